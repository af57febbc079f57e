"""Reports: Markdown/LaTeX tables, published numbers beside ours, costs, failures, figures and the index."""

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.distilled import DistilledSet
from bench.cli import main
from bench.errors import UserError
from bench.figures import accuracy_vs_ipc, displayable
from bench.published import PUBLISHED_PATH, load_published
from bench.report import latex_escape, load_report_frame, prepare_frame, write_reports
from bench.store import write_record
from record_files import record_json

NO_GPU = "cpu run: no CUDA device"
MEAN, STD = 0.1307, 0.3081  # MNIST's normalisation, as a distilled set's metadata records it


def make_record(method, ipc, acc, *, eval_arch="convnet", status="ok", error=None, label=None, config=None,
                iter_s=0.2, rss=500.0, distilled_path=None, quick=False, eval_epochs=None):
    """A record; ``eval_epochs`` makes it a smoke test's (``--eval-epochs``: ``eval_epochs_override``)."""
    acc = [] if status != "ok" else acc
    smoke = "" if eval_epochs is None else f"-smoke{eval_epochs}"
    return {
        "record_id": f"{method}-{label}-{ipc}-{eval_arch}{smoke}", "method": method, "recipe": None, "label": label,
        "suite": "unit", "dataset": "mnist", "ipc": ipc, "distill_arch": "convnet", "eval_arch": eval_arch,
        "protocol": "standard", "quick": quick, "seeds": [0, 1, 2], "acc": acc, "eval_epochs_override": eval_epochs,
        "acc_mean": float(np.mean(acc)) if acc else None, "acc_std": float(np.std(acc)) if acc else None,
        "status": status, "error": error, "config": config or {}, "flops_per_iter": 2.5e9,
        "iter_time_s": {"median": iter_s, "n": 10} if iter_s else None, "distilled_path": distilled_path,
        "env": {"gpu_name": None, "cpu_threads": 2},
        "phases": {"distill": {"wall_s": 12.0, "cpu_peak_rss_mb": rss, "gpu_nvml_peak_mb": None,
                               "gpu_torch_allocated_peak_mb": None, "gpu_reason": NO_GPU}},
    }


def save_distilled_set(folder):
    """A 10-class set of 2 images per class whose pixels, un-normalised, are known: class c is all c/10."""
    pixels = torch.arange(10, dtype=torch.float32).repeat_interleave(2).view(20, 1, 1, 1).expand(20, 1, 8, 8) / 10
    distilled = DistilledSet((pixels - MEAN) / STD, torch.arange(10).repeat_interleave(2),
                             metadata={"method": "dc", "dataset": "mnist", "ipc": 2,
                                       "transform": {"kind": "mean_std", "mean": [MEAN], "std": [STD]}})
    return distilled.save(folder / "distilled" / "mnist_ipc2_dc")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Records for mnist × {full, random, dc, apm variants} × ipc {1, 10}, two eval archs at ipc 1, one oom."""
    results = tmp_path_factory.mktemp("results") / "unit_suite"
    set_path = save_distilled_set(results)
    records = [
        make_record("full", None, [99.5, 99.6, 99.7], iter_s=None),
        make_record("random", 1, [64.0, 65.0, 66.0], iter_s=None),
        make_record("random", 10, [94.0, 95.0, 96.0], iter_s=None),
        make_record("dc", 1, [91.0, 91.5, 92.0], iter_s=0.5, distilled_path=str(set_path)),
        make_record("dc", 10, [97.0, 97.2, 97.4], iter_s=0.5),
        make_record("dm", 1, [89.0, 89.0, 89.0], iter_s=0.1),
        make_record("dm", 10, [], status="oom", error="Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"),
        make_record("dc", 1, [80.0, 81.0, 82.0], eval_arch="resnet18_cifar", iter_s=0.5,
                    distilled_path=str(set_path)),  # the same set, evaluated on a second architecture
        make_record("random", 1, [50.0, 51.0, 52.0], eval_arch="resnet18_cifar", iter_s=None),
    ]
    for k, acc in ((2, [93.0, 93.0, 93.0]), (5, [95.0, 95.0, 95.0])):  # APM variants differing in K
        records.append(make_record("apm", 10, acc, label=f"apm-K{k}", config={"checkpoints": k, "segment": 100},
                                   iter_s=1.0 + k, rss=600.0 + 10 * k))
    for record in records:
        write_record(results, record)
    out = tmp_path_factory.mktemp("reports")
    (out / "older.md").write_text("# an older report\n")  # the index lists every report in the folder
    paths = write_reports(results, out)
    return out, paths, (out / "unit_suite.md").read_text()


def markdown_tables(text):
    """'### title' → the table that follows it, as rows of cells (header row first, separator dropped)."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("|") and title is not None:
            if not re.fullmatch(r"\|[-|: ]+\|", line):
                tables.setdefault(title, []).append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def find_table(text, *words):
    matches = [rows for title, rows in markdown_tables(text).items() if all(w in title for w in words)]
    assert len(matches) == 1, (words, list(markdown_tables(text)))
    return matches[0]


def accuracy_rows(text, arch="convnet"):
    header, *rows = find_table(text, "Test accuracy", f"evaluated on {arch},")
    return header, {row[0]: row[1:] for row in rows}


def test_accuracy_table_has_one_row_per_method_and_one_column_per_ipc(report):
    _, _, text = report
    header, rows = accuracy_rows(text)
    assert header == ["method", "mnist ipc 1", "mnist ipc 10"]
    assert list(rows) == ["full", "random", "apm-K2", "apm-K5", "dc", "dm"]  # full, random, herding, then a–z
    assert "over 3 seeds" in text


def test_accuracy_cells_mean_std_bold_best_and_failures(report):
    _, _, text = report
    _, rows = accuracy_rows(text)
    assert rows["dc"] == ["**91.5 ± 0.4**", "**97.2 ± 0.2**"]  # best of each column (full excluded)
    assert rows["full"] == ["99.6 ± 0.1", "99.6 ± 0.1"]  # one value in every column, never bold
    assert rows["random"] == ["65.0 ± 0.8", "95.0 ± 0.8"]
    assert rows["apm-K2"] == ["–", "93.0 ± 0.0"]
    assert rows["dm"] == ["89.0 ± 0.0", "oom"]


