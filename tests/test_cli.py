"""The command line: exit codes, one-line errors with suggestions, nothing written on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

RUN = ["run", "--dataset", "digits", "--methods", "random", "--ipc", "1", "--eval-archs", "convnet",
       "--seeds", "0", "--protocol", "standard", "--quick"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize("flag,value,expected", [
    ("--methods", "randm", "did you mean 'random'"),
    ("--dataset", "mnits", "did you mean 'mnist'"),
    ("--eval-archs", "convnett", "did you mean 'convnet'"),
    ("--ipc", "0", "ipc must be at least 1"),
    ("--ipc", "500", "larger than the smallest class"),
    ("--protocol", "standart", "did you mean 'standard'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, flag, value, expected):
    code, out, err = run_cli(capsys, *replace(RUN, flag, value), "--results", str(tmp_path / "res"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ddbench: error:") and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "res").exists()


def test_several_protocols_on_the_command_line_share_one_distillation(capsys, tmp_path):
    """``--protocol standard,soft``: one distilled set per cell, a record per protocol naming it, in one run."""
    argv = replace(RUN, "--protocol", "standard,soft") + ["--eval-epochs", "2", "--no-isolate",
                                                           "--results", str(tmp_path / "res")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "res" / "records").glob("*.json"))]
    assert sorted(r["protocol"] for r in records) == ["soft", "standard"]
    assert len({r["distilled_path"] for r in records}) == 1
    assert len(list((tmp_path / "res" / "distilled").glob("*.safetensors"))) == 1
    assert "[standard, quick: 2 epochs" in out and "[soft, quick: 2 epochs" in out
    code, _, err = run_cli(capsys, *replace(argv, "--results", str(tmp_path / "costs")), "--no-evaluate")
    assert code == 0, err  # cost-only: one record, under the first protocol (as a suite's `evaluate: false` grid)
    assert [p.name.split("_")[-2] for p in (tmp_path / "costs" / "records").glob("*.json")] == ["standard"]


def test_data_root_without_the_dataset(capsys, tmp_path):
    argv = replace(RUN, "--dataset", "cifar10") + ["--data-root", str(tmp_path), "--results", str(tmp_path / "res")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "cifar-10-batches-py/data_batch_1" in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()


def test_the_console_script_exits_2_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "ddbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bench.cli"]
    proc = subprocess.run(cmd + replace(RUN, "--methods", "hearding") + ["--results", str(tmp_path / "r")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2 and "did you mean 'herding'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reader_that_leaves_early_ends_the_listing_quietly():
    """``ddbench ls suites | head -1``: the reader gone, ddbench stops with the shell's SIGPIPE status and no
    BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "bench.cli", "ls", "suites"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_ls(capsys):
    for what, expected in [("methods", "herding"), ("datasets", "imagenet64"), ("archs", "convnet"), ("protocols", "soft")]:
        code, out, _ = run_cli(capsys, "ls", what)
        assert code == 0 and expected in out
    assert "any timm model" in run_cli(capsys, "ls", "archs")[1]


def test_distill_then_evaluate_with_timm_models(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "distill", "--dataset", "digits", "--method", "random", "--ipc", "1",
                           "--out", str(tmp_path / "set"), "--quick")
    assert code == 0 and (tmp_path / "set.safetensors").is_file()
    code, out, err = run_cli(capsys, "evaluate", str(tmp_path / "set.json"), "--archs",
                             "resnet18,vit_tiny_patch16_224[patch_size=2]", "--seeds", "0", "--quick",
                             "--eval-epochs", "5", "--results", str(tmp_path / "res"))
    assert code == 0, err
    lines = [line for line in out.splitlines() if "→" in line]
    assert len(lines) == 2 and "resnet18" in lines[0] and "vit_tiny_patch16_224" in lines[1]
    records = sorted((tmp_path / "res" / "records").glob("*.json"))
    assert len(records) == 2

    evaluated = json.loads(records[0].read_text())
    assert evaluated["eval_epochs_override"] == 5 and evaluated["protocol_config"]["epochs"] == 5
    code, _, err = run_cli(capsys, *RUN, "--results", str(tmp_path / "grid"))
    assert code == 0, err
    (grid_record,) = (tmp_path / "grid" / "records").glob("*.json")
    ran = json.loads(grid_record.read_text())
    assert set(ran) - {"distilled_path"} <= set(evaluated), "`evaluate` and `run` records must share one schema"
    assert evaluated["phases"]["eval"]["wall_s"] > 0 and evaluated["config_hash"] == ran["config_hash"]


