"""The interface every distillation method implements.

A method owns its mathematics only. It receives a ``DistillContext`` — the class-indexed real training data,
ipc, an architecture factory, a ``torch.Generator``, the device — and its typed config, reports per-iteration
losses through ``ctx.report`` (the harness draws progress bars, detects NaNs and, later, measures), and returns
a ``DistilledSet``. It never seeds a global RNG, reads a clock, saves a file or logs on its own.

A method file has the same shape every time (as in timm): a docstring citing the paper → a ``Config``
dataclass whose defaults are the paper's → the ``Method`` subclass, registered with ``@register_method`` →
its named recipes (``recipes``) and its reduced CPU recipe (``quick``, overrides applied on top of any recipe).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Callable, ClassVar, ContextManager, Iterator, Literal

import torch
from torch import Tensor, nn

from bench.augment import DSA
from bench.checkpoint import Checkpointer
from bench.data import Dataset
from bench.distilled import DistilledSet
from bench.errors import Diverged
from bench.experts import ExpertPool, expert_recipe
from bench.models import create_network

ReportFn = Callable[[int, dict[str, float]], None]
# Where synthetic images start (DC, DSA, DM, MTT): "real" (random real images of each class) or "noise" (standard
# normal pixels, in the normalised space). A typed option, so a typo is refused with the other options before any work.
Init = Literal["noise", "real"]


@dataclass
class MethodConfig:
    """Base of every method's typed config. Subclasses add fields with the paper's defaults."""


@dataclass
class DistillContext:
    dataset: Dataset  # real training data by class; samples come on `device` (the splits may be on the host)
    ipc: int
    arch: str  # the distillation architecture (a timm name or spec)
    generator: torch.Generator
    device: torch.device
    quick: bool = False
    cache_dir: str | None = None  # where expert pools are cached (None: $DDBENCH_CACHE or ~/.cache/ddbench)
    experts_trained: int = 0  # experts trained by this distillation (the rest came from the cache)
    experts_cached: int = 0
    checkpoints: Checkpointer | None = None  # where the loop state is saved every N iterations (None: never)
    resumed_from: int | None = None  # set by `load_checkpoint`: the iteration this distillation resumed from
    _report: ReportFn | None = field(default=None, repr=False)
    _start: Callable[[int], None] | None = field(default=None, repr=False)
    _log: Callable[[str], None] | None = field(default=None, repr=False)
    _phase: Callable[[str], ContextManager[dict]] | None = field(default=None, repr=False)  # the harness's meter

    def make_network(self, arch: str | None = None, generator: torch.Generator | None = None) -> nn.Module:
        """A freshly initialised network on the device, its weights drawn from ``generator`` (default: this
        context's)."""
        d = self.dataset
        return create_network(arch or self.arch, d.num_classes, d.channels, d.resolution,
                              generator or self.generator).to(self.device)

    def experts(self, recipe: str, count: int, epochs: int | None = None) -> ExpertPool:
        """``count`` experts of the named recipe (``mtt`` or ``apm``) on this dataset and architecture.

        Trained on first use and cached by content; the harness measures obtaining them as its ``experts`` phase.
        """
        pool = ExpertPool(self.dataset, self.arch, expert_recipe(recipe, self.quick, epochs), count, self.device,
                          self.cache_dir, log=self._log)
        with self._phase("experts") if self._phase is not None else nullcontext({}):
            pool.ensure()
        self.experts_trained += pool.trained_now
        self.experts_cached += count - pool.trained_now
        return pool

    def augmentation(self) -> DSA:
        """DSA for this dataset (no flip on digits)."""
        return DSA.for_dataset(self.dataset.info.digit_like)

    def start(self, iterations: int) -> None:
        """Announce how many iterations ``report`` will be called for."""
        if self._start is not None:
            self._start(iterations)

    def report(self, iteration: int, **losses: float | Tensor) -> None:
        """Report one iteration's losses; a NaN or infinite loss stops the run with status ``diverged``."""
        values = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in losses.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise Diverged(f"non-finite {', '.join(bad)} at iteration {iteration}")
        if self._report is not None:
            self._report(iteration, values)

    def checkpoint_due(self, iteration: int) -> bool:
        """Whether to save a checkpoint after ``iteration`` completed iterations (always False without checkpoints).

        A method asks only at points where it can save its whole loop state, and then calls ``save_checkpoint``.
        """
        return self.checkpoints is not None and self.checkpoints.due(iteration)

    def save_checkpoint(self, iteration: int, state: dict) -> None:
        """Save the loop state after ``iteration`` completed iterations: a nested dict of JSON values and tensors
        (images, optimiser ``state_dict()``s, ``generator.get_state()`` of every generator drawn from), such that
        the loop continued from it gives the same result as the uninterrupted run. A no-op without checkpoints."""
        if self.checkpoints is not None:
            self.checkpoints.save(iteration, state)

    def load_checkpoint(self) -> tuple[int, dict] | None:
        """(iteration, state) of this distillation's latest checkpoint, tensors on the CPU, or None (no
        checkpoints, none saved yet, or one that cannot be trusted). Methods call it once, before their loop."""
        loaded = self.checkpoints.load() if self.checkpoints is not None else None
        if loaded is not None:
            self.resumed_from = loaded[0]
            if self._log is not None:
                self._log(f"resuming from the checkpoint after iteration {loaded[0]} in {self.checkpoints.folder}")
        return loaded

    def class_batches(self, images: Tensor, batch_real: int, augment: DSA | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
        """For every class c: (c, a real batch of class c, the synthetic images of class c).

        ``images`` holds ``ipc`` images per class, class by class. With ``augment``, both batches of a class get
        one siamese augmentation (the same operation and parameters), drawn afresh per class.
        """
        for c in range(self.dataset.num_classes):
            real = self.dataset.sample_class(c, batch_real, self.generator)
            syn = images[c * self.ipc : (c + 1) * self.ipc]
            if augment is not None:
                siamese = augment.siamese(real, self.generator)
                real, syn = augment.apply(real, siamese), augment.apply(syn, siamese)
            yield c, real, syn

    def hard_labels(self, per_class: int) -> Tensor:
        """Labels 0,0,…,1,1,… for ``per_class`` images of every class, on the device."""
        return torch.arange(self.dataset.num_classes, device=self.device).repeat_interleave(per_class)

    def real_init(self) -> tuple[Tensor, Tensor]:
        """``ipc`` random real images per class (drawn with the context's generator) and their labels."""
        images = torch.cat([self.dataset.sample_class(c, self.ipc, self.generator) for c in range(self.dataset.num_classes)])
        return images.clone(), self.hard_labels(self.ipc)


@dataclass(frozen=True)
class Part:
    """One independent piece of a distillation that splits (``Method.split``): the harness may run it as a task
    of its own — a plain distillation of ``method`` at ``ipc`` with a generator seeded by ``seed`` — and join
    the pieces with ``Method.merge``."""
    method: "Method"
    ipc: int
    seed: int


class Method(ABC):
    """A registered distillation method: ``Config`` defaults are the paper's, ``recipes`` its named settings."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    recipes: ClassVar[dict[str, dict]] = {}
    quick: ClassVar[dict] = {}  # the CPU-sized copy of any recipe: overrides applied last
    smoke: ClassVar[dict] = {}  # on top of `quick`: a seconds-long run for the conformance test
    depends_on_ipc: ClassVar[bool] = True  # False for `full`: one set, whatever the ipc
    # True when the method differentiates through a gradient of the network (second order): the harness then runs
    # it with attention's math kernel, the only one whose backward pass can itself be differentiated
    second_order: ClassVar[bool] = False

    @property
    def iteration_period(self) -> int:
        """Iterations after which the method's work repeats (APM: a new student every mid_gap + 1); the harness
        counts FLOPs over one such window, so the count is the average iteration's."""
        return 1

    def __init__(self, config: MethodConfig):
        self.config = config

    @abstractmethod
    def distill(self, ctx: DistillContext) -> DistilledSet:
        """Make the distilled set. Metadata about the run is added by the harness."""

    def check_network(self, network: nn.Module) -> None:
        """Raise ``UserError`` when this method cannot distil with ``network``'s architecture (the harness asks
        before any work, with a network of the distillation architecture); every architecture by default."""

    def split(self, ipc: int, generator: torch.Generator) -> list[Part] | None:
        """The independent parts this distillation consists of, or None when it is one piece (the default).

        ``generator`` is a fresh copy of the distillation's generator. Contract: ``merge`` of the parts, each
        distilled with a context of its own ``ipc`` and ``torch.Generator().manual_seed(part.seed)``, equals
        ``distill`` — so the harness may run the parts on separate workers (APM's subgroups)."""
        return None

    def merge(self, parts: list[DistilledSet]) -> DistilledSet:
        """Join the distilled sets of ``split``'s parts, in order, into this method's set."""
        raise NotImplementedError(f"{type(self).__name__} does not split into parts")
