"""Records and distilled sets: atomic writes, round trips, the DataFrame view."""

import json
import os
import stat
from datetime import datetime, timezone

import torch

from bench.distilled import DistilledSet
import pytest

from bench.errors import UserError
from bench.store import SCHEMA_VERSION, existing_records, load_records, load_results, write_record
from record_files import record_json

RECORD = {
    "record_id": "abc123", "method": "random", "recipe": None, "dataset": "digits", "ipc": 10,
    "distill_arch": "convnet", "eval_arch": "convnet", "protocol": "standard", "quick": True,
    "seeds": [0, 1, 2], "acc": [90.0, 91.0, 92.0], "acc_mean": 91.0, "acc_std": 0.8165, "status": "ok",
    "error": None, "phases": {"distill": {"wall_s": 0.5, "cpu_peak_rss_mb": None, "gpu_reason": "no GPU"}},
}


def test_record_round_trip(tmp_path):
    path = write_record(tmp_path, RECORD)
    assert path.parent.name == "records" and not list(path.parent.glob("*.tmp*"))
    loaded = json.loads(path.read_text())
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert {k: loaded[k] for k in RECORD} == RECORD
    written = datetime.fromisoformat(loaded["written_at"])
    assert written.tzinfo is not None and abs((datetime.now(timezone.utc) - written).total_seconds()) < 60
    (record,) = load_records(tmp_path)
    assert record["acc"] == [90.0, 91.0, 92.0]
    frame = load_results(tmp_path)
    assert frame.loc[0, "acc_mean"] == 91.0 and frame.loc[0, "distill_wall_s"] == 0.5
    assert frame.loc[0, "distill_cpu_peak_rss_mb"] is None
    assert [r["record_id"] for r in load_records(path.parent)] == ["abc123"]  # the records/ folder itself
    assert len(load_results(path.parent)) == 1


def test_distilled_set_round_trip(tmp_path):
    images = torch.randn(20, 1, 8, 8)
    labels = torch.arange(10).repeat_interleave(2)
    soft = torch.randn(20, 10)
    meta = {"method": "x", "dataset": "digits", "transform": {"kind": "zca"}, "ipc": 2}
    path = DistilledSet(images, labels, soft, 0.0123, meta).save(tmp_path / "set")
    assert path.suffix == ".json" and (tmp_path / "set.safetensors").is_file()
    back = DistilledSet.load(tmp_path / "set.safetensors")
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels) and torch.equal(back.soft_labels, soft)
    assert back.learned_lr == 0.0123 and back.metadata == meta


def test_stems_with_dots_stay_separate_sets(tmp_path):
    """Cell stems hold the method's recipe after a dot (``digits_ipc1_apm.digits_ipc1_<id>``): two cells whose stems
    differ only after that dot must not overwrite each other's files."""
    first = DistilledSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])).save(tmp_path / "digits_ipc1_apm.digits_ipc1_aaa")
    second = DistilledSet(torch.ones(2, 1, 4, 4), torch.tensor([0, 1])).save(tmp_path / "digits_ipc1_apm.digits_ipc1_bbb")
    assert first != second
    assert first.name == "digits_ipc1_apm.digits_ipc1_aaa.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_ipc1_apm.digits_ipc1_aaa.json", "digits_ipc1_apm.digits_ipc1_aaa.safetensors",
        "digits_ipc1_apm.digits_ipc1_bbb.json", "digits_ipc1_apm.digits_ipc1_bbb.safetensors"]
    assert DistilledSet.load(first).images.sum() == 0
    assert DistilledSet.load(tmp_path / "digits_ipc1_apm.digits_ipc1_bbb.safetensors").images.sum() == 2 * 16
    assert DistilledSet.load(tmp_path / "digits_ipc1_apm.digits_ipc1_bbb").images.sum() == 2 * 16


