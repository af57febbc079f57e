"""The Ray executor (issue 7): a grid run as Ray tasks gets the records the local executor gets, a crashing cell
costs that cell only, and without Ray ``--executor ray`` is one line and exit code 2.

Ray runs only in a private network namespace that has nothing but loopback (``unshare --net``; also a private PID
namespace, so no Ray process outlives the test), with its head on 127.0.0.1: it never binds to or talks over the
machine's network. Where ``unshare`` is refused or Ray is missing, the Ray test is skipped."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.distilled import DistilledSet
from bench.store import load_records

REPO = Path(__file__).resolve().parents[1]
GRID = dict(dataset="digits", ipcs=[1], eval_archs=["convnet"], seeds=[0], quick=True, eval_epochs=2,
            method_options={"dm": {"iterations": 3, "batch_real": 16}})
METHODS = ["random", "herding", "dm"]  # three cells (each a Ray task in a fresh worker: a few seconds apiece)
# one more cell: APM as two independently distilled subgroups of ipc 1, merged (Ray: two part tasks + a merge task)
SUBGROUPS = dict(GRID, ipcs=[2], method_options={"apm": {"iterations": 3, "student_epochs": 4, "checkpoints": 2,
                                                          "num_experts": 1, "expert_epochs": 1, "subgroups": 2}})
# a private network (loopback only) and PID namespace; when the test's process dies, every process in it dies too
# (not root: in a user namespace of its own, where it may set up both)
PRIVATE = ["unshare", *([] if os.geteuid() == 0 else ["--map-root-user"]), "--net", "--pid", "--fork", "--kill-child",
           "--mount-proc"]


def both_executors(results: str) -> None:
    """Run inside the private namespace: the grid (and a crashing method) through the ray executor, on a local Ray
    head with two CPUs on 127.0.0.1, then the grid through the local executor. The grid's cells are evaluated
    under both protocols, one task (one distillation) per cell."""
    import ray

    import crashing_methods
    from bench.registry import register_method
    from bench.runner import RunRequest, plan_all, run, run_planned

    def under_both_protocols(*requests: RunRequest) -> None:
        run_planned(plan_all(list(requests)))

    register_method("crash_abort")(crashing_methods.Aborts)
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    started = time.perf_counter()
    on_ray = dict(GRID, results_dir=Path(results, "ray"), executor="ray")
    under_both_protocols(RunRequest(methods=[*METHODS, "crash_abort"], **on_ray),
                         RunRequest(methods=METHODS, protocol="soft", **on_ray))
    run(RunRequest(methods=["apm"], results_dir=Path(results, "ray"), executor="ray", **SUBGROUPS))
    ray.shutdown()
    print(f"ray executor: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    under_both_protocols(RunRequest(methods=METHODS, results_dir=Path(results, "local"), **GRID),
                         RunRequest(methods=METHODS, results_dir=Path(results, "local"), protocol="soft", **GRID))
    run(RunRequest(methods=["apm"], results_dir=Path(results, "local"), **SUBGROUPS))


def _why_no_private_namespace() -> str | None:
    """Why Ray cannot run in a private loopback-only namespace here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'ddbench[ray]')"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing: Ray runs only in a private network namespace"
    try:
        probe = subprocess.run([*PRIVATE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed ({exc}): Ray runs only in a private network namespace"
    if probe.returncode != 0:
        return (f"`{' '.join(PRIVATE)} true` is refused here ({probe.stderr.strip()}): Ray runs only in a private "
                f"network namespace")
    return None


@pytest.mark.slow
def test_ray_executor_gets_the_local_records_and_a_crash_costs_one_cell(tmp_path):
    reason = _why_no_private_namespace()
    if reason:
        pytest.skip(reason)
    ray_tmp = tempfile.mkdtemp(prefix="ddr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=ray_tmp, HOME=str(tmp_path / "home"),  # Ray's token file, not in the user's ~/.ray
               TMPDIR=ray_tmp,  # the crashed task's scratch folder (it cannot remove it) goes with ray_tmp
               OMP_NUM_THREADS="1")  # the same torch threads in Ray's workers and the local executor's children
    code = f"import test_ray_executor as t; t.both_executors({str(tmp_path)!r})"
    try:
        proc = subprocess.run([*PRIVATE, "sh", "-c", 'ip link set lo up && "$0" -c "$1"', sys.executable, code],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]

    by_ray = {r["record_id"]: r for r in load_records(tmp_path / "ray")}
    local = {r["record_id"]: r for r in load_records(tmp_path / "local")}
    crashed = [r for r in by_ray.values() if r["method"] == "crash_abort"]
    assert len(local) == 7 and len(by_ray) == 8 and len(crashed) == 1
    for method in METHODS:  # one distillation per cell, a record per protocol
        (path,) = {r["distilled_path"] for r in by_ray.values() if r["method"] == method}
        assert sorted(r["protocol"] for r in by_ray.values() if r["method"] == method) == ["soft", "standard"]
    (merged,) = [r for r in by_ray.values() if r["method"] == "apm"]  # its subgroups ran as tasks of their own
    assert merged["config"]["subgroups"] == 2 and len(merged["phases"]["distill"]["part_wall_s"]) == 2
    for record in crashed:  # the worker died of SIGABRT: records that say so, and the rest of the grid ran
        assert record["status"] == "failed" and "WorkerCrashedError" in record["error"] and "\n" not in record["error"]
    assert set(local) <= set(by_ray)
    for rid, expected in local.items():
        got = by_ray[rid]
        assert (got["method"], got["ipc"], got["status"]) == (expected["method"], expected["ipc"], "ok")
        assert got["acc"] == expected["acc"] and got["acc_mean"] == expected["acc_mean"]
        assert got["isolated"] is True and got["process_peak_rss_mb"] > 100
        # the worker sent its distilled set, which the driver wrote where the local executor writes it
        assert Path(got["distilled_path"]).relative_to(tmp_path / "ray") == Path(expected["distilled_path"]).relative_to(tmp_path / "local")
        assert (DistilledSet.load(got["distilled_path"]).images == DistilledSet.load(expected["distilled_path"]).images).all()


def test_ray_executor_without_ray_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(["run", "--methods", "random", "--ipc", "1", "--seeds", "0", "--quick", "--executor", "ray",
                 "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and err == "ddbench: error: the ray executor needs Ray: pip install 'ddbench[ray]'\n"
    assert not (tmp_path / "res").exists()


def test_ray_options_without_the_ray_executor_are_refused(capsys, tmp_path):
    code = main(["run", "--methods", "random", "--ipc", "1", "--seeds", "0", "--quick", "--ray-num-cpus", "4",
                 "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "go with --executor ray" in err
    assert not (tmp_path / "res").exists()
