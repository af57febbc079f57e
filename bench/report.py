"""Reports from records: Markdown and LaTeX tables, figures, and an index of the report folder.

``write_reports(results_dir, out_dir)`` reads the records under ``results_dir`` and writes

* ``<out>/<name>.md`` and ``<out>/<name>.tex`` (a standalone document with booktabs tables) with
  - test accuracy (↑): one table per evaluation architecture × protocol × quick flag; rows are methods (or the
    labels of method variants), columns dataset × ipc, cells mean ± std over seeds, the best of each column in
    bold (``full`` data excluded). ``full`` does not depend on ipc and shows its one value in every column.
    A smoke test's record (``eval_epochs_override``: ``ddbench run --eval-epochs N`` trained every evaluation
    network N epochs, not the protocol's) is no result: where a cell also has a real record, the real one is shown
    and the smoke one left out (a footnote counts them); where it has none, the smoke figure is shown marked ``†``,
    with a footnote giving its epochs, never bold and never ranked (no difference to a published number);
  - our numbers beside the published ones (``results/published.json``, see ``bench.published``);
  - cross-architecture tables where one protocol was evaluated on more than one architecture;
  - the costs (↓) of distillation: peak GPU memory (NVML and allocator), CPU peak RSS, seconds per iteration,
    distillation time, FLOPs per iteration — a GPU figure that could not be measured is "–" with its reason;
  - the failed, oom and diverged cells with their error (a smoke test's marked ``†``);
  - with a suite, the cells it plans that have no record yet;
* figures under ``<out>/figures/<name>_*.png`` (``bench.figures``; accuracy figures leave smoke tests out);
* ``<out>/README.md``, an index of every report and figure in ``<out>``.

``write_reports(..., suite=Suite)`` (``ddbench report --suite``) reports that suite, not the folder: only the
records whose ``suite`` field is the suite's name (the intro counts the others left out; none of the suite is a
``UserError``), and every cell the suite plans (``planned_cells``: resolved as ``ddbench validate`` resolves them,
reading no data) — a cell without a record shows as "not run" in the accuracy tables (never bold, never ranked)
and beside its published number, so that every row and column of the suite appears, and is listed in a section
of its own. A record is a planned cell's when they share (label, dataset, ipc, evaluation architecture,
protocol, quick flag). The placeholders reach only the accuracy tables: costs, failures and figures are of
records. Without a suite every record in the folder is reported, and nothing is planned.

Every file is written atomically (temporary file + rename), and nothing is written (no folder created either)
when there are no records to report; a report that fails part-way removes the folders it created while they are
still empty (no empty ``figures/`` is left behind). A malformed record file is left out with a line on stderr
(``store.load_records``).
"""

from __future__ import annotations

import math
import os
import statistics
import unicodedata
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote

import pandas as pd
from tabulate import tabulate

from bench.distilled import create_temporary_beside
from bench.errors import UserError
from bench.published import Published, load_published
from bench.store import (ACC_DIRECTION, check_writable_folder, differing_keys, load_records, load_results,
                         stable_hash, written_order)

if TYPE_CHECKING:
    from bench.suite import Suite

ROW_ORDER = ("full", "random", "herding")  # then the rest alphabetically
COST_DIRECTION = "↓"  # lower memory, time and FLOPs are better
NOT_MEASURED = "–"
FAILED_STATUSES = ("failed", "oom", "diverged")
SMOKE_MARK = "†"  # a smoke test's figure: evaluation networks trained --eval-epochs N epochs, not the protocol's
NOT_RUN = "not run"  # the status of a suite's planned cell without a record (a placeholder row, not a record)

# Columns a report reads; older records may lack some of them.
COLUMNS = ("suite", "label", "recipe", "ipc", "distill_arch", "eval_arch", "protocol", "quick", "seeds", "acc",
           "acc_mean", "acc_std", "status", "error", "flops_per_iter", "distilled_path", "transform",
           "distill_wall_s", "distill_cpu_peak_rss_mb", "distill_gpu_nvml_peak_mb",
           "distill_gpu_torch_allocated_peak_mb", "distill_gpu_reason", "iter_time_s_median", "eval_epochs_override",
           "distill_seed", "config_hash", "dataset_resident_mb", "dataset_device")


# ----------------------------------------------------------------------------------------------------------------
# Records → one DataFrame with a row label per method variant


def read_records(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The records under ``results_dir`` (``store.load_results``) in the order they were written
    (``store.written_order``: where a cell has several, the last is the newest), plus each record's ``config`` and
    ``device``; raises ``UserError`` when there are none."""
    frame = load_results(results_dir)
    if frame.empty:
        raise UserError(f"no records under {results_dir}")
    records = {record["_path"]: record for record in load_records(results_dir)}
    frame["config"] = [records[path].get("config") for path in frame["_path"]]
    frame["device"] = [_device(records[path].get("env")) for path in frame["_path"]]
    return frame.iloc[sorted(range(len(frame)), key=lambda i: written_order(records[frame["_path"].iloc[i]]))]


def load_report_frame(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every record under ``results_dir`` (``read_records``), ready for the tables (``prepare_frame``)."""
    return prepare_frame(read_records(results_dir))


def prepare_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the columns a report reads (older records lack some) and add each record's ``base_label`` (its own
    ``label``, else ``_row_label``) and row ``label`` (``_labels``)."""
    frame = frame.reset_index(drop=True).copy()
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    frame["config"] = [c if isinstance(c, dict) else {} for c in frame.get("config", [None] * len(frame))]
    if "device" not in frame:
        frame["device"] = None
    frame["quick"] = frame["quick"].fillna(False).astype(bool)
    frame["ipc"] = [_ipc(value) for value in frame["ipc"]]
    frame["eval_epochs_override"] = pd.Series([_smoke_epochs(value) for value in frame["eval_epochs_override"]],
                                              index=frame.index, dtype=object)  # None, or a smoke test's epochs
    frame["method"] = [m if isinstance(m, str) and m else "unnamed" for m in frame.get("method", [None] * len(frame))]
    frame["base_label"] = [(row["label"] if isinstance(row["label"], str) and row["label"] else _row_label(row))
                           + _quick_parts_note(row) for _, row in frame.iterrows()]
    frame["label"] = _labels(frame)
    return frame


def _quick_parts_note(record: pd.Series) -> str:
    """A quick record (flagged ``quick`` if any part was) made of a quick part and a full one — an ``evaluate`` of a
    quick set under the full protocol, or of a full set under the quick one — gets a row of its own, so that it is
    neither mixed with nor taken for a record that is quick throughout."""
    protocol_quick, distilled_quick = record.get("protocol_quick"), record.get("distilled_quick")
    if protocol_quick not in (True, False) or distilled_quick not in (True, False) or protocol_quick == distilled_quick:
        return ""
    return " (full protocol)" if distilled_quick else " (full-recipe set)"


def _ipc(value: object) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _smoke_epochs(value: object) -> int | None:
    """A record's ``eval_epochs_override``: the epochs of a smoke test (``--eval-epochs``), None for a real result."""
    return None if value is None or pd.isna(value) else int(value)


