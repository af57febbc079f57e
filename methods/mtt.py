"""MTT — Matching Training Trajectories (Cazenavette, Wang, Torralba, Efros & Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022; official code ``GeorgeCazenavette/mtt-distillation``).

Idea: a network trained for a few steps on the synthetic set should land where a network trained for a few
*epochs* on the real set landed. Experts (``bench.experts``, recipe ``mtt``) are trained on the real data once
and their parameters kept after every epoch: trajectories θ*_0 … θ*_E. Each distillation iteration

1. picks an expert and a start epoch t ∈ [0, ``max_start_epoch``); θ_0 = θ*_t, the target θ*_{t+M} with
   M = ``expert_epochs``;
2. trains a *student* from θ_0 for N = ``syn_steps`` SGD steps on mini-batches of the synthetic images
   (``batch_syn``; a fresh random permutation split into batches), each batch DSA-augmented with per-image
   parameters, cross-entropy on the labels, with a *learnable* step size α (initialised to ``lr_teacher``):
   θ_{i+1} = θ_i − α ∇_θ CE(θ_i; X_i);
3. measures  L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²  (the student's distance to the target, relative to
   the start's);
4. back-propagates L through all N student steps into the pixels (SGD ``lr_img``, momentum 0.5) and into α
   (SGD ``lr_lr``, momentum 0.5). The learned α is handed to the evaluation as its learning rate.

The student is run functionally — one flat parameter vector, reshaped into the network's named parameters and
passed to ``torch.func.functional_call`` — so the N steps form one differentiable graph. Its memory grows
linearly with N × ``batch_syn``; TESLA (``methods/tesla.py``) computes the same gradient at constant memory by
swapping the ``gradient`` strategy of this class (``unrolled_gradient`` ↔ ``constant_memory_gradient``).

Design decisions and deviations from the official code:

* The set returned is the one after the *last* iteration. The official code evaluates on the test set during
  distillation and saves the best-on-test images; selecting by test accuracy is not done here.
* Randomness (expert, start epoch, batch order, DSA parameters, noise init) comes from the context's generator.
  The expert is drawn uniformly at every iteration (the official ``--load_all`` behaviour; without it the code
  walks shuffled buffer files in order).
* The loss omits the official code's division of numerator and denominator by the parameter count (it cancels).
* Architectures with buffers (BatchNorm running statistics) are refused with a clear error: functional
  unrolling with running statistics is out of scope. The community's ConvNet (instance norm = GroupNorm) has
  no buffers.
* Student batches are taken from the permutation in order (the official code pops them from the end — the same
  distribution).
* The initial real images are the generator's first draw, so MTT starts from the images ``random`` returns.
* Failure modes users report of the official code — NaN pixels, a learned α that turns negative or explodes —
  stop the run with ``bench.errors.Diverged`` (status ``diverged``): non-finite pixels, α ≤ 0 or NaN, or
  α > 1000 × ``lr_teacher``. A NaN loss is caught by ``ctx.report``.
* ``benchmarks/memory_trajectory.py`` measures peak memory against N for both gradient strategies.
* With the harness's checkpoints on (``RunRequest.checkpoint_every``), the loop state — pixels, α, both
  optimisers' momentum, the generator — is saved every N iterations and a killed run resumes from it with the
  same result (``MTT.resume``).

Recipes (``recipes`` below) follow the hyper-parameter table linked from the official readme as transcribed in
``notes/methods.md`` §5. That table is an image and could not be read here; the one row the readme states in
text (CIFAR-100 ipc 1: syn_steps 20, expert_epochs 3, max_start_epoch 20, ZCA, lr_img 1000, lr_lr 1e-5,
lr_teacher 0.01) agrees. One row is known wrong: CIFAR-10 ipc 10's lr_img of 1e5 makes α explode, and the
MTT author called it a typo (mtt-distillation issue #31) without giving the right value; ``cifar10_ipc10`` takes
lr_img 100, lr_lr 1e-5, lr_teacher 0.001 from the commands justincui03/dc_benchmark (``methods/tm/readme.md``)
lists as provided by the author. That list disagrees with the transcription in three more places, which are
kept as transcribed, unverified: CIFAR-10 ipc 1 lr_img (100 there, 1000 here), CIFAR-10 ipc 50 lr_teacher (0.001
there, 0.01 here) and Tiny ipc 1 max_start_epoch (10 there, 40 here); pass ``--set`` to try the other values.
Tiny-ImageNet uses ConvNetD4 (``--distill-arch convnetd4``; the architecture is a run option, not part of the
method config). The ``Config`` defaults are that readme example command; fields the command does not set take
the official argparse defaults (5000 iterations, 100 experts of 50 epochs), except ``init``: real images, where
the argparse default is noise: a user reproducing CIFAR-10 ipc 10 reached the paper's accuracy only from real
images (mtt-distillation issue #3), and TESLA's argparse default is real.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bench.augment import DSA, AugmentParams
from bench.distilled import DistilledSet
from bench.errors import Diverged, UserError
from bench.experts import ExpertPool
from bench.registry import register_method
from methods.base import DistillContext, Init, Method, MethodConfig

LR_EXPLOSION = 1e3  # the learned α is called diverged above this multiple of its initial value


@dataclass
class MTTConfig(MethodConfig):
    syn_steps: int = 20  # N: student SGD steps on the synthetic set per iteration
    expert_epochs: int = 3  # M: the target is the expert M epochs after the start epoch
    max_start_epoch: int = 20  # start epochs are drawn from [0, max_start_epoch)
    batch_syn: int | None = None  # synthetic images per student step; None: all of them
    lr_img: float = 1000.0  # SGD learning rate of the pixels
    lr_lr: float = 1e-5  # SGD learning rate of the learnable step size α
    lr_teacher: float = 0.01  # initial value of α, the student's learnable step size
    iterations: int = 5000  # distillation iterations
    num_experts: int = 100  # expert trajectories to train (once, cached) and sample from
    expert_train_epochs: int = 50  # epochs of each expert's trajectory (recipe `mtt`: SGD lr 0.01, no momentum)
    zca: bool = False  # load the dataset ZCA-whitened (read by the runner); the CIFAR recipes turn it on
    init: Init = "real"  # "real": random real images of each class; "noise": standard normal pixels
    img_momentum: float = 0.5  # momentum of the pixels' SGD
    lr_momentum: float = 0.5  # momentum of α's SGD
    dsa: bool = True  # DSA on every student step (per-image parameters); False only for ablations and tests


# ----------------------------------------------------------------------------------------------------------
# The student, run functionally over one flat parameter vector


class FlatParams:
    """The layout of a network's parameters as one flat vector, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module):
        buffers = [name for name, _ in model.named_buffers()]
        if buffers:
            raise UserError(
                f"MTT/TESLA unroll the student functionally over its parameters; this architecture has buffers "
                f"({', '.join(buffers[:3])}{', …' if len(buffers) > 3 else ''}), e.g. BatchNorm running statistics, "
                f"which that does not support. Use an instance-norm or no-norm architecture (e.g. convnet)."
            )
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise UserError(f"expert parameters lack {missing[:3]}: the experts were trained on another architecture")
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        chunks = vector.split(self.numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}


