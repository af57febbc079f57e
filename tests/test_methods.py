"""The coreset baselines through the method interface."""

import torch

from bench.data import load_dataset
from bench.errors import Diverged
from bench.registry import create_method
from methods.base import DistillContext
from methods.herding import herding_order

import pytest


def context(ipc, seed=0):
    return DistillContext(load_dataset("digits"), ipc, "convnet", torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_random_draws_ipc_real_images_per_class():
    ctx = context(3)
    out = create_method("random").distill(ctx)
    assert out.images.shape == (30, 1, 8, 8) and out.labels.tolist() == [c for c in range(10) for _ in range(3)]
    train = ctx.dataset.train_images.reshape(len(ctx.dataset.train_images), -1)
    for image, label in zip(out.images, out.labels):
        match = (train == image.reshape(1, -1)).all(dim=1).nonzero().flatten()
        assert len(match) >= 1 and int(ctx.dataset.train_labels[match[0]]) == int(label)
    again = create_method("random").distill(context(3))
    assert torch.equal(out.images, again.images)
    other = create_method("random").distill(context(3, seed=1))
    assert not torch.equal(out.images, other.images)


def test_full_is_the_training_set():
    ctx = context(1)
    out = create_method("full").distill(ctx)
    assert torch.equal(out.images, ctx.dataset.train_images)


def test_full_trains_fewer_quick_epochs_and_the_protocol_epochs_otherwise():
    from bench.evaluate import get_protocol
    from bench.runner import protocol_for

    quick = create_method("full", quick=True)
    out = quick.distill(context(1))
    epochs = quick.resolved_config["quick_eval_epochs"]
    for name in ("standard", "soft"):
        resolved = protocol_for(get_protocol(name), out, quick=True)
        assert (resolved.epochs, resolved.decay_epoch) == (epochs, epochs // 2 + 1) and epochs < 300
        assert protocol_for(get_protocol(name), out, quick=True, epochs=7).epochs == 7  # --eval-epochs wins
    full_recipe = create_method("full").distill(context(1))
    assert protocol_for(get_protocol("standard"), full_recipe, quick=False).epochs == 1000
    random_set = create_method("random", quick=True).distill(context(1))
    assert protocol_for(get_protocol("standard"), random_set, quick=True).epochs == 300


def test_herding_order_keeps_the_running_mean_close():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(50, 4, generator=g)
    order = herding_order(features, 5)
    assert len(set(order)) == 5
    mean = features.mean(0)
    first = int(((features - mean) ** 2).sum(1).argmin())
    assert order[0] == first  # step 1: the image closest to the mean
    herded = (features[order].mean(0) - mean).norm()
    random_pick = (features[:5].mean(0) - mean).norm()
    assert herded < random_pick


def test_herding_order_by_hand():
    """Mean 0.64. Step 1: 1.0, the point nearest the mean. Step 2: the point x with (1.0 + x)/2 nearest 0.64 is
    -0.6 (0.2, off by 0.44), not 1.2 (1.1, off by 0.46), though 1.2 is nearer the mean itself. Step 3: 1.2
    ((0.4 + 1.2)/3 = 0.53), step 4: 3.0 ((1.6 + 3.0)/4 = 1.15 against (1.6 - 1.4)/4 = 0.05), then -1.4. Picking the
    points nearest the mean would give 0, 1, 2, 4, 3."""
    features = torch.tensor([[1.0], [1.2], [-0.6], [3.0], [-1.4]])
    assert herding_order(features, 5) == [0, 2, 1, 3, 4]
    assert herding_order(features, 2) == [0, 2]


def test_herding_distills_real_images():
    ctx = context(2)
    out = create_method("herding", quick=True, embed_epochs=2).distill(ctx)
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == [c for c in range(10) for _ in range(2)]
    train = ctx.dataset.train_images.reshape(len(ctx.dataset.train_images), -1)
    for image, label in zip(out.images, out.labels):
        match = (train == image.reshape(1, -1)).all(dim=1).nonzero().flatten()
        assert len(match) >= 1 and int(ctx.dataset.train_labels[match[0]]) == int(label)
    assert len({tuple(image.flatten().tolist()) for image in out.images}) == 20  # no image picked twice


def test_report_detects_nan():
    ctx = context(1)
    ctx.report(0, loss=1.0)
    with pytest.raises(Diverged, match="loss"):
        ctx.report(1, loss=float("nan"))


TINY_VIT = "vit_tiny_cifar[depth=1,embed_dim=32,num_heads=2]"


@pytest.mark.parametrize("name, options", [
    ("dc", {"iterations": 1, "outer_loop": 1, "inner_loop": 1, "batch_real": 16}),
    ("tesla", {"iterations": 1, "num_experts": 1, "expert_train_epochs": 1, "syn_steps": 2, "expert_epochs": 1,
               "max_start_epoch": 1}),
])
def test_second_order_methods_distil_with_attention(name, options, tmp_path):
    """Gradient matching and unrolled students differentiate a backward pass; the fused attention kernels have
    no derivative of theirs (RuntimeError on a ViT), so the harness runs these methods with the math kernel."""
    from bench.runner import RunRequest, distill_cell, plan

    request = RunRequest("digits", [name], [1], [], [], tmp_path, quick=True, isolate=False, distill_arch=TINY_VIT,
                         cache_dir=str(tmp_path / "cache"), method_options={name: options})
    (cell,) = plan(request)
    assert cell.method.second_order
    distilled = distill_cell(cell, request, torch.device("cpu"), {})
    assert distilled.images.shape == (10, 1, 8, 8) and torch.isfinite(distilled.images).all()
