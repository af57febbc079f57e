"""Hostile inputs through the command line (issue 7): each is one line on stderr naming what is wrong, exit code 2,
no traceback, and nothing written. Also: exit code 3 when a cell fails, and Ctrl-C keeps what was written, marks
the interrupted cell, and ``--resume`` redoes only that cell."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import bench.runner
import crashing_methods
from bench.cli import main
from bench.distilled import DistilledSet
from bench.registry import METHODS, register_method
from bench.runner import INTERRUPTED_ERROR, MAX_CELLS_UNCONFIRMED
from bench.store import write_record

RUN = ["run", "--dataset", "digits", "--methods", "random", "--ipc", "1", "--eval-archs", "convnet", "--seeds", "0",
       "--quick"]
DISTILL = ["distill", "--dataset", "digits", "--method", "random", "--ipc", "1", "--quick"]
SUITE = """\
name: hostile
version: 1
quick: true
defaults: {seeds: [0]}
grids:
  - datasets: [digits]
    ipc: [1]
    methods: [random]
"""


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _suite(tmp: Path, text: str) -> str:
    path = tmp / "suite.yaml"
    path.write_text(text)
    return str(path)


def _saved_set(tmp: Path, labels: torch.Tensor | None = None, nan_pixel: bool = False,
               soft: torch.Tensor | None = None) -> Path:
    """A small distilled set (digits-shaped, 10 classes × 1 image), valid unless told otherwise: its JSON path."""
    images = torch.zeros(10, 1, 8, 8)
    if nan_pixel:
        images[3, 0, 2, 2] = float("nan")
    meta = {"dataset": "digits", "method": "random", "ipc": 1, "transform": {"kind": "mean_std"}}
    labels = torch.arange(10) if labels is None else labels
    return DistilledSet(images, labels, soft_labels=soft, metadata=meta).save(tmp / "set")


def _results_with_a_record(tmp: Path) -> Path:
    """A results folder holding one record (of the digits ipc-1 random cell)."""
    record = {"record_id": "r1", "method": "random", "recipe": None, "dataset": "digits", "ipc": 1,
              "distill_arch": "convnet", "eval_arch": "convnet", "protocol": "standard", "quick": True, "seeds": [0],
              "acc": [70.0], "acc_mean": 70.0, "acc_std": 0.0, "status": "ok", "error": None}
    write_record(tmp / "results", record)
    return tmp / "results"


def _truncated_tensors(tmp: Path) -> list[str]:
    path = _saved_set(tmp).with_suffix(".safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["evaluate", str(path.with_suffix(".json")), "--quick", "--results", str(tmp / "res")]


def _json_not_json(tmp: Path) -> list[str]:
    path = _saved_set(tmp)
    path.write_text('{"dataset": "digits", ')
    return ["evaluate", str(path), "--quick", "--results", str(tmp / "res")]


def _json_without_tensors(tmp: Path) -> list[str]:
    path = _saved_set(tmp)
    path.with_suffix(".safetensors").unlink()
    return ["evaluate", str(path), "--quick", "--results", str(tmp / "res")]


def _results_is_a_file(tmp: Path) -> list[str]:
    (tmp / "res").write_text("not a folder")
    return RUN + ["--results", str(tmp / "res")]


def _results_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("not a folder")
    return RUN + ["--results", str(tmp / "file" / "res")]


def _cache_is_a_file(tmp: Path) -> list[str]:
    (tmp / "cache").write_text("not a folder")
    return RUN + ["--cache-dir", str(tmp / "cache"), "--results", str(tmp / "res")]


def _cache_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("not a folder")
    return RUN + ["--cache-dir", str(tmp / "file" / "cache"), "--results", str(tmp / "res")]


def _json_nested_too_deep(tmp: Path) -> list[str]:
    path = _saved_set(tmp)
    path.write_text("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError, not JSONDecodeError
    return ["evaluate", str(path), "--quick", "--results", str(tmp / "res")]


def _json_with_a_huge_integer(tmp: Path) -> list[str]:
    path = _saved_set(tmp)
    path.write_text('{"ipc": ' + "9" * 5000 + "}")  # json.loads: a plain ValueError (int digits limit)
    return ["evaluate", str(path), "--quick", "--results", str(tmp / "res")]


def _empty_mnist_test_split(tmp: Path) -> list[str]:
    from test_data_loaders import idx_bytes, write_mnist

    write_mnist(tmp / "data")
    (tmp / "data" / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8), 2051))
    (tmp / "data" / "MNIST/raw/t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, np.uint8), 2049))
    return _with(RUN, "--dataset", "mnist") + ["--data-root", str(tmp / "data"), "--results", str(tmp / "res")]


def _alias_bomb(tmp: Path) -> list[str]:
    """Under 1 kB of YAML whose options, written out, would be 10⁹ items: the suite's default label for the method
    used to write them out (a GB and more) before the unknown option was reported."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    options = "".join(f"\n          {level}" for level in levels)
    text = SUITE.replace("methods: [random]", f"methods:\n      - method: random\n        options:{options}")
    return ["validate", "--suite", _suite(tmp, text)]


