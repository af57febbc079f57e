"""The results folder: checked before any work (a file where a subfolder goes), held by one run at a time, and a
record that cannot be written ends the run with one line, keeping what was written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.store import writing_results

ROOT = Path(__file__).resolve().parents[1]
RUN = ["run", "--dataset", "digits", "--methods", "random", "--ipc", "1", "--seeds", "0", "--quick", "--eval-epochs", "1"]


def _rejected(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("blocked", ["records", "distilled"])
def test_a_file_where_a_subfolder_goes_is_refused_before_any_work(tmp_path, capsys, blocked):
    results = tmp_path / "res"
    results.mkdir()
    (results / blocked).write_text("x")
    _rejected(capsys, RUN + ["--results", str(results)], f"{results / blocked} is a file, not a folder")
    assert not (results / "records").is_dir() or not any((results / "records").iterdir())


def test_a_folder_where_the_run_lock_goes_is_refused_before_any_work(tmp_path, capsys):
    results = tmp_path / "res"
    (results / ".ddbench-run.lock").mkdir(parents=True)
    _rejected(capsys, RUN + ["--results", str(results)], f"{results / '.ddbench-run.lock'} is not a file")
    assert sorted(p.name for p in results.iterdir()) == [".ddbench-run.lock"]


def test_a_run_lock_that_cannot_be_opened_is_one_line(tmp_path):
    from bench.errors import UserError

    (tmp_path / ".ddbench-run.lock").mkdir()
    with pytest.raises(UserError, match="cannot open the run lock file .*Is a directory"):
        with writing_results(tmp_path):
            pass


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    results = tmp_path / "res"
    with writing_results(results):
        with writing_results(results):  # reentrant within one process (a suite holds it around its runs)
            pass
        other = subprocess.run([sys.executable, "-m", "bench.cli", *RUN, "--results", str(results)], cwd=ROOT,
                               capture_output=True, text=True)
        assert other.returncode == 2, other.stderr
        assert f"another ddbench run is writing to {results} (pid {os.getpid()}, since" in other.stderr
        assert not (results / "records").exists() or not any((results / "records").iterdir())
    with writing_results(results):  # released
        pass


def test_a_record_that_cannot_be_written_ends_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    import bench.runner

    def disk_full(results_dir, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench.runner, "write_record", disk_full)
    _rejected(capsys, RUN + ["--results", str(tmp_path / "res"), "--no-isolate"],
              "cannot write a record under")