def test_published_value_and_source_beside_matching_cells(report):
    _, _, text = report
    header, *rows = find_table(text, "published", "evaluated on convnet,")
    assert header[:7] == ["method", "dataset", "ipc", "ours ↑", "published", "source", "difference"]
    by_key = {(r[0], r[2]): r for r in rows}
    assert by_key["dc", "1"][3:] == ["91.5 ± 0.4", "91.7", "DC readme", "−0.2"]
    assert by_key["dc", "10"][4:] == ["97.4", "DC readme", "−0.2"]
    assert by_key["random", "1"][4:] == ["64.9 ± 3.5", "DC paper (quoted)", "+0.1"]
    assert by_key["full", "all"][4:6] == ["99.6", "DC paper (quoted)"]
    assert not any(key[0].startswith("apm") for key in by_key)  # variants are not the published method
    assert "**DC readme**" in text  # the sources section explains every cited key
    dc_readme = next(line for line in text.splitlines() if line.startswith("- **DC readme**"))
    assert "300 epochs without augmentation" in dc_readme  # and how a source evaluated, where not as we do
    resnet = [title for title in markdown_tables(text) if "published" in title and "resnet18_cifar" in title]
    assert not resnet  # a published ConvNet number is never put beside another architecture


def test_cost_table_shows_dash_with_reason_for_missing_gpu_figures(report):
    _, _, text = report
    header, *rows = find_table(text, "Distillation costs")
    gpu_columns = [i for i, h in enumerate(header) if h.startswith("GPU")]
    assert len(gpu_columns) == 2 and all(h.endswith("↓") for h in header[4:10])
    assert {row[0] for row in rows} == {"random", "apm-K2", "apm-K5", "dc", "dm"}
    for row in rows:
        assert all(row[i] == "– [1]" for i in gpu_columns), row
    assert f"[1] GPU figures not measured: {NO_GPU}." in text
    dc = next(row for row in rows if row[0] == "dc" and row[2] == "1")
    assert dc[header.index("CPU peak RSS (MB) ↓")] == "500"
    assert dc[header.index("s/iteration ↓")] == "0.500" and dc[header.index("FLOPs/iteration ↓")] == "2.5 G"
    assert "The peaks include the dataset" not in text  # these records do not say where their data was


def test_cost_table_says_where_each_cells_dataset_was_held(tmp_path):
    """A peak includes the dataset its cell held throughout; the table says how large it was and on which device."""
    results = tmp_path / "results"
    for method, mb, device in (("dc", 52.3, "cuda"), ("dm", 52.3, "cuda"), ("random", 63466.1, "cpu")):
        record = make_record(method, 1, [90.0, 90.0, 90.0])
        record |= {"dataset": "cifar10" if device == "cuda" else "imagenet64", "dataset_resident_mb": mb,
                   "dataset_device": device}
        write_record(results, record)
    text = Path(write_reports(results, tmp_path / "out")[0]).read_text()
    assert ("The peaks include the dataset each cell held throughout, on the device named: cifar10 52.3 MB on the "
            "GPU; imagenet64 63,466.1 MB on the CPU.") in text


def test_published_cost_figures_beside_matching_sets(tmp_path):
    record = make_record("apm", 50, [30.0] * 3, config={"segment": 250}, iter_s=9.0)
    record["dataset"] = "imagenet64"
    record["phases"]["distill"].update(gpu_nvml_peak_mb=7300.0, gpu_torch_allocated_peak_mb=6100.0)
    write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out")
    header, row = find_table((tmp_path / "out" / "res.md").read_text(), "Distillation costs")
    assert row[header.index("GPU peak NVML (MB) ↓")] == "7,300" and row[header.index("s/iteration ↓")] == "9.00"
    assert row[-3:] == ["7.0", "11.1", "APM readme fig. ImageNet-1K ipc 50"]


def test_records_that_were_not_evaluated_say_so_under_test_accuracy(tmp_path):
    record = make_record("apm", 50, [], eval_arch=None, config={"segment": 250})
    record.update(seeds=[], acc_mean=None, acc_std=None)  # as `--eval-archs ''` writes it: costs only
    write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out")
    text = (tmp_path / "out" / "res.md").read_text()
    accuracy = text[text.index("## Test accuracy"):text.index("## Costs of distillation")]
    assert "No record here was evaluated" in accuracy
    assert find_table(text, "Distillation costs")[1][0] == "apm"


def test_cross_architecture_table_when_two_eval_archs(report):
    _, _, text = report
    header, *rows = find_table(text, "mnist ipc 1:", "by evaluation architecture")
    assert header == ["method", "convnet", "resnet18_cifar"]
    rows = {r[0]: r[1:] for r in rows}
    assert list(rows) == ["full", "random", "dc", "dm"]  # the apm variants ran at ipc 10 only
    assert rows["dc"] == ["**91.5 ± 0.4**", "**81.0 ± 0.8**"] and rows["dm"] == ["89.0 ± 0.0", "–"]
    assert "## Across evaluation architectures" in text
    assert not any("mnist ipc 10:" in title for title in markdown_tables(text))  # ipc 10 ran on one arch only


def test_no_cross_architecture_table_with_one_eval_arch(tmp_path):
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    write_reports(tmp_path / "res", tmp_path / "out")
    text = (tmp_path / "out" / "res.md").read_text()
    assert "Across evaluation architectures" not in text and "Test accuracy" in text


def test_failed_cells_are_listed_with_their_error(report):
    _, _, text = report
    _, *rows = find_table(text, "without a result")
    assert rows == [["dm", "mnist", "10", "convnet", "standard", "oom",
                     "torch.OutOfMemoryError: CUDA out of memory"]]


def test_quick_results_are_marked_and_compared_with_care(tmp_path):
    write_record(tmp_path / "res", make_record("dc", 1, [80.0, 81.0, 82.0], quick=True))
    write_reports(tmp_path / "res", tmp_path / "out", name="quick")
    text = (tmp_path / "out" / "quick.md").read_text()
    find_table(text, "Test accuracy", "QUICK: reduced CPU recipes")
    find_table(text, "published", "QUICK")
    assert "not a failed reproduction" in text


