"""``bench.compare``: regression checks between a baseline and a current results folder."""

import copy
import json
import os
import re

import pytest

from bench.compare import Thresholds, compare_results, format_comparison, main_compare
from bench.errors import UserError
from bench.store import stable_hash, write_record

METHODS = {"random": 30.0, "dm": 45.0, "mtt": 60.0}  # method → mean accuracy at ipc 1 (+10 points at ipc 10)
IPCS = (1, 10)


def make_record(method: str, ipc: int | None, accs: list[float], **overrides) -> dict:
    """A realistic ok record of a GPU run: 3 seeds, phases with CPU and GPU peaks, iteration time, FLOPs."""
    scale = 1 if ipc is None else ipc
    record = {
        "method": method, "recipe": None, "dataset": "cifar10", "ipc": ipc, "distill_arch": "convnet",
        "eval_arch": "convnet", "protocol": "standard", "quick": True, "suite": None,
        "config": {"iterations": 20}, "config_hash": "c0ffee", "seeds": list(range(len(accs))),
        "acc": list(accs), "acc_mean": sum(accs) / len(accs), "acc_std": 0.0, "status": "ok", "error": None,
        "process_peak_rss_mb": 900.0 + scale, "iterations": 20,
        "iter_time_s": {"median": 0.05 * scale, "p90": 0.06 * scale, "n": 15},
        "flops_per_iter": 2_000_000_000 * scale, "flops_per_eval_epoch": 200_000_000,
        "phases": {
            "experts": {"wall_s": 12.0, "cpu_peak_rss_mb": 600.0, "gpu_nvml_peak_mb": 700.0,
                        "gpu_torch_allocated_peak_mb": 300.0, "trained": 0, "cached": 3},
            "distill": {"wall_s": 30.0 * scale, "cpu_peak_rss_mb": 800.0 + scale, "gpu_nvml_peak_mb": 1500.0 * scale,
                        "gpu_torch_allocated_peak_mb": 1000.0 * scale, "gpu_torch_reserved_peak_mb": 1200.0 * scale,
                        "gpu_reason": None},
            "eval": {"wall_s": 20.0, "cpu_peak_rss_mb": 700.0, "gpu_nvml_peak_mb": 900.0,
                     "gpu_torch_allocated_peak_mb": 400.0, "gpu_reason": None},
        },
    }
    record.update(overrides)
    record["record_id"] = stable_hash([method, ipc, record.get("label"), record["config"]])
    return record


def baseline_records() -> list[dict]:
    return [make_record(method, ipc, [acc + 10 * (ipc == 10) + d for d in (-0.5, 0.0, 0.5)])
            for method, acc in METHODS.items() for ipc in IPCS]


def write_folder(path, records) -> str:
    for record in records:
        write_record(path, record)
    return str(path)


@pytest.fixture
def baseline(tmp_path):
    return write_folder(tmp_path / "baseline", baseline_records())


def current_folder(tmp_path, change=lambda record: None) -> str:
    """The baseline's records, each passed through ``change`` (which edits it in place) before writing."""
    records = copy.deepcopy(baseline_records())
    for record in records:
        change(record)
    return write_folder(tmp_path / "current", records)


def regressed(comparison) -> set[tuple[str, int, str]]:
    return {(c.cell.label, c.cell.ipc, c.metric) for c in comparison.regressions}


def test_folder_against_itself_passes(baseline, capsys):
    assert main_compare(baseline, baseline) == 0
    out = capsys.readouterr().out
    assert "6 cells compared, 0 regressions" in out and "nothing moved" in out
    assert compare_results(baseline, baseline).changes and not compare_results(baseline, baseline).regressions


def test_accuracy_drop_of_five_points_regresses(baseline, tmp_path, capsys):
    def lower_dm(record):
        if record["method"] == "dm" and record["ipc"] == 10:
            record["acc"] = [a - 5 for a in record["acc"]]
            record["acc_mean"] -= 5

    current = current_folder(tmp_path, lower_dm)
    assert main_compare(baseline, current) == 1
    out = capsys.readouterr().out
    assert "cifar10 ipc10 dm" in out and "acc ↑" in out and "-5.00 pts" in out and "1 regression," in out
    assert regressed(compare_results(baseline, current)) == {("dm", 10, "acc ↑")}


