"""Stopping ddbench: SIGTERM (``kill``, ``timeout``, a scheduler) is taken as Ctrl-C is — the running cell is
stopped and recorded as interrupted — and a cell whose ddbench process is killed outright ends itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import crashing_methods
from bench.cli import EXIT_TERMINATED, main
from bench.registry import METHODS, register_method

ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sleeper():
    register_method("test_sleeper")(crashing_methods.SleepsForAMinute)
    yield "test_sleeper"
    METHODS.unregister("test_sleeper")


def _sigterm_once_cells_run(count: int, to_main_thread: bool = True) -> list[tuple[float, list[int]]]:
    """Send SIGTERM, from a helper thread, once ``count`` cells started by this test run and ddbench handles SIGTERM;
    the list gets (when, the cells' pids). By default it goes to the main thread; with ``to_main_thread=False`` the
    helper thread takes it itself. Sent to the process, the kernel may hand it to either: before ddbench's main
    thread woke every ``SIGNAL_CHECK_S``, that once (a full `make test` at 7e24481) left the handler waiting for a
    60 s sleeper cell. Each test names the thread it means."""
    import bench.runner

    earlier = set(bench.runner.RUNNING_CHILDREN)  # a previous test's pool may still be reaping its cells
    sent: list[tuple[float, list[int]]] = []

    def terminate() -> None:
        deadline = time.monotonic() + 60
        while (len(bench.runner.RUNNING_CHILDREN - earlier) < count
               or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):  # before ddbench's handler, it would end pytest
            if time.monotonic() > deadline:
                return  # never signal later, into another test
            time.sleep(0.05)
        sent.append((time.monotonic(), [child.pid for child in list(bench.runner.RUNNING_CHILDREN - earlier)]))
        thread = threading.main_thread().ident if to_main_thread else threading.get_ident()
        signal.pthread_kill(thread, signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    return sent


def test_sigterm_stops_the_running_cell_and_records_it_as_interrupted(tmp_path, sleeper, capsys):
    sent = _sigterm_once_cells_run(1)
    results = tmp_path / "results"
    code = main(["run", "--dataset", "digits", "--methods", sleeper, "--ipc", "1", "--seeds", "0", "--quick",
                 "--results", str(results)])
    assert code == EXIT_TERMINATED
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert sent and all(_gone(pid, within_s=10) for pid in sent[0][1]), "the cell's process outlived ddbench"
    (record,) = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert record["status"] == "interrupted"


def test_cells_still_queued_when_stopped_get_no_record(tmp_path, sleeper, capsys):
    """--jobs 2 and three cells: the two running are recorded as interrupted; the third never started, so it has
    no record (a report shows it as not run, and --resume runs it), not an 'interrupted' one."""
    _sigterm_once_cells_run(2)
    results = tmp_path / "results"
    code = main(["run", "--dataset", "digits", "--methods", sleeper, "--ipc", "1,2,3", "--seeds", "0", "--quick",
                 "--jobs", "2", "--results", str(results)])
    assert code == EXIT_TERMINATED
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["interrupted", "interrupted"]
    assert sorted(r["ipc"] for r in records) == [1, 2]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_taken_by_a_helper_thread_still_stops_the_cells(tmp_path, sleeper, capsys, jobs):
    """The kernel may hand a process's SIGTERM to any of its threads that do not block it. Python then runs the
    handler only when the main thread next runs, and the main thread used to sleep until a cell ended (here the
    sleeper's 60 s); it now wakes every ``bench.runner.SIGNAL_CHECK_S`` to take it."""
    sent = _sigterm_once_cells_run(1, to_main_thread=False)
    results = tmp_path / "results"
    code = main(["run", "--dataset", "digits", "--methods", sleeper, "--ipc", "1", "--seeds", "0", "--quick",
                 "--jobs", jobs, "--results", str(results)])
    assert code == EXIT_TERMINATED
    assert sent and time.monotonic() - sent[0][0] < 30, "SIGTERM was taken only when the 60 s cell ended"
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    (record,) = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert record["status"] == "interrupted", record["error"]


def test_a_cell_ends_itself_when_its_ddbench_process_is_killed_outright(tmp_path):
    """SIGKILL leaves ddbench no chance to stop its cells; the cell watches for its parent and ends."""
    parent_code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, sys, time; from bench.runner import _end_with; "
        "_end_with(os.getppid()); print(os.getpid(), flush=True); time.sleep(60)'], stdout=subprocess.PIPE, text=True)\n"
        "print(child.stdout.readline().strip(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    cell_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()  # reaped: its number is free, as a dead ddbench's is
    assert _gone(cell_pid, within_s=10), "the orphaned cell went on running"


def _with_ctrl_c_default() -> None:
    """Start a child as a terminal starts it, with SIGINT's default action, where Python installs its Ctrl-C handler.
    A child inherits an ignored SIGINT, and a non-interactive shell ignores it in what it starts with ``&``: run that
    way (``bash -c 'make test' &``), ddbench rightly left Ctrl-C ignored, and these tests hung or failed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _descendants(pid: int) -> int:
    """How many processes descend from ``pid`` (read from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    count, frontier = 0, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        count += len(frontier)
    return count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_on_cells_side_by_side_prints_its_one_line_and_no_resource_warning(tmp_path):
    """Stopped cells cannot release a multiprocessing semaphore; tqdm's default lock held one in each, and Python's
    resource tracker then warned of 'leaked semaphore objects' after ddbench's own line."""
    suite = tmp_path / "long.yaml"
    suite.write_text("name: long\nversion: 1\nquick: true\ndefaults: {seeds: [0]}\ngrids:\n  - datasets: [digits]\n"
                     "    ipc: [1, 2]\n    methods: [{method: dm, label: dm-long, options: {iterations: 1000000}}]\n")
    run = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--jobs", "2", "--results", str(tmp_path / "res")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_with_ctrl_c_default)
    deadline = time.monotonic() + 90
    while _descendants(run.pid) < 3 and time.monotonic() < deadline:  # the forkserver and two cells
        time.sleep(0.2)
    assert _descendants(run.pid) >= 3, "the two cells never started"
    time.sleep(2)  # into their distillations, past the imports
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "leaked semaphore" not in err and "Traceback" not in err, err


def _forkserver_below(pid: int) -> int | None:
    """The pid of a multiprocessing forkserver descending from ``pid``, if one runs (read from /proc)."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        for child in frontier:
            if b"forkserver" in commands.get(child, b""):
                return child
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_while_the_forkserver_starts_prints_only_ddbenchs_line(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group. The forkserver ignores it once it serves, but it used
    to take it while importing torch (its first seconds) and print a KeyboardInterrupt traceback under ddbench's
    line; it now starts with Ctrl-C ignored."""
    run = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--dataset", "digits", "--methods", "random", "--ipc", "1",
         "--seeds", "0", "--quick", "--results", str(tmp_path / "res")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=_with_ctrl_c_default)
    deadline = time.monotonic() + 60
    while _forkserver_below(run.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    server = _forkserver_below(run.pid)
    assert server is not None, "no forkserver started"
    os.killpg(run.pid, signal.SIGINT)  # at once: the server is still importing torch
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _gone(server, within_s=10), "the forkserver outlived ddbench"