# (argv given a fresh tmp folder, a phrase the error must contain); results always go under the tmp folder
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "unknown method": (lambda t: _with(RUN, "--methods", "randm") + ["--results", str(t / "res")],
                       "did you mean 'random'"),
    "unknown dataset": (lambda t: _with(RUN, "--dataset", "cifar11") + ["--results", str(t / "res")],
                        "did you mean 'cifar10'"),
    "unknown architecture": (lambda t: _with(RUN, "--eval-archs", "convnett") + ["--results", str(t / "res")],
                             "did you mean 'convnet'"),
    "architecture option of the wrong type": (lambda t: _with(RUN, "--eval-archs", "convnet[width=abc]")
                                              + ["--results", str(t / "res")], "width must be int, got 'abc'"),
    "architecture option with a typo": (lambda t: _with(RUN, "--eval-archs", "convnet[widht=64]")
                                        + ["--results", str(t / "res")], "'widht'; did you mean 'width'?"),
    "architecture option out of range": (lambda t: _with(RUN, "--eval-archs", "convnet[width=0]")
                                          + ["--results", str(t / "res")], "ConvNet width must be at least 1, got 0"),
    "unknown distillation architecture": (lambda t: RUN + ["--distill-arch", "resnet1800", "--results", str(t / "res")],
                                          "resnet1800"),
    "unknown protocol": (lambda t: RUN + ["--protocol", "sotf", "--results", str(t / "res")], "did you mean 'soft'"),
    "unknown recipe": (lambda t: _with(RUN, "--methods", "apm.cifar10_ipc5") + ["--results", str(t / "res")],
                       "did you mean 'cifar10_ipc50'"),
    "ipc 0": (lambda t: _with(RUN, "--ipc", "0") + ["--results", str(t / "res")], "ipc must be at least 1"),
    "ipc above the smallest class": (lambda t: _with(RUN, "--ipc", "1,150") + ["--results", str(t / "res")],
                                     "ipc 150 is larger than the smallest class of digits"),
    "empty seeds": (lambda t: _with(RUN, "--seeds", "") + ["--results", str(t / "res")], "no seeds given"),
    "empty ipc": (lambda t: _with(RUN, "--ipc", "") + ["--results", str(t / "res")], "no ipc given"),
    "empty protocol": (lambda t: RUN + ["--protocol", "", "--results", str(t / "res")], "no protocol given"),
    "protocol named twice": (lambda t: RUN + ["--protocol", "soft,standard,soft", "--results", str(t / "res")],
                             "protocol soft is named twice in soft, standard, soft"),
    "negative seed": (lambda t: _with(RUN, "--seeds", "0,-1") + ["--results", str(t / "res")],
                      "evaluation seed -1: seeds are 0 or more"),
    "negative distillation seed": (lambda t: RUN + ["--distill-seed=-1", "--results", str(t / "res")],
                                   "distillation seed -1: seeds are 0 or more"),
    "distill with a negative seed": (lambda t: DISTILL + ["--seed=-3", "--out", str(t / "s")],
                                     "distillation seed -3: seeds are 0 or more"),
    "suite: ipc above the smallest class": (lambda t: ["run", "--suite", _suite(t, SUITE.replace("ipc: [1]", "ipc: [500]")),
                                                       "--results", str(t / "res")],
                                            "ipc 500 is larger than the smallest class of digits (139 training images), "
                                            "in suite hostile"),
    "evaluate with a negative seed": (lambda t: ["evaluate", str(_saved_set(t)), "--seeds=-2", "--results", str(t / "res")],
                                      "evaluation seed -2: seeds are 0 or more"),
    "a folder given as the suite": (lambda t: ["run", "--suite", str(t), "--results", str(t / "res")],
                                    "is a folder; a suite is one YAML file"),
    "--eval-epochs 0": (lambda t: RUN + ["--eval-epochs", "0", "--results", str(t / "res")],
                        "--eval-epochs must be at least 1"),
    "--checkpoint-every 0": (lambda t: RUN + ["--checkpoint-every", "0", "--results", str(t / "res")],
                             "--checkpoint-every must be at least 1"),
    "--set without '='": (lambda t: DISTILL + ["--out", str(t / "s"), "--set", "foo"], "--set expects key=value"),
    "unknown method option": (lambda t: _with(DISTILL, "--method", "dm") + ["--out", str(t / "s"), "--set", "colour=1"],
                              "unknown method 'dm' option 'colour'"),
    "wrong option type": (lambda t: _with(DISTILL, "--method", "dm") + ["--out", str(t / "s"), "--set", "iterations=abc"],
                          "option 'iterations' must be int, got 'abc'"),
    "negative method option": (lambda t: _with(DISTILL, "--method", "dm") + ["--out", str(t / "s"), "--set", "iterations=-5"],
                               "option 'iterations' must be a non-negative number, got -5"),
    "an init that is not one": (lambda t: _with(DISTILL, "--method", "dm") + ["--out", str(t / "s"), "--set", "init=bogus"],
                                "method 'dm': option 'init' must be one of 'noise', 'real', got 'bogus'"),
    "NaN method option": (lambda t: _with(DISTILL, "--method", "apm") + ["--out", str(t / "s"), "--set", "lr_img=.nan"],
                          "option 'lr_img' must be a non-negative number, got nan"),
    "suite: unknown key": (lambda t: ["run", "--suite", _suite(t, SUITE.replace("quick: true", "quick: true\ncolour: 1")),
                                      "--results", str(t / "res")], "unknown key 'colour'"),
    "suite: wrong type": (lambda t: ["run", "--suite", _suite(t, SUITE.replace("ipc: [1]", "ipc: one")),
                                     "--results", str(t / "res")], "grids[0].ipc: must be a list of integers"),
    "suite: malformed YAML": (lambda t: ["run", "--suite", _suite(t, "grids: [unclosed\n"), "--results", str(t / "res")],
                              "not valid YAML at line 2"),
    "suite: python object tag": (lambda t: ["run", "--suite", _suite(t, "!!python/object/apply:os.system ['echo x']\n"),
                                            "--results", str(t / "res")], "without tags"),
    "suite: traversal in a label": (lambda t: ["run", "--suite", _suite(t, SUITE.replace(
        "methods: [random]", "methods: [{method: random, label: ../x}]")), "--results", str(t / "res")],
        "must be a plain name"),
    "suite: traversal in the name": (lambda t: ["run", "--suite", _suite(t, SUITE.replace("name: hostile", "name: ../x")),
                                                "--results", str(t / "res")], "name: must be letters"),
    "suite file that does not exist": (lambda t: ["run", "--suite", str(t / "nope.yaml"), "--results", str(t / "res")],
                                       "does not exist"),
    "suite: traversal in --suite": (lambda t: ["run", "--suite", "../x", "--results", str(t / "res")],
                                    "suite file ../x does not exist"),
    "--only with a bad key": (lambda t: ["run", "--suite", "quick", "--only", "colour=red", "--results", str(t / "res")],
                              "--only expects KEY=VALUE"),
    "huge grid without --yes": (lambda t: _with(_with(RUN, "--methods", "random,herding"), "--ipc",
                                                ",".join(map(str, range(1, 121)))) + ["--results", str(t / "res")],
                                "this grid has 240 cells"),
    "huge suite without --yes": (lambda t: ["run", "--suite", _suite(t, SUITE.replace(
        "ipc: [1]", f"ipc: {list(range(1, 102))}").replace("methods: [random]", "methods: [random, herding]")),
        "--results", str(t / "res")], "this grid has 202 cells"),
    "--yes passes the size check, not the others": (lambda t: _with(_with(RUN, "--methods", "random,herding"), "--ipc",
                                                                    ",".join(map(str, range(1, 151))))
                                                    + ["--yes", "--results", str(t / "res")],
                                                    "is larger than the smallest class of digits"),
    "seed named twice": (lambda t: _with(RUN, "--seeds", "0,1,0") + ["--results", str(t / "res")],
                         "seed 0 is named twice in 0, 1, 0"),
    "ipc named twice": (lambda t: _with(RUN, "--ipc", "1,1") + ["--results", str(t / "res")], "ipc 1 is named twice"),
    "method named twice": (lambda t: _with(RUN, "--methods", "random,random") + ["--results", str(t / "res")],
                           "method random is named twice"),
    "architecture named twice": (lambda t: _with(RUN, "--eval-archs", "convnet,convnet") + ["--results", str(t / "res")],
                                 "evaluation architecture convnet is named twice"),
    "two names for one cell": (lambda t: _with(RUN, "--methods", "apm,apm.digits_ipc1") + ["--results", str(t / "res")],
                               "apm and apm.digits_ipc1 are the same cell (apm.digits_ipc1, digits ipc 1 → convnet, standard protocol)"),
    "suite: two grids share a cell": (lambda t: ["run", "--suite", _suite(t, SUITE + SUITE[SUITE.index("  - datasets"):]),
                                                 "--results", str(t / "res")],
                                      "random is in two grids of the suite, for the same cell (random, digits ipc 1 → convnet, standard protocol)"),
    "suite: seed named twice": (lambda t: ["run", "--suite", _suite(t, SUITE.replace("seeds: [0]", "seeds: [0, 0]")),
                                           "--results", str(t / "res")], "suite.yaml: seed 0 is named twice"),
    "suite: an option of the wrong type": (lambda t: ["run", "--suite", _suite(t, SUITE.replace(
        "methods: [random]", "methods: [{method: apm, options: {ce: abc}}]")), "--results", str(t / "res")],
        "suite.yaml: method 'apm': option 'ce' must be float, got 'abc'"),
    "evaluate with a seed named twice": (lambda t: ["evaluate", str(_saved_set(t)), "--seeds", "2,2",
                                                    "--results", str(t / "res")], "seed 2 is named twice"),
    "cache folder is a file": (_cache_is_a_file, "is a file, not a folder; pass --cache-dir"),
    "cache folder under a file": (_cache_under_a_file, "is not writable"),
    "evaluate with a cache folder that is a file": (lambda t: ["evaluate", str(_saved_set(t)), "--cache-dir",
                                                               str(_saved_set(t)), "--results", str(t / "res")],
                                                    "cache folder"),
    "--memory-sample-ms 0": (lambda t: RUN + ["--memory-sample-ms", "0", "--results", str(t / "res")],
                             "--memory-sample-ms must be above 0"),
    "evaluate --memory-sample-ms -1": (lambda t: ["evaluate", str(_saved_set(t)), "--memory-sample-ms", "-1",
                                                  "--results", str(t / "res")], "--memory-sample-ms must be above 0"),
    "distill --out under a file": (lambda t: DISTILL + ["--out", str(_saved_set(t) / "set")],
                                   "output folder"),
    "distill --out a folder": (lambda t: DISTILL + ["--out", str(t)], "is a folder; --out takes a path stem"),
    "report --out under a file": (lambda t: ["report", "--results", str(_results_with_a_record(t)), "--out",
                                             str(_saved_set(t) / "r")], "report folder"),
    "a method that cannot distil with the architecture": (
        lambda t: _with(RUN, "--methods", "tesla") + ["--distill-arch", "resnet18", "--results", str(t / "res")],
        "tesla cannot distil with 'resnet18': MTT/TESLA unroll the student functionally"),
    "results folder is a file": (_results_is_a_file, "is a file, not a folder"),
    "results folder under a file": (_results_under_a_file, "is not writable"),
    "truncated distilled .safetensors": (_truncated_tensors, "truncated or corrupt"),
    "distilled .json that is not JSON": (_json_not_json, "is not readable JSON"),
    "distilled .json without its .safetensors": (_json_without_tensors, "set.safetensors"),
    "evaluate with empty seeds": (lambda t: ["evaluate", str(_saved_set(t)), "--seeds", "", "--results", str(t / "res")],
                                  "no seeds given"),
    "unknown device": (lambda t: RUN + ["--device", "cdua", "--results", str(t / "res")], "did you mean 'cuda'"),
    "evaluate on an unknown device": (lambda t: ["evaluate", str(_saved_set(t)), "--device", "gpu0",
                                                 "--results", str(t / "res")], "unknown device 'gpu0'"),
    "evaluate a folder": (lambda t: ["evaluate", str(t / "empty"), "--results", str(t / "res")],
                          "is a folder; give one distilled set's .json"),
    "distilled labels outside the classes": (lambda t: ["evaluate", str(_saved_set(t, labels=torch.arange(10) + 50)),
                                                        "--quick", "--results", str(t / "res")],
                                             "distilled set has label 59, but digits has classes 0..9"),
    "distilled labels that are not class indices": (lambda t: ["evaluate", str(_saved_set(t, labels=torch.arange(10) - 1)),
                                                               "--quick", "--results", str(t / "res")],
                                                    "labels must be class indices"),
    "distilled pixels that are NaN": (lambda t: ["evaluate", str(_saved_set(t, nan_pixel=True)), "--quick",
                                                 "--results", str(t / "res")], "non-finite pixels"),
    "distilled soft labels of the wrong shape": (lambda t: ["evaluate", str(_saved_set(t, soft=torch.zeros(10, 3))),
                                                            "--quick", "--results", str(t / "res")],
                                                 "distilled soft labels are (10, 3), expected (10, 10)"),
    "--no-evaluate with a suite": (lambda t: ["run", "--suite", _suite(t, SUITE), "--no-evaluate",
                                              "--results", str(t / "res")], "--no-evaluate is for a grid"),
    "data root without the files": (lambda t: _with(RUN, "--dataset", "mnist") + [
        "--data-root", str(t / "empty"), "--results", str(t / "res")], "MNIST/raw/train-images-idx3-ubyte"),
    "dataset files with an empty split": (_empty_mnist_test_split, "the test split holds no images"),
    "distilled .json nested too deep": (_json_nested_too_deep, "is not readable JSON"),
    "distilled .json with a huge integer": (_json_with_a_huge_integer, "is not readable JSON"),
    "--set value that is not YAML": (lambda t: _with(DISTILL, "--method", "dm") + [
        "--out", str(t / "s"), "--set", "iterations=[unclosed"], "--set iterations: '[unclosed' is not a YAML value"),
    "--set value with a python tag": (lambda t: _with(DISTILL, "--method", "dm") + [
        "--out", str(t / "s"), "--set", "iterations=!!python/name:os.system"], "is not a YAML value"),
    "a '.' without a recipe": (lambda t: _with(RUN, "--methods", "random.") + ["--results", str(t / "res")],
                               "a recipe name must follow the '.'"),
    "suite: a YAML alias bomb in a method's options": (_alias_bomb, "unknown method 'random' option 'a0'"),
    "a results folder whose name is too long": (lambda t: RUN + ["--results", str(t / ("x" * 300))],
                                                "a path is too long for the file system"),
    "--cache-dir under the home of no user": (lambda t: RUN + ["--cache-dir", "~no_such_user_ddbench/cache",
                                                               "--results", str(t / "res")],
                                              "cache folder ~no_such_user_ddbench/cache:"),
    "suite nested too deeply": (lambda t: ["validate", "--suite", _suite(t, "version: 1\ngrids: " + "[" * 100_000
                                                                          + "]" * 100_000 + "\n")],
                                "nested too deeply"),
    "suite: a newline in a label": (lambda t: ["run", "--suite", _suite(t, SUITE.replace(
        "methods: [random]", 'methods: [{method: random, label: "a\\nb"}]')), "--results", str(t / "res")],
        "no '/', '..' or control characters"),
    "ipc above the smallest class, with a new cache folder": (
        lambda t: _with(RUN, "--ipc", "150") + ["--cache-dir", str(t / "new-cache"), "--results", str(t / "res")],
        "ipc 150 is larger than the smallest class of digits"),
}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _assert_rejected(capsys, tmp: Path, argv: list[str], expected: str) -> None:
    before = _tree(tmp)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("ddbench: error:"), err
    assert "Traceback" not in err and expected in err, err
    assert _tree(tmp) == before, "a rejected command wrote something"


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, case):
    make_argv, expected = CASES[case]
    (tmp_path / "empty").mkdir()
    argv = make_argv(tmp_path)
    _assert_rejected(capsys, tmp_path, argv, expected)
    assert not (tmp_path / "res").is_dir()


