"""Regression checks between two results folders: did accuracy drop, or did memory, FLOPs or time grow?

``compare_results(baseline_dir, current_dir)`` pairs the records of the two folders cell by cell and decides, metric
by metric, whether the current run regressed, improved or stayed within tolerance; ``format_comparison`` prints
what moved; ``main_compare`` is the ``ddbench compare`` entry point (exit code 0, or 1 on any regression).

How cells are matched
    By (dataset, label, ipc, distill_arch, eval_arch, protocol, quick, eval_epochs_override, the protocol's epochs
    from ``protocol_config``: a set evaluated for 1000 epochs is not the cell it is at 300), never by config hash:
    a config change that makes things worse must still be compared. ``label`` is the record's own ``label`` (a
    variant's row label such as ``apm-seg100``), else ``method.recipe``, else ``method``. ``eval_epochs_override``
    is a smoke test's ``--eval-epochs N`` (null for a real run): a smoke cell is a cell of its own and never pairs
    with a real one, so a folder of smoke records against a real baseline shows every baseline cell "missing" and
    every smoke cell "new". When several records of one folder share a cell,
    the one with status ok is used (the newest among them; the newest overall when none is ok), and a note says so.
    "Newest" goes by the records' ``written_at``; records without one (written before it existed) count as older
    than any that has one, and among themselves go by file modification time.

When a metric regresses (↑ higher is better, ↓ lower is better)
    * accuracy ↑ (``acc_mean``, in % points): current < baseline − max(acc_tol, k · SE), where
      SE = sqrt(s_b²/n_b + s_c²/n_c) is the standard error of the difference of the two means, s the sample
      standard deviation (ddof=1) of the per-seed ``acc`` list and n its length. Seeded accuracy is noisy, so a
      drop counts only when it is large in points *and* large against the seed-to-seed spread (the rule of
      pytest-benchmark and asv): a 3-point drop with std 4 over 3 seeds (k · SE ≈ 6.5) passes, a 5-point drop with
      std 0.5 fails. A side with a single seed has no measurable spread and adds 0 to SE, so acc_tol alone guards.
    * memory ↓ (distill CPU peak RSS, distill NVML and torch-allocated GPU peaks, process peak RSS):
      current > baseline · (1 + memory_rel_tol). The process peak spans the cell's evaluation, so it is compared
      only where both evaluations did the same work (below): seeds trained at once hold their activations at once.
    * FLOPs ↓ (per distillation iteration, per evaluation epoch): current > baseline · (1 + flops_rel_tol).
    * time ↓ (median iteration time, distill wall time): machines differ in speed, so current times are first
      divided by the *speed factor*, the median over matched cells of current ÷ baseline evaluation wall time
      (the evaluation protocol is the same work for every cell, whatever the method). Only cells whose two
      evaluations did the same work count: as many seeds, trained by the same engine (``eval_engine``'s path: one
      after the other or at once; the epochs are the same in a cell); when no matched cell qualifies, times are
      compared unscaled (factor 1) and the output says why. A time then regresses when
      it exceeds baseline · (1 + time_rel_tol) *and* grows by more than wall_time_floor_s (wall times); iteration
      times whose baseline median is under iter_time_min_s are not compared at all. Tiny noisy times never fail.
    An improvement is the mirror image: accuracy up by more than the same margin, a cost below
    baseline · (1 − rel_tol) (and, for wall times, down by more than the floor).
    A null on either side (a figure that could not be measured) is "n/a", never 0.

Cells rather than metrics
    A baseline cell missing from the current folder is a regression ("missing"), and so is one that was ok and is
    not any more ("now failed: <error>"); a cell that failed before and is ok now is an improvement. Cells only in
    the current folder are listed as new, which is not a failure.
    A record file on either side that ``store.load_records`` cannot take (not readable JSON, or a field of the
    wrong type such as a NaN or infinite accuracy: ``store.record_problem``) stops the check with one line naming
    it: skipped, its cell would only look missing or new, and a NaN accuracy would compare as no regression.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tabulate import tabulate

from bench.data import from_other_files
from bench.errors import UserError
from bench.store import differing_keys, load_records, written_order
from bench.suite import reject_unknown_only_values

REGRESSED, IMPROVED, OK, NOT_AVAILABLE = "regressed", "improved", "ok", "n/a"


@dataclass(frozen=True)
class Thresholds:
    """How far a metric may move before it counts as a regression (or, the other way, an improvement)."""

    acc_tol: float = 2.0  # accuracy points a mean may drop at least, whatever the spread
    acc_k: float = 2.0  # standard errors of the difference of the means a drop must also exceed
    memory_rel_tol: float = 0.10  # peak memory may grow 10%
    flops_rel_tol: float = 0.02  # FLOPs are deterministic: 2% covers a changed shape, not noise
    time_rel_tol: float = 0.5  # times (after the speed factor) may grow 50% ...
    wall_time_floor_s: float = 0.5  # ... and must also grow by more than this many seconds (wall times)
    iter_time_min_s: float = 0.005  # iteration times whose baseline median is below this are not compared

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise UserError(f"threshold {name} must be a non-negative number, got {value!r}")


class CellKey(NamedTuple):
    """What identifies a cell across runs; config hashes are deliberately left out."""

    dataset: str
    label: str
    ipc: int | None
    distill_arch: str
    eval_arch: str
    protocol: str
    quick: bool
    eval_epochs: int | None = None  # a smoke test's --eval-epochs (the record's eval_epochs_override); None: real
    protocol_epochs: int | None = None  # the epochs the protocol trained (protocol_config); None: not recorded
    distill_seed: int = 0  # which distilled set (a suite may distil a cell with several seeds)

    def __str__(self) -> str:
        ipc = "all" if self.ipc is None else self.ipc
        quick = ", quick" if self.quick else ""
        if self.eval_epochs is not None:
            epochs = f", smoke test: {self.eval_epochs} eval epochs"
        else:
            epochs = "" if self.protocol_epochs is None else f", {self.protocol_epochs} epochs"
        seed = f", distill seed {self.distill_seed}" if self.distill_seed else ""
        return (f"{self.dataset} ipc{ipc} {self.label} ({self.distill_arch}→{self.eval_arch}, {self.protocol}{quick}"
                f"{epochs}{seed})")

    def sort_key(self) -> tuple:
        return (self.dataset, self.label, -1 if self.ipc is None else self.ipc, self.distill_arch, self.eval_arch,
                self.protocol, self.quick, -1 if self.eval_epochs is None else self.eval_epochs,
                -1 if self.protocol_epochs is None else self.protocol_epochs, self.distill_seed)


@dataclass(frozen=True)
class Metric:
    """One figure of a record, which way is better, and which tolerance applies to it."""

    name: str
    direction: str  # "↑" higher is better, "↓" lower is better
    kind: str  # "acc", "memory", "flops", "time"
    read: Callable[[dict], float | None]
    is_wall_time: bool = False
    spans_evaluation: bool = False  # the figure includes the cell's evaluation (so depends on how it trained)

    @property
    def title(self) -> str:
        return f"{self.name} {self.direction}"


def _phase_figure(phase: str, key: str) -> Callable[[dict], float | None]:
    return lambda record: ((record.get("phases") or {}).get(phase) or {}).get(key)


def _top_level(key: str) -> Callable[[dict], float | None]:
    return lambda record: record.get(key)


def _iter_time_median(record: dict) -> float | None:
    return (record.get("iter_time_s") or {}).get("median")


METRICS: tuple[Metric, ...] = (
    Metric("acc", "↑", "acc", _top_level("acc_mean")),
    Metric("distill cpu_peak_rss_mb", "↓", "memory", _phase_figure("distill", "cpu_peak_rss_mb")),
    Metric("distill gpu_nvml_peak_mb", "↓", "memory", _phase_figure("distill", "gpu_nvml_peak_mb")),
    Metric("distill gpu_torch_allocated_peak_mb", "↓", "memory", _phase_figure("distill", "gpu_torch_allocated_peak_mb")),
    Metric("process_peak_rss_mb", "↓", "memory", _top_level("process_peak_rss_mb"), spans_evaluation=True),
    Metric("flops_per_iter", "↓", "flops", _top_level("flops_per_iter")),
    Metric("flops_per_eval_epoch", "↓", "flops", _top_level("flops_per_eval_epoch")),
    Metric("iter_time_s median", "↓", "time", _iter_time_median),
    Metric("distill wall_s", "↓", "time", _phase_figure("distill", "wall_s"), is_wall_time=True),
)
EVAL_WALL_TIME = _phase_figure("eval", "wall_s")
COMPARE_ONLY_KEYS = ("dataset", "method", "ipc", "protocol")  # `--only` keys: `run --suite`'s but seed


@dataclass(frozen=True)
class Change:
    """The verdict on one metric (or on a whole cell: metric "cell"/"status") of one cell."""

    cell: CellKey
    metric: str  # a Metric's title, or "cell" (missing/new) or "status"
    baseline: str
    current: str
    change: str
    threshold: str
    verdict: str  # regressed, improved, ok or n/a


@dataclass
class Comparison:
    """Everything ``compare_results`` found; ``changes`` holds every verdict, moved or not."""

    baseline_dir: str
    current_dir: str
    thresholds: Thresholds
    cells_compared: int = 0
    speed_factor: float = 1.0
    speed_cells: int = 0  # how many cells the speed factor is the median of (0: no eval times, factor 1)
    speed_left_out: int = 0  # cells with eval times on both sides left out of it: their evaluations differ in work
    changes: list[Change] = field(default_factory=list)
    new_cells: list[CellKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == REGRESSED]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == IMPROVED]

    @property
    def has_regressions(self) -> bool:
        return bool(self.regressions)


def record_label(record: dict) -> str:
    """A record's row label: its own ``label``, else ``method.recipe``, else ``method``; ``unnamed`` (as in a
    report) for a record that names neither (``ddbench evaluate`` of a set made elsewhere writes a null method,
    though with a label)."""
    if record.get("label"):
        return record["label"]
    method = record.get("method") or "unnamed"
    return f"{method}.{record['recipe']}" if record.get("recipe") else method


def cell_key(record: dict) -> CellKey:
    return CellKey(record.get("dataset"), record_label(record), record.get("ipc"), record.get("distill_arch"),
                   record.get("eval_arch"), record.get("protocol"), bool(record.get("quick")),
                   record.get("eval_epochs_override"), _protocol_epochs(record), int(record.get("distill_seed") or 0))


def _protocol_epochs(record: dict) -> int | None:
    """The epochs its evaluation protocol trained, from ``protocol_config`` (None for a cost-only record or one
    that does not say): a quick set evaluated under the full protocol is another cell than under the quick one."""
    if record.get("eval_arch") is None:
        return None
    epochs = (record.get("protocol_config") or {}).get("epochs")
    return int(epochs) if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) else None


def _load_folder(results_dir: str | os.PathLike, side: str, notes: list[str]) -> dict[CellKey, dict]:
    """The folder's records by cell, one per cell (see the module docstring for which one)."""
    if not Path(results_dir).is_dir():
        raise UserError(f"{side} results folder not found: {results_dir}")
    try:
        records = load_records(results_dir, strict=True)
    except UserError as exc:  # skipping it could hide a regression: its cell would just look new, or missing
        raise UserError(f"{side} record {exc}: a regression check reads every record") from None
    if not records:
        raise UserError(f"no records under {results_dir} (expected {side} records in <folder>/**/records/*.json)")
    by_cell: dict[CellKey, list[dict]] = {}
    for record in records:
        by_cell.setdefault(cell_key(record), []).append(record)
    chosen = {}
    for key, candidates in by_cell.items():
        candidates.sort(key=lambda r: (r.get("status") == "ok", *written_order(r)))
        chosen[key] = candidates[-1]
        if len(candidates) > 1:
            pick = candidates[-1]
            why = "the newest ok one" if pick.get("status") == "ok" else "the newest (none is ok)"
            differing = differing_keys([c.get("config") or {} for c in candidates])
            variants = (f" (their configs differ in {', '.join(differing)}: to compare variants one by one, give each "
                        f"its own label, as a suite's methods: {{method, label, options}} does)") if differing else ""
            notes.append(f"{side}: {len(candidates)} records for {key}; using {why}, {Path(pick['_path']).name}"
                         + variants)
    return chosen