def _device(env: dict | None) -> str | None:
    if not env:
        return None
    if env.get("gpu_name"):
        return env["gpu_name"]
    return f"CPU, {env['cpu_threads']} threads" if env.get("cpu_threads") else "CPU"


def _row_label(record: pd.Series) -> str:
    """The method, plus its recipe when that is not the one picked for this setting (``<dataset>_ipc<k>``)."""
    from bench.registry import setting_recipe_names

    recipe = record.get("recipe")
    if not isinstance(recipe, str):
        return record["method"]
    automatic = setting_recipe_names(record["dataset"], _ipc(record.get("ipc")))
    return record["method"] if recipe in automatic else f"{record['method']}.{recipe}"


def _table_key(record: pd.Series) -> tuple[str | None, str | None, bool]:
    """The accuracy table a record belongs in: evaluation architecture (None: costs only), protocol, quick flag."""
    arch, protocol = record["eval_arch"], record["protocol"]
    return (arch if isinstance(arch, str) else None, protocol if isinstance(protocol, str) else None,
            bool(record["quick"]))


def _labels(frame: pd.DataFrame) -> list[str]:
    """Each record's ``base_label``, told apart where variants would share it: when records of one label fall in
    one table cell with differing configs (older records have no ``label`` of their own), every record of that
    label in that table (``_table_key``) gets what differs, ``apm[segment=100]``, so that a variant keeps one row
    across columns. Records of other tables keep the plain label: cost-only runs of several segment lengths do not
    rename the evaluated ``apm`` rows."""
    settings = [dict(config, distill_arch=arch) for config, arch in zip(frame["config"], frame["distill_arch"])]
    hashes = [stable_hash(setting) for setting in settings]
    tables = [_table_key(row) for _, row in frame.iterrows()]
    labels = list(frame["base_label"])
    cells: dict[tuple, list[int]] = {}  # (table, label, dataset, ipc) → positions of its records
    for i, (dataset, ipc) in enumerate(zip(frame["dataset"], frame["ipc"])):
        cells.setdefault((tables[i], labels[i], dataset, _ipc(ipc)), []).append(i)
    differing: dict[tuple, set[str]] = {}  # (table, label) → the config keys that tell its variants apart
    for (table, label, *_), members in cells.items():
        if len({hashes[i] for i in members}) > 1:
            differing.setdefault((table, label), set()).update(differing_keys([settings[i] for i in members]))
    return [_decorated(label, setting, differing.get((table, label)))
            for label, setting, table in zip(labels, settings, tables)]


def _decorated(label: str, setting: dict, keys: set[str] | None) -> str:
    """``label[k=v,…]`` for the config keys that tell a label's variants apart; the plain label without any."""
    if not keys:
        return label
    return label + "[" + ",".join(f"{key}={setting.get(key)}" for key in sorted(keys)) + "]"


def _label_order(labels: object) -> list[str]:
    def key(label: str) -> tuple[int, str]:
        return (ROW_ORDER.index(label) if label in ROW_ORDER else len(ROW_ORDER), label)

    return sorted(set(labels), key=key)


# ----------------------------------------------------------------------------------------------------------------
# A suite's report: its records only, and the cells it plans that have none


@dataclass
class SuiteCoverage:
    """What a suite's report covers: the records under the folder left out (count per suite; None: of no suite),
    the cells the suite plans (``planned_cells``) and those of them that no record is of."""

    suite: Suite
    left_out: Counter
    planned: pd.DataFrame
    missing: pd.DataFrame


def suite_records(frame: pd.DataFrame, suite_name: str, results_dir: str | os.PathLike
                  ) -> tuple[pd.DataFrame, Counter]:
    """The records of suite ``suite_name`` and the count of the others per suite (None: of no suite); a
    ``UserError`` naming the suites the records do come from when none is of this one."""
    suites = [name if isinstance(name, str) and name else None for name in frame["suite"]]
    left_out = Counter(name for name in suites if name != suite_name)
    if sum(left_out.values()) == len(frame):
        raise UserError(f"no record under {results_dir} is of suite '{suite_name}': its records are "
                        f"{_left_out_text(left_out)}; pass --results with a folder of suite {suite_name}'s records")
    return frame[[name == suite_name for name in suites]], left_out


def _left_out_text(left_out: Counter) -> str:
    """``3 of suite quick, 1 of suite mnist and 2 of no suite``."""
    parts = [f"{n} of suite {name}" for name, n in sorted((k, v) for k, v in left_out.items() if k is not None)]
    parts += [f"{left_out[None]} of no suite"] if left_out[None] else []
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def planned_quick_flags(suite: Suite, frame: pd.DataFrame) -> list[bool]:
    """The quick flags to plan a suite's cells with. A suite marked ``quick: true`` has only quick cells; any other
    runs its full recipes, or its quick ones under ``ddbench run --quick``, so its cells are planned with the
    flag(s) its records (``frame``, prepared) carry: both when some ran each way, each then with its own tables and
    its own missing cells — a quick run of a GPU suite does not list the whole full-recipe grid as missing."""
    return [True] if suite.quick else sorted({bool(quick) for quick in frame["quick"]})