@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda", None, "device 'cuda' requested but CUDA is not available"),
    ("cuda:0", None, "device 'cuda:0' requested but CUDA is not available"),
    ("cuda:7", 2, "device 'cuda:7' requested but this machine shows 2 CUDA devices (cuda:0 to cuda:1)"),
])
def test_a_cuda_device_this_machine_lacks_is_refused_before_any_cell(capsys, tmp_path, monkeypatch, device, gpus,
                                                                     expected):
    """It used to be found in each cell, which then wrote a `failed` record (exit 3)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus is not None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus or 0)
    _assert_rejected(capsys, tmp_path, RUN + ["--device", device, "--results", str(tmp_path / "res")],
                     expected)
    assert not (tmp_path / "res").is_dir()


USAGE_ERRORS = {
    "architecture list with an unclosed bracket": (_with(RUN, "--eval-archs", "convnet[width=64"), "unclosed '['"),
    "evaluate: unclosed bracket": (["evaluate", "set.json", "--archs", "convnet[width=64"], "unclosed '['"),
    "empty architecture list": (_with(RUN, "--eval-archs", ","), "expected comma-separated architecture names"),
    "an empty item among integers": (_with(RUN, "--ipc", "1,,10"), "expected comma-separated integers, got '1,,10'"),
    "a seed that is not an integer": (_with(RUN, "--seeds", "1.5"), "expected comma-separated integers, got '1.5'"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2(capsys, tmp_path, case):
    argv, expected = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as stopped:
        main(argv + ["--results", str(tmp_path / "res")] if argv[0] == "run" else argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.count("\n") == 1 and expected in err and err.endswith("(see ddbench " + argv[0] + " --help)\n"), err
    assert not list(tmp_path.iterdir())


def test_no_evaluate_writes_cost_only_records(capsys, tmp_path):
    assert main(_with(RUN, "--methods", "herding") + ["--no-evaluate", "--no-isolate", "--results", str(tmp_path)]) == 0
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    assert record["status"] == "ok" and record["eval_arch"] is None and record["acc_mean"] is None
    assert record["phases"]["distill"]["wall_s"] > 0


def test_results_folder_without_write_permission(capsys, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root ignores permissions; `results folder under a file` covers that case
            pytest.skip("running as root (or on a file system without permissions): the folder is writable anyway")
        _assert_rejected(capsys, tmp_path, RUN + ["--results", str(folder / "res")], f"{folder / 'res'} is not writable")
    finally:
        folder.chmod(0o700)


def test_huge_grid_threshold_is_a_module_constant():
    assert MAX_CELLS_UNCONFIRMED == 200


@pytest.fixture
def crash_oom():
    register_method("crash_oom")(crashing_methods.RunsOutOfMemory)
    yield "crash_oom"
    METHODS._entries.pop("crash_oom")


def _records(results: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((results / "records").glob("*.json"))}


def test_a_failed_cell_gives_exit_3_and_a_summary(capsys, tmp_path, crash_oom):
    results = tmp_path / "res"
    code = main(_with(RUN, "--methods", f"{crash_oom},random") + ["--eval-epochs", "2", "--no-isolate",
                                                                  "--results", str(results)])
    out, err = capsys.readouterr()
    assert code == 3, err
    summary = out.strip().splitlines()[-1]
    assert "2 records: 1 ok, 0 failed, 1 oom, 0 diverged, 0 skipped by --resume" in summary
    assert sorted(r["status"] for r in _records(results).values()) == ["ok", "oom"]


def test_ctrl_c_keeps_written_records_marks_the_cell_and_resume_redoes_only_it(capsys, tmp_path, monkeypatch):
    results = tmp_path / "res"
    argv = _with(RUN, "--ipc", "1,2") + ["--eval-epochs", "2", "--no-isolate", "--results", str(results)]
    real_run_cell, calls = bench.runner.run_cell, []

    def interrupted_on_the_second_cell(*args, **kwargs):
        calls.append(args[0].ipc)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(bench.runner, "run_cell", interrupted_on_the_second_cell)
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    first = _records(results)
    assert sorted((r["ipc"], r["status"]) for r in first.values()) == [(1, "ok"), (2, "interrupted")]
    (interrupted,) = [r for r in first.values() if r["status"] == "interrupted"]
    assert interrupted["error"] == INTERRUPTED_ERROR == "interrupted by the user (Ctrl-C)"

    monkeypatch.setattr(bench.runner, "run_cell", real_run_cell)
    code = main(argv + ["--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("skip")] == ["skip random ipc 1: records exist (--resume)"]
    assert "2 records: 1 ok, 0 failed, 0 oom, 0 diverged, 1 skipped by --resume" in out
    second = _records(results)
    assert set(second) == set(first), "a redone cell must overwrite its record, not add one"
    assert sorted((r["ipc"], r["status"]) for r in second.values()) == [(1, "ok"), (2, "ok")]
    ok_first = [name for name, r in first.items() if r["status"] == "ok"]
    assert all(second[name] == first[name] for name in ok_first), "the kept record must not be rewritten"


def test_a_dataset_that_will_not_fit_in_memory_is_refused_before_it_is_loaded(capsys, tmp_path, monkeypatch):
    """A dataset whose float32 copy exceeds the memory available is one line, exit 2, nothing written — not the
    out-of-memory killer minutes later; the line says how much it needs and has, and how to try anyway."""
    import bench.data
    from test_data_loaders import write_mnist

    write_mnist(tmp_path / "data")  # uint8 files: 20 + 10 images of 28×28, 94,080 bytes as float32
    monkeypatch.setattr(bench.data, "available_host_memory", lambda: 20_000)
    argv = _with(RUN, "--dataset", "mnist") + ["--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "res")]
    _assert_rejected(capsys, tmp_path, argv,
                     "dataset 'mnist' needs about 0.1 MiB of memory to load (20 + 10 images of 1×28×28 as float32); "
                     "this machine has 0.0 MiB available: use a machine with more memory, or set "
                     "DDBENCH_SKIP_MEMORY_CHECK=1 to try anyway")
    monkeypatch.setenv(bench.data.MEMORY_CHECK_ENV, "1")
    assert bench.data.load_dataset("mnist", tmp_path / "data").train_images.shape == (20, 1, 28, 28)
    monkeypatch.delenv(bench.data.MEMORY_CHECK_ENV)
    monkeypatch.setattr(bench.data, "available_host_memory", lambda: 200_000)  # enough for the float copy only
    raw = bench.data.get_dataset_info("mnist").loader(tmp_path / "data", None)
    bench.data.check_fits_in_memory("mnist", raw, False, torch.device("cpu"))
    with pytest.raises(bench.data.UserError, match="with the ZCA fit"):  # ZCA's float64 fit counts too
        bench.data.check_fits_in_memory("mnist", raw, True, torch.device("cpu"))


def test_a_distillation_that_diverges_is_one_line_and_saves_nothing(capsys, tmp_path):
    register_method("test_diverges")(crashing_methods.Diverges)
    try:
        before = _tree(tmp_path)
        code = main(_with(DISTILL, "--method", "test_diverges") + ["--out", str(tmp_path / "set")])
    finally:
        METHODS.unregister("test_diverges")
    _, err = capsys.readouterr()
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == "ddbench: the distillation diverged (non-finite loss at iteration 0); nothing was saved\n"
    assert _tree(tmp_path) == before


def test_a_mistyped_dataset_placement_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DDBENCH_DATASET_ON", "gpu")
    _assert_rejected(capsys, tmp_path, RUN + ["--results", str(tmp_path / "res")],
                     "DDBENCH_DATASET_ON='gpu': use one of auto, host, device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_a_dataset_larger_than_the_gpus_free_memory_is_refused(monkeypatch):
    import bench.data

    monkeypatch.setattr(bench.data, "available_host_memory", lambda: None)  # the host check says nothing here
    free, _ = torch.cuda.mem_get_info(torch.device("cuda"))
    count = free // (3 * 64 * 64 * 4) + 1  # one image more than fits as float32
    huge = torch.zeros((), dtype=torch.float32).expand(count, 3, 64, 64)  # no memory behind it
    raw = bench.data.RawSplits(huge, torch.zeros(count, dtype=torch.long), huge[:1], torch.zeros(1, dtype=torch.long), [])
    with pytest.raises(bench.data.UserError, match="on cuda"):
        bench.data.check_fits_in_memory("imagenet64", raw, False, torch.device("cuda"))
    bench.data.check_fits_in_memory("imagenet64", bench.data.RawSplits(huge[:10], raw.train_labels[:10], huge[:1],
                                                                        raw.test_labels, []), False, torch.device("cuda"))
