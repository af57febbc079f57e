"""Checkpoints of a long distillation: a method's loop state, written every N iterations, so that a killed run
resumes and ends with the same distilled set as an uninterrupted one (bit for bit on the CPU).

The harness owns the files; a method hands over its state as a nested dict of JSON values and tensors (images,
optimiser ``state_dict()``s, ``generator.get_state()``) through ``DistillContext.save_checkpoint`` and gets the
same structure back from ``DistillContext.load_checkpoint``. A checkpoint folder holds

* ``state-<iteration>.safetensors`` — every tensor of the state, under a key naming where it sat;
* ``checkpoint.json`` — the commit marker: the iteration, who the checkpoint belongs to, the tensor file's name
  and SHA-256, and the rest of the state, each tensor replaced by ``{"__tensor__": key}``; and the SHA-256 of all
  of that (``json_sha256``), so that an edited or bit-rotted marker is not trusted either.

Both files are written atomically (temporary file + rename), the tensor file first and the JSON last; older
tensor files are deleted only once the new JSON is in place. A kill at any moment thus leaves either the previous
complete checkpoint or the new one. A checkpoint whose JSON is unreadable, whose tensor file is missing or does
not match its hash or iteration (a torn or corrupted pair), whose JSON does not match its own hash (edited by
hand: an iteration count past the run's end, a wrong-typed optimiser state), or that belongs to another run is
ignored with a log line, and the distillation starts from scratch. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from bench.distilled import file_sha256, save_safetensors_atomic, write_json_atomic
from bench.errors import UserError

MARKER = "checkpoint.json"
FORMAT_VERSION = 2  # 2: checkpoint.json carries json_sha256
_TENSOR, _ITEMS = "__tensor__", "__items__"


class Checkpointer:
    """Saves and loads one distillation's checkpoints in ``folder``, one every ``every`` iterations."""

    def __init__(self, folder: str | os.PathLike, every: int, identity: dict | None = None,
                 log: Callable[[str], None] | None = None):
        if every < 1:
            raise UserError(f"checkpoint_every must be at least 1 iteration, got {every}")
        self.folder, self.every = Path(folder), every
        self.identity = json.loads(json.dumps(identity or {}, default=str))  # as it reads back from the JSON
        self.log = log or (lambda message: None)
        self.last = 0  # the iteration of the last checkpoint saved or resumed from

    def due(self, iteration: int) -> bool:
        """Whether a checkpoint should be written after ``iteration`` completed iterations: ``every`` or more
        have passed since the last one. Methods ask only where their whole state can be saved."""
        return iteration - self.last >= self.every

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (JSON values and tensors, nested) as the checkpoint after ``iteration`` iterations."""
        tensors: dict[str, Tensor] = {}
        encoded = _encode(state, tensors, "state")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{iteration:08d}.safetensors"
        save_safetensors_atomic(tensors, self.folder / name, metadata={"iteration": str(iteration)}, fsync=True)
        marker = {"format": FORMAT_VERSION, "iteration": iteration, "identity": self.identity,
                  "tensors": name, "sha256": file_sha256(self.folder / name), "state": encoded}
        write_json_atomic(self.folder / MARKER, dict(marker, json_sha256=_json_sha256(marker)))
        for old in self.folder.glob("state-*.safetensors*"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last = iteration
        return self.folder / MARKER

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """The latest complete checkpoint as (iteration, state), tensors on the CPU; None when there is none or
        it cannot be trusted (the reason is logged)."""
        marker = self.folder / MARKER
        if not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
            tensor_path = self.folder / meta["tensors"]
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')}, expected {FORMAT_VERSION}")
            if meta.get("identity") != self.identity:
                raise ValueError(f"it belongs to another run ({meta.get('identity')})")
            if meta.pop("json_sha256", None) != _json_sha256(meta):
                raise ValueError(f"{MARKER} does not match its hash (edited or corrupted)")
            if not tensor_path.is_file():
                raise ValueError(f"{tensor_path.name} is missing")
            if file_sha256(tensor_path) != meta["sha256"]:
                raise ValueError(f"{tensor_path.name} does not match its hash (torn or corrupted)")
            tensors = load_file(str(tensor_path))
            state = _decode(meta["state"], tensors)
            iteration = int(meta["iteration"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, RecursionError) as exc:
            self.log(f"ignoring the checkpoint in {self.folder}: {exc}; starting from scratch")
            return None
        self.last = iteration
        return iteration, state

    def clear(self) -> None:
        """Delete the checkpoint folder (after the distillation has returned)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _json_sha256(marker: dict) -> str:
    """SHA-256 of the marker's canonical JSON (sorted keys), as written and as read back."""
    return hashlib.sha256(json.dumps(marker, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _encode(value: Any, tensors: dict[str, Tensor], key: str) -> Any:
    """JSON for ``value``, its tensors moved into ``tensors`` under ``key``-derived names.

    Dicts whose keys are not all strings (an optimiser's ``state`` is keyed by parameter index) become
    ``{"__items__": [[key, value], …]}``, so that they read back with the same keys; tuples read back as lists.
    """
    if isinstance(value, Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _ITEMS} & value.keys():
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, f"{key}/{i}.key"), _encode(v, tensors, f"{key}/{i}")]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {key}: a {type(value).__name__} (JSON values and tensors only)")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_ITEMS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict) -> None:
    """Load a scheduler state saved as ``scheduler_state(...)`` into a scheduler built the same way."""
    state = scheduler.state_dict()
    state.update(saved)
    scheduler.load_state_dict(state)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """A scheduler's ``state_dict()`` without what its constructor rebuilds from the config (MultiStepLR's
    milestones are a ``Counter``, not a JSON value)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "milestones"}
