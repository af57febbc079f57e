"""DC, DSA and DM: the layer-wise gradient distance by hand, gradients reaching the synthetic images, siamese
augmentation (one parameter draw shared by the real and the synthetic batch of a class step), the loops."""

import copy
import math

import pytest
import torch

from bench.augment import DSA
from bench.data import load_dataset
from bench.errors import UserError
from bench.models import embed
from bench.registry import create_method, get_method_class
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
