"""The figures of a report (``bench.report``), as PNG files ``<figures>/<name>_<kind>_*.png``:

* ``acc-vs-ipc``: test accuracy against images per class, one line per method (error bars: std over seeds);
* ``cost``: seconds per iteration against peak memory, one labelled point per method;
* ``acc-vs-K``: APM's accuracy against its number of checkpoints K, where records differ only in K;
* ``images``: a grid of each distilled set's images, rows classes, columns images (at most 10 × 10).

Drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global backend switch) in seaborn's style.
A figure whose data is absent is skipped. The accuracy figures leave out smoke tests (records with an
``eval_epochs_override``: evaluation networks trained ``--eval-epochs N`` epochs, not the protocol's), whose
accuracies are no results; their captions and titles say how many were left out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

from bench.distilled import DistilledSet, create_temporary_beside
from bench.errors import UserError

FIGURE_KINDS = ("acc-vs-ipc", "cost", "acc-vs-K", "images")
GRID_CLASSES = 10  # image grids show at most this many classes…
GRID_PER_CLASS = 10  # …and this many images of each
GRID_BACKGROUND = (0.82, 0.87, 0.95)  # between the images of a grid
DPI = 150
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "frameon": False}


@dataclass
class FigureFile:
    path: Path
    title: str  # one line, for the report's caption


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "_", str(text)).strip("_")


def _new_figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, object]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        figure = Figure(figsize=(width, height), layout="constrained")
        return figure, figure.subplots()


def _save(figure: Figure, path: Path) -> Path:
    """Save as PNG through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary_beside(path)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MARKERS = "osD^vPX*<>p"


def _styles(labels: list[str]) -> dict[str, dict]:
    """One colour and marker per label, the same in every figure of a report (``full`` is drawn as a dashed line)."""
    labels = [label for label in labels if label != "full"]
    palette = sns.color_palette("colorblind", max(len(labels), 1))
    return {label: {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)]}
            for i, label in enumerate(labels)}


def _quick_text(quick: bool) -> str:
    return ", QUICK recipes" if quick else ""


def _smoke(frame: pd.DataFrame) -> pd.Series:
    """Which records are smoke tests (an ``eval_epochs_override``: ``--eval-epochs``), not results."""
    if "eval_epochs_override" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["eval_epochs_override"].notna()


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    """The records with an accuracy to plot: successful, and not a smoke test's."""
    return frame[(frame["status"] == "ok") & frame["acc_mean"].notna() & ~_smoke(frame)]


def _smoke_caption(group: pd.DataFrame) -> str:
    """What a caption adds when the group's smoke-test records were left out of its accuracy figures."""
    n = int((_smoke(group) & (group["status"] == "ok")).sum())
    return f" ({n} smoke-test record{'' if n == 1 else 's'}, --eval-epochs, left out)" if n else ""


# ----------------------------------------------------------------------------------------------------------------
# Accuracy against ipc, and against APM's K


def _set_ticks(ax: object, values: list[int], log: bool) -> None:
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(values)
    ax.xaxis.set_major_formatter(ScalarFormatter())


def accuracy_vs_ipc(group: pd.DataFrame, styles: dict, title: str) -> Figure | None:
    """One line per label (error bars: std over seeds); ``full`` as a dashed horizontal line."""
    ok = _ok(group)
    curves = ok[ok["ipc"].notna()]
    ipcs = sorted({int(i) for i in curves["ipc"]})
    if len(ipcs) < 2:
        return None
    figure, ax = _new_figure()
    for label in sorted(set(curves["label"]), key=list(styles).index):
        points = curves[curves["label"] == label].groupby("ipc").last().sort_index()
        ax.errorbar(points.index, points["acc_mean"], yerr=points["acc_std"].fillna(0), label=label, capsize=3,
                    **styles[label])
    for _, full in ok[ok["label"] == "full"].groupby("label"):
        ax.axhline(full["acc_mean"].iloc[-1], linestyle="--", color="0.3", label="full data")
    _set_ticks(ax, ipcs, log=ipcs[-1] / ipcs[0] >= 10)
    ax.margins(y=0.08)
    ax.set(xlabel="images per class (ipc)", ylabel="test accuracy (%)", title=title)
    ax.legend(title="method", **LEGEND_OUTSIDE)
    return figure


