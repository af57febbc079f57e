"""Records and distilled sets: atomic writes, round trips, the DataFrame view."""

import json
import os
import stat
from datetime import datetime, timezone

import torch

from bench.distilled import DistilledSet
from bench.store import SCHEMA_VERSION, load_records, load_results, write_record

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
    (folder / "good.json").write_text(json.dumps({"schema_version": 2, "record_id": "a"}))
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
