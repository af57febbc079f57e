"""Every `ddbench run` record carries its measurements; each cell runs in its own process, so a crash or an
out-of-memory death costs one cell and the grid goes on (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import crashing_methods
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
    apm = {"iterations": 8, "student_epochs": 5, "num_experts": 1, "expert_epochs": 1}
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
    apm_record = next(r for r in load_records(tmp_path / "results") if r["method"] == "apm")
    assert apm_record["iterations"] == 8
    # 8 iterations: 2 warm-up, a 3-iteration FLOP window (APM's period, mid_gap + 1), 3 timed
    assert apm_record["iter_time_s"]["n"] == 3 and 0 < apm_record["iter_time_s"]["median"] <= apm_record["iter_time_s"]["p90"]
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
