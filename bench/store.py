"""Result records: one JSON file per (distilled set × evaluation architecture × protocol), schema version 2.

Records are written atomically (temporary file + rename), so a crash never leaves half a record and a rerun
can tell what is done. ``load_results(dir)`` reads every record under a folder into a pandas DataFrame.

Top-level keys that scripts and reports rely on: ``schema_version``, ``record_id``, ``method``, ``recipe``,
``dataset``, ``ipc``, ``distill_arch``, ``eval_arch``, ``protocol``, ``quick``, ``seeds``, ``acc`` (per-seed, %),
``acc_mean``, ``acc_std``, ``status`` (ok / failed / oom / diverged / interrupted), ``error``. Also: ``suite``, ``config`` and
``config_hash``, ``protocol_version`` and ``protocol_config``, ``distill_seed``, ``transform``, ``data_fingerprint``
(``bench.data.RawSplits.fingerprint`` of the data files the numbers come from: ``--resume`` redoes a cell whose
record was made from other files), ``learned_lr``, ``distilled_path``, ``eval_epochs_override`` (a smoke test's
``--eval-epochs``), ``method_origin`` (null for a built-in method; a plugin's entry point, distribution and version,
which ``env``'s git stamp does not cover), and the costs:

* ``phases``: phase name (``experts``, ``distill``, ``eval``) → ``{wall_s, cpu_peak_rss_mb, gpu_nvml_peak_mb,
  gpu_torch_allocated_peak_mb, gpu_torch_reserved_peak_mb, gpu_reason, gpu_nvml_source}``; GPU figures are null
  with a reason where they cannot be measured, never 0. ``experts`` also counts experts ``trained`` / ``cached``.
* ``iterations``, ``iter_time_s`` ``{median, p90, n}`` (after warm-up, outside the FLOP-counting window; with
  ``per_period`` when timed by whole periods of a periodic method such as APM — then ``rest_of_period``
  ``{median, p90, n}`` times the iterations that do not begin a period (APM's image steps without a student's
  training) — and ``flop_window_s``, the wall
  time of the FLOP-counting window, whose excess over ``per_period × median`` is what counting cost),
  ``flops_per_iter`` (or ``flops_reason``), ``flops_per_eval_epoch``;
* ``dataset_resident_mb`` and ``dataset_device``: the dataset the cell held throughout (inside its peaks there);
  ``compute_device``: where the cell computed (a GPU cell holds a dataset too large for the GPU on the host);
* ``process_peak_rss_mb`` (``ru_maxrss`` of the cell's own process when ``isolated``), ``crash_peak_rss_mb``
  (the largest RSS the parent saw of a cell whose process died); ``cell_evaluations``: the ``[protocol,
  eval_arch]`` pairs that process ran on the cell's one distilled set (all inside its peak);
* ``env``: the environment stamp (``bench.measure.environment_stamp``).
* ``written_at``: when the record was written (ISO 8601, UTC, microseconds): what ``ddbench compare`` means by
  the newest of several records of one cell, since a file's modification time says nothing after a copy or a
  ``git checkout``. Records written before it existed have none.
* ``eval_engine``: how the evaluation's seeds were trained — ``{"path": "batched" | "sequential", "reason": ...}``
  (``batch_seeds`` auto / on / off; e.g. ``"auto: calibrated batched 0.6× sequential time"``, ``"off"``,
  ``"BatchNorm running statistics cannot be vmapped"``), with ``batched_forward`` (grouped convolutions or
  ``torch.func.vmap``) when batched and ``tf32`` (``{matmul, cudnn}``) on CUDA, with ``cuda_graphs`` (whether the
  batched steps were replayed from CUDA graphs) when batched on CUDA; null when no evaluation ran.
  Not part of the record's identity: both paths compute the same thing.

Version 1 records (no measurement; ``environment`` instead of ``env``) are still read. ``load_records`` leaves out,
with a line on stderr, a file that is not such a record, and a record whose fields that reports, ``compare`` and
``--resume`` read hold the wrong type (``RECORD_FIELDS``: a NaN accuracy among them); null is a valid value for every
field but ``record_id``, ``dataset`` and ``status``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pandas as pd

from bench.distilled import is_finite_number, write_json_atomic
from bench.errors import UserError
from bench.progress import log

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
DISTILLED_DIR = "distilled"  # the sets a run saves, beside its records
CHECKPOINTS_DIR = "checkpoints"  # resumable distillation states (--checkpoint-every)
RECORDS_DIR = "records"
ACC_DIRECTION = "↑"  # higher accuracy is better; costs (memory, time, FLOPs) are ↓


def stable_hash(payload: object, length: int = 12) -> str:
    """A short hash of a JSON-able object, independent of dict order."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def differing_keys(configs: list[dict]) -> list[str]:
    """The keys whose values are not the same in every one of ``configs`` (a key some lack counts as ``None``):
    what tells unlabelled variants of one method apart."""
    return sorted(k for k in set().union(*configs) if len({repr(c.get(k)) for c in configs}) > 1)