def test_evaluate_missing_set(capsys, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "nothing.json"))
    assert code == 2 and "not found" in err


def test_run_writes_records_and_report(capsys, tmp_path):
    res = tmp_path / "res"
    code, out, err = run_cli(capsys, *RUN, "--results", str(res))
    assert code == 0, err
    (record,) = list((res / "records").glob("*.json"))

    r = json.loads(record.read_text())
    for key in ("schema_version", "method", "recipe", "dataset", "ipc", "distill_arch", "eval_arch", "protocol",
                "quick", "seeds", "acc", "acc_mean", "acc_std", "status", "error"):
        assert key in r
    assert r["status"] == "ok" and r["quick"] is True and len(r["acc"]) == 1
    distill = r["phases"]["distill"]
    assert distill["cpu_peak_rss_mb"] > 0 and distill["gpu_nvml_peak_mb"] is None and distill["gpu_reason"]
    code, out, _ = run_cli(capsys, "report", "--results", str(res), "--out", str(tmp_path / "rep"))
    assert code == 0 and "| random" in (tmp_path / "rep" / "res.md").read_text()
    code, out, _ = run_cli(capsys, *RUN, "--results", str(res), "--resume")
    assert code == 0 and "skip" in out


def test_full_recipes_on_a_cpu_get_a_note_and_quick_ones_none(capsys, tmp_path):
    full = [arg for arg in RUN if arg != "--quick"]
    code, _, err = run_cli(capsys, *full, "--device", "cpu", "--eval-epochs", "1", "--results", str(tmp_path / "full"))
    assert code == 0, err
    (note,) = [line for line in err.splitlines() if line.startswith("note: the full recipes on a CPU")]
    assert "--quick" in note
    code, _, err = run_cli(capsys, *RUN, "--device", "cpu", "--eval-epochs", "1", "--results", str(tmp_path / "quick"))
    assert code == 0 and "note:" not in err


def test_compare_help_states_the_thresholds_defaults():
    from dataclasses import asdict

    from bench.cli import COMPARE_DEFAULTS
    from bench.compare import Thresholds

    defaults = asdict(Thresholds())
    assert {key: defaults[key] for key in COMPARE_DEFAULTS} == COMPARE_DEFAULTS


def test_evaluating_a_set_on_other_data_files_warns_and_records_which(capsys, tmp_path):
    from bench.data import load_dataset

    code, _, err = run_cli(capsys, "distill", "--dataset", "digits", "--method", "random", "--ipc", "1",
                           "--out", str(tmp_path / "set"), "--quick")
    assert code == 0, err
    meta_path = tmp_path / "set.json"
    meta = json.loads(meta_path.read_text())
    digits = load_dataset("digits").fingerprint
    assert meta["data_fingerprint"] == digits
    evaluate = ("evaluate", str(meta_path), "--seeds", "0", "--quick", "--eval-epochs", "1", "--results", str(tmp_path / "res"))
    code, _, err = run_cli(capsys, *evaluate)
    assert code == 0 and "warning" not in err
    meta_path.write_text(meta_path.read_text().replace(digits, "0123456789abcdef"))
    code, _, err = run_cli(capsys, *evaluate)
    assert code == 0 and "was distilled from other digits files (data fingerprint 0123456789abcdef)" in err
    assert all(json.loads(p.read_text())["data_fingerprint"] == digits for p in (tmp_path / "res" / "records").glob("*"))