def test_cpu_memory_rise_of_20_percent_regresses(baseline, tmp_path):
    def grow(record):
        if record["method"] == "mtt" and record["ipc"] == 1:
            record["phases"]["distill"]["cpu_peak_rss_mb"] *= 1.2

    current = current_folder(tmp_path, grow)
    assert main_compare(baseline, current) == 1
    assert regressed(compare_results(baseline, current)) == {("mtt", 1, "distill cpu_peak_rss_mb ↓")}


def test_flops_rise_of_5_percent_regresses(baseline, tmp_path):
    def grow(record):
        if record["method"] == "random" and record["ipc"] == 10:
            record["flops_per_iter"] = int(record["flops_per_iter"] * 1.05)

    current = current_folder(tmp_path, grow)
    assert main_compare(baseline, current) == 1
    assert regressed(compare_results(baseline, current)) == {("random", 10, "flops_per_iter ↓")}


def _without_gpu(record):
    for phase in record["phases"].values():
        phase.update(gpu_nvml_peak_mb=None, gpu_torch_allocated_peak_mb=None, gpu_reason="cpu run: no CUDA device")


def test_null_gpu_memory_on_both_sides_is_not_a_regression(tmp_path):
    records = baseline_records()
    for record in records:
        _without_gpu(record)
    baseline = write_folder(tmp_path / "baseline", records)
    current = current_folder(tmp_path, _without_gpu)
    assert main_compare(baseline, current) == 0
    gpu = [c for c in compare_results(baseline, current).changes if "gpu" in c.metric]
    assert len(gpu) == 12 and {c.verdict for c in gpu} == {"n/a"}


def test_gpu_memory_null_on_one_side_is_not_read_as_zero(baseline, tmp_path, capsys):
    current = current_folder(tmp_path, _without_gpu)  # a current run on CPU: its GPU peaks are null, not 0
    assert main_compare(baseline, current) == 0
    out = capsys.readouterr().out
    assert "0 improvements" in out and "measured on one side only" in out


def test_uniformly_slower_machine_passes_with_speed_factor_2(baseline, tmp_path, capsys):
    def twice_as_slow(record):
        for phase in record["phases"].values():
            phase["wall_s"] *= 2
        record["iter_time_s"] = {**record["iter_time_s"], "median": record["iter_time_s"]["median"] * 2,
                                 "p90": record["iter_time_s"]["p90"] * 2}

    current = current_folder(tmp_path, twice_as_slow)
    assert main_compare(baseline, current) == 0
    assert compare_results(baseline, current).speed_factor == pytest.approx(2.0)
    assert "speed factor 2.00" in capsys.readouterr().out


def test_one_method_three_times_slower_regresses(baseline, tmp_path):
    def slow_mtt(record):
        if record["method"] == "mtt":
            record["phases"]["distill"]["wall_s"] *= 3
            record["phases"]["eval"]["wall_s"] *= 3  # even its evaluation: the median speed factor stays 1
            record["iter_time_s"]["median"] *= 3

    current = current_folder(tmp_path, slow_mtt)
    assert main_compare(baseline, current) == 1
    comparison = compare_results(baseline, current)
    assert comparison.speed_factor == pytest.approx(1.0)
    assert regressed(comparison) == {("mtt", ipc, metric) for ipc in IPCS
                                     for metric in ("distill wall_s ↓", "iter_time_s median ↓")}


def test_tiny_iteration_times_never_fail(tmp_path):
    records = baseline_records()
    for record in records:
        record["iter_time_s"]["median"] = 0.001
        record["phases"]["distill"]["wall_s"] = 0.1
    baseline = write_folder(tmp_path / "baseline", records)

    def noisy(record):
        record["iter_time_s"]["median"] = 0.004  # 4× slower, but under 5 ms
        record["phases"]["distill"]["wall_s"] = 0.4  # 4× slower, but 0.3 s more only

    assert main_compare(baseline, current_folder(tmp_path, noisy)) == 0


def test_missing_cell_regresses(baseline, tmp_path, capsys):
    records = [r for r in baseline_records() if not (r["method"] == "random" and r["ipc"] == 1)]
    current = write_folder(tmp_path / "current", records)
    assert main_compare(baseline, current) == 1
    assert "missing" in capsys.readouterr().out
    assert regressed(compare_results(baseline, current)) == {("random", 1, "cell")}