def test_files_that_are_not_records_are_skipped_with_a_line_saying_so(tmp_path, capsys):
    """A truncated record or one of an unknown schema version is left out of the results, and said once."""
    import json

    from bench.store import load_records

    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps({"schema_version": 2, "record_id": "a", "dataset": "digits",
                                                  "status": "ok"}))
    (folder / "truncated.json").write_text('{"schema_version": 2, "record_')
    (folder / "future.json").write_text(json.dumps({"schema_version": 99, "record_id": "b"}))
    (folder / "list.json").write_text("[1, 2]")
    assert [r["record_id"] for r in load_records(tmp_path)] == ["a"]
    err = capsys.readouterr().err
    assert f"skipped {folder / 'truncated.json'}: not readable JSON" in err
    assert f"skipped {folder / 'future.json'}: not a record of schema version 1 or 2 (schema_version 99)" in err
    assert f"skipped {folder / 'list.json'}: not a record" in err
    assert [r["record_id"] for r in load_records(tmp_path)] == ["a"]
    assert capsys.readouterr().err == "", "each skipped file is said once per process"


def test_written_files_follow_the_umask_like_any_new_file(tmp_path):
    """Temporary-then-rename writes must not leave results private (mode 0600, as ``tempfile.mkstemp`` would)."""
    old = os.umask(0o022)
    try:
        record_path = write_record(tmp_path, RECORD)
        set_path = DistilledSet(torch.zeros(2, 1, 8, 8), torch.arange(2)).save(tmp_path / "set")
    finally:
        os.umask(old)
    for path in (record_path, set_path, set_path.with_suffix(".safetensors")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


UNPARSEABLE = {  # text that json.loads refuses with RecursionError or a plain ValueError, not a JSONDecodeError
    "deep_list.json": "[" * 100_000 + "]" * 100_000,
    "deep_object.json": '{"a": ' * 100_000 + "1" + "}" * 100_000,
    "huge_int.json": '{"schema_version": 2, "record_id": ' + "9" * 5000 + "}",
}


def test_json_too_deep_or_with_a_huge_integer_is_skipped_as_unreadable(tmp_path, capsys):
    """Such files are corrupt records: skipped with the truncated record's warning, also by ``--resume``'s reader."""
    write_record(tmp_path, RECORD)
    for name, text in UNPARSEABLE.items():
        (tmp_path / "records" / name).write_text(text)
    assert [r["record_id"] for r in load_records(tmp_path)] == ["abc123"]
    assert list(existing_records(tmp_path)) == ["abc123"]
    err = capsys.readouterr().err
    assert err.count("\n") == 3, "one line per file"
    for name in ("deep_list.json", "deep_object.json"):
        assert f"skipped {tmp_path / 'records' / name}: not readable JSON (nested too deeply)" in err
    assert f"skipped {tmp_path / 'records' / 'huge_int.json'}: not readable JSON (Exceeds the limit" in err
    assert "set_int_max_str_digits" not in err  # Python's advice, not the user's
    with pytest.raises(UserError, match="deep_list.json: not readable JSON"):
        load_records(tmp_path, strict=True)


WRONG_TYPES = {  # file name → (record text, the field the warning must name)
    "acc_mean_text": (record_json(RECORD, acc_mean='"abc"'), "field acc_mean is 'abc', not a finite number"),
    "acc_mean_nan": (record_json(RECORD, acc_mean="NaN"), "field acc_mean is nan, not a finite number"),
    "acc_mean_inf": (record_json(RECORD, acc_mean="1e400"), "field acc_mean is inf, not a finite number"),
    "acc_text": (record_json(RECORD, acc='"xyz"'), "field acc is 'xyz', not a list of finite numbers"),
    "acc_nan": (record_json(RECORD, acc="[90.0, NaN]"), "field acc is [90.0, nan], not a list of finite numbers"),
    "distill_seed_text": (record_json(RECORD, distill_seed='"abc"'), "field distill_seed is 'abc', not an integer"),
    "phases_list": (record_json(RECORD, phases="[1, 2]"), "field phases is [1, 2], not an object"),
    "wall_s_text": (record_json(RECORD, phases='{"eval": {"wall_s": "fast"}}'), "field phases.eval.wall_s is 'fast'"),
    "env_text": (record_json(RECORD, env='"x"'), "field env is 'x', not an object"),
    "dataset_list": (record_json(RECORD, dataset='["a"]'), "field dataset is ['a'], not a string"),
    "label_object": (record_json(RECORD, label='{"a": 1}'), "field label is {'a': 1}, not a string"),
    "ipc_text": (record_json(RECORD, ipc='"one"'), "field ipc is 'one', not an integer"),
    "epochs_inf": (record_json(RECORD, protocol_config='{"epochs": 1e400}'), "field protocol_config.epochs is inf"),
    "no_status": (json.dumps({"schema_version": 2, **{k: v for k, v in RECORD.items() if k != "status"}}),
                  "field status is missing"),
    "no_record_id": (json.dumps({"schema_version": 2, **{k: v for k, v in RECORD.items() if k != "record_id"}}),
                     "field record_id is missing"),
}


def test_records_with_fields_of_the_wrong_type_are_skipped_naming_the_field(tmp_path, capsys):
    """Each of these crashed ``report``, ``compare`` or ``run --resume`` (an ok record without an id:
    ``existing_records``' KeyError) with a traceback; a non-finite accuracy passed ``compare`` silently."""
    write_record(tmp_path, RECORD)
    for name, (text, _) in WRONG_TYPES.items():
        (tmp_path / "records" / f"{name}.json").write_text(text)
    assert [r["record_id"] for r in load_records(tmp_path)] == ["abc123"]
    assert list(existing_records(tmp_path)) == ["abc123"]
    err = capsys.readouterr().err
    assert err.count("\n") == len(WRONG_TYPES), "one line per file"
    for name, (_, field) in WRONG_TYPES.items():
        assert f"skipped {tmp_path / 'records' / name}.json: not a valid record: {field}" in err, name
    with pytest.raises(UserError, match=r"acc_mean_inf.json: not a valid record: field acc_mean is inf"):
        load_records(tmp_path, strict=True)


def test_older_records_lacking_newer_fields_or_with_nulls_are_still_read(tmp_path, capsys):
    """Validation must not make optional fields required: a version 1 record (``environment``, none of the
    measurement fields) and a record with every optional field null both load, without a warning."""
    folder = tmp_path / "records"
    folder.mkdir()
    version_1 = {"schema_version": 1, "record_id": "old", "method": "dc", "recipe": None, "dataset": "digits",
                 "ipc": 1, "distill_arch": "convnet", "eval_arch": "convnet", "protocol": "standard", "quick": False,
                 "seeds": [0], "acc": [80.0], "acc_mean": 80.0, "acc_std": 0.0, "status": "ok", "error": None,
                 "config": {}, "phases": {"distill": {"wall_s": 1.0}}, "environment": {"gpu_name": None}}
    (folder / "v1.json").write_text(json.dumps(version_1))
    nulls = {key: None for key in RECORD if key not in ("record_id", "dataset", "status")}
    nulls.update(acc=[None, 91.0], phases={"eval": None}, iter_time_s={"median": None})
    write_record(tmp_path, {**RECORD, **nulls, "record_id": "nulls"})
    assert sorted(r["record_id"] for r in load_records(tmp_path)) == ["nulls", "old"]
    assert [r["env"] for r in load_records(tmp_path) if r["record_id"] == "old"] == [{"gpu_name": None}]
    assert capsys.readouterr().err == ""


def test_the_record_check_knows_every_phase_figure_the_harness_writes():
    """``measure`` writes the phase figures and ``store`` states each one's kind for the record check: the two lists
    must name the same fields, or a figure added to one would go unchecked (or be checked but never written)."""
    from bench.measure import PHASE_FIELDS
    from bench.store import PHASE_FIGURES

    assert set(PHASE_FIGURES) == set(PHASE_FIELDS)