def record_id(identity: dict) -> str:
    """Identity → id: what was distilled (method, config, data, ipc, seed, quick) and how it was evaluated."""
    return stable_hash(identity)


def record_filename(record: dict) -> str:
    ipc = "all" if record.get("ipc") is None else record["ipc"]
    name = f"{record['dataset']}_ipc{ipc}_{record['method']}"
    if record.get("recipe"):
        name += f".{record['recipe']}"
    name += f"_{record['eval_arch'] or 'noeval'}_{record['protocol']}_{record['record_id']}.json"
    return "".join(ch if ch.isalnum() or ch in "._-=" else "-" for ch in name)


def set_fields(metadata: dict) -> dict:
    """The record fields that describe a distilled set, from its metadata (as ``runner.cell_metadata`` writes it)."""
    config = metadata.get("config")
    return {
        "method": metadata.get("method"),
        "method_origin": metadata.get("method_origin"),
        "recipe": metadata.get("recipe"),
        "config": config,
        "config_hash": stable_hash(config),
        "dataset": metadata.get("dataset"),
        "transform": metadata.get("transform"),
        "data_fingerprint": metadata.get("data_fingerprint"),
        "ipc": metadata.get("ipc"),
        "distill_arch": metadata.get("distill_arch"),
        "distill_seed": metadata.get("seed"),
    }


def evaluation_fields(eval_arch: str, protocol, resolved, seeds: list[int], result=None) -> dict:
    """The record fields of one evaluation (``protocol`` as registered, ``resolved`` as it ran); empty without a result."""
    return {
        "eval_arch": eval_arch,
        "protocol": protocol.name,
        "protocol_version": protocol.version,
        "protocol_config": resolved.as_record(),
        "seeds": list(seeds),
        "acc": [] if result is None else [round(a, 4) for a in result.acc],
        "acc_mean": None if result is None else round(result.acc_mean, 4),
        "acc_std": None if result is None else round(result.acc_std, 4),
        "final_train_loss": None if result is None else result.final_train_loss,
        "eval_engine": None if result is None else result.eval_engine,
    }


def write_record(results_dir: str | os.PathLike, record: dict) -> Path:
    """Write one record atomically under ``<results_dir>/records/``, stamped with ``written_at`` (when it was
    written, UTC) unless it has one; returns its path. A NaN or infinite float (a diverged network's
    ``final_train_loss``) is written as null: JSON has no NaN, and strict readers refuse Python's bare ``NaN``."""
    record = {"schema_version": SCHEMA_VERSION, "written_at": datetime.now(timezone.utc).isoformat(), **record}
    path = Path(results_dir) / RECORDS_DIR / record_filename(record)
    write_json_atomic(path, _non_finite_as_null(record))
    return path