def test_cell_that_failed_now_regresses(baseline, tmp_path, capsys):
    def fail(record):
        if record["method"] == "dm" and record["ipc"] == 1:
            record.update(status="failed", error="Traceback …\nRuntimeError: boom", acc=[], acc_mean=None)

    assert main_compare(baseline, current_folder(tmp_path, fail)) == 1
    assert "now failed: RuntimeError: boom" in capsys.readouterr().out


def test_new_cell_in_current_is_listed_and_passes(baseline, tmp_path, capsys):
    current = current_folder(tmp_path)
    write_record(current, make_record("dm", 50, [70.0, 71.0, 72.0]))
    assert main_compare(baseline, current) == 0
    out = capsys.readouterr().out
    assert "new cells" in out and "cifar10 ipc50 dm" in out and "1 new" in out


def test_accuracy_improvement_is_listed_as_improved(baseline, tmp_path, capsys):
    def raise_mtt(record):
        if record["method"] == "mtt" and record["ipc"] == 1:
            record["acc"] = [a + 5 for a in record["acc"]]
            record["acc_mean"] += 5

    current = current_folder(tmp_path, raise_mtt)
    assert main_compare(baseline, current) == 0
    assert "improved" in capsys.readouterr().out
    improved = compare_results(baseline, current).improvements
    assert [(c.cell.label, c.cell.ipc, c.metric) for c in improved] == [("mtt", 1, "acc ↑")]


def test_noisy_accuracy_drop_inside_standard_error_passes(tmp_path):
    records = baseline_records()
    records[0].update(acc=[56.0, 60.0, 64.0], acc_mean=60.0, acc_std=4.0)  # std 4 over 3 seeds
    baseline = write_folder(tmp_path / "baseline", records)
    records[0].update(acc=[53.0, 57.0, 61.0], acc_mean=57.0)  # 3 points lower: more than acc_tol, < 2·SE ≈ 6.5
    current = write_folder(tmp_path / "current", records)
    assert main_compare(baseline, current) == 0
    assert main_compare(baseline, current, acc_k=0.0) == 1  # the spread, not acc_tol, is what let it pass


def test_threshold_overrides(baseline, tmp_path):
    def lower(record):
        record["acc"] = [a - 5 for a in record["acc"]]
        record["acc_mean"] -= 5

    current = current_folder(tmp_path, lower)
    assert main_compare(baseline, current) == 1
    assert main_compare(baseline, current, acc_tol=6.0, memory_rel_tol=None) == 0
    with pytest.raises(UserError):
        Thresholds(acc_tol=-1.0)


def test_duplicate_records_prefer_the_ok_one(baseline, tmp_path, capsys):
    current = current_folder(tmp_path)
    failed = make_record("dm", 1, [1.0, 1.0, 1.0], status="failed", error="boom", config={"iterations": 99})
    newest = write_record(current, failed)
    os.utime(newest, (2e9, 2e9))  # newer than the ok record of the same cell
    assert main_compare(baseline, current) == 0
    out = capsys.readouterr().out
    assert "2 records for cifar10 ipc1 dm" in out
    assert "their configs differ in iterations: to compare variants one by one, give each its own label" in out


def test_duplicate_ok_records_pick_the_latest_written_not_the_latest_file(baseline, tmp_path, capsys):
    """After a copy or a ``git checkout`` file times say nothing: the record's own ``written_at`` decides."""
    others = [r for r in baseline_records() if (r["method"], r["ipc"]) != ("dm", 1)]
    current = write_folder(tmp_path / "current", others)
    worse = make_record("dm", 1, [30.0, 30.5, 31.0], config={"iterations": 5}, written_at="2026-01-02T00:00:00+00:00")
    better = make_record("dm", 1, [45.0, 45.5, 46.0], config={"iterations": 50}, written_at="2026-01-01T00:00:00+00:00")
    for record, file_time in ((worse, 1e9), (better, 2e9)):  # the later-written record in the older file
        os.utime(write_record(current, record), (file_time, file_time))
    assert main_compare(baseline, current) == 1  # the worse record, written later, was the one compared
    out = capsys.readouterr().out
    assert "2 records for cifar10 ipc1 dm" in out and "regress" in out.lower()