@dataclass
class StudentStep:
    """What one student step trains on: which synthetic images, and the DSA parameters drawn for them."""

    indices: Tensor  # (batch,) int64 indices into the synthetic set (on the CPU)
    augment: AugmentParams | None  # per-image DSA parameters; None: no augmentation


def plan_student_steps(
    n_images: int, syn_steps: int, batch_syn: int | None, image_size: tuple[int, int], augment: DSA | None,
    generator: torch.Generator,
) -> list[StudentStep]:
    """The batches and augmentations of one iteration's ``syn_steps`` student steps, drawn up front.

    As in the official code, a random permutation of the synthetic set is split into batches of ``batch_syn``
    (the last one may be smaller); a fresh permutation is drawn when they run out.
    """
    batch = batch_syn or n_images
    steps: list[StudentStep] = []
    chunks: list[Tensor] = []
    while len(steps) < syn_steps:
        if not chunks:
            chunks = list(torch.randperm(n_images, generator=generator).split(batch))
        indices = chunks.pop(0)
        params = augment.sample(len(indices), image_size, generator) if augment is not None else None
        steps.append(StudentStep(indices, params))
    return steps


def step_input(images: Tensor, step: StudentStep, augment: DSA | None) -> Tensor:
    x = images[step.indices.to(images.device)]
    return augment.apply(x, step.augment) if augment is not None and step.augment is not None else x