def test_evaluate_says_what_ran_and_keeps_a_quick_set_under_the_full_protocol_apart(capsys, tmp_path):
    """The console line names the epochs and lr; a record says which parts were quick and where soft targets came
    from; the report gives a quick set evaluated under the full protocol a row of its own."""

    from bench.distilled import content_hash

    code, _, err = run_cli(capsys, "distill", "--dataset", "digits", "--method", "random", "--ipc", "1",
                           "--out", str(tmp_path / "set"), "--quick")
    assert code == 0, err
    res = tmp_path / "res"
    common = ("evaluate", str(tmp_path / "set.json"), "--seeds", "0", "--eval-epochs", "2", "--results", str(res))
    code, out, err = run_cli(capsys, *common, "--quick")
    assert code == 0, err
    assert "[standard, quick: 2 epochs, lr 0.01]" in out
    code, out, err = run_cli(capsys, *common, "--quick", "--protocol", "soft")  # the quick teacher: a short training
    assert code == 0, err
    assert "[soft, quick: 2 epochs, lr 0.01]" in out
    code, out, err = run_cli(capsys, *common)  # the full standard protocol on the quick set
    assert code == 0, err
    assert "[standard: 2 epochs, lr 0.01]" in out
    records = [json.loads(p.read_text()) for p in sorted((res / "records").glob("*.json"))]
    by_protocol = {(r["protocol"], r["protocol_quick"]): r for r in records}
    quick_standard, soft, full_standard = by_protocol["standard", True], by_protocol["soft", True], by_protocol["standard", False]
    assert quick_standard["quick"] and quick_standard["distilled_quick"] and quick_standard["soft_targets"] is None
    assert full_standard["quick"] and full_standard["distilled_quick"], "a quick set makes a quick record"
    assert soft["soft_targets"]["source"] == "teacher" and soft["soft_targets"]["expert"] == 0
    assert soft["soft_targets"]["recipe"].startswith("apm") and len(soft["soft_targets"]["cache_key"]) == 16
    assert {r["distilled_sha256"] for r in records} == {content_hash(tmp_path / "set.json")}
    code, _, err = run_cli(capsys, "report", "--results", str(res), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    report = (tmp_path / "rep" / "res.md").read_text()
    labels = {line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| random")}
    assert labels == {"random", "random (full protocol)"}
    assert "Costs of distillation" not in report, "sets only evaluated here have no distillation costs to show"


@pytest.mark.parametrize("spec,dataset,ipc,expected", [
    ("apm.digits_ipc1", "digits", 10, "note: recipe apm.digits_ipc1 was written for digits at ipc 1; it runs here on "
                                      "digits at ipc 10, as asked"),
    ("dm.mnist_ipc1_cpu", "digits", 1, "note: recipe dm.mnist_ipc1_cpu was written for mnist at ipc 1; it runs here on "
                                       "digits at ipc 1, as asked"),
    ("apm.digits_ipc1", "digits", 1, None),
    ("apm.tiny_ipc10", "tiny_imagenet", 10, None),  # the recipe's short name for the dataset
    ("apm.imagenet_ipc10", "tiny_imagenet", 10, "note: recipe apm.imagenet_ipc10 was written for imagenet at ipc 10; "
                                                 "it runs here on tiny_imagenet at ipc 10, as asked"),
    ("apm", "digits", 10, None),
    ("full", "digits", None, None),  # no ipc
])
def test_a_recipe_run_outside_its_setting_is_noted(spec, dataset, ipc, expected):
    from bench.runner import recipe_elsewhere_note

    assert recipe_elsewhere_note(spec, dataset, ipc) == expected


def test_the_recipe_note_reaches_the_command_line_but_not_a_suite(capsys, tmp_path):
    from bench.runner import RunRequest, plan, recipe_notes

    def planned(**kw):
        request = RunRequest(dataset="digits", methods=["dm.mnist_ipc1_cpu", "random"], ipcs=[1], eval_archs=[],
                             seeds=[], results_dir=tmp_path, quick=True, **kw)
        cells = plan(request)
        assert "note:" not in capsys.readouterr().err  # printed once the whole run is checked, not while planning
        return recipe_notes([(request, cells)])

    assert planned() == ["note: recipe dm.mnist_ipc1_cpu was written for mnist at ipc 1; it runs here on digits at "
                         "ipc 1, as asked"]
    assert planned(suite="mine") == []  # a suite's YAML shows its choices


@pytest.mark.parametrize("args", [
    ["--methods", "dm.mnist_ipc1_cpu", "--ipc", "1", "--quick"],  # the recipe note
    ["--methods", "random", "--ipc", "1", "--device", "cpu"],  # the note on full recipes on a CPU
])
def test_bad_input_after_a_note_gets_one_line_and_the_note_a_good_run(capsys, tmp_path, args):
    """A note is printed once every check has passed: an error later in the checks (here a results folder that is
    a file) is then the only line, and a run that goes ahead prints its note."""
    taken = tmp_path / "a_file"
    taken.write_text("")
    common = ["run", "--dataset", "digits", "--eval-archs", "convnet", "--seeds", "0", "--eval-epochs", "1", *args]
    code, out, err = run_cli(capsys, *common, "--results", str(taken))
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("ddbench: error:"), err
    code, out, err = run_cli(capsys, *common, "--results", str(tmp_path / "res"))
    assert code == 0 and any(line.startswith("note: ") for line in err.splitlines()), err