def _same_evaluation_work(baseline: dict, current: dict) -> bool:
    """Whether two records of one cell trained their seeds' networks the same way: as many seeds, and the same
    ``eval_engine`` path where both say (one after the other or at once: the same networks, not the same time).
    Their epochs are equal already: a cell's key holds them."""
    if len(baseline.get("seeds") or []) != len(current.get("seeds") or []):
        return False
    paths = [(record.get("eval_engine") or {}).get("path") for record in (baseline, current)]
    return None in paths or paths[0] == paths[1]


def _same_cell_evaluations(baseline: dict, current: dict) -> bool:
    """Whether the two records' processes ran the same evaluations of their set (``cell_evaluations``: a cell
    evaluated under two protocols holds both in one process peak), where both records say."""
    runs = [record.get("cell_evaluations") for record in (baseline, current)]
    return None in runs or sorted(map(str, runs[0])) == sorted(map(str, runs[1]))


def _speed_factor(pairs: list[tuple[dict, dict]]) -> tuple[float, int, int]:
    """Median over cells of current ÷ baseline evaluation wall time, how many cells it is taken over, and how many
    cells with evaluation times on both sides were left out because their evaluations did not do the same work."""
    ratios, left_out = [], 0
    for baseline, current in pairs:
        before, after = EVAL_WALL_TIME(baseline), EVAL_WALL_TIME(current)
        if before and after and before > 0 and after > 0:
            if _same_evaluation_work(baseline, current):
                ratios.append(after / before)
            else:
                left_out += 1
    return (statistics.median(ratios), len(ratios), left_out) if ratios else (1.0, 0, left_out)


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _spread(accs: list) -> tuple[float, int]:
    """Sample standard deviation (ddof=1) of the per-seed accuracies and their number; 0 for fewer than 2."""
    values = [a for a in accs or [] if a is not None]
    return (statistics.stdev(values) if len(values) >= 2 else 0.0), len(values)


