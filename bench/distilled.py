"""A distilled set — what every method returns — and its on-disk form: safetensors + JSON, nothing pickled.

``name.safetensors`` holds the tensors (images, hard labels, optional soft labels); ``name.json`` holds the
metadata: method, recipe, resolved config, dataset, the data transform (mean/std or ZCA; evaluation applies
the same one to the test set), ipc, seed, the learned learning rate where a method learns one, code version.
Both files are written atomically (temporary file + rename), the JSON last, so a reader that finds the JSON
finds a complete set.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.errors import UserError


@dataclass
class DistilledSet:
    images: Tensor  # (n, C, H, W), in the dataset's transformed space (see metadata["transform"])
    labels: Tensor  # (n,) int64 hard labels
    soft_labels: Tensor | None = None  # (n, classes) teacher logits, for methods that assign them
    learned_lr: float | None = None  # handed to the standard protocol in place of its lr
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path.

        ``path`` is a stem that may hold dots (``…_apm.cifar10_ipc50_<id>``): the suffixes are appended to it, not
        put in place of its last dotted part, so stems that differ only after a dot stay two sets."""
        stem = _stem(Path(path))
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.detach().cpu().long()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().cpu().float().contiguous()
        meta = dict(self.metadata, learned_lr=self.learned_lr, n_images=len(self))
        save_safetensors_atomic(tensors, _with(stem, ".safetensors"))
        write_json_atomic(_with(stem, ".json"), meta)
        return _with(stem, ".json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistilledSet":
        """Read a set saved by ``save`` from either of its two file names (or the common stem)."""
        if Path(path).is_dir():
            sets = sorted(p.name for p in Path(path).glob("*.safetensors"))
            shown = f" (it holds {len(sets)}: e.g. {sets[0]})" if sets else " (it holds none)"
            raise UserError(f"{path} is a folder; give one distilled set's .json or .safetensors{shown}")
        stem = _stem(Path(path))
        meta_path, tensor_path = _with(stem, ".json"), _with(stem, ".safetensors")
        missing = [str(p) for p in (meta_path, tensor_path) if not p.is_file()]
        if missing:
            raise UserError(f"distilled set not found: expected {' and '.join(missing)}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"distilled set metadata {meta_path} is not readable JSON ({_first_line(exc)}); "
                            f"expected the .json that `ddbench distill` writes") from None
        if not isinstance(meta, dict):
            raise UserError(f"distilled set metadata {meta_path} is not a JSON object")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:  # a truncated or corrupt file
            raise UserError(f"distilled set tensors {tensor_path} are unreadable, truncated or corrupt "
                            f"({_first_line(exc)}); distil the set again") from None
        if "images" not in tensors or "labels" not in tensors:
            raise UserError(f"distilled set {tensor_path} lacks 'images' or 'labels'")
        images, labels = tensors["images"], tensors["labels"]
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"distilled set {tensor_path}: expected images (n, C, H, W) and labels (n,), got "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise UserError(f"distilled set {tensor_path} holds non-finite pixels (NaN or infinity): a diverged "
                            f"distillation; distil the set again")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise UserError(f"distilled set {tensor_path}: labels must be class indices (integers), found {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise UserError(f"distilled set {tensor_path}: labels must be class indices, found {int(labels.min())}")
        learned_lr = meta.pop("learned_lr", None)
        meta.pop("n_images", None)
        return cls(images, labels, tensors.get("soft_labels"), learned_lr, meta)


def _first_line(exc: BaseException) -> str:
    """An exception's message, on one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def create_temporary_beside(path: Path) -> tuple[int, str]:
    """(descriptor, name) of a new file ``<path's name>.<random>.tmp`` beside ``path``, opened for writing, to be
    renamed over ``path``. Unlike ``tempfile.mkstemp`` (mode 0600), its mode follows the umask as an ordinary new
    file's does, so results stay readable by the others who may read them (a shared cluster's group)."""
    while True:
        tmp = str(path.parent / f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def save_safetensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None,
                            fsync: bool = False) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename, with the mode an ordinary new file
    gets (``save_file`` itself leaves 0600); ``fsync``: flush the file to disk before the rename. The temporary
    name is fixed (``<name>.tmp``), so that a write killed half-way leaves one file that the next write replaces:
    each of these files has one writer at a time (an expert under the cache's lock, a cell's set, a checkpoint)."""
    tmp = str(path.with_name(path.name + ".tmp"))
    Path(tmp).unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stem(path: Path) -> Path:
    """A set's common stem: ``path`` without a ``.json`` or ``.safetensors`` ending (any other dot is the name's)."""
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)