def _non_finite_as_null(value: object) -> object:
    """``value`` with every NaN or infinite float in its dicts, lists and tuples replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _non_finite_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_finite_as_null(item) for item in value]
    return value


def check_writable_folder(path: str | os.PathLike, name: str, fix: str, inside: str | tuple[str, ...] = "") -> None:
    """Make sure files can be written in ``path`` (in each of its subfolders ``inside``, if given) before any work:
    create the folders and a temporary file in each (removed again); a one-line ``UserError`` naming the folder
    (``name``) and what to do (``fix``) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a folder; {fix}")
    for sub in (inside,) if isinstance(inside, str) else inside:
        folder = path / sub
        if sub and folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, not a folder: the {name} {path} keeps its {sub} there; move that "
                            f"file away, or {fix}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{name} {path} is not writable ({exc.strerror or exc}); {fix}") from None


def check_results_dir(results_dir: str | os.PathLike, also: tuple[str, ...] = ()) -> None:
    """Make sure records, and whatever else a run writes there (``also``: e.g. ``DISTILLED_DIR``), can be written
    under ``results_dir`` before any work (``check_writable_folder``): a file named ``distilled`` there would
    otherwise fail every cell after its distillation."""
    lock = Path(results_dir) / RUN_LOCK
    if os.path.lexists(lock) and not lock.is_file():
        raise UserError(f"{lock} is not a file: it is the run lock ddbench opens in its results folder; delete it, "
                        f"or pass another --results folder")
    check_writable_folder(results_dir, "results folder", "pass --results with a folder you can write records to",
                          inside=(RECORDS_DIR, *also))


RUN_LOCK = ".ddbench-run.lock"
_HELD_RUN_LOCKS: dict[Path, int] = {}  # results folder → how many nested `writing_results` of this process hold it