def _judge_accuracy(key: CellKey, metric: Metric, baseline: dict, current: dict, t: Thresholds) -> Change:
    before, after = metric.read(baseline), metric.read(current)
    if before is None or after is None:
        return Change(key, metric.title, _or_na(before), _or_na(after), "", "", NOT_AVAILABLE)
    s_b, n_b = _spread(baseline.get("acc"))
    s_c, n_c = _spread(current.get("acc"))
    standard_error = math.sqrt((s_b**2 / n_b if n_b else 0.0) + (s_c**2 / n_c if n_c else 0.0))
    margin = max(t.acc_tol, t.acc_k * standard_error)
    delta = after - before
    verdict = REGRESSED if delta < -margin else IMPROVED if delta > margin else OK
    threshold = f"±{margin:.2f} pts (max of {t.acc_tol:g}, {t.acc_k:g}·SE={t.acc_k * standard_error:.2f})"
    return Change(key, metric.title, f"{before:.2f}", f"{after:.2f}", f"{delta:+.2f} pts", threshold, verdict)


def _judge_cost(key: CellKey, metric: Metric, baseline: dict, current: dict, t: Thresholds,
                speed_factor: float) -> Change:
    before, after = metric.read(baseline), metric.read(current)
    if before is None or after is None:
        return Change(key, metric.title, _or_na(before), _or_na(after), "", "", NOT_AVAILABLE)
    if metric.spans_evaluation and not _same_evaluation_work(baseline, current):
        return Change(key, metric.title, _format_value(before), _format_value(after), "",
                      "not compared: evaluated otherwise (seeds or engine)", OK)
    if metric.spans_evaluation and not _same_cell_evaluations(baseline, current):
        return Change(key, metric.title, _format_value(before), _format_value(after), "",
                      "not compared: its process ran other evaluations (cell_evaluations)", OK)
    rel_tol = {"memory": t.memory_rel_tol, "flops": t.flops_rel_tol, "time": t.time_rel_tol}[metric.kind]
    threshold = f"±{rel_tol:.0%}"
    compared = after
    if metric.kind == "time":
        compared = after / speed_factor
        if metric.is_wall_time:
            threshold += f" and ±{t.wall_time_floor_s:g} s"
        threshold += f", current ÷ {speed_factor:.2f}"
        if not metric.is_wall_time and before < t.iter_time_min_s:
            return Change(key, metric.title, _format_value(before), _format_value(after), "",
                          f"not compared under {t.iter_time_min_s * 1000:g} ms", OK)
    if before <= 0:  # nothing to be relative to; a zero cost is never measured, only null is "unknown"
        return Change(key, metric.title, _format_value(before), _format_value(after), "", threshold, OK)
    floor = t.wall_time_floor_s if metric.is_wall_time else 0.0
    grew = compared > before * (1 + rel_tol) and compared - before > floor
    shrank = compared < before * (1 - rel_tol) and before - compared > floor
    verdict = REGRESSED if grew else IMPROVED if shrank else OK
    change = f"{compared / before - 1:+.1%}"
    return Change(key, metric.title, _format_value(before), _format_value(after), change, threshold, verdict)