def planned_cells(suite: Suite, quick_flags: list[bool], results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per cell the suite plans under each quick flag and per evaluation architecture (None for a cost-only
    grid's), in the columns of a record with status ``NOT_RUN``. Cells are resolved as ``ddbench validate``
    resolves them (``suite.resolve_cells``: the recipe picked per ipc, the options applied), reading no data."""
    from bench.registry import split_method_spec
    from bench.suite import naming_the_suite_file, resolve_cells, suite_requests

    cells: dict[tuple, dict] = {}  # two grids may name one cell (only when it is one record: run once)
    with naming_the_suite_file(suite):
        for quick in quick_flags:
            for request in suite_requests(suite, Path(results_dir), quick):
                for cell in resolve_cells(request):
                    for eval_arch in request.eval_archs or [None]:
                        row = {**dict.fromkeys(COLUMNS), "label": cell.label, "base_label": cell.label,
                               "suite": request.suite, "method": split_method_spec(cell.method_spec)[0],
                               "recipe": cell.method.recipe, "config": dict(cell.method.resolved_config),
                               "dataset": request.dataset, "ipc": cell.ipc, "distill_arch": request.distill_arch,
                               "eval_arch": eval_arch, "protocol": request.protocol, "quick": request.quick,
                               "seeds": list(request.seeds), "acc": [], "status": NOT_RUN, "device": None,
                               "distill_seed": request.distill_seed}
                        cells.setdefault(suite_cell_key(row), row)
    return pd.DataFrame(list(cells.values()), columns=[*COLUMNS, "method", "dataset", "config", "device",
                                                       "base_label"])


def _distill_seed(value: object) -> int:
    """A record's distillation seed (0 where an older record does not say)."""
    return 0 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def suite_cell_key(record: pd.Series | dict) -> tuple:
    """What makes a record one of a suite's planned cells: (label, dataset, ipc, evaluation architecture,
    protocol, quick flag, distillation seed) — not the config, so that a record written before a recipe changed
    still counts."""
    arch = record["eval_arch"]
    return (record["base_label"], record["dataset"], _ipc(record["ipc"]), arch if isinstance(arch, str) else None,
            record["protocol"], bool(record["quick"]), _distill_seed(record.get("distill_seed")))


def suite_coverage(suite: Suite, frame: pd.DataFrame, left_out: Counter,
                   results_dir: str | os.PathLike) -> SuiteCoverage:
    """The suite's planned cells, and those that none of its records (``frame``, prepared) is of."""
    planned = planned_cells(suite, planned_quick_flags(suite, frame), results_dir)
    recorded = {suite_cell_key(record) for _, record in frame.iterrows()}
    missing = planned[[suite_cell_key(cell) not in recorded for _, cell in planned.iterrows()]]
    return SuiteCoverage(suite, left_out, planned, missing)


def with_not_run_cells(frame: pd.DataFrame, coverage: SuiteCoverage | None) -> pd.DataFrame:
    """``frame`` plus a placeholder row (status ``NOT_RUN``) for every evaluated planned cell without a record:
    what the accuracy tables read, so that every row and column the suite plans shows. Nothing else reads it."""
    if coverage is None:
        return frame
    missing = coverage.missing[[isinstance(arch, str) for arch in coverage.missing["eval_arch"]]]
    return frame if missing.empty else pd.concat([frame, missing], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# A table, independent of its output format


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    latex_columns: str | None = None  # tabular column spec; default: first column left, the rest right


@dataclass
class Section:
    heading: str
    tables: list[Table] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # paragraphs before the tables


def _fmt_acc(mean: float | None, std: float | None) -> str:
    return f"{mean:.1f}" if std is None or pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _fmt_signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _text_or_dash(value: object) -> str:
    """A text column's value, or "–" where a record has none (None, or the NaN pandas puts in its place)."""
    return value if isinstance(value, str) and value else NOT_MEASURED


def _fmt_number(value: object, digits: int = 0) -> str:
    return NOT_MEASURED if _is_missing(value) else f"{float(value):,.{digits}f}"


def _fmt_seconds(value: object) -> str:
    if _is_missing(value):
        return NOT_MEASURED
    value = float(value)
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _fmt_flops(value: object) -> str:
    if _is_missing(value):
        return NOT_MEASURED
    value = float(value)
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}"
    return f"{value:.0f}"


def _ipc_text(ipc: object) -> str:
    ipc = _ipc(ipc)
    return "all" if ipc is None else str(ipc)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy


def _n_seeds(record: pd.Series) -> int:
    acc = record.get("acc")
    return len(acc) if isinstance(acc, list) and acc else len(record["seeds"] or [])


class Measured(NamedTuple):
    """What one accuracy cell shows."""

    text: str  # mean ± std, or the statuses when no record succeeded; without the smoke mark
    mean: float | None  # the figure to rank: None when nothing succeeded, and for a smoke test's figure
    seeds: int | None
    smoke_epochs: int | None = None  # the --eval-epochs of the smoke record shown; None for a real result
    smoke_hidden: int = 0  # smoke records left out because the cell has a real one
    superseded: int = 0  # other records of the cell left out: older ones, or failed ones beside a success
    sets: int = 1  # distilled sets whose evaluations the figure pools (one per distillation seed)

    def shown(self, show_n: bool = False) -> str:
        """The cell's text, with its number of seeds when asked and the smoke mark when it is a smoke test's."""
        text = f"{self.text} (n={self.seeds})" if show_n and self.seeds else self.text
        return text if self.smoke_epochs is None else f"{text} {SMOKE_MARK}"


def _measured(records: pd.DataFrame) -> Measured:
    """The newest successful record (``records`` are in written order; no std from a single seed); the statuses
    when none succeeded. A real result comes first: a smoke test's records count only where there is no real
    record, and are never ranked."""
    if records.empty:
        return Measured(NOT_MEASURED, None, None)
    smoke = records["eval_epochs_override"].notna()
    hidden = 0 if smoke.all() else int(smoke.sum())
    smoke_epochs = _smoke_epochs(records["eval_epochs_override"].iloc[-1]) if smoke.all() else None
    records = records[~smoke] if hidden else records
    placeholder = records["status"] == NOT_RUN  # a planned distillation seed without a record, beside real ones
    records = records[~placeholder] if not placeholder.all() else records
    ok = records[records["status"] == "ok"]
    if ok.empty:
        return Measured(", ".join(sorted(set(records["status"]))), None, None, smoke_epochs, hidden)
    row = ok.iloc[-1]
    smoke_epochs = _smoke_epochs(row["eval_epochs_override"])
    pooled = _one_per_distilled_set(ok, row)
    if len(pooled) == 1:
        n, mean, std = _n_seeds(row), float(row["acc_mean"]), row["acc_std"]
    else:  # several distilled sets of one config: mean and std over all their networks, as the papers' tables
        accs = [float(a) for _, record in pooled.iterrows() for a in record["acc"]]
        n, mean, std = len(accs), statistics.fmean(accs), statistics.pstdev(accs)  # ddof 0, as np.std
    return Measured(_fmt_acc(mean, std if n > 1 else None), None if smoke_epochs is not None else mean, n,
                    smoke_epochs, hidden, len(records) - len(pooled), len(pooled))


def _one_per_distilled_set(ok: pd.DataFrame, newest: pd.Series) -> pd.DataFrame:
    """The newest successful record of each distillation seed among those of ``newest``'s config (its
    ``config_hash``; records without one stand alone): the distilled sets a cell's figure pools."""
    if pd.isna(newest["config_hash"]):
        return ok.iloc[[-1]]
    same = ok[ok["config_hash"] == newest["config_hash"]]
    return same.groupby(same["distill_seed"].map(_distill_seed), sort=True).tail(1)


def _record_notes(cells: list[Measured]) -> list[str]:
    """The footnotes on which records a table's cells show: what ``†`` means, how many smoke records real ones hid,
    and how many records newer or successful ones of the same cell left out."""
    notes = []
    epochs = sorted({m.smoke_epochs for m in cells if m.smoke_epochs is not None})
    if epochs:
        counts = " or ".join(map(str, epochs))
        notes.append(f"{SMOKE_MARK} smoke test: every evaluation network trained {counts} epoch"
                     f"{'' if epochs == [1] else 's'} (--eval-epochs), not the protocol's; a check that the pipeline "
                     "runs, not a result: never bold, not ranked against the other cells.")
    hidden = sum(m.smoke_hidden for m in cells)
    if hidden:
        notes.append(f"{hidden} smoke-test record{'' if hidden == 1 else 's'} (--eval-epochs) left out: where a cell "
                     "has a real result as well, only the real one is shown.")
    pooled = [m.sets for m in cells if m.sets > 1]
    if pooled:
        notes.append(f"{len(pooled)} cell{'' if len(pooled) == 1 else 's'} here pool{'s' if len(pooled) == 1 else ''} "
                     f"the evaluations of {' / '.join(map(str, sorted(set(pooled))))} distilled sets (one per "
                     "distillation seed, the newest record of each): mean ± std over all their networks, n counts "
                     "them, as the papers' tables do over experiments × networks.")
    superseded = [m.superseded for m in cells if m.superseded]
    if superseded:
        notes.append(f"{len(superseded)} cell{'' if len(superseded) == 1 else 's'} here had more than one record "
                     f"({sum(superseded)} more): each shows its newest successful record (by the records' written_at).")
    return notes


def _protocol_departures(group: pd.DataFrame, protocol: str, quick: bool) -> list[str]:
    """A note naming the rows whose networks trained with another lr, number of epochs or loss than the protocol's
    own (a learned lr that MTT's and TESLA's sets carry, a method's own epochs such as full's, TESLA's loss for its
    soft labels), so that no table hides
    a change of its evaluation behind the protocol's name. Smoke tests (--eval-epochs) have their own note."""
    from bench.evaluate import get_protocol

    try:
        nominal = get_protocol(protocol).resolve(quick)
    except UserError:  # a protocol this ddbench does not know (a newer record): nothing to compare with
        return []
    real = group[(group["status"] == "ok") & group["eval_epochs_override"].isna()]
    departures: dict[str, list[str]] = {}
    for label, records in real.groupby("label", sort=False):
        lrs = sorted({float(lr) for lr in records.get("protocol_lr", pd.Series(dtype=float)).dropna()
                      if not math.isclose(float(lr), nominal.lr)})
        epochs = sorted({int(e) for e in records.get("protocol_epochs", pd.Series(dtype=float)).dropna()
                         if int(e) != nominal.epochs})
        losses = sorted({str(loss) for loss in records.get("protocol_loss", pd.Series(dtype=object)).dropna()
                         if loss != nominal.loss})
        learned = records.get("learned_lr", pd.Series(dtype=float)).notna().any()
        said = ([f"lr {' / '.join(f'{lr:.3g}' for lr in lrs)}" + (" (learned, carried by its sets)" if learned else "")]
                if lrs else []) + ([f"{' / '.join(map(str, epochs))} epochs"] if epochs else []) + (
                [f"loss {' / '.join(losses)} (asked for by its sets)"] if losses else [])
        if said:
            departures[label] = said
    if not departures:
        return []
    rows = "; ".join(f"{label}: {', '.join(said)}" for label, said in departures.items())
    return [f"Trained otherwise than the protocol's lr {nominal.lr:g} for {nominal.epochs} epochs with loss "
            f"{nominal.loss}: {rows}."]


def _records_for(group: pd.DataFrame, label: str, dataset: str, ipc: int | None) -> pd.DataFrame:
    """A label's records for one dataset × ipc column; a label evaluated without ipc (``full``) fills every column."""
    mine = group[(group["label"] == label) & (group["dataset"] == dataset)]
    if mine.empty or mine["ipc"].isna().all():
        return mine
    return mine[mine["ipc"] == ipc]


def _columns(group: pd.DataFrame) -> list[tuple[str, int | None]]:
    """The dataset × ipc columns of a group; a dataset measured only without ipc gets one column."""
    columns = []
    for dataset in sorted(set(group["dataset"])):
        ipcs = sorted({int(i) for i in group.loc[group["dataset"] == dataset, "ipc"].dropna()})
        columns += [(dataset, ipc) for ipc in ipcs] or [(dataset, None)]
    return columns


def _bold_best(rows: list[list[Cell]], means: list[list[float | None]], labels: list[str]) -> None:
    """Bold the highest mean of every column (as printed, so ties are all bold), ``full`` excluded; a mean of None
    (nothing measured, or a smoke test's figure) is never a candidate."""
    for column in range(len(means[0]) if means else 0):
        candidates = [round(m[column], 1) for m, label in zip(means, labels)
                      if label != "full" and m[column] is not None]
        if not candidates:
            continue
        for row, m, label in zip(rows, means, labels):
            if label != "full" and m[column] is not None and round(m[column], 1) == max(candidates):
                row[column + 1].bold = True


def _accuracy_title(arch: str, protocol: str, quick: bool, seeds: set[int | None], smoke: bool = False) -> str:
    seeds = {s for s in seeds if s}
    n = seeds.pop() if len(seeds) == 1 else None
    if n == 1:
        what = "one seed, so no std"
    elif n is None and not seeds:  # nothing measured yet: a suite's cells, none run
        what = "mean ± std over seeds"
    else:
        what = "mean ± std " + ("over n seeds, n in each cell" if n is None else f"over {n} seeds")
    title = f"Test accuracy % {ACC_DIRECTION} ({what}), evaluated on {arch}, protocol {protocol}"
    title += " — QUICK: reduced CPU recipes" if quick else ""
    return title + (f" — {SMOKE_MARK} SMOKE TESTS (--eval-epochs), not results" if smoke else "")


STD_NOTE = ("± is the standard deviation over seeds with ddof 0 (the population std, numpy's np.std, as the "
            "papers' code computes it): over the evaluation networks trained on one distilled set (the cell's "
            "distillation seed), unless a note says a cell pools several. Papers' std often spans several distilled "
            "sets (DC and DSA: 5 sets × 20 networks; a suite's distill_seed list does the same), so it may be larger "
            "than a single set's.")
NOT_RUN_NOTE = (f"{NOT_RUN}: a cell the suite plans that has no record yet (listed under “Cells of the suite "
                "without a record”); never bold, not ranked.")


def accuracy_table(group: pd.DataFrame, arch: str, protocol: str, quick: bool) -> Table:
    """Rows: labels; columns: dataset × ipc; the best per column in bold (a smoke test's figure never, a planned
    cell without a record, ``NOT_RUN``, neither)."""
    columns, labels = _columns(group), _label_order(group["label"])
    measured = {(label, column): _measured(_records_for(group, label, *column))
                for label in labels for column in columns}
    seeds = {m.seeds for m in measured.values()}
    show_n = len({s for s in seeds if s}) > 1
    rows, means = [], []
    for label in labels:
        cells = [measured[label, column] for column in columns]
        rows.append([Cell(label)] + [Cell(m.shown(show_n)) for m in cells])
        means.append([m.mean for m in cells])
    _bold_best(rows, means, labels)
    notes = ["Bold: the best of each column (full data excluded).", STD_NOTE]
    if any(m.text == NOT_RUN for m in measured.values()):
        notes.append(NOT_RUN_NOTE)
    if "full" in labels:
        real = group[(group["label"] == "full") & group["eval_epochs_override"].isna() & (group["status"] != NOT_RUN)]
        quick_epochs = sorted({config.get("quick_eval_epochs") for config in real["config"]
                               if quick and config.get("quick_eval_epochs")})
        trained = (f" for {', '.join(map(str, quick_epochs))} epochs (its quick recipe: an epoch of the whole set is "
                   "many mini-batches)") if quick_epochs else ""
        smoke_epochs = sorted({measured["full", column].smoke_epochs for column in columns} - {None})
        if smoke_epochs:  # a dataset without a real record of full shows a smoke test's figure
            epochs = f"{' or '.join(map(str, smoke_epochs))} epochs"
            trained = (f" for {epochs} ({SMOKE_MARK} a smoke test's --eval-epochs, not its recipe's)" if real.empty
                       else f"{trained}; its {SMOKE_MARK} figures for {epochs} (a smoke test's --eval-epochs)")
        notes.append(f"full: trained on the whole training set{trained}; it does not depend on ipc, so its one value "
                     "fills every column of its dataset.")
    notes += _record_notes(list(measured.values()))
    notes += _protocol_departures(group, protocol, quick)
    smoke = any(m.smoke_epochs is not None for m in measured.values())
    headers = ["method"] + [f"{dataset} ipc {_ipc_text(ipc)}" for dataset, ipc in columns]
    return Table(_accuracy_title(arch, protocol, quick, seeds, smoke), headers, rows, notes)


def published_table(group: pd.DataFrame, arch: str, protocol: str, quick: bool, published: Published) -> Table | None:
    """Ours beside the published number of every cell that has one (``_published_entry``); a suite's planned cell
    without a record shows ``NOT_RUN`` there, with no difference."""
    rows, seen, measured = [], set(), []
    for label in _label_order(group["label"]):
        for dataset, ipc in _columns(group):
            records = _records_for(group, label, dataset, ipc)
            if records.empty:
                continue
            if records["ipc"].isna().all():  # full data: one row per dataset, not one per ipc column
                ipc = None
                if (label, dataset) in seen:
                    continue
                seen.add((label, dataset))
            entry = _published_entry(records, dataset, ipc, protocol, arch, published)
            if entry is None:
                continue
            ours = _measured(records)
            measured.append(ours)
            difference = NOT_MEASURED if ours.mean is None else _fmt_signed(ours.mean - entry["mean"])
            rows.append([Cell(label), Cell(dataset), Cell(_ipc_text(ipc)), Cell(ours.shown()),
                         Cell(_fmt_acc(entry["mean"], entry["std"])), Cell(entry["source"]), Cell(difference)])
    if not rows:
        return None
    title = f"Ours beside published numbers, evaluated on {arch}, protocol {protocol}"
    notes = ["difference = ours − published, in percentage points; published numbers are as the source reports "
             "them (ConvNet; std blank where the source gives none), evaluated as the source did: where that "
             "differs from this protocol, the source's entry below says how.", STD_NOTE]
    if any(m.smoke_epochs is not None for m in measured):
        notes.append(f"A smoke test's figure ({SMOKE_MARK}) gets no difference: it says nothing about a reproduction.")
    notes += _record_notes(measured)
    if quick:
        title += " — ours are QUICK (reduced CPU recipes)"
        notes.insert(0, "Ours come from the QUICK reduced CPU recipes, the published numbers from full recipes: "
                        "the difference is what the quick recipe costs, not a failed reproduction.")
    headers = ["method", "dataset", "ipc", f"ours {ACC_DIRECTION}", "published", "source", "difference"]
    return Table(title, headers, rows, notes, latex_columns="lllrrlr")


def _published_entry(records: pd.DataFrame, dataset: str, ipc: int | None, protocol: str, arch: str,
                     published: Published) -> dict | None:
    """The published accuracy to put beside one row's records in one column, or None.

    The records must share one method and one number of subgroups (``Published.accuracy`` matches it), and be either
    the method's own row (label = method name, whatever the decoration ``_labels`` added) or a variant whose only
    change to its method's recipe is the subgroups, beside an entry of merged subgroups (one that names
    ``subgroups``): the parallel suite's ``apm-merged`` rows get APM's figure for G subgroups, while an ablation's
    ``apm-K3`` (another K) or a variant with any other option gets no published number. (A variant whose config is
    exactly its recipe's, such as ``apm-K5``, is the setting of an entry of one subgroup, and gets it; an entry
    without ``subgroups`` is never put beside a variant.)"""
    methods = set(records["method"])
    subgroups = {config.get("subgroups") or 1 for config in records["config"]}
    if len(methods) != 1 or len(subgroups) != 1:
        return None
    method = methods.pop()
    entry = published.accuracy(dataset, method, ipc, protocol, arch, subgroups.pop())
    if entry is None or set(records["base_label"]) == {method}:
        return entry
    if entry.get("subgroups") and all(_recipe_changes(record) <= {"subgroups"} for _, record in records.iterrows()):
        return entry
    return None


def _recipe_changes(record: pd.Series) -> set[str]:
    """The config keys in which a record differs from the recipe it names (its method's defaults without one;
    quick overrides applied for a quick record); every key when that recipe can no longer be built."""
    from bench.registry import create_method

    config, recipe = record["config"], record["recipe"]
    spec = record["method"] + (f".{recipe}" if isinstance(recipe, str) else "")
    try:
        planned = create_method(spec, quick=bool(record["quick"])).resolved_config
    except UserError:
        return set(config) | {"recipe"}
    return {key for key, value in config.items() if key not in planned or planned[key] != value}


def accuracy_section(frame: pd.DataFrame, published: Published) -> Section:
    section = Section("Test accuracy")
    for (arch, protocol, quick), group in frame.groupby(["eval_arch", "protocol", "quick"], sort=True):
        section.tables.append(accuracy_table(group, arch, protocol, quick))
        beside = published_table(group, arch, protocol, quick, published)
        if beside is not None:
            section.tables.append(beside)
    if not section.tables:
        section.text.append("No record here was evaluated: these runs measured the costs of distillation only.")
    return section


def accuracy_tables(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, Markdown table) for every evaluation architecture × protocol × quick group of ``frame``
    (``store.load_results``); the rows are methods, the columns dataset × ipc."""
    frame = prepare_frame(frame)
    return [(table.title, markdown_table(table))
            for (arch, protocol, quick), group in frame.groupby(["eval_arch", "protocol", "quick"], sort=True)
            for table in [accuracy_table(group, arch, protocol, quick)]]


def cross_architecture_section(frame: pd.DataFrame) -> Section | None:
    """Per protocol × quick flag evaluated on several architectures: rows labels, columns architectures, one table
    per dataset × ipc."""
    section = Section("Across evaluation architectures")
    for (protocol, quick), group in frame.groupby(["protocol", "quick"], sort=True):
        if group["eval_arch"].nunique() < 2:
            continue
        for dataset, ipc in _columns(group):
            here = group[(group["dataset"] == dataset) & ((group["ipc"] == ipc) if ipc is not None else True)]
            archs = sorted({arch for arch in here["eval_arch"] if isinstance(arch, str)})  # not cost-only records
            if len(archs) < 2:  # this dataset × ipc was evaluated on one architecture only
                continue
            labels = [label for label in _label_order(group.loc[group["dataset"] == dataset, "label"])
                      if not _records_for(group, label, dataset, ipc).empty]
            rows, means, measured = [], [], []
            for label in labels:
                cells = [_measured(_records_for(group[group["eval_arch"] == arch], label, dataset, ipc))
                         for arch in archs]
                rows.append([Cell(label)] + [Cell(m.shown()) for m in cells])
                means.append([m.mean for m in cells])
                measured += cells
            _bold_best(rows, means, labels)
            distilled_on = ", ".join(sorted({str(a) for a in group["distill_arch"].dropna()})) or "–"
            title = (f"{dataset} ipc {_ipc_text(ipc)}: test accuracy % {ACC_DIRECTION} (mean ± std) by evaluation "
                     f"architecture, protocol {protocol}, distilled on {distilled_on}")
            title += " — QUICK: reduced CPU recipes" if quick else ""
            if any(m.smoke_epochs is not None for m in measured):
                title += f" — {SMOKE_MARK} SMOKE TESTS (--eval-epochs), not results"
            notes = ["Bold: the best of each column (full data excluded)."] + _record_notes(measured)
            section.tables.append(Table(title, ["method", *archs], rows, notes))
    return section if section.tables else None


# ----------------------------------------------------------------------------------------------------------------
# Costs of distillation


def distilled_sets(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per distilled set (label × dataset × ipc × quick): its newest successful record, else its newest
    (``frame`` is in written order); a real record before a smoke test's (whose distillation is the same, only its
    evaluation was cut short)."""
    rows = []
    for _, records in frame.groupby(["label", "dataset", "ipc", "quick"], dropna=False, sort=False):
        ok, smoke = records["status"] == "ok", records["eval_epochs_override"].notna()
        for pick in (ok & ~smoke, ok, ~smoke, smoke):
            if pick.any():
                rows.append(records[pick].iloc[-1])
                break
    order = {label: i for i, label in enumerate(_label_order(frame["label"]))}
    sets = pd.DataFrame(rows)
    sets["ipc"] = pd.Series([_ipc(i) for i in sets["ipc"]], index=sets.index, dtype=object)
    sets["_order"] = [order[label] for label in sets["label"]]
    return sets.sort_values(["quick", "dataset", "ipc", "_order"], na_position="first").drop(columns="_order")


def _gpu_cell(value: object, reason: object, reasons: dict[str, int]) -> Cell:
    """A GPU memory figure, or "–" with the number of the footnote that gives the reason (never 0)."""
    if not _is_missing(value):
        return Cell(_fmt_number(value))
    reason = reason if isinstance(reason, str) and reason else "not measured"
    return Cell(f"{NOT_MEASURED} [{reasons.setdefault(reason, len(reasons) + 1)}]")


def cost_section(frame: pd.DataFrame, published: Published) -> Section | None:
    """One table per quick flag: the distillation costs of every distilled set, with published figures beside
    where they match (APM's ImageNet-1K figures per segment length, TESLA's)."""
    from bench.runner import NOT_DISTILLED_HERE

    sets = distilled_sets(frame)
    reasons = sets["flops_reason"] if "flops_reason" in sets else pd.Series(None, index=sets.index, dtype=object)
    evaluated_only = reasons == NOT_DISTILLED_HERE["flops_reason"]  # `ddbench evaluate` of a saved set
    sets = sets[(sets["label"] != "full") & ~evaluated_only]
    if sets.empty:
        return None
    section = Section(f"Costs of distillation {COST_DIRECTION}", text=[
        "Distillation phase of each distilled set (one row per set, whatever it was evaluated on). GPU peak: NVML "
        "process peak and the PyTorch allocator peak; CPU: peak resident set size; s/iteration: median after "
        "warm-up (for methods whose iterations repeat in periods, such as APM's student training every mid_gap + 1 "
        "iterations, the mean iteration of whole periods); FLOPs: per distillation iteration, averaged over one "
        "period."])
    for quick, group in sets.groupby("quick", sort=True):
        reasons: dict[str, int] = {}  # why a GPU figure is missing → its footnote number
        pub_rows = [published.cost(r["dataset"], r["method"], r["ipc"], r["config"].get("segment"))
                    for _, r in group.iterrows()]
        rows = []
        for (_, r), pub in zip(group.iterrows(), pub_rows):
            row = [Cell(r["label"]), Cell(r["dataset"]), Cell(_ipc_text(r["ipc"])), Cell(_text_or_dash(r["device"])),
                   _gpu_cell(r["distill_gpu_nvml_peak_mb"], r["distill_gpu_reason"], reasons),
                   _gpu_cell(r["distill_gpu_torch_allocated_peak_mb"], r["distill_gpu_reason"], reasons),
                   Cell(_fmt_number(r["distill_cpu_peak_rss_mb"])), Cell(_fmt_seconds(r["iter_time_s_median"])),
                   Cell(_fmt_seconds(r["distill_wall_s"])), Cell(_fmt_flops(r["flops_per_iter"]))]
            if any(pub_rows):
                row += ([Cell(f"{pub['gpu_peak_gb']:.1f}"), Cell(f"{pub['s_per_iter']:.1f}"), Cell(pub["source"])]
                        if pub else [Cell(NOT_MEASURED) for _ in range(3)])
            rows.append(row)
        d = COST_DIRECTION
        headers = ["method", "dataset", "ipc", "device", f"GPU peak NVML (MB) {d}", f"GPU peak allocator (MB) {d}",
                   f"CPU peak RSS (MB) {d}", f"s/iteration {d}", f"distill time (s) {d}", f"FLOPs/iteration {d}"]
        columns = "llll" + "r" * 6
        notes = [f"[{n}] GPU figures not measured: {reason}." for reason, n in reasons.items()]
        held = _datasets_held(group)
        if held:
            notes.append(f"The peaks include the dataset each cell held throughout, on the device named: {held}.")
        if any(pub_rows):
            headers += [f"published GPU peak (GB) {d}", f"published s/iteration {d}", "source"]
            columns += "rrl"
            hardware = {p["hardware"] for p in pub_rows if p}
            notes.append(f"Published figures: hardware {', '.join(sorted(hardware))}; "
                         "ours ran on the device in the device column.")
        title = "Distillation costs" + (" — QUICK: reduced CPU recipes" if quick else "")
        section.tables.append(Table(title, headers, rows, notes, latex_columns=columns))
    return section


def _datasets_held(group: pd.DataFrame) -> str:
    """``cifar10 703.1 MB on the GPU; imagenet64 63,466.1 MB on the CPU`` — each dataset of the table as its records
    say it was held (``dataset_resident_mb``, ``dataset_device``); records from before those fields name none."""
    where = {"cuda": "the GPU", "cpu": "the CPU"}
    held = {(r["dataset"], float(r["dataset_resident_mb"]), where.get(r["dataset_device"], r["dataset_device"]))
            for _, r in group.iterrows()
            if isinstance(r["dataset_device"], str) and pd.notna(r["dataset_resident_mb"])}
    return "; ".join(f"{name} {mb:,.1f} MB on {device}" for name, mb, device in sorted(held))


# ----------------------------------------------------------------------------------------------------------------
# Failures


def _error_summary(error: object, limit: int = 240) -> str:
    """The last non-empty line of an error (the exception itself, after any traceback), shortened."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    text = lines[-1] if lines else "(no error text)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure_section(frame: pd.DataFrame) -> Section | None:
    failed = frame[frame["status"].isin(FAILED_STATUSES)]
    if failed.empty:
        return None
    smoke = failed["eval_epochs_override"].notna()
    rows = [[Cell(r["label"]), Cell(r["dataset"]), Cell(_ipc_text(r["ipc"])), Cell(str(r["eval_arch"])),
             Cell(str(r["protocol"])), Cell(r["status"] + (f" {SMOKE_MARK}" if is_smoke else "")),
             Cell(_error_summary(r["error"]))]
            for (_, r), is_smoke in zip(failed.iterrows(), smoke)]
    notes = ["error: the last line of the record's error text."]
    if smoke.any():
        notes.append(f"{SMOKE_MARK} a smoke test's record (--eval-epochs: evaluation networks trained "
                     f"{' or '.join(map(str, sorted(set(failed.loc[smoke, 'eval_epochs_override']))))} epochs).")
    table = Table(f"{len(rows)} cell(s) without a result", ["method", "dataset", "ipc", "eval arch", "protocol",
                                                               "status", "error"],
                  rows, notes, latex_columns="llllllp{0.4\\linewidth}")
    return Section("Failed, out-of-memory and diverged cells", [table])


# ----------------------------------------------------------------------------------------------------------------
# A suite's cells without a record


MISSING_HEADING = "Cells of the suite without a record"


def missing_section(coverage: SuiteCoverage) -> Section | None:
    """One table per quick flag of the suite's planned cells that no record is of (cost-only cells included)."""
    missing, suite = coverage.missing, coverage.suite
    if missing.empty:
        return None
    section = Section(MISSING_HEADING, text=[
        f"Cells that suite {suite.name} (version {suite.version}, {suite.path.name}) plans and that no record of "
        f"the suite is of, matched by label, dataset, ipc, evaluation architecture, protocol, quick flag and "
        f"distillation seed: "
        f"ddbench run --suite {suite.name} --resume runs them (with --quick, the quick ones)."])
    for quick, group in missing.groupby("quick", sort=True):
        rows = [[Cell(cell["label"] + (f" (distill seed {_distill_seed(cell['distill_seed'])})"
                                       if _distill_seed(cell["distill_seed"]) else "")),
                 Cell(cell["dataset"]), Cell(_ipc_text(cell["ipc"])),
                 Cell(cell["eval_arch"] if isinstance(cell["eval_arch"], str) else f"{NOT_MEASURED} (costs only)"),
                 Cell(cell["protocol"])] for _, cell in group.iterrows()]
        title = f"{len(rows)} planned cell(s) with no record" + (" — QUICK: reduced CPU recipes" if quick else "")
        section.tables.append(Table(title, ["method", "dataset", "ipc", "eval arch", "protocol"], rows,
                                    latex_columns="lllll"))
    return section


# ----------------------------------------------------------------------------------------------------------------
# Markdown and LaTeX


def markdown_table(table: Table) -> str:
    def text(cell: Cell) -> str:
        value = cell.text.replace("|", "\\|").replace("\n", " ")
        return f"**{value}**" if cell.bold else value

    return tabulate([[text(c) for c in row] for row in table.rows], headers=table.headers, tablefmt="github",
                    disable_numparse=True)


LATEX_REPLACEMENTS = {
    "\\": r"$\backslash$", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\~{}", "^": r"\^{}", "<": r"$<$", ">": r"$>$", "|": r"$|$", "±": r"$\pm$", "↑": r"$\uparrow$",
    "↓": r"$\downarrow$", "−": r"$-$", "–": "--", "—": "---", "×": r"$\times$", "≈": r"$\approx$",
    "…": r"\ldots{}", "·": r"$\cdot$", "“": "``", "”": "''", "‘": "`", "’": "'", "†": r"$^\dagger$",
    "/": r"/\allowbreak{}",  # a long path may break after a slash instead of running off the page
}


def latex_escape(text: str) -> str:
    """Text → LaTeX that pdflatex compiles with no extra package or font (nothing from the TS1 text-companion
    fonts): specials escaped, known symbols as math, any other non-ASCII character as its closest ASCII form
    (or ``?``); ``--`` stays two hyphens (``--eval-epochs``), not an en dash; a slash may end a line."""
    out = []
    text = str(text)
    for i, char in enumerate(text):
        if char == "-" and text[i + 1 : i + 2] == "-":
            out.append("-{}")
        elif char in LATEX_REPLACEMENTS:
            out.append(LATEX_REPLACEMENTS[char])
        elif ord(char) < 128:
            out.append(char)
        else:
            ascii_form = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            out.append("".join(LATEX_REPLACEMENTS.get(c, c) for c in ascii_form) or "?")
    return "".join(out)


def latex_table(table: Table) -> str:
    def text(cell: Cell) -> str:
        value = latex_escape(cell.text)
        value = f"\\textbf{{{value}}}" if cell.bold else value
        return "{}" + value if value.startswith("[") else value  # a row must not start with '[' after '\\'

    columns = table.latex_columns or "l" + "r" * (len(table.headers) - 1)
    lines = [f"\\par\\medskip\\noindent\\textbf{{{latex_escape(table.title)}}}\\par\\smallskip",
             "\\begin{center}", "\\fittable{%", f"\\begin{{tabular}}{{{columns}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in table.headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(text(c) for c in row) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
    lines += [f"{{\\footnotesize {latex_escape(note)}\\par}}" for note in table.notes]
    return "\n".join(lines)


def _sources_used(sections: list[Section], published: Published) -> dict[str, str]:
    cited = {cell.text for s in sections for t in s.tables if "source" in t.headers
             for row in t.rows for cell in [row[t.headers.index("source")]]}
    return {key: text for key, text in published.sources.items() if key in cited}


def render_markdown(name: str, intro: list[str], sections: list[Section], figures: list,
                    sources: dict[str, str]) -> str:
    parts = [f"# ddbench report: {name}", "", *[line + "\n" for line in intro]]
    for section in sections:
        parts += [f"## {section.heading}", ""]
        parts += [paragraph + "\n" for paragraph in section.text]
        for table in section.tables:
            parts += [f"### {table.title}", "", markdown_table(table), ""]
            parts += [note + "  " for note in table.notes] + ([""] if table.notes else [])
    if figures:
        parts += ["## Figures", ""]
        for figure in figures:
            parts += [f"### {figure.title}", "", f"![{figure.title}](figures/{quote(figure.path.name)})", ""]
    if sources:
        parts += ["## Sources of the published numbers", ""]
        parts += [f"- **{key}**: {text}" for key, text in sources.items()] + [""]
    return "\n".join(parts)


LATEX_PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\usepackage{graphicx}
\newsavebox{\tablebox}
% a table wider than the text is scaled down to the text width
\newcommand{\fittable}[1]{\sbox{\tablebox}{#1}%
  \ifdim\wd\tablebox>\linewidth\resizebox{\linewidth}{!}{\usebox{\tablebox}}\else\usebox{\tablebox}\fi}
\setlength{\parindent}{0pt}
"""


def render_latex(name: str, intro: list[str], sections: list[Section], figures: list, sources: dict[str, str]) -> str:
    parts = [LATEX_PREAMBLE, "\\begin{document}", f"{{\\Large\\bfseries ddbench report: {latex_escape(name)}\\par}}",
             "\\medskip", *[latex_escape(line.replace("`", "")) + "\\par" for line in intro]]
    for section in sections:
        parts += [f"\\section*{{{latex_escape(section.heading)}}}", *[latex_escape(p) + "\\par" for p in section.text]]
        parts += [latex_table(table) for table in section.tables]
    if figures:
        parts.append("\\section*{Figures}")
        for figure in figures:
            path = f"figures/{figure.path.name}"
            parts += [f"\\par\\medskip\\noindent\\textbf{{{latex_escape(figure.title)}}}\\par",
                      f"\\IfFileExists{{{path}}}{{\\begin{{center}}\\includegraphics[width=0.9\\linewidth,"
                      f"height=0.4\\textheight,keepaspectratio]{{{path}}}\\end{{center}}}}{{(figure file missing)}}"]
    if sources:
        parts.append("\\section*{Sources of the published numbers}")  # no itemize: its bullet needs a TS1 font
        parts += [f"\\textbf{{{latex_escape(k)}}}: {latex_escape(v)}\\par" for k, v in sources.items()]
    parts.append("\\end{document}")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Files


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_index(out_dir: str | os.PathLike) -> Path:
    """Rebuild ``<out>/README.md``: every report (``*.md``, ``*.tex``) in ``out_dir`` and every figure under
    ``figures/``, grouped by report name (a figure ``<name>_*.png`` belongs to the longest matching name)."""
    out = Path(out_dir)
    documents = [p for p in sorted(out.glob("*.md")) + sorted(out.glob("*.tex")) if p.name != "README.md"]
    names = sorted({p.stem for p in documents})
    figures: dict[str | None, list[Path]] = {}
    for figure in sorted((out / "figures").glob("*.png")):
        owners = [n for n in names if figure.name.startswith(n + "_")]
        figures.setdefault(max(owners, key=len) if owners else None, []).append(figure)
    lines = ["# Reports", "", "This index is rebuilt by `ddbench report` (`bench.report.write_reports`) from the files "
             "in this folder.", ""]
    for name in names + ([None] if None in figures else []):
        lines += [f"## {name if name else 'Other figures'}", ""]
        for document in (p for p in documents if p.stem == name):
            kind = "Markdown" if document.suffix == ".md" else "LaTeX (compile with pdflatex)"
            lines.append(f"- [{document.name}]({quote(document.name)}) — {kind}")
        lines += [f"- figure: [{f.name}](figures/{quote(f.name)})" for f in figures.get(name, [])]
        lines.append("")
    return write_text_atomic(out / "README.md", "\n".join(lines))


def write_reports(results_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
                  suite: Suite | None = None) -> list[Path]:
    """Write ``<out>/<name>.md``, ``<out>/<name>.tex``, ``<out>/figures/<name>_*.png`` and ``<out>/README.md`` from the
    records under ``results_dir``; ``name`` defaults to the suite's name, else the results folder's. Returns the
    paths written. With ``suite``, only that suite's records, and every cell it plans (see the module docstring).

    A results folder without records (or, with a suite, without a record of it), and an ``out_dir`` that cannot be
    written, are one-line ``UserError``s raised before anything is written: the records are read first, so that no
    report folder is created for nothing."""
    from bench.figures import sets_without_files, write_figures  # matplotlib is slow to import; only reports need it

    out = Path(out_dir)
    frame, coverage = report_frame(results_dir, suite)
    name = name or (suite.name if suite else Path(results_dir).resolve().name)
    with _new_folders_removed_on_failure(out / "figures"):
        check_writable_folder(out, "report folder", "pass --out with a folder you can write the report to",
                              inside="figures")
        published = load_published()
        with_planned = with_not_run_cells(frame, coverage)
        sections = [s for s in (accuracy_section(with_planned, published), cross_architecture_section(with_planned),
                                cost_section(frame, published), failure_section(frame),
                                missing_section(coverage) if coverage else None) if s is not None]
        sets = distilled_sets(frame)
        figures = write_figures(frame, sets, _label_order(frame["label"]), out / "figures", name, Path(results_dir))
        intro = report_intro(frame, results_dir, coverage)
        unseen = sets_without_files(sets, Path(results_dir))
        if unseen:  # e.g. records committed to git without their sets (which are data, and are not)
            intro.append(f"The images of {len(unseen)} distilled set{'' if len(unseen) == 1 else 's'} are not drawn: "
                         f"{'its file was' if len(unseen) == 1 else 'their files were'} not found (e.g. {unseen[0]}); "
                         "restore the sets or rerun their cells to draw them.")
        sources = _sources_used(sections, published)
        paths = [write_text_atomic(out / f"{name}.md", render_markdown(name, intro, sections, figures, sources)),
                 write_text_atomic(out / f"{name}.tex", render_latex(name, intro, sections, figures, sources))]
        return paths + [figure.path for figure in figures] + [write_index(out)]


@contextmanager
def _new_folders_removed_on_failure(folder: Path) -> Iterator[None]:
    """Run the block; should it fail, remove again ``folder`` and those of its parents that did not exist before
    it and are still empty, so that a failed report leaves no empty ``figures/`` (or report folder) behind."""
    new = []  # innermost first
    while not folder.exists() and folder != folder.parent:
        new.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for created in new:
            try:
                created.rmdir()  # only if empty: a file written in it is kept, and so are its parents
            except OSError:
                break
        raise


def report_frame(results_dir: str | os.PathLike, suite: Suite | None) -> tuple[pd.DataFrame, SuiteCoverage | None]:
    """The records to report, prepared: all of them, or with ``suite`` the suite's, with what they cover of it."""
    records = read_records(results_dir)
    if suite is None:
        return prepare_frame(records), None
    records, left_out = suite_records(records, suite.name, results_dir)
    frame = prepare_frame(records)
    return frame, suite_coverage(suite, frame, left_out, results_dir)


def report_intro(frame: pd.DataFrame, results_dir: str | os.PathLike, coverage: SuiteCoverage | None) -> list[str]:
    """The report's opening lines: what it was made from, what the marks mean."""
    if coverage is None:
        suites = sorted({s for s in frame["suite"].dropna()})
        intro = [f"Generated from the {len(frame)} record{'' if len(frame) == 1 else 's'} under `{results_dir}`"
                 + (f" (suite {', '.join(suites)})." if suites else ".")]
    else:
        intro = [f"Generated from the {len(frame)} record{'' if len(frame) == 1 else 's'} of suite {coverage.suite.name} "
                 f"under `{results_dir}`.",
                 *_coverage_lines(coverage)]
    intro.append(f"Accuracy {ACC_DIRECTION}: higher is better; costs {COST_DIRECTION}: lower is better.")
    if frame["quick"].any():
        intro.append("QUICK marks results of the reduced CPU recipes (for checking the pipeline, not the papers' "
                     "settings).")
    smoke = frame["eval_epochs_override"].notna()
    if smoke.any():
        epochs = " or ".join(map(str, sorted(set(frame.loc[smoke, "eval_epochs_override"]))))
        intro.append(f"{int(smoke.sum())} of these records are smoke tests (`--eval-epochs`: every evaluation network "
                     f"trained {epochs} epochs, not the protocol's), marked {SMOKE_MARK}: a check that the pipeline "
                     "runs, not results. They are never bold nor ranked, a cell with a real result shows only that, "
                     "and the accuracy figures leave them out.")
    return intro


def _coverage_lines(coverage: SuiteCoverage) -> list[str]:
    """How many records of the folder a suite's report left out, and how many of its cells have no record."""
    lines = []
    others = sum(coverage.left_out.values())
    if others:
        lines.append(f"{others} other record{'' if others == 1 else 's'} under the folder left out: "
                     f"{_left_out_text(coverage.left_out)}.")
    missing = len(coverage.missing)
    planned = len(coverage.planned)
    line = (f"{missing} of the suite's {planned} cell{'' if planned == 1 else 's'} "
            f"{'has' if missing == 1 else 'have'} no record yet")
    lines.append(line + (f": “{NOT_RUN}” in the accuracy tables, listed under “{MISSING_HEADING}”."
                         if missing else "."))
    return lines