@contextmanager
def writing_results(results_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the results folder for one run (or a suite's runs): a second ``ddbench run`` into the same folder is
    refused while this one runs — the two would compute the same cells twice, and a ``--resume`` would delete
    the other's temporary files. An advisory ``flock`` on ``<results>/.ddbench-run.lock``, released when the
    process ends however it ends; reentrant within a process. Where ``fcntl`` is missing (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(results_dir).resolve()
    if folder in _HELD_RUN_LOCKS:
        _HELD_RUN_LOCKS[folder] += 1
        try:
            yield
        finally:
            _HELD_RUN_LOCKS[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a folder where the lock file goes, a lock file made read-only
        raise UserError(f"cannot open the run lock file {folder / RUN_LOCK} ({exc.strerror or exc}); delete or fix it "
                        f"(it only names the process writing to the folder), or pass another --results folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise UserError(f"another ddbench run is writing to {results_dir} ({holder}); wait for it to finish, or "
                            f"pass another --results folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode())
        _HELD_RUN_LOCKS[folder] = 1
        try:
            yield
        finally:
            del _HELD_RUN_LOCKS[folder]
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(results_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``*.tmp``) that a run killed mid-write left under ``results_dir``'s records
    and distilled sets; every real file is written to a temporary name first and renamed into place, so these
    are never part of a result. Call it only when no other run writes to the folder (``--resume`` does)."""
    removed = []
    for folder in (RECORDS_DIR, "distilled"):
        for path in (Path(results_dir) / folder).glob("*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def existing_records(results_dir: str | os.PathLike) -> dict[str, dict]:
    """The folder's ok records by record id: what ``--resume`` keeps."""
    return {r["record_id"]: r for r in load_records(results_dir) if r.get("status") == "ok"}


_SKIPPED_SAID: set[str] = set()  # record files this process has already said it skips


def _skip(path: Path, why: str) -> None:
    """Say once per process, on stderr, that a file under a records folder is not read as a record."""
    if str(path) not in _SKIPPED_SAID:
        _SKIPPED_SAID.add(str(path))
        log(f"ddbench: skipped {path}: {why}")


class _Kind(NamedTuple):
    """What a record field must hold: ``fits`` says whether a (non-null) value does, ``what`` names it."""

    what: str
    fits: Callable[[object], bool]


TEXT = _Kind("a string", lambda v: isinstance(v, str))
WHOLE = _Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63)
NUMBER = _Kind("a finite number", is_finite_number)
FLAG = _Kind("true or false", lambda v: isinstance(v, bool))
LIST = _Kind("a list", lambda v: isinstance(v, list))
NUMBERS = _Kind("a list of finite numbers",  # a null entry is a seed whose accuracy was not finite when written
                lambda v: isinstance(v, list) and all(a is None or is_finite_number(a) for a in v))
OBJECT = _Kind("an object", lambda v: isinstance(v, dict))

# The fields that reports, ``compare`` and ``--resume`` read, with what each must hold: a record whose field holds
# something else is skipped (``record_problem``). Null (or absence) is allowed everywhere except in REQUIRED_FIELDS,
# which every record of every schema version has; older records lack many of the others. A nested object's own
# fields are checked where it is an object: ``phases`` maps each phase name to such an object (PHASE_FIGURES).
REQUIRED_FIELDS = ("record_id", "dataset", "status")
RECORD_FIELDS: dict[str, _Kind] = {
    "record_id": TEXT, "dataset": TEXT, "status": TEXT, "method": TEXT, "label": TEXT, "recipe": TEXT,
    "suite": TEXT, "error": TEXT, "ipc": WHOLE, "distill_arch": TEXT, "eval_arch": TEXT, "protocol": TEXT,
    "quick": FLAG, "protocol_quick": FLAG, "distilled_quick": FLAG, "eval_epochs_override": WHOLE,
    "distill_seed": WHOLE, "seeds": LIST, "acc": NUMBERS, "acc_mean": NUMBER, "acc_std": NUMBER,
    "config": OBJECT, "config_hash": TEXT, "protocol_config": OBJECT, "learned_lr": NUMBER,
    "data_fingerprint": TEXT, "distilled_path": TEXT, "written_at": TEXT, "env": OBJECT, "eval_engine": OBJECT,
    "phases": OBJECT, "iter_time_s": OBJECT, "flops_per_iter": NUMBER, "flops_per_eval_epoch": NUMBER,
    "flops_reason": TEXT, "process_peak_rss_mb": NUMBER, "dataset_resident_mb": NUMBER, "dataset_device": TEXT,
    "compute_device": TEXT, "cell_evaluations": LIST,
}
NESTED_FIELDS: dict[str, dict[str, _Kind]] = {
    "config": {"subgroups": WHOLE, "checkpoints": WHOLE},  # APM's, which the report's tables and figures read
    "protocol_config": {"epochs": NUMBER, "lr": NUMBER, "loss": TEXT},
    "env": {"gpu_name": TEXT, "cpu_threads": WHOLE, "git_sha": TEXT},  # git_sha and cpu_threads: --resume's warnings
    "eval_engine": {"path": TEXT, "reason": TEXT},
    "iter_time_s": {"median": NUMBER, "p90": NUMBER, "n": WHOLE},
}
PHASE_FIGURES: dict[str, _Kind] = {
    "wall_s": NUMBER, "cpu_peak_rss_mb": NUMBER, "gpu_nvml_peak_mb": NUMBER, "gpu_torch_allocated_peak_mb": NUMBER,
    "gpu_torch_reserved_peak_mb": NUMBER, "gpu_reason": TEXT,
}


def _field_problem(name: str, value: object, kind: _Kind, required: bool = False) -> str | None:
    """Why ``value`` cannot be field ``name`` (dotted for a nested one), or None when it fits (or is null, unless
    ``required``)."""
    if value is None and required:
        return f"field {name} is missing"
    if value is None or kind.fits(value):
        return None
    shown = reprlib.repr(value)  # shortened, and safe however deeply the value nests
    return f"field {name} is {shown}, not {kind.what}" + ("" if required else " (or null)")


def record_problem(record: dict) -> str | None:
    """Why a parsed record of a readable schema version cannot be reported, compared or resumed from — a required
    field missing, or a field of the wrong type (``RECORD_FIELDS``), such as a non-finite accuracy — or None."""
    for name, kind in RECORD_FIELDS.items():
        problem = _field_problem(name, record.get(name), kind, required=name in REQUIRED_FIELDS)
        if problem:
            return problem
    for name, fields in NESTED_FIELDS.items():
        for key, kind in fields.items():
            problem = _field_problem(f"{name}.{key}", (record.get(name) or {}).get(key), kind)
            if problem:
                return problem
    for phase, figures in (record.get("phases") or {}).items():
        problem = _field_problem(f"phases.{phase}", figures, OBJECT)
        for key, kind in PHASE_FIGURES.items():
            problem = problem or _field_problem(f"phases.{phase}.{key}", (figures or {}).get(key), kind)
        if problem:
            return problem
    return None


def _parse_problem(exc: Exception) -> str:
    """One line on why a record file's text is not JSON this code can read."""
    if isinstance(exc, RecursionError):
        return "not readable JSON (nested too deeply)"
    detail = " ".join(str(exc).split(";")[0].split())  # not Python's advice after ';' (set_int_max_str_digits)
    return f"not readable JSON ({detail})"


def load_records(results_dir: str | os.PathLike, strict: bool = False) -> list[dict]:
    """Every record (``*.json`` under ``records/`` folders) below ``results_dir``, or in it when it is itself a
    ``records/`` folder. A file that is not readable JSON
    (truncated, nested too deeply, an integer of thousands of digits), not a record of a schema version this code
    reads, or a record with a field of the wrong type (``record_problem``) is skipped with a line on stderr naming
    it and why — or, with ``strict`` (a regression check, which must not pass by losing a cell), is a
    ``UserError`` naming it."""
    records = []
    root = Path(results_dir)
    paths = set(root.rglob(f"{RECORDS_DIR}/*.json")) | (set(root.glob("*.json")) if root.name == RECORDS_DIR else set())
    for path in sorted(paths):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, ...
            why = _parse_problem(exc)
        else:
            version = record.get("schema_version") if isinstance(record, dict) else None
            why = None if version in READABLE_SCHEMA_VERSIONS else (
                f"not a record of schema version {' or '.join(map(str, READABLE_SCHEMA_VERSIONS))} "
                f"(schema_version {version})")
            if why is None:
                if record["schema_version"] == 1:
                    record["env"] = record.pop("environment", None)
                problem = record_problem(record)
                why = f"not a valid record: {problem}" if problem else None
        if why and strict:
            raise UserError(f"{path}: {why}; repair or remove it")
        if why:
            _skip(path, why)
            continue
        record["_path"] = str(path)
        records.append(record)
    return records


def written_order(record: dict) -> tuple[str, float]:
    """A sort key that puts a record after those written before it: its ``written_at``; records without one (older
    than the field) come first, in the order of their files' modification times."""
    try:
        mtime = os.path.getmtime(record["_path"])
    except (KeyError, OSError):
        mtime = 0.0
    return str(record.get("written_at") or ""), mtime


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The records under ``results_dir`` as a DataFrame: one row per record, phases flattened to columns."""
    rows = []
    for record in load_records(results_dir):
        row = {k: v for k, v in record.items()
               if k not in ("phases", "env", "config", "protocol_config", "iter_time_s", "eval_engine")}
        for key, value in (record.get("eval_engine") or {}).items():
            if key in ("path", "reason"):
                row[f"eval_engine_{key}"] = value
        for phase, figures in (record.get("phases") or {}).items():
            for key, value in (figures or {}).items():
                row[f"{phase}_{key}"] = value
        for key, value in (record.get("iter_time_s") or {}).items():
            row[f"iter_time_s_{key}"] = value
        for key in ("lr", "epochs", "loss"):  # what the evaluation ran, which a set's learned lr or recipe may change
            row[f"protocol_{key}"] = (record.get("protocol_config") or {}).get(key)
        rows.append(row)
    return pd.DataFrame(rows)