def _or_na(value) -> str:
    return NOT_AVAILABLE if value is None else _format_value(value)


def _judge_status(key: CellKey, baseline: dict, current: dict) -> Change | None:
    """A change of status, or None when both are ok (metrics are compared then) or both are not."""
    was_ok, is_ok = baseline.get("status") == "ok", current.get("status") == "ok"
    if was_ok and not is_ok:
        error_text = (current.get("error") or "").strip()
        error = error_text.splitlines()[-1] if error_text else "no error text"  # a traceback's last line
        return Change(key, "status", "ok", str(current.get("status")), f"now {current.get('status')}: {error}", "",
                      REGRESSED)
    if is_ok and not was_ok:
        return Change(key, "status", str(baseline.get("status")), "ok", "now ok", "", IMPROVED)
    return None


def _selected(key: CellKey, record: dict, only: dict[str, set[str]]) -> bool:
    """Whether a cell passes ``--only`` filters (the keys of ``ddbench run --suite … --only``). As there, a cell
    without an ipc (``full``: the method ignores it) passes every ipc filter."""
    ipc = {str(key.ipc)} if key.ipc is not None else set(only.get("ipc", ()))
    names = {"dataset": {key.dataset}, "ipc": ipc, "protocol": {key.protocol},
             "method": {key.label, str(record.get("method")), str(record.get("method")).split(".")[0]}}
    return all(names[k] & values for k, values in only.items() if k in names)


