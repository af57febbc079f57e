"""Reports from records: Markdown tables of test accuracy (↑), mean ± std over seeds.

One table per (dataset, evaluation architecture, protocol, quick): rows are methods, columns ipc. ``full`` does
not depend on ipc and shows its one value in every column. Quick results are marked as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.store import ACC_DIRECTION, load_results

ROW_ORDER = ("full", "random", "herding")


def _cell(group: pd.DataFrame) -> str:
    ok = group[group["status"] == "ok"]
    if ok.empty:
        return ", ".join(sorted(set(group["status"])))
    row = ok.iloc[-1]
    return f"{row['acc_mean']:.1f} ± {row['acc_std']:.1f}"


def _row_label(record: pd.Series) -> str:
    """The method, plus its recipe when that is not the one picked for this setting (``<dataset>_ipc<k>``)."""
    from bench.registry import DATASET_RECIPE_ALIASES

    recipe = record.get("recipe")
    if not isinstance(recipe, str):
        return record["method"]
    ipc = None if pd.isna(record.get("ipc")) else int(record["ipc"])
    dataset = record["dataset"]
    automatic = {f"{dataset}_ipc{ipc}", f"{DATASET_RECIPE_ALIASES.get(dataset, dataset)}_ipc{ipc}"}
    return record["method"] if recipe in automatic else f"{record['method']}.{recipe}"


def accuracy_tables(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, Markdown table) for every dataset × evaluation architecture × protocol × quick group."""
    tables = []
    frame = frame.copy()
    frame["label"] = frame.apply(_row_label, axis=1)
    for (dataset, arch, protocol, quick), group in frame.groupby(["dataset", "eval_arch", "protocol", "quick"], sort=True):
        ipcs = sorted({int(i) for i in group["ipc"].dropna()})
        labels = sorted(set(group["label"]), key=lambda m: (ROW_ORDER.index(m) if m in ROW_ORDER else len(ROW_ORDER), m))
        rows = []
        for label in labels:
            mine = group[group["label"] == label]
            if mine["ipc"].isna().all():
                value = _cell(mine)
                rows.append([label, *[value] * max(1, len(ipcs))])
            else:
                rows.append([label, *[_cell(mine[mine["ipc"] == ipc]) if (mine["ipc"] == ipc).any() else "–" for ipc in ipcs]])
        seeds = sorted({len(s) for s in group["seeds"]})
        title = (f"{dataset} — test accuracy % {ACC_DIRECTION} (mean ± std over {'/'.join(map(str, seeds))} seeds), "
                 f"evaluated on {arch}, protocol {protocol}{' (QUICK: reduced CPU recipes)' if quick else ''}")
        headers = ["method", *[f"ipc {i}" for i in ipcs]] if ipcs else ["method", "all"]
        tables.append((title, tabulate(rows, headers=headers, tablefmt="github")))
    return tables


def write_reports(results_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<out>/<results folder name>.md``; returns the paths written."""
    frame = load_results(results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(results_dir).resolve().name
    path = out / f"{name}.md"
    if frame.empty:
        from bench.errors import UserError

        raise UserError(f"no records under {results_dir}")
    parts = [f"# ddbench report: {name}\n", f"Generated from the records under `{results_dir}`.\n"]
    for title, table in accuracy_tables(frame):
        parts += [f"## {title}\n", table, ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(path)
    return [path]