def student_loss(model: nn.Module, layout: FlatParams, theta: Tensor, x: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the network with parameters ``theta`` on ``x``; ``targets`` are class indices or
    class probabilities (soft labels)."""
    return F.cross_entropy(functional_call(model, layout.unflatten(theta), (x,)), targets)


# ----------------------------------------------------------------------------------------------------------
# The two gradient strategies: the same loss and gradient, different memory


@dataclass
class MatchingGradient:
    loss: Tensor  # the normalised parameter-matching loss (detached scalar)
    images: Tensor  # dL/d images, shaped like the synthetic set
    lr: Tensor  # dL/dα (scalar)


GradientFn = Callable[..., MatchingGradient]


def unrolled_gradient(
    model: nn.Module, layout: FlatParams, images: Tensor, targets: Tensor, alpha: Tensor, theta_start: Tensor,
    theta_target: Tensor, steps: list[StudentStep], augment: DSA | None,
) -> MatchingGradient:
    """MTT: build the graph of all N student steps, then one backward pass. Memory grows linearly with N."""
    images = images.detach().requires_grad_(True)
    alpha = alpha.detach().requires_grad_(True)
    theta = theta_start.detach().requires_grad_(True)
    for step in steps:
        idx = step.indices.to(images.device)
        ce = student_loss(model, layout, theta, step_input(images, step, augment), targets[idx])
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta = theta - alpha * grad
    loss = matching_loss(theta, theta_start, theta_target)
    grad_images, grad_alpha = torch.autograd.grad(loss, (images, alpha))
    return MatchingGradient(loss.detach(), grad_images, grad_alpha)


def constant_memory_gradient(
    model: nn.Module, layout: FlatParams, images: Tensor, targets: Tensor, alpha: Tensor, theta_start: Tensor,
    theta_target: Tensor, steps: list[StudentStep], augment: DSA | None,
) -> MatchingGradient:
    """TESLA: the exact gradient of ``unrolled_gradient`` with memory that does not grow with N.

    Forward: run the N steps without a graph, keeping only each step's detached parameter vector θ_i (batch
    indices and DSA parameters are already in ``steps``). Backward, one step at a time from the last: with
    v = dL/dθ_{i+1} and g_i = ∇_θ CE(θ_i; X_i) recomputed with a graph,
        dL/dα   += −⟨v, g_i⟩
        dL/dX_i += −α (∂g_i/∂X_i)ᵀ v
        dL/dθ_i  = v − α (∂g_i/∂θ_i)ᵀ v      (a Hessian-vector product)
    Only one step's graph is alive at a time; the stored θ_i cost N parameter vectors, no activations.
    """
    images = images.detach()
    alpha = alpha.detach()
    theta = theta_start.detach()
    thetas: list[Tensor] = []
    for step in steps:
        thetas.append(theta)
        idx = step.indices.to(images.device)
        leaf = theta.clone().requires_grad_(True)
        ce = student_loss(model, layout, leaf, step_input(images, step, augment), targets[idx])
        theta = theta - alpha * torch.autograd.grad(ce, leaf)[0]
    distance = (theta_start - theta_target).pow(2).sum()
    loss = (theta - theta_target).pow(2).sum() / distance
    v = 2 * (theta - theta_target) / distance  # dL/dθ_N
    grad_images = torch.zeros_like(images)
    grad_alpha = torch.zeros_like(alpha)
    for step, theta_i in zip(reversed(steps), reversed(thetas)):
        idx = step.indices.to(images.device)
        leaf = theta_i.clone().requires_grad_(True)
        x = images[idx].requires_grad_(True)
        batch = augment.apply(x, step.augment) if augment is not None and step.augment is not None else x
        grad = torch.autograd.grad(student_loss(model, layout, leaf, batch, targets[idx]), leaf, create_graph=True)[0]
        grad_alpha -= torch.dot(v, grad.detach())
        hvp_theta, vjp_x = torch.autograd.grad(grad, (leaf, x), grad_outputs=-alpha * v)
        grad_images.index_add_(0, idx, vjp_x)
        v = v + hvp_theta
    return MatchingGradient(loss, grad_images, grad_alpha)


def matching_loss(theta_end: Tensor, theta_start: Tensor, theta_target: Tensor) -> Tensor:
    """‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²."""
    return (theta_end - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()


# ----------------------------------------------------------------------------------------------------------
# Expert trajectories as flat vectors


class Trajectories:
    """Flat parameter vectors of the experts' epochs, loaded on demand; the last few experts stay in memory."""

    def __init__(self, pool: ExpertPool, layout: FlatParams, device: torch.device, keep: int = 16):
        self.pool, self.layout, self.device, self.keep = pool, layout, device, keep
        self._cache: OrderedDict[int, list[dict[str, Tensor]]] = OrderedDict()

    def params(self, expert: int, epoch: int) -> Tensor:
        if expert not in self._cache:
            self._cache[expert] = self.pool.trajectory(expert)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(expert)
        return self.layout.flatten(self._cache[expert][epoch]).to(self.device)


# ----------------------------------------------------------------------------------------------------------
# The method