def _check_only_values(baseline: dict[CellKey, dict], only: dict[str, set[str]]) -> None:
    """A ``UserError`` for an ``--only`` key that compare cannot filter on (``seed``: cells are compared over their
    seeds, whichever they are; the command line takes ``COMPARE_ONLY_KEYS`` only) or a value that no baseline cell
    has, with the nearest one."""
    if "seed" in only:
        raise UserError(f"compare --only takes {', '.join(COMPARE_ONLY_KEYS[:-1])} or {COMPARE_ONLY_KEYS[-1]}; a cell is "
                        "compared over all its seeds (its acc list), so --only seed=… selects nothing here")
    present: dict[str, set[str]] = {key: set() for key in COMPARE_ONLY_KEYS}
    for key, record in baseline.items():
        present["dataset"].add(str(key.dataset))
        if key.ipc is not None:  # a cell without an ipc (full) passes every ipc filter, but names none
            present["ipc"].add(str(key.ipc))
        present["protocol"].add(str(key.protocol))
        present["method"].update({key.label, str(record.get("method")), str(record.get("method")).split(".")[0]})
    reject_unknown_only_values(only, present, "baseline cell")


def compare_results(baseline_dir: str | os.PathLike, current_dir: str | os.PathLike,
                    thresholds: Thresholds = Thresholds(), only: dict[str, set[str]] | None = None) -> Comparison:
    """Compare every cell of ``current_dir`` with the same cell of ``baseline_dir`` (see the module docstring).

    With ``only`` (``--only`` filters, as ``ddbench run --suite`` takes them), cells of either side outside the
    filters are left out, so a run of part of a suite is compared with that part of its baseline."""
    comparison = Comparison(str(baseline_dir), str(current_dir), thresholds)
    baseline = _load_folder(baseline_dir, "baseline", comparison.notes)
    current = _load_folder(current_dir, "current", comparison.notes)
    if only:
        _check_only_values(baseline, only)
        shown = " ".join(f"--only {k}={','.join(sorted(v))}" for k, v in sorted(only.items()))
        for side, cells in (("baseline", baseline), ("current", current)):
            left_out = [k for k, record in cells.items() if not _selected(k, record, only)]
            for k in left_out:
                del cells[k]
            if left_out:
                comparison.notes.append(f"{side}: {len(left_out)} cell{'' if len(left_out) == 1 else 's'} outside "
                                        f"{shown} not compared")
        if not baseline:
            raise UserError(f"no baseline cell passes {shown}")

    matched = sorted(set(baseline) & set(current), key=CellKey.sort_key)
    comparison.cells_compared = len(matched)
    both_ok = [(baseline[k], current[k]) for k in matched
               if baseline[k].get("status") == "ok" and current[k].get("status") == "ok"]
    comparison.speed_factor, comparison.speed_cells, comparison.speed_left_out = _speed_factor(both_ok)
    left_out = comparison.speed_left_out
    differ = (f"{left_out} matched cell{'' if left_out == 1 else 's'} with evaluation wall times on both sides "
              "evaluated with a different number of seeds or engine (sequential or batched)")
    if comparison.speed_cells and left_out:
        comparison.notes.append(f"speed factor taken over {comparison.speed_cells} "
                                f"cell{'' if comparison.speed_cells == 1 else 's'} only: {differ}")
    elif left_out:
        comparison.notes.append(f"no matched cell evaluated the same work on both sides ({differ}): times compared "
                                "unscaled, speed factor taken as 1")
    elif not both_ok:
        comparison.notes.append("no cell is ok on both sides: speed factor taken as 1")
    elif not comparison.speed_cells:
        comparison.notes.append("no evaluation wall times on both sides: speed factor taken as 1")

    other_data = [k for k in matched
                  if from_other_files(baseline[k].get("data_fingerprint"), current[k].get("data_fingerprint"))]
    if other_data:
        comparison.notes.append(f"{len(other_data)} matched cell{'' if len(other_data) == 1 else 's'} "
                                f"({', '.join(str(k) for k in other_data[:3])}{', …' if len(other_data) > 3 else ''}) "
                                "come from other data files on each side (their data_fingerprint differs): a change "
                                "there may be the data's, not the code's")

    for key in sorted(set(baseline) - set(current), key=CellKey.sort_key):
        comparison.changes.append(Change(key, "cell", str(baseline[key].get("status")), "missing", "missing", "",
                                         REGRESSED))
    comparison.new_cells = sorted(set(current) - set(baseline), key=CellKey.sort_key)
    for key in comparison.new_cells:
        comparison.changes.append(Change(key, "cell", "", str(current[key].get("status")), "new", "", OK))

    for key in matched:
        before, after = baseline[key], current[key]
        status_change = _judge_status(key, before, after)
        if status_change is not None:
            comparison.changes.append(status_change)
        if before.get("status") != "ok" or after.get("status") != "ok":
            continue
        for metric in METRICS:
            if metric.kind == "acc":
                comparison.changes.append(_judge_accuracy(key, metric, before, after, thresholds))
            else:
                comparison.changes.append(_judge_cost(key, metric, before, after, thresholds, comparison.speed_factor))
    return comparison


