"""Methods that fail on purpose, for the isolation tests. Not registered on import: the tests register them for
their own duration (a child process unpickles them from this module by name)."""

from __future__ import annotations

import os
import signal

from bench.distilled import DistilledSet
from methods.base import DistillContext, Method


class RunsOutOfMemory(Method):
    """Raises the error an allocator raises when memory runs out."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        raise MemoryError("simulated: could not allocate 40 GiB")


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
        import time

        time.sleep(60)
        raise AssertionError("should have been stopped")
