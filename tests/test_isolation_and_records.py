"""Every `ddbench run` record carries its measurements; each cell runs in its own process, so a crash or an
out-of-memory death costs one cell and the grid goes on (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import crashing_methods
from bench.data import load_dataset
from bench.measure import PHASE_FIELDS
from bench.registry import METHODS, register_method
from bench.runner import RunRequest, run
from bench.store import SCHEMA_VERSION, load_records, load_results

ENV_KEYS = ("git_sha", "torch", "timm", "python", "cpu_model", "cpu_threads", "hostname", "gpu_name", "cuda", "cudnn",
            "tf32_matmul", "deterministic_algorithms")


def _request(tmp_path: Path, methods: list[str], **kw) -> RunRequest:
    return RunRequest(dataset="digits", methods=methods, ipcs=[1], eval_archs=["convnet"], seeds=[0],
                      results_dir=tmp_path / "results", quick=True, **kw)


@pytest.fixture
def crashing():
    names = {"crash_oom": crashing_methods.RunsOutOfMemory, "crash_killed": crashing_methods.KilledByTheKernel,
             "crash_abort": crashing_methods.Aborts}
    for name, cls in names.items():
        register_method(name)(cls)
    yield list(names)
    for name in names:
        METHODS._entries.pop(name)


def test_every_run_record_carries_phases_iterations_flops_and_env(tmp_path):
    apm = {"iterations": 12, "student_epochs": 5, "num_experts": 1, "expert_epochs": 1}
    records = run(_request(tmp_path, ["random", "apm"], method_options={"apm": apm}), echo=lambda _: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    for record in load_records(tmp_path / "results"):
        assert record["schema_version"] == SCHEMA_VERSION == 2
        assert record["isolated"] is True and record["process_peak_rss_mb"] > 100
        for name in ("distill", "eval"):
            figures = record["phases"][name]
            assert set(PHASE_FIELDS) <= set(figures)
            assert figures["wall_s"] > 0 and figures["cpu_peak_rss_mb"] > 100
            # no GPU here: null with a reason, never 0
            assert figures["gpu_nvml_peak_mb"] is None and figures["gpu_torch_allocated_peak_mb"] is None
            assert figures["gpu_reason"]
        assert set(ENV_KEYS) <= set(record["env"])
        assert record["flops_per_eval_epoch"] > 0
        # digits as float32: (1437 + 360) images of 8×8 and their int64 labels
        assert record["dataset_resident_mb"] == round((1797 * 64 * 4 + 1797 * 8) / 2**20, 1)
        assert record["dataset_device"] == record["compute_device"] == "cpu"
    apm_record = next(r for r in load_records(tmp_path / "results") if r["method"] == "apm")
    assert apm_record["iterations"] == 12
    # 12 iterations = 4 periods of 3 (mid_gap + 1): warm-up, the FLOP window, then 2 whole periods timed
    assert apm_record["iter_time_s"]["n"] == 2 and apm_record["iter_time_s"]["per_period"] == 3
    assert 0 < apm_record["iter_time_s"]["median"] <= apm_record["iter_time_s"]["p90"]
    assert apm_record["flops_per_iter"] > 1e6
    assert apm_record["phases"]["experts"]["trained"] + apm_record["phases"]["experts"]["cached"] == 1
    frame = load_results(tmp_path / "results")
    assert {"distill_cpu_peak_rss_mb", "iter_time_s_median", "flops_per_iter"} <= set(frame.columns)


def test_crashing_and_out_of_memory_cells_get_records_and_the_grid_goes_on(tmp_path, crashing):
    records = run(_request(tmp_path, ["crash_oom", "crash_killed", "crash_abort", "random"]), echo=lambda _: None)
    by_method = {r["method"]: r for r in records}
    assert by_method["crash_oom"]["status"] == "oom" and "MemoryError" in by_method["crash_oom"]["error"]
    killed = by_method["crash_killed"]
    assert killed["status"] == "oom" and "SIGKILL" in killed["error"] and killed["crash_peak_rss_mb"] > 0
    assert by_method["crash_abort"]["status"] == "failed" and "SIGABRT" in by_method["crash_abort"]["error"]
    assert by_method["random"]["status"] == "ok" and by_method["random"]["acc_mean"] > 20
    on_disk = {json.loads(p.read_text())["method"] for p in (tmp_path / "results" / "records").glob("*.json")}
    assert on_disk == set(by_method)


def test_isolated_and_in_process_runs_give_the_same_accuracy(tmp_path):
    isolated = run(_request(tmp_path / "a", ["random"]), echo=lambda _: None)
    in_process = run(_request(tmp_path / "b", ["random"], isolate=False), echo=lambda _: None)
    assert isolated[0]["acc"] == in_process[0]["acc"]
    assert in_process[0]["isolated"] is False and in_process[0]["process_peak_rss_mb"] is None


def test_periodic_methods_are_timed_by_whole_periods():
    """APM-like: a long iteration (student training) then two short ones. A median over single iterations would
    report a short one; the meter reports whole periods, skipping warm-up and the FLOP window."""
    import torch

    from bench.runner import IterationMeter

    meter = IterationMeter(torch.device("cpu"), period=3, warmup=2)
    meter.start(15)
    assert meter._flop_start == 3  # the window starts on a period boundary
    for _ in range(15):
        meter.iteration_done()
    meter.durations = {i: (3.0 if i % 3 == 0 else 0.5) + i / 1000 for i in meter.durations}
    stats = meter.fields()["iter_time_s"]
    assert stats["per_period"] == 3 and stats["n"] == 3  # periods starting at 6, 9 and 12
    assert abs(stats["median"] - (3.0 + 0.5 + 0.5 + (9 + 10 + 11) / 1000) / 3) < 1e-9
    rest = stats["rest_of_period"]  # the short iterations of the same periods: 7, 8, 10, 11, 13, 14
    assert rest["n"] == 6 and abs(rest["median"] - (0.5 + (10 + 11) / 2000)) < 1e-9
    single = IterationMeter(torch.device("cpu"), period=1, warmup=2)
    single.start(6)
    for _ in range(6):
        single.iteration_done()
    assert single.fields()["iter_time_s"]["n"] == 3 and "per_period" not in single.fields()["iter_time_s"]


def test_cells_side_by_side_give_every_record_and_say_so(tmp_path):
    """--jobs 2: two cells at a time, each in its own process with its share of the cores; two cells that need the
    same experts (MTT and TESLA) train them once between them (the pool's lock), and each record says how it ran."""
    from bench.executors import cpu_threads_per_job

    trajectory = {"iterations": 2, "num_experts": 1, "expert_train_epochs": 2, "syn_steps": 2, "expert_epochs": 1,
                  "max_start_epoch": 1}
    request = _request(tmp_path, ["random", "mtt", "tesla"], jobs=2, cache_dir=str(tmp_path / "cache"),
                       method_options={"mtt": trajectory, "tesla": trajectory})
    records = run(request, echo=lambda _: None)
    assert sorted(r["method"] for r in records) == ["mtt", "random", "tesla"]
    assert all(r["status"] == "ok" and r["cells_side_by_side"] == 2 for r in records)
    assert {r["env"]["cpu_threads"] for r in records} == {cpu_threads_per_job(2)}
    experts = [r["phases"]["experts"] for r in records if r["method"] in ("mtt", "tesla")]
    assert sum(e["trained"] for e in experts) == 1 and sum(e["cached"] for e in experts) == 1


@pytest.mark.parametrize("options, message", [
    ({"jobs": 0}, "at least 1"),
    ({"jobs": 2, "isolate": False}, "--no-isolate"),
    ({"jobs": 2, "device": "cuda"}, "CPU runs"),
])
def test_impossible_jobs_are_refused_before_any_work(tmp_path, monkeypatch, options, message):
    import torch

    from bench import runner
    from bench.errors import UserError

    real = runner.resolve_device  # as on a machine with a GPU, so that --device cuda itself is valid
    monkeypatch.setattr(runner, "resolve_device", lambda device: torch.device("cuda") if device == "cuda" else real(device))
    with pytest.raises(UserError, match=message):
        run(_request(tmp_path, ["random"], **options), echo=lambda _: None)
    assert not (tmp_path / "results" / "records").exists()


def test_the_memory_sampling_interval_reaches_every_phase(tmp_path, monkeypatch):
    """``memory_sample_s`` (``--memory-sample-ms``) is the interval of every phase's sampler: experts, distill,
    eval."""
    import bench.measure
    import bench.runner

    intervals: dict[str, set[float]] = {}
    measured = bench.measure.phase

    def spying_phase(phases, name, device="cpu", interval_s=bench.measure.DEFAULT_SAMPLE_INTERVAL_S):
        intervals.setdefault(name, set()).add(interval_s)
        return measured(phases, name, device, interval_s)

    monkeypatch.setattr(bench.runner, "phase", spying_phase)
    apm = {"iterations": 3, "student_epochs": 5, "num_experts": 1, "expert_epochs": 1}
    request = _request(tmp_path, ["apm"], method_options={"apm": apm}, isolate=False, memory_sample_s=0.05,
                       eval_epochs=1, cache_dir=str(tmp_path / "cache"))
    (record,) = run(request, echo=lambda _: None)
    assert record["status"] == "ok"
    assert intervals == {"experts": {0.05}, "distill": {0.05}, "eval": {0.05}}


def test_resume_warns_when_the_records_it_keeps_came_from_other_code(tmp_path, monkeypatch):
    """A record's identity holds its method's config, not the code: ``--resume`` keeps it, and says so."""
    import bench.runner

    real_stamp = bench.runner.environment_stamp
    monkeypatch.setattr(bench.runner, "environment_stamp", lambda: dict(real_stamp(), git_sha="1" * 40))
    request = _request(tmp_path, ["random"], isolate=False, eval_epochs=2)
    (record,) = run(request, echo=lambda _: None)
    assert record["env"]["git_sha"] == "1" * 40
    lines: list[str] = []
    run(replace(request, resume=True), echo=lines.append)
    assert lines == ["skip random ipc 1: records exist (--resume)"]
    monkeypatch.setattr(bench.runner, "environment_stamp", lambda: dict(real_stamp(), git_sha="2" * 40))
    lines.clear()
    run(replace(request, resume=True), echo=lines.append)
    assert lines == ["skip random ipc 1: records exist (--resume); WARNING: written by commit 1111111, this is 2222222: "
                     "delete them (or run without --resume into a new folder) to measure this code"]


def test_resume_warns_when_the_cpu_records_it_keeps_had_another_thread_count(tmp_path, monkeypatch):
    """CPU sums differ in their last digits between thread counts: --resume keeps such records, and says so."""
    import torch

    import bench.runner

    real_stamp = bench.runner.environment_stamp
    other = torch.get_num_threads() + 5
    monkeypatch.setattr(bench.runner, "environment_stamp", lambda: dict(real_stamp(), cpu_threads=other))
    request = _request(tmp_path, ["random"], isolate=False, eval_epochs=2)
    (record,) = run(request, echo=lambda _: None)
    assert record["env"]["cpu_threads"] == other and record["dataset_device"] == "cpu"
    monkeypatch.setattr(bench.runner, "environment_stamp", real_stamp)
    lines: list[str] = []
    run(replace(request, resume=True), echo=lines.append)
    assert lines == [f"skip random ipc 1: records exist (--resume); WARNING: made with {other} torch threads per cell, "
                     f"this run gives {torch.get_num_threads()}: CPU results can differ in their last digits between "
                     f"thread counts"]


def test_resume_redoes_a_cell_whose_record_came_from_other_data_files(tmp_path):
    """Another copy of the dataset under the same name (a subset, random pixels) must not pass for this one."""
    request = _request(tmp_path, ["random"], isolate=False, eval_epochs=2)
    (record,) = run(request, echo=lambda _: None)
    assert record["data_fingerprint"] == load_dataset("digits").fingerprint
    path = next((tmp_path / "results" / "records").glob("*.json"))
    path.write_text(json.dumps(dict(json.loads(path.read_text()), data_fingerprint="0123456789abcdef")))
    lines: list[str] = []
    (redone,) = run(replace(request, resume=True), echo=lines.append)
    assert lines[0].startswith("redo random ipc 1: its records were made from other digits files")
    assert "0123456789abcdef" in lines[0] and redone["data_fingerprint"] == record["data_fingerprint"]
    lines.clear()
    assert run(replace(request, resume=True), echo=lines.append) == []
    assert lines == ["skip random ipc 1: records exist (--resume)"]


def _send_modules_present_at_start(connection) -> None:
    connection.send(sorted(sys.modules))
    connection.close()


def test_cells_fork_from_a_server_that_imported_the_methods_once():
    """A cell starts with every method's module already imported by the forkserver, not importing it again."""
    from bench.registry import get_method_class, list_methods
    from bench.runner import _child_context

    context = _child_context()
    if context.get_start_method() != "forkserver":
        pytest.skip("no forkserver on this platform: cells are spawned")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_modules_present_at_start, args=(sender,))
    child.start()
    sender.close()
    at_start = set(receiver.recv())
    child.join()
    method_modules = {get_method_class(name).__module__ for name in list_methods()}
    assert {"methods.apm", "methods.mtt", "methods.random"} <= method_modules <= at_start