def test_quick_full_row_says_how_many_epochs_it_trained(tmp_path):
    write_record(tmp_path / "res", make_record("full", None, [98.0, 98.5, 99.0], iter_s=None, quick=True,
                                               config={"quick_eval_epochs": 100}))
    write_record(tmp_path / "res", make_record("dc", 1, [80.0, 81.0, 82.0], quick=True))
    write_reports(tmp_path / "res", tmp_path / "out", name="quick")
    assert "full: trained on the whole training set for 100 epochs" in (tmp_path / "out" / "quick.md").read_text()


def test_figures_are_written_and_open(report):
    out, paths, text = report
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    for kind in ("acc-vs-ipc", "cost", "acc-vs-K", "images"):
        assert any(name.startswith(f"unit_suite_{kind}_") for name in figures), (kind, figures)
    for path in (out / "figures").glob("*.png"):
        assert path in paths
        with Image.open(path) as image:
            image.verify()
        assert f"figures/{path.name}" in text


def test_distilled_images_are_shown_unnormalised():
    pixels = np.linspace(0, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    normalised = (pixels - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    shown, how = displayable(normalised, {"kind": "mean_std", "mean": mean, "std": std})
    np.testing.assert_allclose(shown, pixels, atol=1e-6)
    shown, how = displayable(normalised, {"kind": "zca"})
    assert "min-max" in how and shown.min() == 0 and shown.max() == 1


def test_index_links_every_report_and_figure(report):
    out, paths, _ = report
    index = (out / "README.md").read_text()
    assert out / "README.md" in paths
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "README.md" and p.suffix in (".md", ".tex", ".png")]
    assert len(files) > 4
    for path in files:
        assert f"]({path.relative_to(out).as_posix()})" in index, path
    assert "## older" in index and "## unit_suite" in index
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_latex_is_escaped_and_uses_booktabs(report):
    out, _, _ = report
    tex = (out / "unit_suite.tex").read_text()
    assert "\\documentclass" in tex and "\\usepackage{booktabs}" in tex
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\textbf{91.5 $\\pm$ 0.4}" in tex and "$\\uparrow$" in tex and "$\\downarrow$" in tex
    assert "unit\\_suite" in tex and "±" not in tex and "↓" not in tex
    assert latex_escape("a_b 50% & #1 ± ↑↓ {x} ~ ^ \\") == (
        "a\\_b 50\\% \\& \\#1 $\\pm$ $\\uparrow$$\\downarrow$ \\{x\\} \\~{} \\^{} $\\backslash$")
    assert all(ord(c) < 128 for c in tex)


def test_latex_report_compiles(report, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    out, _, _ = report
    shutil.copytree(out, tmp_path / "out")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "unit_suite.tex"],
                            cwd=tmp_path / "out", capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (tmp_path / "out" / "unit_suite.pdf").stat().st_size > 0
    log = (tmp_path / "out" / "unit_suite.log").read_text(errors="replace")
    assert not re.findall(r"Overfull \\hbox \(.*\) in paragraph", log), "text runs off the page"


def test_a_long_path_in_the_latex_report_breaks_at_its_slashes(tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    gone = "results/cpu/2026-12-01-amd-epyc/parallel_quick/distilled/digits_ipc1_apm.digits_ipc1_0c3e0fdb81eb.json"
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 91.5, 92.0], distilled_path=gone))
    write_reports(tmp_path / "res", tmp_path / "out", name="long")
    assert "/\\allowbreak{}distilled/\\allowbreak{}" in (tmp_path / "out" / "long.tex").read_text()
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "long.tex"],
                            cwd=tmp_path / "out", capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    log = (tmp_path / "out" / "long.log").read_text(errors="replace")
    assert not re.findall(r"Overfull \\hbox \(.*\) in paragraph", log), "text runs off the page"


def test_a_cell_distilled_with_several_seeds_pools_the_sets_networks(tmp_path):
    """Papers average over several distilled sets (DC: 5 sets × 20 networks); a cell with records of several
    distillation seeds (a suite's distill_seed list) shows the mean and std over all their networks — the newest
    record of each seed, of the newest record's config only."""
    def record(seed, acc, config_hash="same", label="dm", stamp=0):
        made = make_record("dm", 1, acc, label=label)
        made.update(distill_seed=seed, config_hash=config_hash, record_id=f"dm-{seed}-{config_hash}-{stamp}",
                    written_at=f"2026-12-01T10:00:0{stamp}+00:00")
        return made

    paths = [write_record(tmp_path / "res", made) for made in (
        record(0, [10.0, 10.0, 10.0], stamp=0),  # superseded by the next record of seed 0
        record(0, [60.0, 62.0, 64.0], stamp=1), record(1, [70.0, 72.0, 74.0], stamp=2),
        record(2, [80.0, 82.0, 84.0], stamp=3), record(3, [0.0, 0.0, 0.0], config_hash="other", stamp=4))]
    # the newest record (seed 3) is of another config: it is shown alone, never pooled with the others
    write_reports(tmp_path / "res", tmp_path / "out", name="alone")
    assert accuracy_rows((tmp_path / "out" / "alone.md").read_text())[1]["dm"] == ["**0.0 ± 0.0**"]
    paths[-1].unlink()
    write_reports(tmp_path / "res", tmp_path / "out", name="pooled")
    text = (tmp_path / "out" / "pooled.md").read_text()
    pooled = [60.0, 62.0, 64.0, 70.0, 72.0, 74.0, 80.0, 82.0, 84.0]
    assert accuracy_rows(text)[1]["dm"] == [f"**{np.mean(pooled):.1f} ± {np.std(pooled):.1f}**"]
    assert "1 cell here pools the evaluations of 3 distilled sets (one per distillation seed" in text
    assert "(1 more)" in text  # seed 0's older record


def test_rows_without_a_label_are_told_apart_by_their_config(tmp_path):
    for ipc, segment, acc in ((10, 100, 90.0), (10, 500, 92.0), (1, 100, 70.0)):
        record = make_record("apm", ipc, [acc] * 3, config={"segment": segment, "checkpoints": 5})
        record["record_id"] += str(segment)
        del record["label"]  # an older record
        write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out")
    _, rows = accuracy_rows((tmp_path / "out" / "res.md").read_text())
    # the ipc 1 record collides with nothing, yet keeps the row of its variant
    assert rows == {"apm[segment=100]": ["**70.0 ± 0.0**", "90.0 ± 0.0"], "apm[segment=500]": ["–", "**92.0 ± 0.0**"]}


