"""Distilled sets made elsewhere, as ``ddbench evaluate`` reads them: what is refused (one line on stderr naming the
file and what is expected, exit code 2, nothing written, before any training), what is cast and accepted, and
records that stay valid JSON when a loss is NaN. The README's section "Bring your own distilled set" documents it."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.cli import main
from bench.data import load_dataset
from bench.distilled import DistilledSet
from bench.errors import UserError
from bench.evaluate import check_compatible
from bench.store import write_record

README = Path(__file__).resolve().parent.parent / "README.md"
VALID_META = {"dataset": "digits", "transform": {"kind": "mean_std"}, "method": "mine", "ipc": 1}


def _write_set(folder: Path, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               soft_labels: torch.Tensor | None = None, meta: dict | None = None, **meta_changes: object) -> Path:
    """A digits-shaped set (10 classes × 1 image) written by hand as another tool would: its JSON path."""
    tensors = {"images": torch.zeros(10, 1, 8, 8) if images is None else images,
               "labels": torch.arange(10) if labels is None else labels}
    if soft_labels is not None:
        tensors["soft_labels"] = soft_labels
    save_file(tensors, str(folder / "set.safetensors"))
    meta = dict(VALID_META if meta is None else meta, **meta_changes)
    path = folder / "set.json"
    path.write_text(json.dumps(meta))
    return path


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _assert_refused(capsys, folder: Path, path: Path | str, *expected: str) -> str:
    """``ddbench evaluate PATH`` exits 2 with one line naming what is wrong, and writes nothing."""
    before = _tree(folder)
    code = main(["evaluate", str(path), "--quick", "--seeds", "0", "--results", str(folder / "res"),
                 "--cache-dir", str(folder / "cache")])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("ddbench: error:") and "Traceback" not in err, err
    for phrase in expected:
        assert phrase in err, err
    assert _tree(folder) == before, "a refused set wrote something"
    return err


# A: sets that used to train to garbage with status ok

@pytest.mark.parametrize("learned_lr, shown", [(float("nan"), "NaN"), (0, "0"), (-0.01, "-0.01"),
                                               (float("inf"), "Infinity"), (True, "true"), ("abc", '"abc"'),
                                               ([0.01], "[0.01]")])
def test_learned_lr_must_be_a_finite_number_above_0(capsys, tmp_path, learned_lr, shown):
    path = _write_set(tmp_path, learned_lr=learned_lr)
    _assert_refused(capsys, tmp_path, path, str(path), "'learned_lr' must be a finite number above 0", f"got {shown}")


@pytest.mark.parametrize("ipc, labels, shown", [(10, torch.arange(10), "holds 1 images per class"),
                                               (1, torch.arange(20) % 10, "holds 2 images per class"),
                                               (1, torch.tensor([0, 0] + list(range(2, 10))), "holds 0/1/2 images")])
def test_a_stated_ipc_must_be_what_every_class_holds(capsys, tmp_path, ipc, labels, shown):
    """The set's ipc files its records under that column; one that says 10 and holds 1 per class was accepted."""
    path = _write_set(tmp_path, images=torch.zeros(len(labels), 1, 8, 8), labels=labels, ipc=ipc)
    _assert_refused(capsys, tmp_path, path, str(path), f"distilled set says ipc {ipc} but {shown}")


@pytest.mark.parametrize("labels, images, expected", [
    (torch.arange(10), torch.zeros(10, 1, 28, 28), "distilled images are (1, 28, 28), the dataset's (1, 8, 8)"),
    (torch.arange(1, 11), torch.zeros(10, 1, 8, 8), "distilled set has label 10, but digits has classes 0..9"),
])
def test_a_set_that_does_not_fit_its_dataset_is_refused_naming_the_file(capsys, tmp_path, labels, images, expected):
    path = _write_set(tmp_path, images=images, labels=labels, ipc=None)
    _assert_refused(capsys, tmp_path, path, f"{path}: {expected}")


def test_a_huge_but_finite_learned_lr_is_the_set_s_business(tmp_path):
    assert DistilledSet.load(_write_set(tmp_path, learned_lr=1e6)).learned_lr == 1e6