def test_a_cell_whose_process_cannot_be_started_gets_a_failed_record_and_the_grid_goes_on(tmp_path, monkeypatch):
    """The forkserver can end while it starts a cell (the out-of-memory killer, a signal): that cell's record says
    so, where the grid stopped with an EOFError traceback, and the next cell starts from a new forkserver."""
    from multiprocessing import forkserver

    from bench.runner import _child_context

    context = _child_context()
    if context.get_start_method() != "forkserver":
        pytest.skip("no forkserver on this platform: cells are spawned")
    real_start = context.Process.start
    starts = []

    def start_once_the_server_is_gone(process) -> None:
        starts.append(process.name)
        if len(starts) == 1:  # the server dies under this cell's start, as read_signed then finds
            server = forkserver._forkserver._forkserver_pid
            os.kill(server, signal.SIGKILL)
            while Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                time.sleep(0.01)  # dead, not yet reaped
            raise EOFError("unexpected EOF")
        real_start(process)

    monkeypatch.setattr(context.Process, "start", start_once_the_server_is_gone)
    records = run(RunRequest(dataset="digits", methods=["random"], ipcs=[1, 2], eval_archs=["convnet"], seeds=[0],
                             results_dir=tmp_path / "results", quick=True, eval_epochs=2))
    by_ipc = {record["ipc"]: record for record in records}
    assert len(starts) == 2 and set(by_ipc) == {1, 2}
    assert by_ipc[1]["status"] == "failed" and "could not be started" in by_ipc[1]["error"]
    assert "EOFError" in by_ipc[1]["error"] and "\n" not in by_ipc[1]["error"]
    assert by_ipc[2]["status"] == "ok" and len(by_ipc[2]["acc"]) == 1


def test_a_cell_whose_thread_starts_it_after_the_run_stopped_does_not_start(tmp_path, monkeypatch):
    """Ctrl-C with cells side by side: the executor sets ``stop`` and ends the running cells' processes under
    ``CHILDREN_LOCK``. A pool thread that had taken its cell but not yet started it used to start it afterwards, unseen
    by that sweep, and the cell ran on (in a whole test run, into the next test). Now it does not start."""
    import threading

    from bench.runner import Evaluation, plan, run_cell_isolated

    request = _request(tmp_path, ["random"])
    (cell,) = plan(request)
    starts = []
    monkeypatch.setattr("multiprocessing.process.BaseProcess.start", lambda process: starts.append(process))
    stop = threading.Event()
    stop.set()
    evaluation = Evaluation("standard", "convnet")
    records = run_cell_isolated(cell, request, [evaluation], {evaluation: "id"}, stop=stop)
    assert starts == []
    assert [record["status"] for record in records] == ["interrupted"]
