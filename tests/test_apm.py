"""APM: segment accumulation, one-image segments, checkpoints, teacher cadence, subgroups, divergence."""

import pytest
import torch

from bench.data import load_dataset
from bench.errors import Diverged, UserError
from bench.models import create_network
from bench.registry import create_method
from methods.apm import APM, CheckpointRecorder, checkpoint_epochs, image_step
from methods.base import DistillContext


def tiny_networks(count):
    g = torch.Generator().manual_seed(0)
    nets = [create_network("convnet[width=8]", 10, 1, 8, g).double().eval() for _ in range(count)]
    for net in nets:
        net.requires_grad_(False)
    return nets


def gradient(segment, images, labels, batch, teacher, students):
    u = images.clone().requires_grad_(True)
    losses = image_step(u, labels, batch, teacher, students, ce=0.1, segment=segment)
    return u.grad, losses


def test_segment_accumulation_equals_one_segment():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(7, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    teacher, *students = tiny_networks(4)
    batch = torch.tensor([6, 0, 3, 2, 5])  # a subset, in random order, as an update draws it
    whole, losses_whole = gradient(5, images, labels, batch, teacher, students)
    for segment in (1, 2, 3):  # 1: one-image segments keep their batch dimension
        parts, losses = gradient(segment, images, labels, batch, teacher, students)
        assert torch.allclose(parts, whole, rtol=1e-10, atol=1e-12), segment
        assert losses["loss"] == pytest.approx(losses_whole["loss"], rel=1e-10)
    assert whole[[1, 4]].abs().sum() == 0  # images outside the update get no gradient
    assert whole[batch].abs().sum() > 0


def test_image_step_gradient_is_that_of_the_objective_on_the_batch():
    """The segments' gradients, gathered at each segment and scattered into the set's gradient, are autograd's
    gradient of ce·CE(T(u_b), y_b) − Σ_k L1(S_k(u_b), T(u_b)) with respect to the whole set."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(9) % 10
    teacher, *students = tiny_networks(3)
    batch = torch.tensor([8, 1, 4, 0, 6])
    u = images.clone().requires_grad_(True)
    t = teacher(u[batch])
    objective = 0.1 * torch.nn.functional.cross_entropy(t, labels[batch]) - sum(
        torch.nn.functional.l1_loss(s(u[batch]), t) for s in students)
    (expected,) = torch.autograd.grad(objective, u)
    for segment in (5, 2):
        got, _ = gradient(segment, images, labels, batch, teacher, students)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13), segment


class _SavedBytes:
    """Counts the bytes autograd holds saved for backward (live now, and the most at once) while installed."""

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        counter = self

        class Held:
            def __init__(self, tensor):
                self.tensor, self.size = tensor.detach(), tensor.numel() * tensor.element_size()  # no cycle via grad_fn
                counter.live += self.size
                counter.peak = max(counter.peak, counter.live)

            def __del__(self):
                counter.live -= self.size

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize("students", [1, 2, 5])
def test_image_step_holds_one_teacher_graph_and_one_student_graph(students):
    """Peak memory of the image step (what autograd keeps for backward) is one teacher graph and one student graph
    of a segment, whatever K. Each student's graph used to live on through the next forward pass (of the next
    student, or of the next segment's teacher), so three graphs were held at once."""
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    teacher, *rest = tiny_networks(1 + students)
    with _SavedBytes() as one_graph:  # a network's graph on a 3-image segment, as the step builds it
        torch.nn.functional.l1_loss(teacher(images[:3].requires_grad_(True)), torch.zeros(3, 10, dtype=torch.float64))
    with _SavedBytes() as step:
        gradient(3, images, torch.arange(6), torch.arange(6), teacher, rest)
    assert step.live == 0  # every graph freed at the end
    assert 1.9 * one_graph.peak < step.peak < 2.1 * one_graph.peak


def test_image_step_is_ce_minus_disagreement():
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    teacher, s1, s2 = tiny_networks(3)
    _, losses = gradient(3, images, labels, torch.arange(3), teacher, [s1, s2])
    t = teacher(images)
    expected_gap = float(torch.nn.functional.l1_loss(s1(images), t) + torch.nn.functional.l1_loss(s2(images), t))
    expected_ce = float(torch.nn.functional.cross_entropy(t, labels))
    assert losses["disagreement"] == pytest.approx(expected_gap)
    assert losses["loss"] == pytest.approx(0.1 * expected_ce - expected_gap)


def test_checkpoints_are_evenly_spaced_and_frozen():
    assert checkpoint_epochs(250, 5) == [50, 100, 150, 200, 250]
    assert checkpoint_epochs(10, 3) == [3, 6, 10]
    with pytest.raises(UserError):
        checkpoint_epochs(4, 5)
    net = torch.nn.Linear(2, 2)
    recorder = CheckpointRecorder(net, [1, 3])
    for epoch in range(3):
        with torch.no_grad():
            net.weight.add_(1.0)
        recorder(epoch, 0.0)
    assert len(recorder.saved) == 2
    assert not torch.equal(recorder.saved[0].weight, recorder.saved[1].weight)
    assert not any(p.requires_grad for p in recorder.saved[0].parameters())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def context(dataset, ipc=1, seed=0):
    return DistillContext(dataset, ipc, "convnet", torch.Generator().manual_seed(seed), torch.device("cpu"), quick=True)


def test_teacher_and_student_every_mid_gap_plus_one(digits, monkeypatch):
    trained = []
    original = APM.train_students

    def spy(self, ctx, images, teacher, generator):
        trained.append(len(images))
        return original(self, ctx, images, teacher, generator)

    monkeypatch.setattr(APM, "train_students", spy)
    create_method("apm", quick=True, **dict(APM.smoke, iterations=7, mid_gap=2)).distill(context(digits))
    assert trained == [10, 10, 10]  # iterations 0, 3, 6


def test_subgroups_merge_class_balanced_sets(digits):
    out = create_method("apm", quick=True, **dict(APM.smoke, subgroups=2)).distill(context(digits, ipc=2))
    assert out.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert not torch.equal(out.images[0], out.images[1])
    with pytest.raises(UserError, match="subgroups"):
        create_method("apm", quick=True, **dict(APM.smoke, subgroups=2)).distill(context(digits, ipc=3))


def test_subgroups_split_into_parts_that_merge_to_the_same_set(digits):
    """Distilled as separate tasks (each part in a context of its own), the subgroups merge to exactly the set
    that one process distils — the contract that lets the harness spread them over workers."""
    method = create_method("apm", quick=True, **dict(APM.smoke, subgroups=3))
    whole = method.distill(context(digits, ipc=3))
    parts = method.split(3, torch.Generator().manual_seed(0))
    assert [(p.ipc, p.method.config.subgroups) for p in parts] == [(1, 1)] * 3
    assert len({p.seed for p in parts}) == 3
    pieces = []
    for part in parts:
        ctx = context(digits, ipc=part.ipc)
        ctx.generator = torch.Generator().manual_seed(part.seed)
        pieces.append(part.method.distill(ctx))
    merged = method.merge(pieces)
    assert torch.equal(merged.images, whole.images) and torch.equal(merged.labels, whole.labels)
    assert create_method("apm", quick=True, **APM.smoke).split(3, torch.Generator()) is None


def test_divergence_is_detected(digits):
    with pytest.raises(Diverged):
        create_method("apm", quick=True, **dict(APM.smoke, lr_img=1e38)).distill(context(digits))


def test_soft_protocol_gets_the_recipe_lr(digits):
    from bench.evaluate import get_protocol
    from bench.runner import protocol_for

    out = create_method("apm.cifar10_ipc50", quick=True, **APM.smoke).distill(context(digits))
    assert protocol_for(get_protocol("soft"), out, quick=False).lr == 0.02
    assert protocol_for(get_protocol("soft"), out, quick=False).epochs == 1000
    assert protocol_for(get_protocol("standard"), out, quick=False).lr == 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_host_set_with_networks_on_the_gpu(digits):
    """The set in host memory, the networks on the GPU: each segment goes to the GPU and its gradient comes back,
    the same gradient as with the set on the GPU; a whole (smoke) distillation runs so, and its set stays on the
    host."""
    device = torch.device("cuda:0")
    g = torch.Generator().manual_seed(2)
    images = torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(9) % 10
    teacher, *students = [net.to(device) for net in tiny_networks(3)]
    batch = torch.tensor([8, 1, 4, 0, 6])
    host = images.clone().requires_grad_(True)
    host_losses = image_step(host, labels, batch, teacher, students, ce=0.1, segment=2, device=device)
    gpu = images.to(device).requires_grad_(True)
    gpu_losses = image_step(gpu, labels.to(device), batch.to(device), teacher, students, ce=0.1, segment=2)
    assert host.grad.device.type == "cpu"
    torch.testing.assert_close(host.grad, gpu.grad.cpu(), rtol=1e-9, atol=1e-12)
    assert host_losses == pytest.approx(gpu_losses, rel=1e-9)
    ctx = DistillContext(digits.to(device), 1, "convnet", torch.Generator().manual_seed(0), device, quick=True)
    distilled = APM(APM.Config(**APM.smoke)).distill(ctx)
    assert distilled.images.device.type == "cpu" and distilled.images.shape[0] == 10
