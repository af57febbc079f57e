"""Suites: every bundled suite resolves; malformed files are one-line errors naming the key and file; a suite
runs through the harness with its labels; ImageNet without data stops at once, with a fake folder it runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.errors import UserError
from bench.suite import describe_cells, list_suites, load_suite, parse_only, run_suite, suite_requests

BUNDLED = ("quick", "mnist", "cifar10", "cifar100", "tiny", "imagenet", "cross_arch", "efficiency", "ablation_k")


def test_every_required_suite_is_bundled_and_resolves():
    assert set(BUNDLED) <= set(list_suites())
    for name in list_suites():
        suite = load_suite(name)
        lines = describe_cells(suite_requests(suite, Path(".")))
        assert lines, name
        assert suite.name == name and suite.version >= 1


def test_quick_suite_is_the_make_bench_grid():
    suite = load_suite("quick")
    assert suite.quick
    lines = describe_cells(suite_requests(suite, Path(".")))
    # 8 ipc-dependent methods × ipc 1 and 10, plus `full` once
    assert len(lines) == 17
    assert sum("ipc 1 apm" in line for line in lines) == 1


def test_efficiency_suite_labels_apm_segments():
    requests = suite_requests(load_suite("efficiency"), Path("."))
    labels = [label for r in requests for label in r.method_labels.values()]
    assert labels == ["mtt", "tesla", "apm-seg500", "apm-seg250", "apm-seg100"] or \
        sorted(labels) == sorted(["mtt", "tesla", "apm-seg500", "apm-seg250", "apm-seg100"])
    segments = sorted(r.method_options["apm"]["segment"] for r in requests if "apm" in r.method_options)
    assert segments == [100, 250, 500]
    assert all(r.eval_archs == [] for r in requests)  # costs only


def test_ablation_k_covers_one_to_ten():
    requests = suite_requests(load_suite("ablation_k"), Path("."), only=parse_only(["protocol=soft"]))
    assert sorted(r.method_options["apm"]["checkpoints"] for r in requests) == list(range(1, 11))


def test_only_filters_cells():
    requests = suite_requests(load_suite("quick"), Path("."), only=parse_only(["method=apm,random", "ipc=1"]))
    lines = describe_cells(requests)
    assert len(lines) == 2 and all("ipc 1 " in line for line in lines)
    with pytest.raises(UserError, match="no grid of suite 'quick' has method 'nothing'"):
        suite_requests(load_suite("quick"), Path("."), only=parse_only(["method=nothing"]))
    with pytest.raises(UserError, match="method 'randm'; did you mean 'random'"):  # even beside a value that matches
        suite_requests(load_suite("quick"), Path("."), only=parse_only(["method=random,randm"]))
    with pytest.raises(UserError, match="--only expects"):
        parse_only(["colour=red"])
    (request,) = suite_requests(load_suite("quick"), Path("."), only=parse_only(["method=random", "ipc=1", "seed=0,2"]))
    assert request.seeds == [0, 2]
    with pytest.raises(UserError, match=r"no grid of suite 'quick' has seed '7' \(it has 0, 1, 2\)"):
        suite_requests(load_suite("quick"), Path("."), only=parse_only(["seed=7"]))
    two_grids = load_suite("quick")
    two_grids.grids.append(replace(two_grids.grids[0], ipc=[50], methods=two_grids.grids[0].methods[-1:]))
    with pytest.raises(UserError, match="no cell of suite 'quick' matches --only ipc=50 --only method=apm"):
        suite_requests(two_grids, Path("."), only=parse_only(["ipc=50", "method=apm"]))  # each alone exists


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: tiny_test
version: 1
quick: true
defaults: {seeds: [0]}
grids:
  - datasets: [digits]
    ipc: [1]
    methods: [random]
"""


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("version: 1", "version: one"), "version: must be an integer"),
    (GOOD.replace("quick: true", "quick: true\ncolour: red"), "unknown key 'colour'"),
    (GOOD.replace("ipc: [1]", "ipcs: [1]"), "unknown key 'ipcs'; did you mean 'ipc'"),
    (GOOD.replace("ipc: [1]", "ipc: 1"), r"grids\[0\].ipc: must be a list of integers"),
    (GOOD.replace("ipc: [1]", "ipc: [0]"), "ipc must be at least 1"),
    (GOOD.replace("seeds: [0]", "seeds: zero"), "defaults.seeds: must be a list of integers"),
    (GOOD.replace("seeds: [0]", "seeds: [0], distill_seed: [0, 0]"),
     "defaults.distill_seed: must be an integer or a list of distinct integers"),
    (GOOD.replace("seeds: [0]", "seeds: [0], distill_seed: []"), "distill_seed: must be an integer or a list"),
    (GOOD.replace("methods: [random]", "methods: []"), "methods: must be a non-empty list"),
    (GOOD.replace("methods: [random]", "methods: [{method: apm, colour: 1}]"), "unknown key 'colour'"),
    (GOOD.replace("methods: [random]", "methods: [{method: apm, label: ../../etc}]"), "must be a plain name"),
    (GOOD.replace("methods: [random]", "methods: [{method: apm}, {method: apm}]"), "share a label"),
    (GOOD.replace("    methods: [random]\n", ""), "missing 'methods'"),
    (GOOD.split("grids:")[0], "grids: must be a non-empty list"),
    (GOOD.replace("name: tiny_test", "name: ../evil"), "name: must be letters"),
    ("grids: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "a suite is a mapping"),
    ("!!python/object/apply:os.system ['echo hacked']", "not valid YAML"),
])
def test_malformed_suite_is_a_one_line_error_naming_file_and_key(tmp_path, capsys, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=message) as caught:
        load_suite(str(path))
    assert str(path) in str(caught.value)
    assert main(["validate", "--suite", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_names_are_caught_by_validate_without_data(tmp_path, capsys):
    for bad, hint in (("methods: [randm]", "random"), ("datasets: [cifar11]", "cifar10")):
        path = _write(tmp_path, GOOD.replace("methods: [random]", bad) if "methods" in bad
                      else GOOD.replace("datasets: [digits]", bad))
        assert main(["validate", "--suite", str(path)]) == 2
        assert hint in capsys.readouterr().err
    assert main(["validate", "--suite", "quikc"]) == 2
    assert "did you mean 'quick'" in capsys.readouterr().err


def test_validate_refuses_two_grids_that_share_a_cell_as_run_does(tmp_path, capsys):
    shared = GOOD + """  - datasets: [digits]
    ipc: [1, 10]
    methods: [dm, random]
"""
    path = _write(tmp_path, shared)
    assert main(["validate", "--suite", str(path)]) == 2
    err = capsys.readouterr().err
    assert "random is in two grids of the suite, for the same cell (random, digits ipc 1 → convnet, standard protocol)" \
        in err and len(err.strip().splitlines()) == 1
    assert main(["validate", "--suite", str(_write(tmp_path, shared.replace("ipc: [1, 10]", "ipc: [10]")))]) == 0
    assert "3 cells, every name resolves" in capsys.readouterr().out


def test_a_list_of_distillation_seeds_distils_each_cell_once_per_seed(tmp_path):
    path = _write(tmp_path, GOOD.replace("seeds: [0]", "seeds: [0], distill_seed: [0, 3]"))
    requests = suite_requests(load_suite(str(path)), tmp_path)
    assert [r.distill_seed for r in requests] == [0, 3]
    assert describe_cells(requests) == [
        "digits ipc 1 random [standard, quick] distil convnet; evaluate convnet × seeds 0",
        "digits ipc 1 random [standard, quick] distil convnet (distill seed 3); evaluate convnet × seeds 0"]


def test_suite_runs_with_labels_and_cost_only_cells(tmp_path):
    path = _write(tmp_path, """\
name: labelled
version: 3
quick: true
defaults: {seeds: [0], eval_archs: [convnet]}
grids:
  - datasets: [digits]
    ipc: [1]
    methods: [random, {method: herding, label: herding-again}]
  - datasets: [digits]
    ipc: [1]
    evaluate: false
    methods: [{method: apm, label: apm-seg5, options: {segment: 5, iterations: 3, student_epochs: 2, checkpoints: 2}}]
""")
    results = tmp_path / "results"
    written = run_suite(load_suite(str(path)), results, isolate=True, cache_dir=str(tmp_path / "cache"),
                        echo=lambda line: None)
    by_label = {r["label"]: r for r in written}
    assert set(by_label) == {"random", "herding-again", "apm-seg5"}
    assert all(r["suite"] == "labelled" for r in written)
    assert by_label["random"]["acc_mean"] is not None and by_label["random"]["eval_arch"] == "convnet"
    cost_only = by_label["apm-seg5"]
    assert cost_only["status"] == "ok" and cost_only["eval_arch"] is None and cost_only["acc"] == []
    assert cost_only["iterations"] == 3 and cost_only["config"]["segment"] == 5
    assert "eval" not in cost_only["phases"] and cost_only["phases"]["distill"]["wall_s"] > 0
    on_disk = sorted(p.name for p in (results / "records").glob("*.json"))
    assert len(on_disk) == 3 and any("noeval" in name for name in on_disk)
    # resuming skips all three
    assert run_suite(load_suite(str(path)), results, isolate=False, resume=True, cache_dir=str(tmp_path / "cache"),
                     echo=lambda line: None) == []


def test_a_set_is_distilled_once_for_all_its_protocols_across_grids(tmp_path, monkeypatch, capsys):
    """Cells that differ only in their protocol — two protocols of one grid, or one method in two grids, as APM in
    the cifar10 suite — are one distillation with every protocol's records; other cells stay apart."""
    import bench.runner

    path = _write(tmp_path, """\
name: protocols_test
version: 1
quick: true
defaults: {seeds: [0], eval_archs: [convnet]}
grids:
  - datasets: [digits]
    ipc: [1]
    protocols: [standard, soft]
    methods: [random]
  - datasets: [digits]
    ipc: [1]
    protocols: [standard]
    methods: [herding]
  - datasets: [digits]
    ipc: [1, 2]
    protocols: [soft]
    methods: [herding]
""")
    real_distill_cell, distilled = bench.runner.distill_cell, []

    def counted(cell, request, *args, **kwargs):
        distilled.append((cell.method_spec, cell.ipc))
        return real_distill_cell(cell, request, *args, **kwargs)

    monkeypatch.setattr(bench.runner, "distill_cell", counted)
    lines: list[str] = []
    written = run_suite(load_suite(str(path)), tmp_path / "results", isolate=False, eval_epochs=2, echo=lines.append)
    assert sorted(distilled) == [("herding", 1), ("herding", 2), ("random", 1)]
    assert all(r["status"] == "ok" and r["acc_mean"] is not None for r in written)
    cells = {(r["method"], r["ipc"], r["protocol"]): r for r in written}
    assert sorted(cells) == [("herding", 1, "soft"), ("herding", 1, "standard"), ("herding", 2, "soft"),
                             ("random", 1, "soft"), ("random", 1, "standard")]
    for method in ("random", "herding"):  # one set, named by both records, each record its own protocol's
        standard, soft = cells[(method, 1, "standard")], cells[(method, 1, "soft")]
        assert standard["distilled_path"] == soft["distilled_path"] and standard["record_id"] != soft["record_id"]
        assert standard["protocol_config"]["loss"] == "ce" and soft["protocol_config"]["loss"] == "l1"
    assert len(list((tmp_path / "results" / "distilled").glob("*.safetensors"))) == 3
    assert sum("[soft" in line for line in lines) == 3 and sum("[standard" in line for line in lines) == 2
    assert lines[0].startswith("suite protocols_test v1: 5 cells (3 distilled sets, each evaluated under all its protocols) → ")
    assert main(["validate", "--suite", str(path)]) == 0
    assert "5 cells (3 distilled sets, each evaluated under all its protocols), every name resolves" in capsys.readouterr().out

    # a resumed run that redoes one protocol of a shared set distils again into a set of another name: the set
    # that the kept record names stays as it was
    from bench.distilled import content_hash

    kept = cells[("herding", 1, "soft")]
    next(p for p in (tmp_path / "results" / "records").glob("*.json") if kept["record_id"] not in p.name
         and "herding_convnet_standard" in p.name and "ipc1_" in p.name).unlink()
    distilled.clear()
    lines.clear()
    redone = run_suite(load_suite(str(path)), tmp_path / "results", isolate=False, eval_epochs=2, resume=True,
                       echo=lines.append)
    assert distilled == [("herding", 1)] and [(r["label"], r["protocol"]) for r in redone] == [("herding", "standard")]
    assert redone[0]["distilled_path"] != kept["distilled_path"] and content_hash(kept["distilled_path"]) == kept["distilled_sha256"]
    assert "skip herding ipc 1 [soft]: records exist (--resume)" in lines


def test_a_suites_option_variants_run_side_by_side_under_jobs(tmp_path):
    """Each option variant is a request of its own; their cells still form one pool, so with --jobs 2 the two
    variants run at the same time (each waits up to 60 s for the other, and fails alone)."""
    import crashing_methods
    from bench.registry import METHODS, register_method

    marks = tmp_path / "marks"
    marks.mkdir()
    path = _write(tmp_path, f"""\
name: side_by_side
version: 1
quick: true
defaults: {{seeds: [0], eval_archs: [convnet]}}
grids:
  - datasets: [digits]
    ipc: [1]
    methods:
      - {{method: test_rendezvous, label: first, options: {{folder: '{marks}', mark: a}}}}
      - {{method: test_rendezvous, label: second, options: {{folder: '{marks}', mark: b}}}}
""")
    register_method("test_rendezvous")(crashing_methods.WaitsForItsPartners)
    try:
        lines: list[str] = []
        written = run_suite(load_suite(str(path)), tmp_path / "results", jobs=2, eval_epochs=2, echo=lines.append)
    finally:
        METHODS.unregister("test_rendezvous")
    assert sorted((r["label"], r["status"]) for r in written) == [("first", "ok"), ("second", "ok")], written
    assert all(r["cells_side_by_side"] == 2 for r in written)
    assert sorted(line.split(" → ")[0] for line in lines if line.startswith("digits")) == [
        "digits ipc 1 test_rendezvous (first)", "digits ipc 1 test_rendezvous (second)"]


def test_a_suite_loads_each_dataset_once_and_lets_go_of_it_while_its_cells_run(tmp_path, monkeypatch):
    """A suite's requests on one dataset share one loaded copy while they are planned (ImageNet-1K 64×64 is about
    63 GB in float32, and the imagenet suite has five requests); cells that run in processes of their own load
    their own copies, so this process keeps only the dataset's description (no images) while they run."""
    import bench.runner
    from bench.runner import plan, run_planned
    from bench.runner import plan_all

    loads = []
    real_load = bench.runner.load_dataset
    monkeypatch.setattr(bench.runner, "load_dataset", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    path = _write(tmp_path, """\
name: two_protocols
version: 1
quick: true
defaults: {seeds: [0], eval_archs: [convnet]}
grids:
  - {datasets: [digits], ipc: [1], protocols: [standard, soft], methods: [random]}
""")
    requests = suite_requests(load_suite(str(path)), tmp_path / "results", eval_epochs=2)
    planned = plan_all(requests)
    assert len(requests) == 2 and len(loads) == 1
    assert planned[0][1][0].dataset is planned[1][1][0].dataset
    assert planned[0][1][0].dataset.train_images.device.type == "cpu"  # cells load their own, on their device

    single = [(requests[0], plan(requests[0]))]
    assert single[0][1][0].dataset.train_images.numel() > 0
    (record,) = run_planned(single, echo=lambda line: None)
    assert record["status"] == "ok" and record["data_fingerprint"] == planned[0][1][0].dataset.fingerprint
    kept = single[0][1][0].dataset
    assert kept.train_images.numel() == 0 and kept.test_images.numel() == 0 and kept.image_shape == (1, 8, 8)
    assert (kept.name, kept.transform, kept.fingerprint) == ("digits", planned[0][1][0].dataset.transform,
                                                              planned[0][1][0].dataset.fingerprint)


@pytest.mark.parametrize("option", [["--seeds", "0"], ["--dataset", "mnist"], ["--ipc", "1"], ["--protocol", "soft"],
                                    ["--eval-archs", "convnet"], ["--distill-arch", "convnet"], ["--distill-seed", "0"]])
def test_a_grid_option_beside_a_suite_is_refused_not_ignored(tmp_path, capsys, option):
    """A suite's grids set the datasets, ipc, seeds…: a grid option given with --suite was silently dropped (a user
    asking for one seed waited for three); now it is one line naming it and --only, before anything runs."""
    code = main(["run", "--suite", "quick", "--only", "method=random", *option, "--results", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{option[0]} would be ignored with --suite" in err and "--only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_imagenet_suite_without_data_names_the_files(tmp_path, capsys):
    code = main(["run", "--suite", "imagenet", "--quick", "--data-root", str(tmp_path), "--results", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "imagenet64/train_data_batch_1.npz" in err and "imagenet64/val_data.npz" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def _fake_imagenet64(root: Path, per_class: int = 1) -> None:
    """The downsampled-ImageNet release's layout with ``per_class`` random images of each of 1000 classes."""
    folder = root / "imagenet64"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        labels = np.tile(np.arange(1, 1001), n)[: n * 1000] if n else np.zeros(0, np.int64)
        return {"data": rng.integers(0, 256, (len(labels), 12288), dtype=np.uint8), "labels": labels}

    np.savez(folder / "train_data_batch_1.npz", **batch(per_class))
    for k in range(2, 11):
        np.savez(folder / f"train_data_batch_{k}.npz", **batch(0))
    np.savez(folder / "val_data.npz", **batch(1))


@pytest.mark.slow
def test_imagenet_suite_runs_one_quick_cell_on_a_fake_folder(tmp_path, capsys):
    _fake_imagenet64(tmp_path / "data")
    results = tmp_path / "results"
    code = main(["run", "--suite", "imagenet", "--quick", "--data-root", str(tmp_path / "data"), "--results", str(results),
                 "--only", "method=random", "--only", "ipc=1", "--only", "protocol=standard", "--only", "seed=0",
                 "--eval-epochs", "1",
                 "--no-isolate", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert record["suite"] == "imagenet" and record["dataset"] == "imagenet64" and record["ipc"] == 1
    assert record["status"] == "ok" and record["quick"] and record["eval_epochs_override"] == 1
    assert record["eval_arch"] == "convnetd4" and record["protocol_config"]["epochs"] == 1
    assert len(record["acc"]) == 1 and record["seeds"] == [0]