def test_published_numbers_are_data_with_sources():
    data = json.loads(PUBLISHED_PATH.read_text())
    published = load_published()
    primary = [e for e in data["entries"] if e["primary"]]
    keys = [(e["dataset"], e["method"], e["ipc"], e["protocol"], e["eval_arch"]) for e in primary]
    assert len(keys) == len(set(keys))  # one number to show per setting
    for entry in data["entries"] + data["efficiency"] + data["cost_notes"]:
        assert entry["source"] in data["sources"], entry
    assert published.accuracy("cifar10", "random", 1, "standard", "convnetd3")["source"] == "DC paper"
    assert published.accuracy("cifar10", "full", 50, "standard", "convnet")["mean"] == 84.8
    assert published.accuracy("imagenet64", "tesla", 50, "soft", "convnet")["mean"] == 27.9
    assert published.accuracy("mnist", "dc", 1, "standard", "resnet18_cifar") is None
    cost = published.cost("imagenet64", "apm", 50, 250)
    assert (cost["gpu_peak_gb"], cost["s_per_iter"]) == (7.0, 11.1)
    assert published.cost("imagenet64", "tesla", 50, None)["gpu_peak_gb"] == 34.2


def test_rerun_replaces_its_own_old_figures_only(tmp_path):
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    figures = tmp_path / "out" / "figures"
    figures.mkdir(parents=True)
    (figures / "res_cost_gone.png").write_bytes(b"stale")  # from an earlier report of the same name
    (figures / "other_cost_x.png").write_bytes(b"kept")  # another report's
    paths = write_reports(tmp_path / "res", tmp_path / "out")
    assert not (figures / "res_cost_gone.png").exists() and (figures / "other_cost_x.png").exists()
    assert figures / "res_cost_mnist_ipc1.png" in paths
    assert "figures/other_cost_x.png" in (tmp_path / "out" / "README.md").read_text()


def test_merged_subgroups_figure_for_apm_at_several_subgroup_counts(tmp_path):
    """The parallel suite's figure: APM at G = 1, 2, 5 merged subgroups of ipc 1, MTT as one set at the same ipc."""
    results = tmp_path / "parallel_unit"
    for g, acc in ((1, [80.0, 81.0, 82.0]), (2, [85.0, 86.0, 87.0]), (5, [90.0, 90.5, 91.0])):
        write_record(results, make_record("apm", g, acc, label="apm-merged", config={"subgroups": g}))
        write_record(results, make_record("mtt", g, [a - 5 for a in acc]))
    write_record(results, make_record("apm", 10, [95.0, 95.0, 95.0], label="apm-plain", config={"subgroups": 1}))
    out = tmp_path / "reports"
    write_reports(results, out)
    (figure,) = (out / "figures").glob("parallel_unit_acc-vs-subgroups_*.png")
    with Image.open(figure) as image:
        image.verify()
    assert f"figures/{figure.name}" in (out / "parallel_unit.md").read_text()


def test_no_merged_subgroups_figure_without_two_subgroup_counts(report):
    out, _, _ = report
    assert not list((out / "figures").glob("*acc-vs-subgroups*"))


def smoke_and_real_report(tmp_path):
    """The audit's case: a quick 2-epoch smoke run of random, herding and full at ipc 1 and 10 (one seed), then a
    real quick run of random at ipc 1 in the same folder; the smoke herding scores above the real random."""
    results = tmp_path / "res"
    for method, ipc, acc in (("random", 1, 40.0), ("random", 10, 55.0), ("herding", 1, 80.0), ("herding", 10, 85.0),
                             ("full", None, 30.0)):
        record = make_record(method, ipc, [acc], quick=True, eval_epochs=2,
                             config={"quick_eval_epochs": 50} if method == "full" else None)
        write_record(results, dict(record, seeds=[0]))
    write_record(results, dict(make_record("random", 1, [69.4], quick=True), seeds=[0]))
    write_record(results, dict(make_record("dm", 1, [], status="failed", error="RuntimeError: boom", quick=True,
                                           eval_epochs=2), seeds=[0]))
    write_reports(results, tmp_path / "out")
    return (tmp_path / "out" / "res.md").read_text(), (tmp_path / "out" / "res.tex").read_text()


def test_smoke_records_are_marked_never_bold_and_a_real_result_wins(tmp_path):
    text, tex = smoke_and_real_report(tmp_path)
    title = next(t for t in markdown_tables(text) if t.startswith("Test accuracy"))
    assert "QUICK" in title and "† SMOKE TESTS (--eval-epochs), not results" in title
    _, rows = accuracy_rows(text)
    assert rows["random"] == ["**69.4**", "55.0 †"]  # the real result, not merged with its smoke record
    assert rows["herding"] == ["80.0 †", "85.0 †"]  # above the real 69.4, yet never bold
    assert rows["full"] == ["30.0 †", "30.0 †"]
    assert "† smoke test: every evaluation network trained 2 epochs (--eval-epochs), not the protocol's" in text
    assert "1 smoke-test record (--eval-epochs) left out: where a cell has a real result as well" in text
    assert "full: trained on the whole training set for 2 epochs († a smoke test's --eval-epochs" in text
    assert "50 epochs" not in text  # the quick recipe's epochs, which the smoke test did not train
    assert "6 of these records are smoke tests" in text
    assert "\\textbf{80.0}" not in tex and "\\textbf{69.4}" in tex and "80.0 $^\\dagger$" in tex
    assert "(-{}-eval-epochs)" in tex  # two hyphens, not an en dash
    assert all(ord(c) < 128 for c in tex)


def test_smoke_figure_beside_a_published_number_gets_no_difference(tmp_path):
    text, _ = smoke_and_real_report(tmp_path)
    header, *rows = find_table(text, "published")
    by_key = {(r[0], r[2]): r for r in rows}
    assert by_key["random", "1"][3:] == ["69.4", "64.9 ± 3.5", "DC paper (quoted)", "+4.5"]
    assert by_key["random", "10"][3] == "55.0 †" and by_key["random", "10"][6] == "–"
    assert "A smoke test's figure (†) gets no difference" in text