def test_an_empty_set_is_refused(capsys, tmp_path):
    path = _write_set(tmp_path, images=torch.zeros(0, 1, 8, 8), labels=torch.zeros(0, dtype=torch.long))
    _assert_refused(capsys, tmp_path, path, "set.safetensors holds no images", "(0, 1, 8, 8)")


@pytest.mark.parametrize("soft_labels, expected", [
    (torch.full((10, 10), float("nan")), "non-finite soft_labels"),
    (torch.zeros(10, 10, dtype=torch.long), "soft_labels are torch.int64, expected floating point logits"),
])
def test_soft_labels_must_be_finite_floats(capsys, tmp_path, soft_labels, expected):
    path = _write_set(tmp_path, soft_labels=soft_labels)
    _assert_refused(capsys, tmp_path, path, "set.safetensors", expected)


# B: dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_images_of_any_width_are_cast_to_float32(tmp_path, dtype):
    images = torch.linspace(-1, 1, 640).reshape(10, 1, 8, 8).to(dtype)
    loaded = DistilledSet.load(_write_set(tmp_path, images=images))
    assert loaded.images.dtype == torch.float32 and torch.equal(loaded.images, images.float())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_labels_of_any_width_are_cast_to_int64(tmp_path, dtype):
    loaded = DistilledSet.load(_write_set(tmp_path, labels=torch.arange(10).to(dtype)))
    assert loaded.labels.dtype == torch.int64 and torch.equal(loaded.labels, torch.arange(10))