@register_method("mtt")
class MTT(Method):
    Config = MTTConfig
    gradient: ClassVar[GradientFn] = staticmethod(unrolled_gradient)
    second_order = True  # the image gradient flows back through the student's SGD steps

    # notes/methods.md §5, one row per paper setting
    recipes = {
        name: dict(zip(("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "zca", "lr_img", "lr_lr",
                        "lr_teacher"), row))
        for name, row in {
            "cifar10_ipc1": (50, 2, 2, None, True, 1000.0, 1e-7, 0.01),
            # The table's lr_img 1e5 is a typo, its author says (mtt-distillation issue #31: α explodes with it);
            # these are the values of the author-provided commands in justincui03/dc_benchmark (methods/tm).
            "cifar10_ipc10": (30, 2, 20, None, True, 100.0, 1e-5, 0.001),
            "cifar10_ipc50": (30, 2, 40, None, False, 1000.0, 1e-5, 0.01),
            "cifar100_ipc1": (20, 3, 20, None, True, 1000.0, 1e-5, 0.01),
            "cifar100_ipc10": (20, 2, 20, None, False, 1000.0, 1e-5, 0.01),
            "cifar100_ipc50": (80, 2, 40, 125, True, 1000.0, 1e-5, 0.01),
            "tiny_ipc1": (10, 2, 40, None, False, 1e4, 1e-4, 0.01),
            "tiny_ipc10": (20, 2, 40, 200, False, 1e4, 1e-4, 0.01),
            "tiny_ipc50": (20, 2, 40, 300, False, 1e4, 1e-4, 0.01),
        }.items()
    }
    # The CPU-sized copy, applied on top of any recipe and sized for `digits` (8×8, 10 classes, 6 expert SGD
    # steps per epoch): 8 experts of 15 epochs (trained once, cached, shared with TESLA), 300 iterations of 12
    # student steps on batches of ≤ 20 images. lr_img and lr_lr are digits' values: the readme's lr_img 1000
    # scrambles digits' pixels and lr_lr 1e-5 drives α below 0 within two iterations there. In the committed quick
    # run (results/cpu/2026-12-01-amd-epyc/quick/records: 2 cores, two cells side by side, 1 torch thread each):
    # experts 29 s once; distillation 26 s at ipc 1, 41 s at ipc 10.
    quick = dict(iterations=300, num_experts=8, expert_train_epochs=15, syn_steps=12, expert_epochs=2,
                 max_start_epoch=10, batch_syn=20, lr_img=100.0, lr_lr=1e-6)
    smoke = dict(iterations=3, num_experts=2, expert_train_epochs=2, syn_steps=2, expert_epochs=1, max_start_epoch=1)

    def check_network(self, network: nn.Module) -> None:
        FlatParams(network)  # the unrolled student is a function of its parameters alone: no buffers

    def distill(self, ctx: DistillContext) -> DistilledSet:
        cfg: MTTConfig = self.config  # type: ignore[assignment]
        self.check(cfg)
        device = ctx.device
        images, labels = self.initial_images(ctx, cfg)  # first draw: the same real images as `random`
        model = ctx.make_network()  # only its structure is used: the parameters come from the experts
        model.train()
        layout = FlatParams(model)
        pool = ctx.experts("mtt", cfg.num_experts, epochs=cfg.expert_train_epochs)
        trajectories = Trajectories(pool, layout, device)
        targets, soft_labels = self.student_targets(cfg, model, layout, trajectories, images, labels)
        images = images.detach().clone().requires_grad_(True)
        alpha = torch.tensor(cfg.lr_teacher, dtype=images.dtype, device=device, requires_grad=True)
        optimizer_img = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.img_momentum)
        optimizer_lr = torch.optim.SGD([alpha], lr=cfg.lr_lr, momentum=cfg.lr_momentum)
        augment = ctx.augmentation() if cfg.dsa else None
        image_size = (images.shape[2], images.shape[3])

        first = self.resume(ctx, images, alpha, optimizer_img, optimizer_lr)
        ctx.start(cfg.iterations)
        for it in range(first, cfg.iterations):
            expert = int(torch.randint(cfg.num_experts, (1,), generator=ctx.generator))
            start = int(torch.randint(cfg.max_start_epoch, (1,), generator=ctx.generator))
            theta_start = trajectories.params(expert, start)
            theta_target = trajectories.params(expert, start + cfg.expert_epochs)
            steps = plan_student_steps(len(images), cfg.syn_steps, cfg.batch_syn, image_size, augment, ctx.generator)
            result = self.gradient(model, layout, images.detach(), targets, alpha.detach(), theta_start,
                                theta_target, steps, augment)
            ctx.report(it, loss=result.loss, lr=alpha.detach())
            images.grad = result.images
            alpha.grad = result.lr.reshape_as(alpha)
            optimizer_img.step()
            optimizer_lr.step()
            check_state(images, alpha, cfg.lr_teacher, it)
            if it + 1 < cfg.iterations and ctx.checkpoint_due(it + 1):
                ctx.save_checkpoint(it + 1, {
                    "images": images, "alpha": alpha, "optimizer_img": optimizer_img.state_dict(),
                    "optimizer_lr": optimizer_lr.state_dict(), "generator": ctx.generator.get_state(),
                })

        return DistilledSet(images.detach(), labels, soft_labels=soft_labels, learned_lr=float(alpha.detach()))

    @staticmethod
    def resume(ctx: DistillContext, images: Tensor, alpha: Tensor, optimizer_img: torch.optim.Optimizer,
               optimizer_lr: torch.optim.Optimizer) -> int:
        """Restore the loop state of the context's checkpoint, if any; returns the iteration to continue from.

        An iteration carries only the pixels, α, both optimisers' momentum and the generator (the expert, start
        epoch, batches and DSA parameters are drawn afresh each iteration), so a checkpoint may follow any
        iteration. Everything before the loop (initial images, network structure, TESLA's soft labels) is rebuilt
        as in the first run, from the same draws, before the generator is set to its saved state.
        """
        resume = ctx.load_checkpoint()
        if resume is None:
            return 0
        iteration, state = resume
        with torch.no_grad():
            images.copy_(state["images"])
            alpha.copy_(state["alpha"])
        optimizer_img.load_state_dict(state["optimizer_img"])
        optimizer_lr.load_state_dict(state["optimizer_lr"])
        ctx.generator.set_state(state["generator"])
        return iteration

    # -- hooks and checks ------------------------------------------------------------------------------------

    @staticmethod
    def check(cfg: MTTConfig) -> None:
        if cfg.syn_steps < 1 or cfg.expert_epochs < 1 or cfg.max_start_epoch < 1 or cfg.iterations < 1:
            raise UserError("syn_steps, expert_epochs, max_start_epoch and iterations must be at least 1")
        if cfg.max_start_epoch - 1 + cfg.expert_epochs > cfg.expert_train_epochs:
            raise UserError(
                f"max_start_epoch {cfg.max_start_epoch} + expert_epochs {cfg.expert_epochs} reach past the experts' "
                f"{cfg.expert_train_epochs} epochs (need max_start_epoch − 1 + expert_epochs ≤ expert_train_epochs)"
            )
        if cfg.batch_syn is not None and cfg.batch_syn < 1:
            raise UserError(f"batch_syn must be at least 1 or None, got {cfg.batch_syn}")
        if cfg.init not in ("real", "noise"):
            raise UserError(f"init must be 'real' or 'noise', got '{cfg.init}'")
        if not cfg.lr_teacher > 0:
            raise UserError(f"lr_teacher must be positive, got {cfg.lr_teacher}")

    @staticmethod
    def initial_images(ctx: DistillContext, cfg: MTTConfig) -> tuple[Tensor, Tensor]:
        if cfg.init == "real":
            return ctx.real_init()
        labels = ctx.hard_labels(ctx.ipc)
        shape = (len(labels), *ctx.dataset.image_shape)
        return torch.randn(shape, generator=ctx.generator).to(ctx.device), labels

    def student_targets(
        self, cfg: MTTConfig, model: nn.Module, layout: FlatParams, trajectories: Trajectories, images: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """The students' cross-entropy targets, and the soft labels to store (MTT: hard labels, none stored)."""
        return labels, None


def check_state(images: Tensor, alpha: Tensor, initial_lr: float, iteration: int) -> None:
    """Stop with status ``diverged`` on NaN/inf pixels or a learned α that is ≤ 0, NaN or exploded."""
    if not torch.isfinite(images).all():
        raise Diverged(f"the synthetic images contain NaN or infinite values after iteration {iteration}")
    lr = float(alpha.detach())
    if not (lr > 0) or lr != lr:
        raise Diverged(f"the learned learning rate became {lr:.4g} (≤ 0 or NaN) at iteration {iteration}")
    if lr > LR_EXPLOSION * initial_lr:
        raise Diverged(f"the learned learning rate exploded to {lr:.4g} (> {LR_EXPLOSION:g} × its initial "
                       f"{initial_lr:g}) at iteration {iteration}")