def test_records_without_written_at_fall_back_to_file_times(baseline, tmp_path):
    others = [r for r in baseline_records() if (r["method"], r["ipc"]) != ("dm", 1)]
    current = write_folder(tmp_path / "current", others)
    worse = make_record("dm", 1, [30.0, 30.5, 31.0], config={"iterations": 5})
    better = make_record("dm", 1, [45.0, 45.5, 46.0], config={"iterations": 50})
    for record, file_time in ((worse, 1e9), (better, 2e9)):
        path = write_record(current, record)
        stamped = json.loads(path.read_text())
        del stamped["written_at"]  # as a record written before the stamp existed
        path.write_text(json.dumps(stamped))
        os.utime(path, (file_time, file_time))
    assert main_compare(baseline, current) == 0  # the newer file, the better record


def test_duplicate_records_of_one_config_name_no_difference(baseline, tmp_path, capsys):
    current = current_folder(tmp_path)
    again = make_record("dm", 1, [1.0, 1.0, 1.0], status="failed", error="boom")  # the same config, failed
    again["record_id"] = "another-file"
    write_record(current, again)
    main_compare(baseline, current)
    out = capsys.readouterr().out
    assert "2 records for cifar10 ipc1 dm" in out and "configs differ" not in out


def test_label_keys_cells_and_config_hash_does_not(tmp_path):
    records = baseline_records()
    for record in records:
        record["label"] = f"{record['method']}-seg100"
    baseline = write_folder(tmp_path / "baseline", records)

    def other_config(record):
        record.update(label=f"{record['method']}-seg100", config={"iterations": 40}, config_hash="deadbeef")
        record["record_id"] = stable_hash([record["record_id"], "new config"])

    comparison = compare_results(baseline, current_folder(tmp_path, other_config))
    assert comparison.cells_compared == 6 and not comparison.new_cells and not comparison.regressions
    assert {c.cell.label for c in comparison.changes} == {"random-seg100", "dm-seg100", "mtt-seg100"}


