"""Fault injection (issue 7): the runner of a quick grid is killed with SIGKILL at random moments, ten times,
and resumed with ``--resume`` each time; in the end every cell has exactly one complete record, no temporary or
truncated file is left, and the accuracies equal those of an uninterrupted run.

The kill takes the runner's whole process group (the runner, its forkserver and the cell's child), as a
pre-empted job or a dead machine would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KILLS = 10
SUITE = """\
name: faults
version: 1
quick: true
defaults: {seeds: [0, 1]}
grids:
  - datasets: [digits]
    ipc: [1, 2]
    methods:
      - random
      - {method: herding, options: {embed_epochs: 1}}
      - {method: dm, options: {iterations: 3, batch_real: 16}}
"""
CELLS = 6


def ddbench(results: Path, suite: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--results", str(results),
            "--cache-dir", str(cache), "--eval-epochs", "3", "--resume"]


def run_to_the_end(command: list[str], env: dict) -> None:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def records(results: Path) -> dict[str, dict]:
    found = {}
    for path in (results / "records").glob("*.json"):
        record = json.loads(path.read_text())  # a truncated record would fail here
        assert record["record_id"] not in found
        found[record["record_id"]] = record
    return found


@pytest.fixture
def scratch():
    """A killed forkserver leaves its pymp-* folder behind: the runs' TMPDIR, removed after the test. A short path
    of its own, not under tmp_path: the forkserver's socket lives there, and a Unix socket's path may not exceed
    107 bytes (under pytest's numbered, per-worker folders it did, once the counter reached three digits)."""
    folder = tempfile.mkdtemp(prefix="ddb-", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_one_complete_record_per_cell(tmp_path, scratch):
    suite = tmp_path / "faults.yaml"
    suite.write_text(SUITE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(scratch))

    started = time.monotonic()
    run_to_the_end(ddbench(tmp_path / "clean", suite, tmp_path / "cache"), env)
    clean_wall = time.monotonic() - started
    reference = records(tmp_path / "clean")
    assert len(reference) == CELLS and all(r["status"] == "ok" for r in reference.values())

    def written() -> int:
        return len(records(tmp_path / "faulty")) if (tmp_path / "faulty" / "records").is_dir() else 0

    # Every other kill strikes at a random moment of a clean run's length (start-up and expert training included),
    # the others within half a second of the run's next record: on a loaded machine a run's start-up can outlast
    # the clean run, and kills at random moments alone then all landed before the first record.
    chance = random.Random(7)
    killed_with = []
    for attempt in range(KILLS):
        before = written()
        runner = subprocess.Popen(ddbench(tmp_path / "faulty", suite, tmp_path / "cache"), cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if attempt % 2:
            deadline = time.monotonic() + 5 * clean_wall
            while written() == before and runner.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(chance.uniform(0.0, 0.5))
        else:
            time.sleep(chance.uniform(0.2, clean_wall))
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:  # the run had finished the grid and exited
            pass
        runner.wait()
        killed_with.append(written())
    assert any(0 < count < CELLS for count in killed_with), killed_with  # some kills landed mid-grid

    run_to_the_end(ddbench(tmp_path / "faulty", suite, tmp_path / "cache"), env)
    resumed = records(tmp_path / "faulty")
    assert set(resumed) == set(reference)
    for record_id, record in resumed.items():
        assert record["status"] == "ok"
        assert record["acc"] == reference[record_id]["acc"], record_id
    leftovers = [p for p in (tmp_path / "faulty").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    for meta in (tmp_path / "faulty" / "distilled").glob("*.json"):
        json.loads(meta.read_text())
