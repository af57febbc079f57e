"""Progress on stderr, one style for every phase: bars for expert training, distillation and evaluation, and log
lines written between them. Bars show only on a terminal (``tqdm``'s ``disable=None``), so logs of batch jobs and
of cells run in child processes hold the log lines alone."""

from __future__ import annotations

import sys
import threading

from tqdm.auto import tqdm

# tqdm's default lock holds a multiprocessing semaphore; a cell's process that is stopped (Ctrl-C, SIGTERM) cannot
# release it, and Python's resource tracker then warns of "leaked semaphore objects" at exit. Bars are written by
# one process each (cells report through their parent), so a thread lock is all they need.
tqdm.set_lock(threading.RLock())


def progress_bar(desc: str, total: int | None = None) -> tqdm:
    """A bar on stderr that disappears when done."""
    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr, dynamic_ncols=True)


def log(message: str) -> None:
    """A progress line on stderr that does not break the bars."""
    tqdm.write(message, file=sys.stderr)
