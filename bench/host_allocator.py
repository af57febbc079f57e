"""Keep freed CPU memory inside a measured phase, so that a training loop does not pay page faults every step.

PyTorch's CPU tensors come straight from the C library's ``malloc``. glibc serves every block above its mmap
threshold (128 KiB, adapting up to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when
it is freed, and trims the top of its heap whenever more than 128 KiB there is free. A training loop allocates
and frees the same activations every step, so each step faults every page of them in again and the kernel zeroes
it: a seed-batched evaluation at digits ipc 50 on the 2-core CI machine took 3.6 million page faults and spent
10.5 s of its 12.3 s in the kernel (``benchmarks/host_allocator.py``; 5.7 s with the memory kept).

While a phase of ``bench.measure.phase`` runs, the harness turns both off (``M_MMAP_MAX`` 0: no block is
mmapped; ``M_TRIM_THRESHOLD`` 2 GiB: the heap is not trimmed), so that freed blocks are reused; when the phase
pauses or ends it restores glibc's default values and calls ``malloc_trim(0)``, so that the memory goes back to
the system before the next phase measures its own peak RSS (and a phase trims when it starts, too, so that memory
freed outside any phase cannot serve its allocations unseen). A phase's peak RSS stays its own working set's high
water mark. One lasting change: glibc's adaptive mmap threshold stops adapting after the first phase (setting any
of these values fixes it at its current value).

Nothing changes where malloc is not glibc's, where the user chose malloc settings (a ``MALLOC_…_`` or
``GLIBC_TUNABLES`` environment variable), or with ``DDBENCH_KEEP_FREED_MEMORY=0``. Every record's environment
stamp says which of these held (``host_allocator``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from functools import lru_cache

# mallopt parameters (malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB at the top of the heap are free
OPT_OUT_VARIABLE = "DDBENCH_KEEP_FREED_MEMORY"

_lock = threading.Lock()
_depth = 0  # how many callers are keeping freed memory now (phases nest, and the executor's threads overlap)


@lru_cache(maxsize=1)
def _policy() -> tuple[ctypes.CDLL | None, str]:
    """The C library to call (None: leave malloc alone) and the sentence the environment stamp records."""
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"glibc defaults ({OPT_OUT_VARIABLE}={os.environ[OPT_OUT_VARIABLE]})"
    user_settings = sorted(name for name in os.environ
                           if name == "GLIBC_TUNABLES" or (name.startswith("MALLOC_") and name.endswith("_")))
    if user_settings:
        return None, f"the user's malloc settings ({', '.join(user_settings)}), left alone"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): the system's malloc, left alone"
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError) as exc:
        return None, f"glibc defaults (mallopt unavailable: {exc})"
    return libc, "glibc: freed memory kept within each measured phase (M_MMAP_MAX 0, no trimming), trimmed after it"


def description() -> str:
    """What this process does with freed memory, for the environment stamp."""
    return _policy()[1]


def keep_freed_memory() -> None:
    """From now until the matching ``return_freed_memory``, freed blocks stay in the heap for reuse."""
    _change_depth(+1)


def return_freed_memory() -> None:
    """Undo one ``keep_freed_memory``; the last one restores glibc's defaults and returns free memory to the system."""
    _change_depth(-1)


def _change_depth(step: int) -> None:
    global _depth
    libc = _policy()[0]
    if libc is None:
        return
    with _lock:
        before, _depth = _depth, max(0, _depth + step)
        if before == 0 and _depth == 1:
            # Free memory left resident by what ran before (blocks under the mmap threshold, freed outside any
            # phase) would serve this phase's first allocations unseen by its peak RSS: return it first.
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        elif before == 1 and _depth == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
