"""bench.host_allocator: freed memory kept inside a measured phase, glibc's defaults outside, the user's choice kept."""

import json
import os
import platform
import subprocess
import sys

import pytest

from bench import host_allocator
from bench.measure import environment_stamp, phase

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: a loop that allocates, touches and frees 64 MiB blocks as a training step does; the page faults
# of its last iterations inside a measured phase, and the memory handed back when the phase ends.
FAULTS_OF_A_TRAINING_LIKE_LOOP = """
import json, resource, psutil, torch
from bench.measure import phase
from bench.host_allocator import description

def faults_of_last_iterations(iterations=20, counted=4):
    faults = 0
    for i in range(iterations):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 * 2**20)
        y = x * 2
        del x, y
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before if i >= iterations - counted else 0
    return faults

rss = lambda: psutil.Process().memory_info().rss / 2**20
with phase({}, "eval"):
    inside = faults_of_last_iterations()
    rss_inside = rss()
rss_after = rss()
print(json.dumps({"inside": inside, "rss_inside": rss_inside,
                  "rss_after": rss_after, "policy": description()}))
"""


def _faults(**env: str) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key != "GLIBC_TUNABLES" and not key.startswith("MALLOC_") and key != host_allocator.OPT_OUT_VARIABLE}
    environment.update(env)
    output = subprocess.run([sys.executable, "-c", FAULTS_OF_A_TRAINING_LIKE_LOOP], env=environment,
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only: elsewhere the system's malloc is left alone")
def test_a_phase_reuses_freed_memory_and_gives_it_back_at_its_end():
    kept = _faults()
    default = _faults(**{host_allocator.OPT_OUT_VARIABLE: "0"})
    # 2 × 64 MiB a step in 4 KiB pages: 32,768 faults a step when the blocks are mmapped afresh, 4 steps counted
    assert default["inside"] > 60_000, default
    assert kept["inside"] < default["inside"] / 20, (kept, default)
    assert kept["rss_after"] < kept["rss_inside"] - 100, kept  # the kept blocks went back to the system
    assert kept["policy"].startswith("glibc: freed memory kept")
    assert default["policy"] == f"glibc defaults ({host_allocator.OPT_OUT_VARIABLE}=0)"


# In a fresh process: 250 MiB of small blocks freed outside any phase stay resident in glibc's heap (the top of the
# heap pinned by a live block); a phase returns them when it starts, so that they cannot serve its allocations unseen
# by its peak RSS.
MEMORY_FREED_BEFORE_A_PHASE = """
import json, psutil, torch
from bench.measure import phase

rss = lambda: psutil.Process().memory_info().rss / 2**20
blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each: under the mmap threshold, from the heap
pin = torch.ones(1024)
del blocks
before = rss()
with phase({}, "eval"):
    at_start = rss()
print(json.dumps({"before": before, "at_start": at_start}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only: elsewhere the system's malloc is left alone")
def test_a_phase_starts_by_returning_memory_freed_before_it():
    output = subprocess.run([sys.executable, "-c", MEMORY_FREED_BEFORE_A_PHASE], capture_output=True, text=True,
                            check=True, env={k: v for k, v in os.environ.items() if k != host_allocator.OPT_OUT_VARIABLE})
    measured = json.loads(output.stdout.strip().splitlines()[-1])
    assert measured["at_start"] < measured["before"] - 200, measured


def test_the_users_malloc_settings_are_left_alone():
    result = _faults(MALLOC_ARENA_MAX_="2")
    assert result["policy"] == "the user's malloc settings (MALLOC_ARENA_MAX_), left alone"
    if GLIBC:  # glibc's own behaviour inside the phase: every block mmapped afresh
        assert result["inside"] > 60_000, result


class RecordingLibc:
    def __init__(self):
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_nested_phases_keep_memory_until_the_outermost_pauses(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(host_allocator, "_policy", lambda: (libc, "recording"))
    monkeypatch.setattr(host_allocator, "_depth", 0)
    keep = [("malloc_trim", 0), ("mallopt", host_allocator.M_MMAP_MAX, 0),
            ("mallopt", host_allocator.M_TRIM_THRESHOLD, host_allocator.KEEP_TRIM_THRESHOLD)]
    restore = [("mallopt", host_allocator.M_MMAP_MAX, host_allocator.DEFAULT_MMAP_MAX),
               ("mallopt", host_allocator.M_TRIM_THRESHOLD, host_allocator.DEFAULT_TRIM_THRESHOLD),
               ("malloc_trim", 0)]
    host_allocator.keep_freed_memory()
    host_allocator.keep_freed_memory()  # a second caller (another executor thread)
    host_allocator.return_freed_memory()
    assert libc.calls == keep
    host_allocator.return_freed_memory()
    assert libc.calls == keep + restore

    libc.calls.clear()
    phases: dict = {}
    with pytest.raises(RuntimeError):
        with phase(phases, "distill"):
            with phase(phases, "experts"):  # the outer phase pauses (restore), the inner one keeps
                raise RuntimeError("the allocator is restored on the way out too")
    assert libc.calls == keep + restore + keep + restore + keep + restore
    assert host_allocator._depth == 0


def test_the_environment_stamp_says_what_malloc_does():
    assert environment_stamp()["host_allocator"] == host_allocator.description()
