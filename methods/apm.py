"""APM — Dataset Distillation via Adversarial Prediction Matching (Chen, Guo, Wang, Zhang & Tan, arXiv 2312.08912,
2023; official code mchen725/DD_APM).

The idea: a network trained on the distilled set should *predict like* a network trained on the real data. APM
plays a min-max game with single-level losses — no unrolled inner training, hence its small memory:

* **student step (max over networks, approximated by training):** every ``mid_gap + 1`` iterations a teacher T is
  drawn at random from a pool of networks trained on the real data; T's logits on the current synthetic images
  u (no augmentation) become regression targets; a *fresh* student is trained from scratch on (u, T(u)) with L1
  on logits and DSA for E epochs (SGD ``lr_net``, momentum 0.9, wd 5e-4, lr ×0.1 at E//2+1, batch 256), keeping K
  checkpoints S_1..S_K evenly spaced over training (after E/K, 2E/K, …, E epochs).
* **image step (min over images), every iteration:** move u to where the students still disagree most with the
  teacher, while the teacher still recognises u as its class:

      minimise_u   ce · CE(T(u), y)  −  Σ_k  L1(S_k(u), T(u))

  with gradients through T and every S_k (all frozen), no augmentation, SGD on the images (``lr_img``,
  momentum 0.5, lr ×0.3 at iterations//2). The ``batch_syn`` images of an update are processed in segments of
  ``segment`` images whose gradients accumulate (each segment's loss weighted by its share of the batch, so the
  sum is the batch-mean gradient): peak memory is set by ``segment`` — one teacher graph and one student graph
  of ``segment`` images — and depends neither on K nor on E. The official code notes that it leaves out a
  logarithm of the paper's formulation of the disagreement term ("it will not impact the optimization"); we follow
  the code, as ``notes/methods.md`` §7 does. Under SGD the two differ: d log L1 = dL1 / L1 rescales each checkpoint's
  gradient by one over its disagreement.

Real data enters only through the teachers and the initialisation (ipc random real images per class).

As in the official code, the synthetic set lives in host memory with its gradient and its optimiser's momentum
(``images_on_host``): each update moves its batch to the device segment by segment, and the device holds only the
networks and one segment's graphs. At ImageNet-1K ipc 50 the set (50,000 images of 3×64×64) is 2.5 GB, three times
over with gradient and momentum: on the GPU that alone would exceed the paper's 6.5 GB at segment 100. On an
H200 the image step of this placement (``benchmarks/apm_segment_cost.py --device cuda``, ConvNet-4 of width 128)
peaked at 9.2 / 4.7 / 1.9 GB allocated at segment 500 / 250 / 100
(``results/gpu/2026-11-30-h200-second/apm_memory_73afc5d.log``), before 013b085 freed each student's graph after
its backward; not measured on a GPU since.

With the harness's checkpoints on, the loop state is saved at period boundaries only — after an iteration
whose successor draws a new teacher and student — so neither network needs saving (``APM.distill_group``); a
killed run resumes from it with the same images.

Deviations from the official code, on purpose (``notes/methods.md`` §7):

* teachers are the *last* epoch of their training, never the best on the test set, and the returned set is the
  last iteration's, never the best-evaluated one;
* randomness flows from the harness's generator (the official code reseeds the global RNG from the clock);
* a one-image segment keeps its batch dimension (the official code adds a spurious one);
* the recipes are the paper's Table A9, not the argparse defaults (ce 10, E 500, mid_gap 5);
* exactly ``iterations`` updates and E student epochs (the official loops run ``n + 1``), so checkpoints fall
  after 50, 100, … 250 epochs rather than 51, 101, … 251;
* per segment, the teacher's forward pass is shared by the K disagreement terms and the CE term (its graph is
  kept while the K student graphs are freed one by one) — the same gradient as K + 1 separate passes;
* each segment's gradient stops at the segment (a leaf copy of its images) and is scattered into the set's
  gradient once. The official code backpropagates each of its K + 1 passes per segment through an index of the
  whole set and adds the whole set's gradient into an accumulator: work in the size of the set, not of the
  segment. At ImageNet-1K ipc 50 (50,000 images, ``batch_syn`` 500) that bookkeeping is what makes small segments
  slow: re-implemented in ``benchmarks/apm_segment_cost.py`` (image step alone, narrow ConvNet-4 networks, 2-core CPU),
  its image step took 28 / 34 / 79 s at segment 500 / 250 / 100, where this one took 5.7 / 5.7 / 5.6 s at 8114e41,
  before the set moved to host memory and the step dropped a graph (``results/cpu/2026-11-30-amd-epyc/
  apm_segment_cost.log``; the paper, whole iterations on a GPU: 8.6 / 11.1 / 18.2 s).

The paper has no recipe for ipc 1 or for CIFAR-10 ipc 10; ours (``cifar10_ipc1``, ``cifar10_ipc10``,
``cifar100_ipc1``) reuse the CIFAR-10 ipc 50 recipe (ZCA, lr_img 1, lr_net 0.02, all images per update), the
nearest published setting. For ``digits`` (not in the paper) the recipes keep CIFAR-10 ipc 50's per-image step. ``subgroups = G`` distils G independent class-balanced subsets (ipc/G images per
class each, each with its own generator, all G seeds drawn first) and merges them — the paper's
parallelisability experiment. ``split`` hands the G runs to the harness, which may run them on separate workers
(the Ray executor does); run in one process, they go one after another, with the same result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.checkpoint import restore_scheduler, scheduler_state
from bench.distilled import DistilledSet
from bench.errors import UserError
from bench.evaluate import Protocol, logits_of, train_network
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig, Part


@dataclass
class APMConfig(MethodConfig):
    iterations: int = 2500  # image updates
    lr_img: float = 1.0  # SGD on the images (Table A9: 1 on CIFAR with ZCA, 20–40 on 64×64 data)
    img_momentum: float = 0.5
    ce: float = 0.1  # weight of the teacher's cross-entropy on the synthetic images
    student_epochs: int = 250  # E: epochs of each fresh student
    checkpoints: int = 5  # K: student checkpoints used in the image step
    mid_gap: int = 2  # a new teacher and student every mid_gap + 1 iterations
    lr_net: float = 0.01  # the student's lr; also the lr of the `soft` evaluation protocol
    student_batch: int = 256
    batch_syn: int | None = None  # images per update (None: all)
    segment: int | None = None  # images per gradient-accumulation segment (None: the whole update)
    num_experts: int = 100  # size of the teacher pool
    expert_epochs: int | None = None  # teacher training epochs (None: the `apm` expert recipe, 100)
    zca: bool = False
    eval_epochs: int = 1000  # epochs of the `soft` evaluation (Table A9)
    subgroups: int = 1  # independent class-balanced subsets, merged
    images_on_host: bool = True  # the set, its gradient and momentum in host memory, as the official code keeps them


def _recipe(zca: bool, lr_img: float, lr_net: float, batch_syn: int | None, eval_epochs: int, segment: int | None = None) -> dict:
    return dict(zca=zca, lr_img=lr_img, lr_net=lr_net, batch_syn=batch_syn, segment=segment, eval_epochs=eval_epochs)


class CheckpointRecorder:
    """Keeps frozen copies of a network after the given epoch counts (1-based: "after e epochs")."""

    def __init__(self, network: nn.Module, after_epochs: list[int]):
        self.network, self.after = network, set(after_epochs)
        self.saved: list[nn.Module] = []

    def __call__(self, epoch: int, loss: Tensor) -> None:
        if epoch + 1 in self.after:
            frozen = copy.deepcopy(self.network).eval()
            frozen.requires_grad_(False)
            self.saved.append(frozen)


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """K evenly spaced epoch counts ending at E: E/K, 2E/K, …, E."""
    if not 1 <= count <= epochs:
        raise UserError(f"APM needs 1 ≤ checkpoints ≤ student_epochs, got K={count}, E={epochs}")
    step = epochs // count
    return [step * k for k in range(1, count)] + [epochs]


@register_method("apm")
class APM(Method):
    Config = APMConfig
    recipes = {
        "cifar10_ipc1": _recipe(True, 1.0, 0.02, None, 1000),  # ours: no paper recipe
        "cifar10_ipc10": _recipe(True, 1.0, 0.02, None, 1000),  # ours: no paper recipe
        "cifar10_ipc50": _recipe(True, 1.0, 0.02, None, 1000),
        "cifar10_ipc500": _recipe(True, 1.0, 0.02, 2500, 1000),
        "cifar10_ipc1000": _recipe(True, 1.0, 0.02, 2500, 600),
        "cifar100_ipc1": _recipe(True, 1.0, 0.02, None, 1000),  # ours: no paper recipe
        "cifar100_ipc10": _recipe(True, 1.0, 0.02, None, 1000),
        "cifar100_ipc50": _recipe(True, 1.0, 0.04, 2500, 1000),
        "cifar100_ipc100": _recipe(True, 1.0, 0.04, 2500, 600),
        "tiny_ipc10": _recipe(False, 20.0, 0.1, 500, 1000, segment=100),
        "tiny_ipc50": _recipe(False, 40.0, 0.1, 500, 1000, segment=100),
        "tiny_ipc100": _recipe(False, 40.0, 0.1, 500, 600, segment=100),
        "imagenet_ipc10": _recipe(False, 20.0, 0.1, 500, 1000, segment=100),
        "imagenet_ipc50": _recipe(False, 20.0, 0.1, 500, 600, segment=100),
        "imagenet_ipc100": _recipe(False, 20.0, 0.1, 500, 600, segment=100),
    }
    recipes |= {
        # Ours, for the embedded default: the per-image step of cifar10_ipc50 (lr_img 1 at 500 images per update;
        # the loss is a batch mean, so each image's step shrinks as 1/batch): lr_img = batch / 500.
        "digits_ipc1": dict(lr_img=1.0 * 10 / 500),
        "digits_ipc10": dict(lr_img=1.0 * 100 / 500),
        "digits_ipc50": dict(lr_img=1.0 * 500 / 500),
    }
    smoke = {"iterations": 3, "student_epochs": 5, "num_experts": 1, "expert_epochs": 1}

    @staticmethod
    def quick(config: dict) -> dict:
        """The CPU copy of any recipe: 150 iterations with the same total image-step budget (lr_img scaled by
        iterations / 150), students of E = 50 epochs (K = 5 checkpoints, every 10 epochs), a pool of 3 teachers
        trained with the quick expert recipe; K, mid_gap, ce and the optimisers unchanged.

        Chosen on a validation split of digits (a held-out fifth of the *training* set; the test set is not read)
        at ipc 1, quick soft protocol, distillation seeds 0/1/2 (``benchmarks/apm_ipc1_validation.py``): 92.5 /
        91.2 / 94.3 against 82.3 / 90.9 / 82.6 for the former 100 iterations of E = 250, at under a third of the student
        epochs. Under hard labels both fall below the random initialisation (50–57 and 64–66 against 65–72): the
        further APM's images move, the more they are made for soft labels (see the README)."""
        iterations = min(150, config["iterations"])
        return {"iterations": iterations, "student_epochs": min(50, config["student_epochs"]),
                "num_experts": min(3, config["num_experts"]),
                "lr_img": config["lr_img"] * config["iterations"] / iterations}

    @property
    def iteration_period(self) -> int:
        return self.config.mid_gap + 1  # type: ignore[attr-defined]

    def split(self, ipc: int, generator: torch.Generator) -> list[Part] | None:
        """With ``subgroups = G > 1``: G independent APM runs of ipc/G images per class, each seeded by its own
        draw from ``generator`` (all G drawn first, so no part depends on another) — the paper's
        parallelisability experiment; the harness may run them on separate workers."""
        cfg: APMConfig = self.config  # type: ignore[assignment]
        if cfg.subgroups == 1:
            return None
        if ipc % cfg.subgroups:
            raise UserError(f"APM subgroups={cfg.subgroups} must divide ipc={ipc}")
        single = type(self)(replace(cfg, subgroups=1))
        return [Part(single, ipc // cfg.subgroups, int(torch.randint(2**62, (1,), generator=generator)))
                for _ in range(cfg.subgroups)]

    def merge(self, parts: list[DistilledSet]) -> DistilledSet:
        """The subgroups' images and labels together, ordered by class (stable: subgroup order within a class)."""
        cfg: APMConfig = self.config  # type: ignore[assignment]
        images = torch.cat([part.images for part in parts])
        labels = torch.cat([part.labels for part in parts])
        order = torch.argsort(labels, stable=True)
        return DistilledSet(
            images[order], labels[order],
            metadata={"protocol_overrides": {"soft": {"lr": cfg.lr_net, "epochs": cfg.eval_epochs}}},
        )

    def distill(self, ctx: DistillContext) -> DistilledSet:
        cfg: APMConfig = self.config  # type: ignore[assignment]
        parts = self.split(ctx.ipc, ctx.generator)
        generators = [ctx.generator] if parts is None else [torch.Generator().manual_seed(p.seed) for p in parts]
        per_group = ctx.ipc // cfg.subgroups
        pool = ctx.experts("apm", cfg.num_experts, epochs=cfg.expert_epochs)
        ctx.start(cfg.iterations * cfg.subgroups)
        resume = ctx.load_checkpoint()
        home = self.home(ctx)
        finished = [] if resume is None else [images.to(home) for images in resume[1]["finished"]]
        groups = [DistilledSet(images, ctx.hard_labels(per_group).to(home)) for images in finished]
        for g in range(len(groups), cfg.subgroups):
            state = resume[1] if resume is not None and g == len(finished) else None
            images, labels = self.distill_group(ctx, pool, per_group, generators[g], offset=g * cfg.iterations,
                                                resume=state, finished=[group.images for group in groups])
            groups.append(DistilledSet(images, labels))
        return self.merge(groups)

    def distill_group(self, ctx: DistillContext, pool, ipc: int, generator: torch.Generator, offset: int = 0,
                      resume: dict | None = None, finished: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One APM run: ``ipc`` images per class, initialised from real images drawn with ``generator``.

        Checkpoints (``ctx.checkpoint_due``) are saved only at period boundaries — after an iteration whose
        successor draws a new teacher and trains a new student — so neither network is saved: the state is the
        images, their optimiser's momentum and lr schedule, the iteration, the state of ``generator`` and of
        ``ctx.generator``, and the images of the ``finished`` subgroups. None is saved after a group's last
        iteration. ``generator`` drives everything random in the run: the initial images, teacher draws, image
        batches, the students' initialisation and their training. ``resume`` is such a state: the loop continues from it exactly.
        """
        cfg: APMConfig = self.config  # type: ignore[assignment]
        data, home = ctx.dataset, self.home(ctx)
        if resume is None:
            images = torch.cat([data.sample_class(c, ipc, generator) for c in range(data.num_classes)]).to(home).clone()
        else:
            images = resume["images"].to(home)
        labels = ctx.hard_labels(ipc).to(home)
        images.requires_grad_(True)
        optimizer = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.img_momentum)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[cfg.iterations // 2], gamma=0.3)
        start = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            restore_scheduler(schedule, resume["schedule"])
            generator.set_state(resume["generator"])
            ctx.generator.set_state(resume["context_generator"])
            start = resume["group_iteration"]
        batch_syn = min(cfg.batch_syn or len(images), len(images))
        teacher, students, since_switch = None, [], cfg.mid_gap
        for it in range(start, cfg.iterations):
            batch = torch.randperm(len(images), generator=generator)[:batch_syn].to(images.device)
            if since_switch == cfg.mid_gap:
                teacher = pool.network(int(torch.randint(pool.count, (1,), generator=generator)))
                teacher.requires_grad_(False)
                students = self.train_students(ctx, images[batch].detach().to(ctx.device), teacher, generator)
                since_switch = 0
            else:
                since_switch += 1
            optimizer.zero_grad(set_to_none=True)
            losses = image_step(images, labels, batch, teacher, students, cfg.ce, cfg.segment or batch_syn, ctx.device)
            optimizer.step()
            schedule.step()
            ctx.report(offset + it, **losses)
            if since_switch == cfg.mid_gap and it + 1 < cfg.iterations and ctx.checkpoint_due(offset + it + 1):
                ctx.save_checkpoint(offset + it + 1, {
                    "group_iteration": it + 1, "images": images, "optimizer": optimizer.state_dict(),
                    "schedule": scheduler_state(schedule), "generator": generator.get_state(),
                    "context_generator": ctx.generator.get_state(), "finished": finished or [],
                })
        return images.detach(), labels

    def home(self, ctx: DistillContext) -> torch.device:
        """Where the synthetic set lives: host memory (``images_on_host``, the official code's choice) or the device."""
        return torch.device("cpu") if self.config.images_on_host else ctx.device  # type: ignore[attr-defined]

    def train_students(self, ctx: DistillContext, images: Tensor, teacher: nn.Module, generator: torch.Generator) -> list[nn.Module]:
        """A fresh student trained on the teacher's logits (L1, DSA); its K checkpoints, frozen."""
        cfg: APMConfig = self.config  # type: ignore[assignment]
        targets = logits_of(teacher, images)
        student = ctx.make_network(generator=generator)
        recipe = Protocol("apm-student", 1, "soft", "l1", cfg.student_epochs, cfg.student_epochs, cfg.lr_net,
                          momentum=0.9, weight_decay=5e-4, batch_size=cfg.student_batch)
        recorder = CheckpointRecorder(student, checkpoint_epochs(cfg.student_epochs, cfg.checkpoints))
        train_network(student, images, targets, recipe, generator, ctx.augmentation(), on_epoch=recorder)
        return recorder.saved


def image_step(
    images: Tensor, labels: Tensor, batch: Tensor, teacher: nn.Module, students: list[nn.Module], ce: float, segment: int,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Accumulate into ``images.grad`` the gradient of ce·CE(T(u), y) − Σ_k L1(S_k(u), T(u)) over ``batch``.

    The batch is processed ``segment`` images at a time; each segment's losses are weighted by its share of the
    batch, so the accumulated gradient is that of the batch mean whatever the segment size. ``images``,
    ``labels`` and ``batch`` (indices) live where the set lives; each segment moves to ``device`` (default: the
    set's), where the networks are, and its gradient comes back. Returns the batch's loss terms.
    """
    device = images.device if device is None else torch.device(device)
    total = len(batch)
    if images.grad is None:
        images.grad = torch.zeros_like(images)
    disagreement = torch.zeros((), dtype=torch.float64, device=device)
    class_term = torch.zeros((), dtype=torch.float64, device=device)
    for part in batch.split(segment):
        weight = len(part) / total
        # The segment is a leaf of its own: its K + 1 backward passes stop at `segment` images, and one scatter
        # adds them to the set's gradient. Backpropagating through images[part] instead would build and add a
        # gradient of the whole set at every pass: work in the set's size, K + 1 times per segment.
        u = images.detach()[part].to(device).requires_grad_(True)
        t = teacher(u)
        for student in students:
            gap = F.l1_loss(student(u), t)
            (-weight * gap).backward(retain_graph=True)  # retains the teacher's graph, and this student's while `gap` lives
            disagreement += weight * gap.detach().double()
            del gap  # so the next student's forward runs with one student graph held, not two
        cross_entropy = F.cross_entropy(t, labels[part].to(device))
        (weight * ce * cross_entropy).backward()
        class_term += weight * cross_entropy.detach().double()
        images.grad.index_add_(0, part, u.grad.to(images.device))
    disagreement, class_term = float(disagreement), float(class_term)
    return {"loss": ce * class_term - disagreement, "disagreement": disagreement, "teacher_ce": class_term}
