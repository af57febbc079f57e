"""DC, DSA and DM: the layer-wise gradient distance by hand, gradients reaching the synthetic images, siamese
augmentation (one parameter draw shared by the real and the synthetic batch of a class step), the loops."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import DSA
from bench.data import load_dataset
from bench.errors import UserError
from bench.models import embed
from bench.registry import create_method, get_method_class
from methods import dc as dc_module
from methods.base import DistillContext
from methods.dc import BN_IMAGES_PER_CLASS, batchnorm_layers, freeze_batchnorm, gradient_distance, initial_images, layer_distance

IPC = 2
EPS = 1e-6


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def context(dataset, seed=0, arch="convnet", ipc=IPC):
    return DistillContext(dataset, ipc, arch, torch.Generator().manual_seed(seed), torch.device("cpu"), quick=True)


def smoke_method(name, **overrides):
    return create_method(name, quick=True, **{**get_method_class(name).smoke, **overrides})


# -- the distance ------------------------------------------------------------------------------------------------


def test_layer_distance_linear_by_hand():
    # A linear weight's gradient (out=2, in=3): rows are output channels.
    real = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    syn = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # row 0: orthogonal → 1 − 0; row 1: identical → 1 − 2 / (√2·√2 + 1e-6)
    expected = (1 - 0.0 / (1 * 1 + EPS)) + (1 - 2.0 / (math.sqrt(2) * math.sqrt(2) + EPS))
    assert float(layer_distance(real, syn)) == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx(1.0, abs=1e-5)
    # Per output channel, not per input column: the transposed reading (three rows, the last zero in both) gives
    # another number.
    columns = float(layer_distance(real.T.contiguous(), syn.T.contiguous()))
    assert columns == pytest.approx(1.586, abs=1e-3)
    assert float(layer_distance(real, syn)) != pytest.approx(columns, abs=1e-3)


def test_layer_distance_conv_by_hand():
    # A conv weight's gradient (out=2, in=1, kh=2, kw=1) → rows (1, 2) and (0, 1) vs (2, 1) and (1, 0).
    real = torch.tensor([1.0, 2.0, 0.0, 1.0]).reshape(2, 1, 2, 1)
    syn = torch.tensor([2.0, 1.0, 1.0, 0.0]).reshape(2, 1, 2, 1)
    expected = (1 - 4.0 / (math.sqrt(5) * math.sqrt(5) + EPS)) + (1 - 0.0 / (1 * 1 + EPS))
    assert float(layer_distance(real, syn)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.2, abs=1e-5)


def test_layer_distance_skips_1d_and_sums_layers():
    bias_real, bias_syn = torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 5.0])
    assert float(layer_distance(bias_real, bias_syn)) == 0.0
    weight = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # one orthogonal row: distance 1
    total = gradient_distance([weight[0], bias_real], [weight[1], bias_syn])
    assert float(total) == pytest.approx(1.0, abs=1e-6)


def test_layer_distance_of_a_gradient_with_itself_is_zero():
    g = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    assert float(layer_distance(g, g.clone())) == pytest.approx(0.0, abs=1e-5)


def official_match_loss(grads_real, grads_syn):
    """``match_loss(..., dis_metric='ours')`` of the official utils.py: ``distance_wb`` summed over every parameter."""
    total = grads_syn[0].new_zeros(())
    for real, syn in zip(grads_real, grads_syn):
        if real.dim() == 1:
            continue
        a, b = real.reshape(real.shape[0], -1), syn.reshape(syn.shape[0], -1)
        total = total + torch.sum(1 - torch.sum(a * b, dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1) + 0.000001))
    return total


def first_classes(dataset, classes, dtype):
    """The dataset restricted to its first ``classes`` classes, its images cast to ``dtype``."""
    train, test = dataset.train_labels < classes, dataset.test_labels < classes
    return dataclasses.replace(
        dataset, info=dataclasses.replace(dataset.info, num_classes=classes),
        train_images=dataset.train_images[train].to(dtype), train_labels=dataset.train_labels[train],
        test_images=dataset.test_images[test].to(dtype), test_labels=dataset.test_labels[test],
        class_names=dataset.class_names[:classes],
    )


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_matching_loss_is_the_official_sum_over_every_parameter_and_class(name, digits):
    """A real ConvNet (two conv layers and a classifier, biases and norm weights) in float64, three classes: per
    class, the gradients of CE on the real batch and on the synthetic images w.r.t. every parameter, the official
    distance of each parameter (1-D ones 0), summed over parameters and classes — computed here with the same real
    batches and siamese draws (the context's generator replayed) — equals ``matching_loss``, and so does its
    gradient in the synthetic images."""
    classes, batch_real = 3, 32
    data = first_classes(digits, classes, torch.float64)
    method = smoke_method(name, batch_real=batch_real)
    ctx = context(data, seed=11, arch="convnet[depth=2,width=16]")
    net = ctx.make_network().double().train()
    params = list(net.parameters())
    assert sum(p.dim() > 1 for p in params) == 3 and any(p.dim() == 1 for p in params)
    images = torch.randn(classes * IPC, *data.image_shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    augment = ctx.augmentation() if method.config.dsa else None
    replay = torch.Generator().set_state(ctx.generator.get_state())

    loss = method.matching_loss(net, images, ctx, augment)

    expected = images.new_zeros(())
    for c in range(classes):
        real, syn = data.sample_class(c, batch_real, replay), images[c * IPC : (c + 1) * IPC]
        if augment is not None:
            drawn = augment.siamese(real, replay)
            real, syn = augment.apply(real, drawn), augment.apply(syn, drawn)
        ce_real = F.cross_entropy(net(real), torch.full((len(real),), c))
        ce_syn = F.cross_entropy(net(syn), torch.full((len(syn),), c))
        grads_real = [g.detach() for g in torch.autograd.grad(ce_real, params)]
        grads_syn = torch.autograd.grad(ce_syn, params, create_graph=True)
        expected = expected + official_match_loss(grads_real, grads_syn)
    assert loss.dtype == torch.float64
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, images)
    (expected_grad,) = torch.autograd.grad(expected, images)
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-15)


# -- loops -----------------------------------------------------------------------------------------------------------


def test_loops_follow_get_loops_and_scale():
    dc = create_method("dc")
    assert dc.loops(1) == (1, 1) and dc.loops(10) == (10, 50) and dc.loops(50) == (50, 10)
    assert create_method("dc", loop_scale=0.2).loops(10) == (2, 10)
    assert create_method("dc", loop_scale=0.2).loops(1) == (1, 1)
    assert create_method("dc", inner_loop=5).loops(10) == (10, 5)
    assert create_method("dc", outer_loop=3, inner_loop=4).loops(7) == (3, 4)
    with pytest.raises(UserError, match="ipc 7"):
        dc.loops(7)


def test_dsa_is_dc_with_augmentation_and_real_init():
    dc_cls, dsa_cls = get_method_class("dc"), get_method_class("dsa")
    assert issubclass(dsa_cls, dc_cls) and dsa_cls.distill is dc_cls.distill
    dsa = create_method("dsa")
    assert dsa.config.dsa is True and dsa.config.init == "real"
    assert create_method("dc").config.dsa is False and create_method("dc").config.init == "noise"


def test_defaults_and_recipes_are_the_official_hyperparameters():
    """VICO-UoE/DatasetCondensation. DC: main.py's argparse defaults (Iteration 1000, lr_img 0.1, lr_net 0.01,
    batch_real and batch_train 256, init noise), its image optimiser SGD(momentum=0.5), utils.get_loops. DSA:
    main.py --method DSA with the readme's --init real and main.py's lr_img. DM: main_DM.py's defaults (Iteration
    20000, lr_img 1.0, batch_real 256, init real, DSA on) and image optimiser SGD(momentum=0.5); the readme's lr_img
    10 for CIFAR-10 at ipc 100/200/500/1000/1250 and 1 for CIFAR-100 at ipc 1/10/50/100/125."""
    get_loops = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    datasets = ("mnist", "fashion_mnist", "svhn", "cifar10", "cifar100")

    dc = get_method_class("dc").Config()
    assert (dc.iterations, dc.lr_img, dc.img_momentum, dc.lr_net, dc.batch_real, dc.batch_train, dc.init, dc.dsa) == (
        1000, 0.1, 0.5, 0.01, 256, 256, "noise", False)
    assert (dc.outer_loop, dc.inner_loop, dc.loop_scale) == (None, None, 1.0)
    assert dc_module.LOOPS_BY_IPC == get_loops
    assert dc_module.BN_IMAGES_PER_CLASS == 16
    for ipc, loops in get_loops.items():
        assert create_method("dc").loops(ipc) == loops

    dsa = get_method_class("dsa").Config()
    assert (dsa.iterations, dsa.lr_img, dsa.img_momentum, dsa.lr_net, dsa.batch_real, dsa.batch_train, dsa.init,
            dsa.dsa) == (1000, 0.1, 0.5, 0.01, 256, 256, "real", True)

    for name, init, dsa_on in (("dc", "noise", False), ("dsa", "real", True)):
        for dataset in datasets:
            for ipc in (1, 10, 50):
                method = create_method(f"{name}.{dataset}_ipc{ipc}")
                cfg = method.config
                assert method.loops(ipc) == get_loops[ipc], (name, dataset, ipc)
                assert (cfg.iterations, cfg.lr_img, cfg.img_momentum, cfg.lr_net, cfg.batch_real, cfg.batch_train,
                        cfg.init, cfg.dsa) == (1000, 0.1, 0.5, 0.01, 256, 256, init, dsa_on), (name, dataset, ipc)

    dm = get_method_class("dm").Config()
    assert (dm.iterations, dm.lr_img, dm.img_momentum, dm.batch_real, dm.init, dm.dsa) == (20000, 1.0, 0.5, 256, "real", True)
    lr_by_recipe = {
        **{f"{dataset}_ipc{ipc}": 1.0 for dataset in datasets for ipc in (1, 10, 50)},
        **{f"cifar10_ipc{ipc}": 10.0 for ipc in (100, 200, 500, 1000, 1250)},
        **{f"cifar100_ipc{ipc}": 1.0 for ipc in (100, 125)},
    }
    for recipe, lr_img in lr_by_recipe.items():
        cfg = create_method(f"dm.{recipe}").config
        assert (cfg.iterations, cfg.lr_img, cfg.img_momentum, cfg.batch_real, cfg.init, cfg.dsa) == (
            20000, lr_img, 0.5, 256, "real", True), recipe


@pytest.mark.parametrize("name", ["dc", "dm"])
def test_optimisers_use_the_configured_hyperparameters(name, digits, monkeypatch):
    """The images' optimiser is SGD(lr_img, momentum img_momentum) (official: SGD([image_syn], lr=args.lr_img,
    momentum=0.5)); DC's inner training is SGD(lr_net) without momentum or weight decay (official main.py). Unusual
    values, so that a constant written in the code instead of the config shows."""
    made = []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            params = list(params)
            made.append((params, kwargs))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    inner = {"outer_loop": 2, "inner_loop": 1, "lr_net": 0.02} if name == "dc" else {}
    out = smoke_method(name, iterations=1, lr_img=0.3, img_momentum=0.7, **inner).distill(context(digits))
    (images,), kwargs = made[0]
    assert images.shape == out.images.shape
    assert (kwargs["lr"], kwargs["momentum"], kwargs.get("weight_decay", 0)) == (0.3, 0.7, 0)
    if name == "dc":
        assert len(made) > 1
        assert all((kw["lr"], kw.get("momentum", 0), kw.get("weight_decay", 0)) == (0.02, 0, 0) for _, kw in made[1:])
    else:
        assert len(made) == 1


# -- gradients reach the synthetic images -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dc", "dsa", "dm"])
def test_matching_loss_reaches_every_synthetic_image(name, digits):
    method = smoke_method(name)
    ctx = context(digits)
    images, _ = ctx.real_init()
    images.requires_grad_(True)
    net = ctx.make_network()
    net.train()
    if name == "dm":
        net.requires_grad_(False)
    augment = ctx.augmentation() if method.config.dsa else None
    loss = method.matching_loss(net, images, ctx, augment)
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert images.grad is not None
    per_image = images.grad.flatten(1).abs().sum(dim=1)
    assert (per_image > 0).all(), "some synthetic image received no gradient"


@pytest.mark.parametrize("name", ["dc", "dsa", "dm"])
def test_one_iteration_changes_the_images(name, digits):
    method = smoke_method(name, iterations=1)
    out = method.distill(context(digits, seed=3))
    initial, labels = initial_images(context(digits, seed=3), method.config.init)  # the same draws come first
    assert out.images.shape == initial.shape and torch.equal(out.labels, labels)
    assert not torch.allclose(out.images, initial), "one iteration left the images unchanged"
    assert torch.isfinite(out.images).all()


def test_dm_loss_is_the_squared_distance_of_class_means(digits):
    method = smoke_method("dm", dsa=False)
    ctx = context(digits, seed=5)
    images, _ = ctx.real_init()
    net = ctx.make_network()
    net.requires_grad_(False)
    state = ctx.generator.get_state()
    loss = method.matching_loss(net, images, ctx, None)
    ctx.generator.set_state(state)  # replay the same real batches
    expected = 0.0
    for c in range(digits.num_classes):
        real = digits.sample_class(c, method.config.batch_real, ctx.generator)
        diff = embed(net, real).mean(0) - embed(net, images[c * IPC : (c + 1) * IPC]).mean(0)
        expected += float((diff**2).sum())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_dm_batchnorm_network_embeds_classes_jointly(digits):
    method = smoke_method("dm")
    ctx = context(digits, arch="convnet_bn")
    images, _ = ctx.real_init()
    images.requires_grad_(True)
    net = ctx.make_network()
    net.train()
    net.requires_grad_(False)
    calls = []
    handle = net.features.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    loss = method.matching_loss(net, images, ctx, ctx.augmentation())
    handle.remove()
    loss.backward()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()
    assert IPC * digits.num_classes in calls  # one synthetic batch holding every class


# -- siamese augmentation --------------------------------------------------------------------------------------------


def record_apply(monkeypatch):
    calls = []
    original = DSA.apply

    def apply(self, x, params):
        calls.append((params, x.shape[0]))
        return original(self, x, params)

    monkeypatch.setattr(DSA, "apply", apply)
    return calls


@pytest.mark.parametrize("name", ["dsa", "dm"])
def test_siamese_parameters_are_shared_within_a_class_step(name, digits, monkeypatch):
    method = smoke_method(name)
    ctx = context(digits)
    images, _ = ctx.real_init()
    images.requires_grad_(True)
    net = ctx.make_network()
    if name == "dm":
        net.requires_grad_(False)
    calls = record_apply(monkeypatch)
    method.matching_loss(net, images, ctx, ctx.augmentation())
    classes = digits.num_classes
    assert len(calls) == 2 * classes  # a real and a synthetic batch per class step
    batch_real = min(method.config.batch_real, min(digits.class_counts()))
    for c in range(classes):
        (params_real, n_real), (params_syn, n_syn) = calls[2 * c], calls[2 * c + 1]
        assert params_real is params_syn, f"class {c}: real and synthetic batch augmented differently"
        assert n_real == batch_real and n_syn == IPC
        assert all(v.shape[0] == 1 for v in params_real.values.values())  # batch-wide parameters
    draws = [calls[2 * c][0] for c in range(classes)]
    assert len({id(p) for p in draws}) == classes  # a fresh draw per class step


def test_dsa_inner_training_augments_and_dc_does_not(digits, monkeypatch):
    calls = record_apply(monkeypatch)
    smoke_method("dc", iterations=1).distill(context(digits))
    assert calls == []
    smoke_method("dsa", iterations=1).distill(context(digits))
    per_image = [p for p, n in calls if any(v.shape[0] == n and n > 1 for v in p.values.values())]
    assert per_image, "the inner training of DSA should use (per-image, non-siamese) DSA"


def test_dc_freezes_batchnorm_statistics_on_real_data(digits):
    """The running statistics are those of one forward pass, in training mode, of BN_IMAGES_PER_CLASS real images
    of every class drawn with the context's generator (replayed here on a twin network); then they are frozen."""
    ctx = context(digits, arch="convnet_bn")
    net = ctx.make_network()
    twin = copy.deepcopy(net)
    replay = torch.Generator().set_state(ctx.generator.get_state())
    layers = batchnorm_layers(net)
    assert layers and all(layer.training for layer in layers)
    freeze_batchnorm(net, ctx)
    assert not any(layer.training for layer in layers)
    assert any(float(layer.running_mean.abs().sum()) > 0 for layer in layers)
    real = torch.cat([digits.sample_class(c, BN_IMAGES_PER_CLASS, replay) for c in range(digits.num_classes)])
    with torch.no_grad():
        twin.train()(real)
    for frozen, replayed in zip(layers, batchnorm_layers(twin)):
        assert torch.equal(frozen.running_mean, replayed.running_mean)
        assert torch.equal(frozen.running_var, replayed.running_var)
    out = smoke_method("dc", iterations=1).distill(context(digits, arch="convnet_bn"))
    assert torch.isfinite(out.images).all()


def test_dc_refreezes_batchnorm_before_every_image_step(digits, monkeypatch):
    """Official main.py sets and freezes the BatchNorm statistics at the top of every outer-loop step: once per image
    step, just before it — the inner training in between puts the network back in training mode, so every matching
    loss must find the statistics frozen again."""
    events = []
    freeze, matching_loss = dc_module.freeze_batchnorm, get_method_class("dc").matching_loss

    def counting_freeze(net, ctx):
        events.append("freeze")
        freeze(net, ctx)

    def checking_matching_loss(self, net, images, ctx, augment):
        events.append("match" if not any(layer.training for layer in batchnorm_layers(net)) else "match, BN training")
        return matching_loss(self, net, images, ctx, augment)

    monkeypatch.setattr(dc_module, "freeze_batchnorm", counting_freeze)
    monkeypatch.setattr(get_method_class("dc"), "matching_loss", checking_matching_loss)
    iterations, outer_loop = 2, 3
    smoke_method("dc", iterations=iterations, outer_loop=outer_loop, inner_loop=1).distill(context(digits, arch="convnet_bn"))
    assert events == ["freeze", "match"] * (iterations * outer_loop)