def accuracy_vs_checkpoints(group: pd.DataFrame, title: str) -> Figure | None:
    """APM's accuracy against K (``config["checkpoints"]``), one line per ipc; None unless K takes 2+ values."""
    apm = _ok(group[group["method"] == "apm"])
    apm = apm.assign(K=[config.get("checkpoints") for config in apm["config"]]).dropna(subset=["K"])
    if apm.empty or apm.groupby("ipc", dropna=False)["K"].nunique().max() < 2:
        return None
    figure, ax = _new_figure()
    palette = sns.color_palette("colorblind", apm["ipc"].nunique())
    for colour, (ipc, points) in zip(palette, apm.groupby("ipc", dropna=False)):
        points = points.groupby("K")[["acc_mean", "acc_std"]].mean().sort_index()
        ax.errorbar(points.index, points["acc_mean"], yerr=points["acc_std"].fillna(0), marker="o", capsize=3,
                    color=colour, label=f"ipc {int(ipc)}" if pd.notna(ipc) else "all")
    ks = sorted({int(k) for k in apm["K"]})
    _set_ticks(ax, ks, log=False)
    ax.set(xlabel="K: expert checkpoints matched per trajectory", ylabel="test accuracy (%)", title=title)
    ax.legend(**LEGEND_OUTSIDE)
    return figure


def merged_subgroups(group: pd.DataFrame, styles: dict, title: str) -> Figure | None:
    """APM's parallelisability: accuracy against G, the number of independently distilled subgroups (of ``k``
    images per class each) merged into one set of ipc G·k; every other method at ipc G·k distilled as one set.
    None unless APM appears with two or more values of G of one subgroup size."""
    ok = _ok(group[group["ipc"].notna()])
    subgroups = [config.get("subgroups") if method == "apm" and isinstance(config, dict) else None
                 for method, config in zip(ok["method"], ok["config"])]
    ok = ok.assign(G=subgroups)
    apm = ok[ok["G"].notna()]
    apm = apm.assign(k=apm["ipc"] / apm["G"].astype(float))
    sizes = apm.groupby("k")["G"].nunique()
    if sizes.empty or sizes.max() < 2:
        return None
    k = sizes.idxmax()
    apm = apm[apm["k"] == k]
    others = ok[ok["G"].isna() & (ok["ipc"] % k == 0)]
    others = others.assign(G=others["ipc"] / k)
    figure, ax = _new_figure()
    merged_labels = set(apm["label"])
    points_all = pd.concat([apm, others])
    for label in sorted(set(points_all["label"]), key=list(styles).index):
        points = points_all[points_all["label"] == label].groupby("G").last().sort_index()
        name = label if label in merged_labels else f"{label} (one set of ipc {int(k)}·G)"
        ax.errorbar(points.index, points["acc_mean"], yerr=points["acc_std"].fillna(0), capsize=3, label=name,
                    **styles[label])
    _set_ticks(ax, sorted({int(g) for g in apm["G"]}), log=False)
    ax.margins(y=0.08)
    ax.set(xlabel=f"G: merged subgroups of ipc {int(k)} (the set's ipc is {int(k)}·G)", ylabel="test accuracy (%)",
           title=title)
    ax.legend(title="method", **LEGEND_OUTSIDE)
    return figure

# ----------------------------------------------------------------------------------------------------------------
# Cost


def _place_labels(ax: object, xs: list[float], ys: list[float], texts: list[str], gap: float = 0.07) -> None:
    """Write each point's label beside it, pushed apart vertically (in axes fractions) so that none overlap."""
    to_axes = ax.transData + ax.transAxes.inverted()
    placed = sorted(zip(to_axes.transform(np.column_stack([xs, ys])), texts), key=lambda p: p[0][1])
    last = -np.inf
    for (x, y), text in placed:
        label_y = max(y, last + gap)
        last = label_y
        left = x > 0.7
        ax.annotate(text, xy=(x, y), xycoords="axes fraction", xytext=(x + (-0.04 if left else 0.04), label_y),
                    textcoords="axes fraction", ha="right" if left else "left", va="center", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6})