def test_failed_smoke_record_is_marked(tmp_path):
    text, _ = smoke_and_real_report(tmp_path)
    _, *rows = find_table(text, "without a result")
    assert rows == [["dm", "mnist", "1", "convnet", "standard", "failed †", "RuntimeError: boom"]]
    assert "† a smoke test's record (--eval-epochs: evaluation networks trained 2 epochs)." in text


def test_full_note_keeps_real_epochs_apart_from_smoke_ones(tmp_path):
    """full is real on mnist (its quick recipe's 50 epochs) and only a 2-epoch smoke test on cifar10."""
    write_record(tmp_path / "res", make_record("full", None, [99.0, 99.1, 99.2], quick=True,
                                               config={"quick_eval_epochs": 50}))
    smoke = make_record("full", None, [40.0], quick=True, eval_epochs=2, config={"quick_eval_epochs": 50})
    write_record(tmp_path / "res", dict(smoke, dataset="cifar10"))
    write_reports(tmp_path / "res", tmp_path / "out")
    text = (tmp_path / "out" / "res.md").read_text()
    _, rows = accuracy_rows(text)
    assert rows["full"] == ["40.0 (n=1) †", "99.1 ± 0.1 (n=3)"]
    assert ("full: trained on the whole training set for 50 epochs (its quick recipe: an epoch of the whole set is "
            "many mini-batches); its † figures for 2 epochs (a smoke test's --eval-epochs);") in text


def test_cross_architecture_table_marks_smoke_figures(tmp_path):
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    write_record(tmp_path / "res", make_record("random", 1, [99.0], eval_epochs=3))
    write_record(tmp_path / "res", make_record("dc", 1, [80.0, 81.0, 82.0], eval_arch="resnet18_cifar"))
    write_reports(tmp_path / "res", tmp_path / "out")
    header, *rows = find_table((tmp_path / "out" / "res.md").read_text(), "by evaluation architecture")
    assert {r[0]: r[1:] for r in rows} == {"random": ["99.0 †", "–"], "dc": ["**92.0 ± 0.8**", "**81.0 ± 0.8**"]}


def test_accuracy_figures_leave_smoke_tests_out(tmp_path):
    records = [make_record("random", 1, [60.0, 61.0, 62.0]), make_record("random", 10, [90.0, 91.0, 92.0]),
               make_record("herding", 1, [70.0], eval_epochs=2), make_record("herding", 10, [93.0], eval_epochs=2)]
    frame = prepare_frame(pd.DataFrame(records))
    figure = accuracy_vs_ipc(frame, {label: {} for label in ("random", "herding")}, "title")
    assert figure.axes[0].get_legend_handles_labels()[1] == ["random"]
    for record in records:
        write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out")
    text = (tmp_path / "out" / "res.md").read_text()
    assert "### Test accuracy vs images per class — mnist, evaluated on convnet, protocol standard (2 smoke-test " \
           "records, --eval-epochs, left out)" in text
    assert "the accuracy figures leave them out" in text