def test_empty_or_missing_folder_is_a_user_error(baseline, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no records"):
        main_compare(baseline, str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not found"):
        main_compare(str(tmp_path / "nowhere"), baseline)


@pytest.mark.parametrize("side", ["baseline", "current"])
def test_an_unreadable_record_on_either_side_is_an_error_not_a_skipped_cell(tmp_path, side, capsys):
    """A corrupt baseline record used to be skipped: its cell then looked new in the current run, and a drop of
    that cell's accuracy passed with exit 0."""
    folders = {"baseline": write_folder(tmp_path / "baseline", baseline_records()),
               "current": current_folder(tmp_path, lambda r: r.update(acc=[a - 5 for a in r["acc"]],
                                                                     acc_mean=r["acc_mean"] - 5))}
    broken = sorted((tmp_path / side / "records").glob("*.json"))[0]
    broken.write_text(broken.read_text()[:40])
    with pytest.raises(UserError, match=f"{side} record .*{broken.name}: not readable JSON"):
        main_compare(folders["baseline"], folders["current"])


def test_table_shows_only_what_moved(baseline, tmp_path):
    def grow(record):
        if record["method"] == "dm" and record["ipc"] == 1:
            record["flops_per_eval_epoch"] *= 2

    text = format_comparison(compare_results(baseline, current_folder(tmp_path, grow)))
    table_rows = [line for line in text.splitlines() if line.startswith("| cifar10")]
    assert len(table_rows) == 1 and "flops_per_eval_epoch ↓" in table_rows[0] and "regressed" in table_rows[0]


def test_only_compares_the_selected_part_of_the_baseline(baseline, tmp_path):
    """A run of part of a suite (`make regress` runs ipc 1) against the whole baseline: with the same `--only`
    filters the rest of the baseline is not "missing"; a regression inside the part still fails."""
    part = [r for r in baseline_records() if r["ipc"] == 1]
    current = write_folder(tmp_path / "part", part)
    assert compare_results(baseline, current).has_regressions  # without the filter: ipc 10 cells are missing
    comparison = compare_results(baseline, current, only={"ipc": {"1"}})
    assert not comparison.has_regressions and comparison.cells_compared == len(METHODS)
    assert any("3 cells outside --only ipc=1 not compared" in note for note in comparison.notes)
    assert main_compare(baseline, current, only={"ipc": {"1"}}) == 0

    worse = copy.deepcopy(part)
    worse[0]["acc"] = [a - 5 for a in worse[0]["acc"]]
    worse[0]["acc_mean"] -= 5
    current = write_folder(tmp_path / "worse", worse)
    assert main_compare(baseline, current, only={"ipc": {"1"}}) == 1
    assert main_compare(baseline, current, only={"ipc": {"1"}, "method": {"dm", "mtt"}}) == 0  # random left out
    with pytest.raises(UserError, match="no baseline cell has method 'apm'"):
        compare_results(baseline, current, only={"method": {"apm"}})
    with pytest.raises(UserError, match="no baseline cell passes"):  # each value exists, not together
        mixed = [r for r in baseline_records() if (r["method"], r["ipc"]) in (("dm", 1), ("mtt", 10))]
        compare_results(write_folder(tmp_path / "mixed", mixed), current, only={"method": {"dm"}, "ipc": {"10"}})


def test_only_ipc_keeps_cells_without_an_ipc(tmp_path):
    """`full` ignores ipc: `run --suite quick --only ipc=1` runs it, so `compare --only ipc=1` compares it."""
    records = [make_record("random", 1, [30.0, 31.0]), make_record("full", None, [99.0, 99.2])]
    baseline = write_folder(tmp_path / "baseline", records + [make_record("random", 10, [50.0, 51.0])])
    current = write_folder(tmp_path / "current", records)
    comparison = compare_results(baseline, current, only={"ipc": {"1"}})
    assert comparison.cells_compared == 2 and not comparison.has_regressions
    assert compare_results(baseline, current, only={"ipc": {"1"}, "method": {"random"}}).cells_compared == 1


def _smoke_test(record):
    """As `ddbench run --eval-epochs 2 --seeds 0` writes the cell: one seed of 2 epochs, not 300."""
    record.update(eval_epochs_override=2, seeds=[0], acc=[record["acc"][0]], acc_mean=record["acc"][0])
    record["phases"]["eval"]["wall_s"] *= 2 / 300 / 3
    record["record_id"] = stable_hash([record["record_id"], "smoke"])


def test_smoke_records_never_pair_with_real_ones(baseline, tmp_path, capsys):
    """The audit's case: a folder of 2-epoch smoke records against a real baseline printed speed factor 0.02 and
    called every distillation time a regression; a smoke cell is now a cell of its own."""
    current = current_folder(tmp_path, _smoke_test)
    comparison = compare_results(baseline, current)
    assert comparison.cells_compared == 0 and len(comparison.new_cells) == 6
    assert regressed(comparison) == {(method, ipc, "cell") for method in METHODS for ipc in IPCS}  # all missing
    assert comparison.speed_factor == 1.0 and comparison.speed_cells == 0
    assert main_compare(baseline, current) == 1
    out = capsys.readouterr().out
    assert "cifar10 ipc1 dm (convnet→convnet, standard, quick, smoke test: 2 eval epochs)" in out
    assert "speed factor 0.0" not in out and "wall_s" not in out and "no cell is ok on both sides" in out


def test_smoke_folder_against_itself_passes(tmp_path):
    smoke = copy.deepcopy(baseline_records())
    for record in smoke:
        _smoke_test(record)
    folder = write_folder(tmp_path / "smoke", smoke)
    comparison = compare_results(folder, folder)
    assert comparison.cells_compared == 6 and not comparison.regressions and comparison.speed_cells == 6


def test_speed_factor_only_over_cells_whose_evaluations_did_the_same_work(tmp_path, capsys):
    """A machine twice as slow; dm's cells evaluated 1 seed instead of 3 and mtt's 2: the
    factor is random's 2.0, not the median 1.0 over every cell (which made every distill time a regression)."""
    records = baseline_records()
    for record in records:
        record["protocol_config"] = {"epochs": 300}
    baseline = write_folder(tmp_path / "baseline", records)

    def slower_and_less_work(record):
        record["protocol_config"] = {"epochs": 300}
        for phase in record["phases"].values():
            phase["wall_s"] *= 2
        record["iter_time_s"]["median"] *= 2
        if record["method"] == "dm":
            record.update(seeds=[0], acc=[record["acc_mean"]])
            record["phases"]["eval"]["wall_s"] /= 3
        if record["method"] == "mtt":
            record.update(seeds=[0, 1], acc=record["acc"][:2])
            record["phases"]["eval"]["wall_s"] *= 2 / 3

    current = current_folder(tmp_path, slower_and_less_work)
    comparison = compare_results(baseline, current)
    assert comparison.speed_factor == pytest.approx(2.0)
    assert (comparison.speed_cells, comparison.speed_left_out) == (2, 4)
    assert not comparison.regressions
    assert main_compare(baseline, current) == 0
    out = capsys.readouterr().out
    assert "speed factor 2.00 (current ÷ baseline evaluation wall time, median over 2 cells whose evaluations did " \
           "the same work)" in out
    assert "speed factor taken over 2 cells only: 4 matched cells with evaluation wall times on both sides " \
           "evaluated with a different number of seeds or engine (sequential or batched)" in out


def test_no_cell_with_the_same_evaluation_work_compares_times_unscaled(baseline, tmp_path, capsys):
    def one_seed(record):  # the same machine, one seed instead of three: evaluation a third as long
        record.update(seeds=[0], acc=[record["acc_mean"]])
        record["phases"]["eval"]["wall_s"] /= 3

    current = current_folder(tmp_path, one_seed)
    comparison = compare_results(baseline, current)
    assert comparison.speed_factor == 1.0 and (comparison.speed_cells, comparison.speed_left_out) == (0, 6)
    assert not comparison.regressions  # divided by 1/3, every unchanged time looked three times slower
    assert main_compare(baseline, current) == 0
    out = capsys.readouterr().out
    assert "speed factor 1.00: no matched cell's evaluation did the same work on both sides" in out
    assert "times compared unscaled" in out


def test_a_set_evaluated_for_other_epochs_is_another_cell(baseline, tmp_path, capsys):
    """``ddbench evaluate`` of a quick set without --quick trains the full protocol's 1000 epochs: its record says
    quick (the set is), and must not pair with the 300-epoch cell."""
    def full_protocol(record):
        if (record["method"], record["ipc"]) == ("dm", 1):
            record["protocol_config"] = {"epochs": 1000}
    base = [dict(r, protocol_config={"epochs": 300}) for r in baseline_records()]
    baseline = write_folder(tmp_path / "base300", base)
    current = current_folder(tmp_path, lambda r: (r.update(protocol_config={"epochs": 300}), full_protocol(r)))
    comparison = compare_results(baseline, current)
    assert comparison.cells_compared == len(base) - 1
    assert main_compare(baseline, current) == 1  # the 300-epoch cell is missing
    out = capsys.readouterr().out
    assert "cifar10 ipc1 dm (convnet→convnet, standard, quick, 300 epochs)" in out
    assert "cifar10 ipc1 dm (convnet→convnet, standard, quick, 1000 epochs)" in out


def test_speed_factor_leaves_out_evaluations_of_another_engine(tmp_path):
    """Seeds trained at once take another time than one after the other: such a pair says nothing of the machine."""
    records = baseline_records()
    for record in records:
        record["eval_engine"] = {"path": "sequential", "reason": "off"}
    baseline = write_folder(tmp_path / "baseline", records)

    def batched_dm(record):
        record["eval_engine"] = {"path": "batched" if record["method"] == "dm" else "sequential"}
        record["phases"]["eval"]["wall_s"] *= 0.5 if record["method"] == "dm" else 1.5

    comparison = compare_results(baseline, current_folder(tmp_path, batched_dm))
    assert comparison.speed_factor == pytest.approx(1.5) and comparison.speed_left_out == 2


def test_process_peak_is_compared_only_between_evaluations_of_the_same_engine(tmp_path):
    """The process peak spans the evaluation: seeds trained at once hold their activations at once, so a rise
    from the sequential to the batched engine says nothing about the code (the quick baseline's full cell: +13 %)."""
    records = baseline_records()
    for record in records:
        record["eval_engine"] = {"path": "sequential", "reason": "off"}
    baseline = write_folder(tmp_path / "baseline", records)

    def batched_dm_and_grown_mtt(record):
        record["process_peak_rss_mb"] *= 1.3 if record["method"] in ("dm", "mtt") else 1.0
        record["eval_engine"] = {"path": "batched" if record["method"] == "dm" else "sequential"}

    comparison = compare_results(baseline, current_folder(tmp_path, batched_dm_and_grown_mtt))
    assert regressed(comparison) == {("mtt", 1, "process_peak_rss_mb ↓"), ("mtt", 10, "process_peak_rss_mb ↓")}
    dm = [c for c in comparison.changes if c.cell.label == "dm" and c.metric == "process_peak_rss_mb ↓"]
    assert len(dm) == 2 and all(c.threshold.startswith("not compared: evaluated otherwise") for c in dm)


def test_process_peak_is_compared_only_between_processes_that_ran_the_same_evaluations(tmp_path):
    """A cell evaluated under two protocols runs both in one process (one distilled set), so its process peak holds
    both evaluations: it is not held against a baseline whose cell ran one (records without the field: compared)."""
    records = baseline_records()
    for record in records:
        record["cell_evaluations"] = [["standard", "convnet"]] if record["method"] != "random" else None
    baseline = write_folder(tmp_path / "baseline", records)

    def soft_too_for_dm_and_grown(record):
        record["process_peak_rss_mb"] *= 1.3 if record["method"] in ("dm", "mtt", "random") else 1.0
        if record["method"] == "dm":
            record["cell_evaluations"] = [["soft", "convnet"], ["standard", "convnet"]]
        elif record["method"] == "mtt":
            record["cell_evaluations"] = [["standard", "convnet"]]

    comparison = compare_results(baseline, current_folder(tmp_path, soft_too_for_dm_and_grown))
    assert regressed(comparison) == {(method, ipc, "process_peak_rss_mb ↓") for method in ("mtt", "random")
                                     for ipc in (1, 10)}
    dm = [c for c in comparison.changes if c.cell.label == "dm" and c.metric == "process_peak_rss_mb ↓"]
    assert len(dm) == 2 and all(c.threshold.startswith("not compared: its process ran other evaluations") for c in dm)


def test_only_with_a_typo_or_a_seed_is_an_error_naming_the_nearest(baseline, tmp_path):
    current = current_folder(tmp_path)
    with pytest.raises(UserError, match="no baseline cell has method 'randon'; did you mean 'random'"):
        compare_results(baseline, current, only={"method": {"random", "randon"}})
    with pytest.raises(UserError, match=r"no baseline cell has ipc '5' \(it has 1, 10\)"):
        compare_results(baseline, current, only={"ipc": {"5"}})
    with pytest.raises(UserError, match="compare --only takes dataset, method, ipc or protocol"):
        compare_results(baseline, current, only={"seed": {"0"}})
    assert compare_results(baseline, current, only={"method": {"dm"}, "ipc": {"1"}}).cells_compared == 1


def test_cells_made_from_other_data_files_are_noted(tmp_path, capsys):
    base = write_folder(tmp_path / "baseline", [dict(r, data_fingerprint="aaaa") for r in baseline_records()])
    same = current_folder(tmp_path, lambda r: r.update(data_fingerprint="aaaa"))
    assert not any("data_fingerprint" in note for note in compare_results(base, same).notes)
    other = write_folder(tmp_path / "other", [dict(r, data_fingerprint="bbbb") for r in baseline_records()])
    notes = [n for n in compare_results(base, other).notes if "data_fingerprint" in n]
    assert len(notes) == 1 and notes[0].startswith(f"{len(baseline_records())} matched cells (")


def test_each_distilled_set_is_compared_with_the_same_seeds(tmp_path):
    """A cell distilled with several seeds has one record per seed on each side: set k pairs with set k."""
    records = []
    for seed in (0, 1):
        for record in baseline_records():
            record.update(distill_seed=seed, record_id=f"{record['record_id']}-{seed}")
            records.append(record)
    baseline = write_folder(tmp_path / "baseline", records)

    def lower_seed_1_of_dm(record):
        if record["method"] == "dm" and record["ipc"] == 1 and record["distill_seed"] == 1:
            record["acc"] = [a - 5 for a in record["acc"]]
            record["acc_mean"] -= 5

    current = copy.deepcopy(records)
    for record in current:
        lower_seed_1_of_dm(record)
    comparison = compare_results(baseline, write_folder(tmp_path / "current", current))
    assert len(comparison.regressions) == 1
    (change,) = comparison.regressions
    assert change.cell.distill_seed == 1 and "distill seed 1" in str(change.cell)
    assert "12 cells compared" in format_comparison(comparison)


def _with_raw(record: dict, **fields: str) -> str:
    """``record`` as a schema-2 record's JSON, with each of ``fields`` set to a raw JSON literal (``NaN``, ``1e400``)."""
    text = json.dumps({"schema_version": 2, **record, **{key: f"@{key}@" for key in fields}})
    for key, literal in fields.items():
        text = text.replace(f'"@{key}@"', literal)
    return text


MALFORMED = {  # what the record's file holds → what the error must say; each crashed compare with a traceback
    "deep": (lambda r: "[" * 100_000 + "]" * 100_000, "not readable JSON (nested too deeply)"),
    "huge_int": (lambda r: _with_raw(r, ipc="9" * 5000), "not readable JSON (Exceeds the limit (4300 digits)"),
    "acc_mean": (lambda r: _with_raw(r, acc_mean='"abc"'), "field acc_mean is 'abc'"),
    "distill_seed": (lambda r: _with_raw(r, distill_seed='"abc"'), "field distill_seed is 'abc'"),
    "phases": (lambda r: _with_raw(r, phases="[1, 2]"), "field phases is [1, 2]"),
    "dataset": (lambda r: _with_raw(r, dataset='["a"]'), "not a valid record: field dataset is ['a']"),
    "label": (lambda r: _with_raw(r, label='{"a": 1}'), "field label is {'a': 1}"),
    "acc": (lambda r: _with_raw(r, acc='"xyz"'), "field acc is 'xyz'"),
    "epochs": (lambda r: _with_raw(r, protocol_config='{"epochs": 1e400}'), "field protocol_config.epochs is inf"),
    "wall_s": (lambda r: _with_raw(r, phases='{"eval": {"wall_s": "fast"}}'), "field phases.eval.wall_s is 'fast'"),
}


@pytest.mark.parametrize("side", ["baseline", "current"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_record_is_one_clear_error_naming_its_file_and_field(tmp_path, side, case):
    """As an unreadable record is (above): compare reads every record, so it stops with one line, no traceback."""
    folders = {name: write_folder(tmp_path / name, baseline_records()) for name in ("baseline", "current")}
    make_text, said = MALFORMED[case]
    (tmp_path / side / "records" / "bad.json").write_text(make_text(make_record("dm", 1, [45.0, 45.0, 45.0])))
    with pytest.raises(UserError, match=f"{side} record .*bad.json: .*{re.escape(said)}") as caught:
        main_compare(folders["baseline"], folders["current"])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["acc_mean", "acc"])
def test_a_non_finite_current_accuracy_is_an_error_not_a_pass(baseline, tmp_path, field, literal):
    """A NaN accuracy compared as "0 regressions" (every comparison with NaN is false) and an infinite one as an
    improvement. ``write_record`` never writes one (it writes null), so such a record was edited or made elsewhere:
    like any malformed record it stops the check, naming the file and field, rather than being skipped — skipped,
    its cell would only count as missing."""
    current = current_folder(tmp_path)
    path = sorted((tmp_path / "current" / "records").glob("*_dm_*.json"))[0]
    record = json.loads(path.read_text())
    path.write_text(_with_raw(record, **{field: literal if field == "acc_mean" else f"[45.0, {literal}, 45.5]"}))
    with pytest.raises(UserError, match=f"current record .*{path.name}: not a valid record: field {field} is "):
        main_compare(baseline, current)


def test_a_record_without_method_or_label_is_compared_as_unnamed(tmp_path, capsys):
    """``ddbench evaluate`` of a set made elsewhere writes a null method (with a label); one with neither used to be
    a KeyError. It is the row ``unnamed``, as in a report."""
    record = {k: v for k, v in make_record("dm", 1, [45.0, 45.0, 45.0]).items() if k != "method"}
    (tmp_path / "both" / "records").mkdir(parents=True)
    (tmp_path / "both" / "records" / "unnamed.json").write_text(json.dumps({"schema_version": 2, **record}))
    folder = str(tmp_path / "both")
    assert main_compare(folder, folder) == 0
    assert "1 cell compared, 0 regressions" in capsys.readouterr().out
    assert {c.cell.label for c in compare_results(folder, folder).changes} == {"unnamed"}