def cost_scatter(sets: pd.DataFrame, styles: dict, title: str) -> Figure | None:
    """x: median seconds per iteration; y: distillation's peak GPU memory (NVML) when every point has it, else its
    CPU peak RSS. None without a timed point."""
    sets = sets[sets["iter_time_s_median"].notna()]
    if sets.empty:
        return None
    gpu = sets["distill_gpu_nvml_peak_mb"].notna().all()
    memory = sets["distill_gpu_nvml_peak_mb" if gpu else "distill_cpu_peak_rss_mb"]
    sets = sets[memory.notna()]
    if sets.empty:
        return None
    memory = memory[sets.index].astype(float)
    figure, ax = _new_figure(6.5, 4.2)
    for label, time, peak in zip(sets["label"], sets["iter_time_s_median"], memory):
        ax.scatter([time], [peak], s=45, zorder=3, **styles[label])
    times = sets["iter_time_s_median"].astype(float)
    if times.max() / times.min() >= 10:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 1, 2, 5 rather than 10^0
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(plain)
    ax.margins(x=0.25, y=0.25)
    ax.autoscale_view()
    _place_labels(ax, list(times), list(memory), list(sets["label"]))
    ax.set(xlabel="time per distillation iteration, median (s)",
           ylabel="peak GPU memory, NVML (MB)" if gpu else "peak CPU memory, RSS (MB)", title=title)
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Images of a distilled set


