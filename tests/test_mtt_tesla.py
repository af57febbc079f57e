"""MTT and TESLA: TESLA's constant-memory gradient equals MTT's unrolled one; divergence is caught; the learned
lr and TESLA's soft labels reach the distilled set."""

import pytest
import torch

from bench.augment import DSA
from bench.data import load_dataset
from bench.errors import Diverged, UserError
from bench.evaluate import get_protocol
from bench.models import create_network
from bench.registry import create_method, get_method_class
from bench.runner import RunRequest, protocol_for, run
from methods.base import DistillContext
from methods.mtt import MTT, FlatParams, constant_memory_gradient, plan_student_steps, unrolled_gradient
from methods.tesla import TESLA


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def context(dataset, ipc=1, seed=0):
    return DistillContext(dataset, ipc, "convnet", torch.Generator().manual_seed(seed), torch.device("cpu"), quick=True)


def smoke(name, **overrides):
    return create_method(name, quick=True, **{**get_method_class(name).smoke, **overrides})


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------------------
# The gradients


def tiny_problem(seed, soft):
    """float64: a width-8 depth-1 ConvNet, 2 classes × 2 images of 1×8×8, an expert-like start and target."""
    g = torch.Generator().manual_seed(seed)
    model = create_network("convnet[width=8,depth=1]", 2, 1, 8, g).double()
    layout = FlatParams(model)
    images = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    if soft:
        targets = torch.randn(4, 2, generator=g, dtype=torch.float64).softmax(1)
    theta_start = layout.flatten(dict(model.named_parameters())).detach()
    theta_target = theta_start + 0.05 * torch.randn(layout.size, generator=g, dtype=torch.float64)
    return model, layout, images, targets, theta_start, theta_target, g


@pytest.mark.parametrize("augmented", [False, True], ids=["no-aug", "dsa"])
@pytest.mark.parametrize("batch_syn", [None, 3], ids=["all", "batch3"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_tesla_gradient_equals_unrolled_mtt(augmented, batch_syn, soft):
    model, layout, images, targets, theta_start, theta_target, g = tiny_problem(0, soft)
    augment = DSA.for_dataset(digit_like=False) if augmented else None
    steps = plan_student_steps(len(images), 5, batch_syn, (8, 8), augment, g)  # the same draws for both
    alpha = torch.tensor(0.05, dtype=torch.float64)
    mtt = unrolled_gradient(model, layout, images, targets, alpha, theta_start, theta_target, steps, augment)
    tesla = constant_memory_gradient(model, layout, images, targets, alpha, theta_start, theta_target, steps, augment)
    assert relative_error(tesla.loss, mtt.loss) < 1e-10
    assert mtt.images.norm() > 0 and mtt.lr.abs() > 0
    # Exact in float64 up to rounding: far inside the 1e-4 the issue asks for.
    assert relative_error(tesla.images, mtt.images) < 1e-10
    assert relative_error(tesla.lr, mtt.lr) < 1e-10


def test_each_method_uses_its_gradient():
    assert MTT.gradient is unrolled_gradient
    assert TESLA.gradient is constant_memory_gradient
    assert issubclass(TESLA, MTT)


def test_student_steps_cycle_through_permutations():
    g = torch.Generator().manual_seed(0)
    steps = plan_student_steps(10, 5, 4, (8, 8), None, g)
    assert [len(s.indices) for s in steps] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat([s.indices for s in steps[:3]]).tolist()) == list(range(10))
    assert all(s.augment is None for s in steps)


def test_mtt_and_tesla_distil_the_same_set_without_soft_labels(digits):
    mtt = smoke("mtt").distill(context(digits))
    tesla = smoke("tesla", soft_labels=False, iterations=3).distill(context(digits))
    assert tesla.soft_labels is None
    assert torch.allclose(mtt.images, tesla.images, rtol=1e-3, atol=1e-4)
    assert mtt.learned_lr == pytest.approx(tesla.learned_lr, rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Divergence and configuration errors


@pytest.mark.parametrize("name", ["mtt", "tesla"])
@pytest.mark.parametrize("option", [{"lr_img": 1e20}, {"lr_lr": 1e6}], ids=["lr_img", "lr_lr"])
def test_huge_learning_rates_stop_as_diverged(name, option, digits):
    with pytest.raises(Diverged):
        smoke(name, iterations=5, **option).distill(context(digits))


def test_divergence_is_recorded_with_status_diverged(tmp_path):
    request = RunRequest("digits", ["mtt"], [1], ["convnet"], [0], tmp_path, quick=True,
                         method_options={"mtt": {**MTT.smoke, "iterations": 5, "lr_lr": 1e6}})
    records = run(request, echo=lambda message: None)
    assert [r["status"] for r in records] == ["diverged"]
    assert "learning rate" in records[0]["error"] and records[0]["acc"] == []


def test_buffers_are_refused(digits):
    with pytest.raises(UserError, match="buffers"):
        FlatParams(create_network("convnet_bn", 10, 1, 8, torch.Generator().manual_seed(0)))


def test_start_epochs_must_fit_in_the_trajectories(digits):
    method = smoke("mtt", max_start_epoch=2, expert_epochs=2, expert_train_epochs=2)
    with pytest.raises(UserError, match="max_start_epoch"):
        method.distill(context(digits))


# ------------------------------------------------------------------------------------------------------------
# What reaches the distilled set


def test_mtt_learns_a_positive_lr_that_the_standard_protocol_uses(digits):
    method = smoke("mtt", iterations=3, lr_lr=1e-3)
    out = method.distill(context(digits))
    assert out.learned_lr is not None and out.learned_lr > 0
    assert out.learned_lr != pytest.approx(method.config.lr_teacher)  # it was learned
    assert out.soft_labels is None
    assert protocol_for(get_protocol("standard"), out, quick=True).lr == out.learned_lr


def test_tesla_soft_labels_are_the_experts_logits(digits):
    method = smoke("tesla")
    ctx = context(digits)
    out = method.distill(ctx)
    assert method.config.soft_labels is True
    assert out.soft_labels is not None and out.soft_labels.shape == (10, 10)
    cfg = method.config
    pool = ctx.experts("mtt", cfg.num_experts, epochs=cfg.expert_train_epochs)
    expert = create_network("convnet", 10, 1, 8, torch.Generator().manual_seed(0))
    expert.load_state_dict(pool.trajectory(0)[cfg.max_start_epoch - 1 + cfg.expert_epochs])
    initial, _ = context(digits).real_init()  # the same draw as the distillation's initial images
    with torch.no_grad():
        assert torch.allclose(out.soft_labels, expert(initial), atol=1e-5)
    # evaluated as TESLA's code evaluates: cross-entropy on their softmax (KL at temperature 1), at the learned lr
    soft = protocol_for(get_protocol("soft"), out, quick=True)
    assert (soft.loss, soft.temperature, soft.lr) == ("kl", 1.0, out.learned_lr)
    hard = smoke("tesla", soft_labels=False).distill(context(digits))
    assert hard.soft_labels is None and protocol_for(get_protocol("soft"), hard, quick=True).loss == "l1"