def test_report_without_records_or_folder_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no records under"):
        write_reports(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # not even out/figures/
    (tmp_path / "file").write_text("not a folder")
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    with pytest.raises(UserError, match="report folder .* is not writable"):
        write_reports(tmp_path / "res", tmp_path / "file" / "out")
    with pytest.raises(UserError, match="report folder .* is a file, not a folder"):
        write_reports(tmp_path / "res", tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "res"]


def test_report_command_without_records_creates_no_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == 2 and "no records under" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_files_follow_the_umask(tmp_path):
    results = tmp_path / "res"
    write_record(results, make_record("dc", 1, [91.0, 92.0, 93.0]))
    old = os.umask(0o022)
    try:
        written = write_reports(results, tmp_path / "out", name="mine")
    finally:
        os.umask(old)
    assert written and all(stat.S_IMODE(Path(p).stat().st_mode) == 0o644 for p in written)


def test_a_cell_with_several_records_shows_the_newest_whatever_the_folder_order(tmp_path):
    """compare and report pick the same record: the newest by ``written_at``, not the last path in sort order."""
    results = tmp_path / "results"
    newer = dict(make_record("dm", 1, [50.0, 50.0, 50.0]), written_at="2030-01-01T00:00:00+00:00")
    older = dict(make_record("dm", 1, [92.0, 92.4, 92.8]), written_at="2020-01-01T00:00:00+00:00")
    write_record(results / "a", newer)  # a/ sorts before b/: path order would show the older record
    write_record(results / "b", older)
    write_reports(results, tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    _, rows = accuracy_rows(text)
    assert rows["dm"] == ["**50.0 ± 0.0**"]
    assert "1 cell here had more than one record (1 more): each shows its newest successful record" in text


def test_cost_only_records_beside_a_cross_architecture_evaluation(tmp_path):
    """A cost-only record (no evaluation architecture) of a cell evaluated on two architectures: it used to crash
    the cross-architecture table (sorting None among the architecture names)."""
    results = tmp_path / "results"
    for record in (make_record("dc", 1, [91.0, 91.5, 92.0]),
                   make_record("dc", 1, [80.0, 81.0, 82.0], eval_arch="resnet18_cifar"),
                   dict(make_record("dc", 1, [], eval_arch=None), record_id="dc-cost-only", seeds=[])):
        write_record(results, record)
    write_reports(results, tmp_path / "out")
    header, *rows = find_table((tmp_path / "out" / "results.md").read_text(), "by evaluation architecture")
    assert header == ["method", "convnet", "resnet18_cifar"] and rows == [["dc", "**91.5 ± 0.4**", "**81.0 ± 0.8**"]]


# ----------------------------------------------------------------------------------------------------------------
# A suite's report (--suite): its records only, every cell it plans, published numbers for variants


def suite_record(suite, method, ipc, acc, *, dataset="cifar10", protocol="standard", label=None, **kwargs):
    """A record a suite wrote: its ``suite`` and row ``label`` (the method name unless given)."""
    record = make_record(method, ipc, acc, label=label or method, **kwargs)
    record.update(suite=suite, dataset=dataset, protocol=protocol,
                  record_id=f"{record['record_id']}-{dataset}-{protocol}-{suite}")
    return record


def apm_config(recipe="cifar10_ipc50", **options):
    """APM's resolved config as its records carry it: the recipe's, with ``options`` applied."""
    from bench.registry import create_method

    return dict(create_method(f"apm.{recipe}", **options).resolved_config)


def test_suite_report_of_a_folder_without_its_records_is_an_error(tmp_path, capsys):
    from bench.suite import load_suite

    results = tmp_path / "res"
    write_record(results, suite_record("quick", "dc", 1, [80.0] * 3, dataset="digits", quick=True))
    write_record(results, dict(make_record("dm", 1, [70.0] * 3), suite=None, record_id="dm-no-suite"))
    with pytest.raises(UserError, match=r"no record under .* is of suite 'imagenet': its records are 1 of suite "
                                        r"quick and 1 of no suite"):
        write_reports(results, tmp_path / "out", suite=load_suite("imagenet"))
    code = main(["report", "--suite", "imagenet", "--results", str(results), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1 and "suite quick" in error
    assert not (tmp_path / "out").exists()


def cifar10_partial_report(tmp_path):
    """The audit's case: the cifar10 suite with only MTT and TESLA run at ipc 50, beside records of other suites."""
    from bench.suite import load_suite

    results = tmp_path / "res"
    write_record(results, suite_record("cifar10", "mtt", 50, [70.0, 71.0, 72.0]))
    write_record(results, suite_record("cifar10", "tesla", 50, [72.0, 73.0, 74.0]))
    write_record(results, suite_record("quick", "dc", 1, [99.0] * 3, dataset="digits", quick=True))
    write_record(results, dict(make_record("dm", 50, [99.0] * 3), dataset="cifar10", suite=None, record_id="dm-x"))
    write_reports(results, tmp_path / "out", suite=load_suite("cifar10"))
    return (tmp_path / "out" / "cifar10.md").read_text()


def test_suite_report_reports_only_the_suites_records_and_counts_the_others(tmp_path):
    text = cifar10_partial_report(tmp_path)
    assert "Generated from the 2 records of suite cifar10" in text
    assert "2 other records under the folder left out: 1 of suite quick and 1 of no suite." in text
    assert "digits" not in text and "99.0" not in text


def test_suite_report_shows_every_planned_cell_not_run(tmp_path):
    text = cifar10_partial_report(tmp_path)
    header, *rows = find_table(text, "Test accuracy", "protocol standard")
    rows = {row[0]: row[1:] for row in rows}
    assert header == ["method", "cifar10 ipc 1", "cifar10 ipc 10", "cifar10 ipc 50"]
    assert list(rows) == ["full", "random", "herding", "apm", "dc", "dm", "dsa", "mtt", "tesla"]
    assert rows["dm"] == ["not run"] * 3 and rows["full"] == ["not run"] * 3
    assert rows["tesla"] == ["not run", "not run", "**73.0 ± 0.8**"] and rows["mtt"][2] == "71.0 ± 0.8"
    soft = find_table(text, "Test accuracy", "protocol soft")
    assert [row[0] for row in soft[1:]] == ["random", "apm"] and soft[2][1:] == ["not run"] * 3
    assert "not run: a cell the suite plans that has no record yet" in text
    # 25 standard cells (full once, eight methods × three ipc) and 6 soft ones; MTT and TESLA at ipc 50 ran
    assert "29 of the suite's 31 cells have no record yet" in text


def test_suite_report_puts_published_numbers_beside_cells_not_run(tmp_path):
    text = cifar10_partial_report(tmp_path)
    _, *rows = find_table(text, "published", "protocol standard")
    by_key = {(r[0], r[2]): r[3:] for r in rows}
    assert by_key["dm", "50"] == ["not run", "63.0 ± 0.4", "DM paper", "–"]
    assert by_key["full", "all"] == ["not run", "84.8 ± 0.1", "DC/MTT papers", "–"]
    assert by_key["mtt", "50"] == ["71.0 ± 0.8", "71.6 ± 0.2", "MTT paper", "−0.6"]
    assert ("dc", "1") in by_key and ("tesla", "10") in by_key


def test_suite_report_lists_missing_cells_and_keeps_them_out_of_costs_failures_and_figures(tmp_path):
    text = cifar10_partial_report(tmp_path)
    assert "## Cells of the suite without a record" in text
    _, *rows = find_table(text, "planned cell(s) with no record")
    assert len(rows) == 29 and ["dm", "cifar10", "50", "convnet", "standard"] in rows
    assert ["apm", "cifar10", "1", "convnet", "soft"] in rows
    assert ["full", "cifar10", "all", "convnet", "standard"] in rows
    _, *costs = find_table(text, "Distillation costs")
    assert sorted(row[0] for row in costs) == ["mtt", "tesla"]
    assert "without a result" not in text  # no failures section: a cell not run did not fail
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert figures and not any("ipc1" in name or "ipc10" in name for name in figures), figures


def test_cost_only_suite_lists_its_missing_cells_outside_the_accuracy_tables(tmp_path):
    from bench.suite import load_suite

    record = suite_record("efficiency", "apm", 50, [], eval_arch=None, label="apm-seg500",
                          config={"segment": 500, "iterations": 30})
    record.update(seeds=[], acc_mean=None, acc_std=None)
    write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out", suite=load_suite("efficiency"))
    text = (tmp_path / "out" / "efficiency.md").read_text()
    accuracy = text[text.index("## Test accuracy"):text.index("## Costs of distillation")]
    assert "No record here was evaluated" in accuracy and "not run" not in accuracy
    _, *rows = find_table(text, "planned cell(s) with no record")
    assert [row[0] for row in rows] == ["apm-seg250", "apm-seg100", "mtt", "tesla"]
    assert all(row[3] == "– (costs only)" for row in rows)
    assert "4 of the suite's 5 cells have no record yet" in text
    assert [row[0] for row in find_table(text, "Distillation costs")[1:]] == ["apm-seg500"]


def test_planned_cells_take_the_quick_flag_of_the_suites_records(tmp_path):
    """A GPU suite run with --quick: its cells are planned quick, not listed again as missing full-recipe cells."""
    from bench.suite import load_suite

    write_record(tmp_path / "res", suite_record("cifar10", "mtt", 50, [40.0] * 3, quick=True))
    write_reports(tmp_path / "res", tmp_path / "out", suite=load_suite("cifar10"))
    text = (tmp_path / "out" / "cifar10.md").read_text()
    titles = [title for title in markdown_tables(text) if title.startswith("Test accuracy")]
    assert titles and all("QUICK" in title for title in titles)
    assert "30 of the suite's 31 cells have no record yet" in text


def test_merged_subgroup_rows_get_the_published_figure_of_their_subgroups(tmp_path):
    """The parallel suite's apm-merged rows (APM with G subgroups, ipc 50·G) beside APM's figure for G."""
    from bench.suite import load_suite

    results = tmp_path / "parallel"
    for g, acc in ((1, [75.0] * 3), (3, [78.0] * 3)):
        write_record(results, dict(suite_record("parallel", "apm", 50 * g, acc, protocol="soft", label="apm-merged",
                                                config=apm_config(subgroups=g)), recipe="cifar10_ipc50"))
    write_record(results, dict(suite_record("parallel", "apm", 50, [74.0] * 3, label="apm-merged",
                                            config=apm_config(subgroups=1)), recipe="cifar10_ipc50"))
    write_reports(results, tmp_path / "out")
    text = (tmp_path / "out" / "parallel.md").read_text()
    _, *rows = find_table(text, "published", "protocol soft")
    assert [(r[0], r[2], r[3], r[4], r[6]) for r in rows] == [("apm-merged", "50", "75.0 ± 0.0", "75.1", "−0.1"),
                                                              ("apm-merged", "150", "78.0 ± 0.0", "78.6", "−0.6")]
    assert not [t for t in markdown_tables(text) if "published" in t and "protocol standard" in t]
    write_reports(results, tmp_path / "out", suite=load_suite("parallel"))
    _, *rows = find_table((tmp_path / "out" / "parallel.md").read_text(), "published", "protocol soft")
    by_key = {(r[0], r[2]): r[3:] for r in rows}
    assert by_key["apm-merged", "500"] == ["not run", "83.3", "APM readme fig. parallelizability", "–"]
    assert by_key["mtt", "50"][:2] == ["not run", "71.3"] and ("apm-merged", "250") in by_key


def test_variants_that_change_the_recipe_otherwise_get_no_published_number(tmp_path):
    """An ablation over K is not the published setting, even where a published entry of the method exists."""
    from bench.published import Published
    from bench.report import published_table

    results = tmp_path / "ablation"
    for k, ipc in ((3, 10), (5, 10), (3, 50)):  # (apm-K5 at ipc 50 is the recipe itself: the G = 1 setting)
        recipe = f"cifar10_ipc{ipc}"
        write_record(results, dict(suite_record("ablation_k", "apm", ipc, [70.0] * 3, protocol="soft",
                                                label=f"apm-K{k}", config=apm_config(recipe, checkpoints=k)),
                                   recipe=recipe))
    write_reports(results, tmp_path / "out")
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert not [title for title in markdown_tables(text) if "published" in title]  # not 75.1 beside apm-K3 at 50
    plain = {"dataset": "cifar10", "method": "apm", "ipc": 10, "mean": 60.0, "std": None, "eval_arch": "convnet",
             "protocol": "soft", "source": "made up", "primary": True}  # a K = 5 figure, without subgroups
    group = load_report_frame(results)
    group = group[group["ipc"] == 10]
    assert published_table(group, "convnet", "soft", False, Published(entries=[plain])) is None


def test_cost_only_variants_do_not_rename_the_evaluated_rows(tmp_path):
    """Unlabelled cost-only runs at two configs decorate their own rows only, and the evaluated row keeps its
    label and its published number."""
    results = tmp_path / "res"
    write_record(results, make_record("dc", 1, [91.0, 91.5, 92.0]))
    for iterations in (10, 20):
        record = make_record("dc", 1, [], eval_arch=None, config={"iterations": iterations})
        record.update(seeds=[], acc_mean=None, acc_std=None, record_id=f"dc-cost-{iterations}")
        write_record(results, record)
    write_reports(results, tmp_path / "out")
    text = (tmp_path / "out" / "res.md").read_text()
    _, rows = accuracy_rows(text)
    assert list(rows) == ["dc"]
    _, *published = find_table(text, "published")
    assert [row[:5] for row in published] == [["dc", "mnist", "1", "91.5 ± 0.4", "91.7"]]
    costs = sorted(row[0] for row in find_table(text, "Distillation costs")[1:])
    assert costs == ["dc", "dc[iterations=10]", "dc[iterations=20]"]


def test_published_convnet_is_the_papers_depth_for_the_image_size():
    published = load_published()
    assert published.accuracy("cifar10", "mtt", 50, "standard", "convnetd3")["mean"] == 71.6
    assert published.accuracy("cifar10", "mtt", 50, "standard", "convnetd4") is None  # not the papers' CIFAR ConvNet
    assert published.accuracy("tiny_imagenet", "mtt", 10, "standard", "convnetd4")["mean"] == 23.2
    assert published.accuracy("tiny_imagenet", "mtt", 10, "standard", "convnetd3") is None
    assert published.accuracy("mnist", "dc", 1, "standard", "convnetd3")["mean"] == 91.7  # 28×28 is depth 3 too
    assert published.accuracy("imagenet64", "tesla", 10, "soft", "convnetd4")["mean"] == 17.8


def test_published_accuracy_matches_the_number_of_subgroups():
    published = load_published()
    assert published.accuracy("cifar10", "apm", 150, "soft", "convnet", subgroups=3)["mean"] == 78.6
    assert published.accuracy("cifar10", "apm", 150, "soft", "convnet") is None  # one subgroup of ipc 150
    assert published.accuracy("cifar10", "apm", 50, "soft", "convnet")["mean"] == 75.1  # one subgroup: G = 1
    assert published.accuracy("cifar10", "apm", 50, "soft", "convnet", subgroups=1)["mean"] == 75.1
    assert published.accuracy("cifar10", "mtt", 50, "soft", "convnet", subgroups=1)["mean"] == 71.3
    assert published.accuracy("cifar10", "mtt", 50, "soft", "convnet", subgroups=2) is None


def test_accuracy_note_says_std_is_the_population_std(report):
    _, _, text = report
    assert "± is the standard deviation over seeds with ddof 0 (the population std" in text


def test_published_cost_columns_carry_the_direction_mark(tmp_path):
    record = make_record("apm", 50, [30.0] * 3, config={"segment": 250}, iter_s=9.0)
    write_record(tmp_path / "res", dict(record, dataset="imagenet64"))
    write_reports(tmp_path / "res", tmp_path / "out")
    header, _ = find_table((tmp_path / "out" / "res.md").read_text(), "Distillation costs")
    assert header[-3:] == ["published GPU peak (GB) ↓", "published s/iteration ↓", "source"]


def test_rows_trained_with_another_lr_epochs_or_loss_are_named_and_missing_sets_are_said(tmp_path):
    """A learned lr (MTT's), a method's own epochs or a set's own loss (TESLA's) change the evaluation: the table
    names them; a record whose distilled set is gone says why its images are not drawn."""
    learned = dict(make_record("mtt", 1, [80.0, 81.0, 82.0], quick=True, distilled_path="gone/mnist_ipc1_mtt.json"),
                   learned_lr=0.00633, protocol_config={"lr": 0.00633, "epochs": 300, "loss": "ce"})
    plain = dict(make_record("dc", 1, [70.0, 71.0, 72.0], quick=True),
                 protocol_config={"lr": 0.01, "epochs": 300, "loss": "ce"})
    own_loss = dict(make_record("tesla", 1, [75.0, 76.0, 77.0], quick=True),
                    protocol_config={"lr": 0.01, "epochs": 300, "loss": "kl"})
    for record in (learned, plain, own_loss):
        write_record(tmp_path / "res", record)
    write_reports(tmp_path / "res", tmp_path / "out", name="quick")
    text = (tmp_path / "out" / "quick.md").read_text()
    assert ("Trained otherwise than the protocol's lr 0.01 for 300 epochs with loss ce: mtt: lr 0.00633 (learned, "
            "carried by its sets); tesla: loss kl (asked for by its sets).") in text
    assert "dc:" not in text.split("Trained otherwise")[1].splitlines()[0]
    assert "The images of 1 distilled set are not drawn: its file was not found (e.g. gone/mnist_ipc1_mtt.json)" in text


def test_a_suite_with_several_distillation_seeds_reports_each_seeds_missing_set(tmp_path):
    from bench.suite import load_suite

    suite_file = tmp_path / "seeds.yaml"
    suite_file.write_text("name: seeds\nversion: 1\nquick: true\ndefaults: {seeds: [0, 1, 2], distill_seed: [0, 1]}\n"
                          "grids:\n  - {datasets: [digits], ipc: [1], methods: [random]}\n")
    results = tmp_path / "res"
    write_record(results, dict(suite_record("seeds", "random", 1, [70.0, 71.0, 72.0], dataset="digits", quick=True),
                               distill_seed=0))
    write_reports(results, tmp_path / "out", suite=load_suite(str(suite_file)))
    text = (tmp_path / "out" / "seeds.md").read_text()
    assert "1 of the suite's 2 cells has no record yet" in text
    assert accuracy_rows(text, "convnet")[1]["random"] == ["**71.0 ± 0.8**"]  # seed 0's set alone, no placeholder
    assert "more than one record" not in text and "here pool" not in text
    header, *rows = find_table(text, "planned cell(s) with no record")
    assert rows == [["random (distill seed 1)", "digits", "1", "convnet", "standard"]]


def test_malformed_records_are_skipped_with_a_line_each_and_the_rest_reported(tmp_path, capsys):
    """Each of these files crashed ``ddbench report`` with a traceback (and left an empty figures/ behind)."""
    results = tmp_path / "res"
    write_record(results, make_record("dc", 1, [91.0, 92.0, 93.0]))
    bad = make_record("dm", 1, [89.0, 89.0, 89.0])
    files = {
        "deep": ("[" * 100_000 + "]" * 100_000, "not readable JSON (nested too deeply)"),
        "huge_int": (record_json(bad, ipc="9" * 5000), "not readable JSON (Exceeds the limit (4300 digits)"),
        "acc_mean": (record_json(bad, acc_mean='"abc"'), "field acc_mean is 'abc'"),
        "distill_seed": (record_json(bad, distill_seed='"abc"'), "field distill_seed is 'abc'"),
        "phases": (record_json(bad, phases="[1, 2]"), "field phases is [1, 2]"),
        "env": (record_json(bad, env='"x"'), "field env is 'x'"),
        "dataset": (record_json(bad, dataset='["a"]'), "field dataset is ['a']"),
        "epochs": (record_json(bad, protocol_config='{"epochs": 1e400}'), "field protocol_config.epochs is inf"),
        "ipc": (record_json(bad, ipc='"one"'), "field ipc is 'one'"),
        "status": (json.dumps({"schema_version": 2, **{k: v for k, v in bad.items() if k != "status"}}),
                   "field status is missing"),
    }
    for name, (text, _) in files.items():
        (results / "records" / f"{name}.json").write_text(text)
    code = main(["report", "--results", str(results), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    for name, (_, said) in files.items():
        assert re.search(f"skipped {re.escape(str(results / 'records' / name))}.json: .*{re.escape(said)}", err), name
    text = (tmp_path / "out" / "res.md").read_text()
    assert "Generated from the 1 record under" in text and set(accuracy_rows(text)[1]) == {"dc"}


def test_a_record_without_env_beside_records_with_one_shows_a_dash_for_its_device(tmp_path):
    """Its device became pandas' NaN in the cost table, which crashed rendering (NaN has no ``replace``)."""
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    write_record(tmp_path / "res", dict(make_record("dm", 1, [89.0, 89.0, 89.0]), env=None))
    write_reports(tmp_path / "res", tmp_path / "out")
    costs = {row[0]: row[3] for row in find_table((tmp_path / "out" / "res.md").read_text(), "Distillation costs")[1:]}
    assert costs == {"dc": "CPU, 2 threads", "dm": "–"}


def test_a_report_that_fails_part_way_leaves_no_empty_folder_behind(tmp_path, monkeypatch):
    """The report folder and its figures/ are created (checked writable) before the work; should the work fail,
    the folders this report created and left empty are removed again, and an existing report folder is kept."""
    import bench.figures

    def fail(*args, **kwargs):
        raise UserError("drawing failed")

    monkeypatch.setattr(bench.figures, "write_figures", fail)
    write_record(tmp_path / "res", make_record("dc", 1, [91.0, 92.0, 93.0]))
    with pytest.raises(UserError, match="drawing failed"):
        write_reports(tmp_path / "res", tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="drawing failed"):
        write_reports(tmp_path / "res", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