def format_comparison(comparison: Comparison) -> str:
    """The speed factor, a table of what regressed or improved beyond its threshold, notes, and a summary line."""
    lines = [f"baseline: {comparison.baseline_dir}", f"current:  {comparison.current_dir}"]
    if comparison.speed_cells:
        lines.append(f"speed factor {comparison.speed_factor:.2f} (current ÷ baseline evaluation wall time, median "
                     f"over {comparison.speed_cells} cell{'' if comparison.speed_cells == 1 else 's'} whose evaluations "
                     "did the same work); current times are divided by it before comparing")
    elif comparison.speed_left_out:
        lines.append("speed factor 1.00: no matched cell's evaluation did the same work on both sides (seeds or "
                     "engine differ), so times are compared unscaled")
    else:
        lines.append("speed factor 1.00 (no evaluation wall times to calibrate against)")
    moved = sorted((c for c in comparison.changes if c.verdict in (REGRESSED, IMPROVED)),
                   key=lambda c: (c.verdict != REGRESSED, c.cell.sort_key(), c.metric))
    lines.append("")
    if moved:
        rows = [[str(c.cell), c.metric, c.baseline, c.current, c.change, c.threshold, c.verdict] for c in moved]
        lines.append(tabulate(rows, headers=["cell", "metric", "baseline", "current", "change", "threshold", "verdict"],
                              tablefmt="github", disable_numparse=True))
    else:
        lines.append("nothing moved beyond its threshold")
    if comparison.new_cells:
        lines += ["", "new cells (only in current, not compared):"]
        lines += [f"  {key}" for key in comparison.new_cells]
    one_sided = [c for c in comparison.changes
                 if c.verdict == NOT_AVAILABLE and (c.baseline == NOT_AVAILABLE) != (c.current == NOT_AVAILABLE)]
    if one_sided:
        lines += ["", "not compared, measured on one side only (null is never read as 0):"]
        lines += [f"  {c.cell}: {c.metric} baseline {c.baseline}, current {c.current}" for c in one_sided]
    if comparison.notes:
        lines += ["", "notes:"] + [f"  {note}" for note in comparison.notes]
    regressions, improvements = len(comparison.regressions), len(comparison.improvements)
    compared = comparison.cells_compared
    summary = (f"{compared} cell{'' if compared == 1 else 's'} compared, "
               f"{regressions} regression{'' if regressions == 1 else 's'}, "
               f"{improvements} improvement{'' if improvements == 1 else 's'}, {len(comparison.new_cells)} new")
    lines += ["", summary]
    return "\n".join(lines)


def main_compare(baseline: str, current: str, only: dict[str, set[str]] | None = None,
                 **threshold_overrides: float | None) -> int:
    """``ddbench compare BASELINE CURRENT``: print the comparison; 0 when nothing regressed, else 1.

    ``threshold_overrides`` are ``Thresholds`` fields (``acc_tol=3.0``); None means "keep the default". A missing
    or empty folder, or a negative threshold, raises ``UserError``.
    """
    overrides = {name: value for name, value in threshold_overrides.items() if value is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Thresholds)}
    if unknown:
        raise TypeError(f"unknown threshold(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Thresholds)]}")
    comparison = compare_results(baseline, current, Thresholds(**overrides), only)
    print(format_comparison(comparison))
    return 1 if comparison.has_regressions else 0
