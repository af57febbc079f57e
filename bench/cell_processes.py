"""Where the cells' processes come from: a forkserver whose server imports torch, the harness and the built-in methods
once, and forks every cell from there (``spawn`` where the platform has no forkserver).

This module imports neither torch nor the harness, so that ``ddbench run`` can start the server first thing
(``child_context`` before its own imports): the server's imports (about 8 s on a 2-core CPU) then run beside the
command's own, which take as long, instead of after them. Should the command then stop on bad input, the server ends
by itself once its imports are done: it serves only while the process that started it lives. Third-party methods are
not preloaded (the command has not imported them yet, and a plugin that raises on import would end the server): a
cell imports its plugin itself, as the registry loads it.
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.context import BaseContext

_CONTEXT: BaseContext | None = None


def preloaded_modules() -> list[str]:
    """What the server imports before it forks any cell: ``bench.cell_server`` first (it handles Ctrl-C there), the
    runner (torch, the harness), then every built-in method."""
    import methods  # lists its modules without importing them

    return ["bench.cell_server", "bench.runner", *(f"methods.{name}" for name in methods.BUILTIN)]


def child_context() -> BaseContext:
    """The context the cells start from: the forkserver, started here on first use (``spawn`` where there is none)."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(preloaded_modules())
            _start_forkserver()
            _CONTEXT = context
        else:
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _start_forkserver() -> None:
    """Start the forkserver with SIGINT blocked, as it inherits, until ``bench.cell_server`` handles it there (as
    CPython starts its resource tracker): a Ctrl-C in the server's start-up then ends it quietly. The resource
    tracker is started first: starting it unblocks SIGINT (and ignores it itself)."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
