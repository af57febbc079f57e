"""Methods that misbehave on purpose, for the isolation and scheduling tests. Not registered on import: the tests
register them for their own duration (a child process unpickles them from this module by name)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.distilled import DistilledSet
from methods.base import DistillContext, Method, MethodConfig


class RunsOutOfMemory(Method):
    """Raises the error an allocator raises when memory runs out."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        raise MemoryError("simulated: could not allocate 40 GiB")


class Diverges(Method):
    """Reports a NaN loss at its first iteration, as a distillation with an absurd learning rate does."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        ctx.report(0, loss=float("nan"))
        raise AssertionError("unreachable: report raises Diverged")


class KilledByTheKernel(Method):
    """Dies the way the out-of-memory killer ends a process: SIGKILL, no exception, no goodbye."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class Aborts(Method):
    """Dies of SIGABRT, as a crashing C extension does."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        os.abort()


class SleepsForAMinute(Method):
    """Sleeps: a cell still running when ddbench is stopped."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        time.sleep(60)
        raise AssertionError("should have been stopped")


@dataclass
class RendezvousConfig(MethodConfig):
    folder: str = ""  # where the cells leave their marks
    mark: str = "a"  # this cell's
    partners: int = 2  # how many marks make a meeting


class WaitsForItsPartners(Method):
    """Leaves a mark in ``folder`` and waits (up to 60 s) for ``partners`` marks there: it finishes only when that
    many cells run at the same time. Then it is ``random``."""

    Config = RendezvousConfig

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        folder = Path(self.config.folder)
        (folder / self.config.mark).touch()
        deadline = time.monotonic() + 60
        while len(list(folder.iterdir())) < self.config.partners:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.config.mark} waited 60 s alone: its partners did not run beside it")
            time.sleep(0.05)
        images, labels = ctx.real_init()
        ctx.report(0)
        return DistilledSet(images, labels)