def test_float16_images_and_int32_labels_evaluate(capsys, tmp_path):
    """Once cast, such a set trains as any other (here 2 epochs, one seed)."""
    path = _write_set(tmp_path, images=torch.randn(10, 1, 8, 8).half(), labels=torch.arange(10).int(),
                      soft_labels=torch.randn(10, 10).double())
    code = main(["evaluate", str(path), "--quick", "--seeds", "0", "--eval-epochs", "2", "--results",
                 str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(next((tmp_path / "res").rglob("*.json")).read_text())
    assert record["status"] == "ok" and len(record["acc"]) == 1


def test_integer_images_are_refused(capsys, tmp_path):
    path = _write_set(tmp_path, images=torch.zeros(10, 1, 8, 8, dtype=torch.uint8))
    _assert_refused(capsys, tmp_path, path, "images are torch.uint8, expected float pixels in the dataset's "
                                            "transformed space")


def test_float64_pixels_beyond_float32_are_refused_as_non_finite(capsys, tmp_path):
    images = torch.zeros(10, 1, 8, 8, dtype=torch.float64)
    images[0, 0, 0, 0] = 1e300
    _assert_refused(capsys, tmp_path, _write_set(tmp_path, images=images), "non-finite pixels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_float_and_bool_labels_are_refused(capsys, tmp_path, dtype):
    path = _write_set(tmp_path, labels=torch.ones(10).to(dtype))
    _assert_refused(capsys, tmp_path, path, "labels must be class indices (integers)")


# C: metadata types

@pytest.mark.parametrize("changes, expected", [
    ({"transform": "zca"}, "'transform' must be an object with a kind"),
    ({"transform": None}, "'transform' must be an object with a kind"),
    ({"transform": {"eps": 0.1}}, "'transform' must be an object with a kind"),
    ({"transform": {"kind": "meanstd"}}, "'transform.kind' must be 'mean_std' or 'zca', got \"meanstd\""),
    ({"transform": {"kind": "zca", "eps": "small"}}, "'transform.eps' must be a finite number above 0"),
    ({"transform": {"kind": "mean_std", "mean": "abc"}}, "'transform.mean' must be a list of finite numbers"),
    ({"transform": {"kind": "mean_std", "std": [0.0]}}, "'transform.std' must be a list of finite numbers, one per "
                                                       "channel, each above 0"),
    ({"dataset": 5}, "'dataset' must be a string, got 5"),
    ({"method": ["dm"]}, "'method' must be a string"),
    ({"ipc": "10"}, "'ipc' must be an integer of at least 1 (or null), got \"10\""),
    ({"ipc": True}, "'ipc' must be an integer of at least 1"),
    ({"quick": "false"}, "'quick' must be true or false"),
    ({"distill_arch": 3}, "'distill_arch' must be a string"),
    ({"protocol_overrides": "fast"}, "'protocol_overrides' must be an object of protocol name"),
    ({"protocol_overrides": {"standard": 300}}, "'protocol_overrides.standard' must be an object of settings"),
    ({"protocol_overrides": {"standard": {"epoch": 300}}}, "unknown key 'protocol_overrides.standard.epoch'"),
    ({"protocol_overrides": {"soft": {"lr": "abc"}}}, "'protocol_overrides.soft.lr' must be a finite number above 0"),
    ({"protocol_overrides": {"standard": {"lr": 1e308}}}, "at most 3.4e38 (float32's largest"),
    ({"learned_lr": 1e39}, "'learned_lr' must be a finite number above 0 and at most 3.4e38"),
    ({"recipe": 5}, "'recipe' must be a string, got 5"),
    ({"protocol_overrides": {"soft": {"loss": "mse"}}}, "'protocol_overrides.soft.loss' must be one of ce, l1, kl"),
    ({"protocol_overrides": {"standard": {"quick_epochs": 2.5}}},
     "'protocol_overrides.standard.quick_epochs' must be an integer of at least 1"),
])
def test_metadata_of_the_wrong_type_names_the_key_and_the_file(capsys, tmp_path, changes, expected):
    path = _write_set(tmp_path, **changes)
    _assert_refused(capsys, tmp_path, path, f"distilled set metadata {path}:", expected)


def test_metadata_as_ddbench_writes_it_passes(tmp_path):
    meta = dict(VALID_META, quick=True, ipc=None, learned_lr=0.01, distill_arch="convnet", data_fingerprint="ab12",
                protocol_overrides={"soft": {"lr": 0.01, "epochs": 500, "loss": "kl"}, "standard": {"quick_epochs": 50}},
                transform={"kind": "zca", "eps": 0.1, "fitted_on": "train", "fingerprint": "11e56851eedef89d"})
    loaded = DistilledSet.load(_write_set(tmp_path, meta=meta))
    assert loaded.learned_lr == 0.01 and loaded.metadata["protocol_overrides"] == meta["protocol_overrides"]


# D: torch pickles

def test_a_torch_save_file_is_refused_and_never_unpickled(capsys, tmp_path):
    torch.save({"images": torch.zeros(10, 1, 8, 8), "labels": torch.arange(10)}, tmp_path / "x.pt")
    err = _assert_refused(capsys, tmp_path, tmp_path / "x.pt", "x.pt looks like a torch.save/pickle file",
                          "never unpickles", "weights_only=True", "Bring your own distilled set")
    assert "not found" not in err


@pytest.mark.parametrize("write", [
    lambda path: torch.save({"images": torch.zeros(10, 1, 8, 8)}, path),  # a zip archive: b"PK\x03\x04"
    lambda path: path.write_bytes(pickle.dumps({"images": [0.0]}, protocol=2)),  # a legacy pickle: b"\x80"
])
def test_a_pickle_renamed_to_safetensors_is_named_as_a_pickle(capsys, tmp_path, write):
    json_path = _write_set(tmp_path)
    write(tmp_path / "set.safetensors")
    err = _assert_refused(capsys, tmp_path, json_path, "set.safetensors looks like a torch.save/pickle file")
    assert "distil the set again" not in err


def test_a_safetensors_file_whose_header_length_begins_like_a_pickle_is_read(tmp_path):
    """A safetensors file begins with its header's length (8 bytes, little-endian): its first byte may be 0x80."""
    tensors = {"images": torch.zeros(10, 1, 8, 8), "labels": torch.arange(10)}
    for padding in range(256):
        save_file(tensors, str(tmp_path / "set.safetensors"), metadata={"padding": "x" * padding})
        if (tmp_path / "set.safetensors").read_bytes()[:1] == b"\x80":
            break
    (tmp_path / "set.json").write_text(json.dumps(VALID_META))
    assert (tmp_path / "set.safetensors").read_bytes()[:1] == b"\x80"
    assert len(DistilledSet.load(tmp_path / "set.safetensors")) == 10
    (tmp_path / "set.json").unlink()
    with pytest.raises(UserError, match="distilled set not found: expected .*set.json"):
        DistilledSet.load(tmp_path / "set.safetensors")


def test_a_set_whose_stem_ends_in_pt_is_still_a_set(tmp_path):
    tensors = {"images": torch.zeros(10, 1, 8, 8), "labels": torch.arange(10)}
    save_file(tensors, str(tmp_path / "model.pt.safetensors"))
    (tmp_path / "model.pt.json").write_text(json.dumps(VALID_META))
    assert len(DistilledSet.load(tmp_path / "model.pt")) == 10


def test_the_readme_conversion_snippet_makes_a_set_that_evaluates(capsys, tmp_path, monkeypatch):
    section = README.read_text().split("### Bring your own distilled set", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.save({"images": torch.randn(10, 1, 8, 8, dtype=torch.float64), "labels": torch.arange(10).int()},
               tmp_path / "set.pt")
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    code = main(["evaluate", "set.json", "--quick", "--seeds", "0", "--eval-epochs", "2",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err


# E: the transform the set's pixels are in

def test_a_set_that_names_its_dataset_must_state_its_transform(capsys, tmp_path):
    meta = {key: value for key, value in VALID_META.items() if key != "transform"}
    _assert_refused(capsys, tmp_path, _write_set(tmp_path, meta=meta), "names a dataset but not its transform",
                    '"transform": {"kind": "mean_std"}', '{"kind": "zca"}')


def test_a_mean_std_set_made_with_other_statistics_is_refused(capsys, tmp_path):
    path = _write_set(tmp_path, transform={"kind": "mean_std", "mean": [0.5], "std": [0.376121]})
    loaded_mean = load_dataset("digits").transform["mean"]
    _assert_refused(capsys, tmp_path, path, "mean_std transform has mean [0.5]", f"loaded with mean {loaded_mean}")


def test_mean_std_written_to_four_digits_passes(tmp_path):
    dataset = load_dataset("digits")
    rounded = {key: [round(v, 4) for v in dataset.transform[key]] for key in ("mean", "std")}
    check_compatible(DistilledSet.load(_write_set(tmp_path, transform={"kind": "mean_std", **rounded})), dataset)


def test_zca_eps_is_compared_and_the_fingerprint_is_not(tmp_path):
    dataset = load_dataset("digits", zca=True)
    same = dict(dataset.transform, fingerprint="from another thread count")
    check_compatible(DistilledSet.load(_write_set(tmp_path, transform=same)), dataset)
    with pytest.raises(UserError, match=r"zca transform has eps 0.2, but digits was loaded with eps 0.1"):
        check_compatible(DistilledSet.load(_write_set(tmp_path, transform=dict(same, eps=0.2))), dataset)


def test_a_zca_set_is_not_scored_in_mean_std_space(tmp_path):
    with pytest.raises(UserError, match="distilled set is in 'zca' space but the test set was loaded with 'mean_std'"):
        check_compatible(DistilledSet.load(_write_set(tmp_path, transform={"kind": "zca"})), load_dataset("digits"))


# F: records stay JSON when a loss is not finite

def test_non_finite_floats_are_written_as_null(tmp_path):
    record = {"written_at": "2026-12-01T00:00:00+00:00", "record_id": "r1", "method": "random", "recipe": None,
              "dataset": "digits", "ipc": 1, "eval_arch": "convnet", "protocol": "standard", "status": "ok",
              "acc": [70.0, 71.5], "final_train_loss": [float("nan"), 0.25, float("inf")],
              "phases": {"eval": {"wall_s": 1.5, "gpu_nvml_peak_mb": float("-inf")}}, "shape": (1, 8, 8)}
    path = write_record(tmp_path, record)

    def refuse_constant(name: str) -> float:
        raise AssertionError(f"bare {name} in a record")

    back = json.loads(path.read_text(), parse_constant=refuse_constant)
    assert back["final_train_loss"] == [None, 0.25, None] and back["phases"]["eval"]["gpu_nvml_peak_mb"] is None
    expected = dict(record, final_train_loss=[None, 0.25, None], phases={"eval": {"wall_s": 1.5, "gpu_nvml_peak_mb": None}})
    assert path.read_text() == json.dumps({"schema_version": back["schema_version"], **expected}, indent=2) + "\n"
    assert math.isnan(record["final_train_loss"][0])  # the caller's record is left as it was