def displayable(images: np.ndarray, transform: dict | None) -> tuple[np.ndarray, str]:
    """(N, C, H, W) in the dataset's transformed space → values in [0, 1], and how: the mean/std normalisation
    undone, or (for ZCA and unknown transforms) each image rescaled to its own min–max."""
    if transform and transform.get("kind") == "mean_std" and transform.get("mean") and transform.get("std"):
        mean = np.asarray(transform["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(transform["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return np.clip(images * std + mean, 0.0, 1.0), "normalisation undone"
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    kind = (transform or {}).get("kind", "unknown")
    return (images - low) / np.maximum(high - low, 1e-8), f"{kind} space, each image min-max rescaled"


def image_grid(distilled: DistilledSet, title: str) -> Figure:
    """Rows: the first ``GRID_CLASSES`` classes; columns: their first ``GRID_PER_CLASS`` images. A set of one image
    per class is laid out as one row (classes as columns), which reads better than a column of ten."""
    images = distilled.images.detach().float().cpu().numpy()
    labels = distilled.labels.cpu().numpy()
    images, how = displayable(images, distilled.metadata.get("transform"))
    all_classes = sorted(set(labels.tolist()))
    classes = all_classes[:GRID_CLASSES]
    per_class = max(int((labels == c).sum()) for c in classes)
    grid = [list(np.flatnonzero(labels == c)[:GRID_PER_CLASS]) for c in classes]  # grid[class][image]
    one_row = per_class == 1
    if one_row:
        grid = [[row[0] if row else None for row in grid]]
    channels, height, width = images.shape[1:]
    n_rows, n_columns = len(grid), max(len(row) for row in grid)
    pad = max(1, height // 8)
    # NaN between images: drawn in a light blue that neither white nor black strokes blend into
    mosaic = np.full(((height + pad) * n_rows - pad, (width + pad) * n_columns - pad, channels), np.nan, np.float32)
    for i, row in enumerate(grid):
        for j, index in enumerate(row):
            if index is not None:
                y, x = i * (height + pad), j * (width + pad)
                mosaic[y : y + height, x : x + width] = images[index].transpose(1, 2, 0)
    figure, ax = _new_figure(min(1.6 + 0.7 * n_columns, 10.0), min(1.6 + 0.7 * n_rows, 10.0))
    if channels == 1:
        cmap = matplotlib.colormaps["gray"].with_extremes(bad=GRID_BACKGROUND)
        ax.imshow(np.ma.masked_invalid(mosaic[..., 0]), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        rgb = mosaic[..., :3]
        rgb[np.isnan(rgb).any(axis=-1)] = GRID_BACKGROUND
        ax.imshow(rgb, interpolation="nearest")
    ax.grid(False)
    ax.tick_params(length=0)
    ax.set_xticks([j * (width + pad) + width / 2 for j in range(n_columns)],
                  [str(c) for c in classes] if one_row else [str(j + 1) for j in range(n_columns)])
    ax.set_yticks([i * (height + pad) + height / 2 for i in range(n_rows)],
                  [] if one_row else [str(c) for c in classes])
    shown = "all classes"
    if len(classes) < len(all_classes):
        shown = f"classes {classes[0]}–{classes[-1]} of {len(all_classes)}"
    if one_row:
        ax.set(xlabel="class (one image each)")
    else:
        ax.set(xlabel=f"image (first {n_columns} of {per_class} per class)", ylabel="class")
    ax.set_title(f"{title}\n({shown}; {how})")
    return figure


def _find_distilled(path: object, results_dir: Path) -> Path | None:
    """A record's ``distilled_path`` (relative to where the run started) found from here or above ``results_dir``."""
    if not isinstance(path, str) or not path:
        return None
    path = Path(path)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + [
        base / path for base in [results_dir.resolve(), *results_dir.resolve().parents]]
    return next((c for c in candidates if c.is_file()), None)


def sets_without_files(sets: pd.DataFrame, results_dir: Path) -> list[str]:
    """The ``distilled_path`` of every successful set (``sets``: one row per distilled set) whose file is not
    found, so that a report says why its images are not drawn (records are committed, distilled sets are not)."""
    sets = sets[(sets["status"] == "ok") & (sets["label"] != "full")]
    return [str(path) for path in sets["distilled_path"]
            if isinstance(path, str) and path and _find_distilled(path, results_dir) is None]


# ----------------------------------------------------------------------------------------------------------------


def _draw_all(frame: pd.DataFrame, sets: pd.DataFrame, styles: dict,
              results_dir: Path) -> Iterator[tuple[str, str, Figure | None]]:
    """(file stem, caption, figure or None where its data is absent), one figure at a time."""
    for (dataset, arch, protocol, quick), group in frame.groupby(["dataset", "eval_arch", "protocol", "quick"]):
        where = f"{dataset}, evaluated on {arch}, protocol {protocol}{_quick_text(quick)}"
        suffix = _slug(f"{dataset}_{arch}_{protocol}" + ("_quick" if quick else ""))
        left_out = _smoke_caption(group)
        drawn = where + (f"\n{left_out.strip()}" if left_out else "")  # the figure's own title says it too
        yield (f"acc-vs-ipc_{suffix}", f"Test accuracy vs images per class — {where}{left_out}",
               accuracy_vs_ipc(group, styles, f"Test accuracy vs ipc\n{drawn}"))
        yield (f"acc-vs-K_{suffix}", f"APM: test accuracy vs K — {where}{left_out}",
               accuracy_vs_checkpoints(group, f"APM: test accuracy vs K\n{drawn}"))
        yield (f"acc-vs-subgroups_{suffix}", f"APM: test accuracy vs merged subgroups — {where}{left_out}",
               merged_subgroups(group, styles, f"Merged independently distilled subgroups\n{drawn}"))
    sets = sets[(sets["status"] == "ok") & (sets["label"] != "full")]
    for (dataset, ipc, quick), group in sets.groupby(["dataset", "ipc", "quick"], sort=True):
        where = f"{dataset}, ipc {int(ipc)}{_quick_text(quick)}"
        yield (f"cost_{_slug(f'{dataset}_ipc{int(ipc)}' + ('_quick' if quick else ''))}",
               f"Distillation cost: time per iteration vs peak memory — {where}",
               cost_scatter(group, styles, f"Distillation cost (lower left is cheaper)\n{where}"))
    seen: set[Path] = set()
    for _, record in sets.iterrows():
        path = _find_distilled(record["distilled_path"], results_dir)
        if path is None or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            distilled = DistilledSet.load(path)
        except UserError:
            continue
        meta = distilled.metadata
        method, dataset = meta.get("method", record["method"]), meta.get("dataset", record["dataset"])
        title = f"{method}: distilled {dataset}, ipc {meta.get('ipc', record['ipc'])}"
        yield f"images_{_slug(path.stem)}", f"Distilled images — {path.stem}", image_grid(distilled, title)


def write_figures(frame: pd.DataFrame, sets: pd.DataFrame, labels: list[str], figures_dir: Path, name: str,
                  results_dir: Path) -> list[FigureFile]:
    """Every figure the records (``frame``, and ``sets``: one row per distilled set) allow, written to
    ``figures_dir/<name>_<kind>_*.png``, ``labels`` in legend order; figures of these kinds left from an earlier
    report of the same name are removed."""
    written = []
    for stem, title, figure in _draw_all(frame, sets, _styles(labels), results_dir):
        if figure is not None:
            written.append(FigureFile(_save(figure, figures_dir / f"{name}_{stem}.png"), title))
    kept = {f.path.name for f in written}
    for old in figures_dir.glob(f"{name}_*.png"):
        if old.name not in kept and old.name[len(name) + 1 :].startswith(tuple(k + "_" for k in FIGURE_KINDS)):
            old.unlink()
    return written
