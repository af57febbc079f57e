"""A distilled set — what every method returns — and its on-disk form: safetensors + JSON, nothing pickled.

``name.safetensors`` holds the tensors (images, hard labels, optional soft labels); ``name.json`` holds the
metadata: method, recipe, resolved config, dataset, the data transform (mean/std or ZCA; evaluation applies
the same one to the test set), ipc, seed, the learned learning rate where a method learns one, code version.
Both files are written atomically (temporary file + rename), the JSON last, so a reader that finds the JSON
finds a complete set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.data import transform_kind
from bench.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")  # what torch.save and pickle files are usually called
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy pickle's PROTO opcode
TRANSFORM_KINDS = (transform_kind(zca=False), transform_kind(zca=True))
PROTOCOL_OVERRIDE_KEYS = ("lr", "epochs", "quick_epochs", "loss")  # what runner.protocol_for reads from a set's overrides
PROTOCOL_LOSSES = ("ce", "l1", "kl")  # the losses a protocol can train with (bench.evaluate.Protocol.loss)


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
        if missing and stem == Path(path) and _is_pickle(stem):  # x.pt, not a set's own file (which may begin 0x80)
            raise UserError(_pickle_refusal(path))
        if missing:
            raise UserError(f"distilled set not found: expected {' and '.join(missing)}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON's, and huge ints
            if _is_pickle(meta_path):
                raise UserError(_pickle_refusal(meta_path)) from None
            raise UserError(f"distilled set metadata {meta_path} is not readable JSON ({_first_line(exc)}); "
                            f"expected the .json that `ddbench distill` writes") from None
        if not isinstance(meta, dict):
            raise UserError(f"distilled set metadata {meta_path} is not a JSON object")
        check_metadata(meta, meta_path)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:  # a truncated or corrupt file
            if _is_pickle(tensor_path):  # checked only now: a valid safetensors header may begin with 0x80 too
                raise UserError(_pickle_refusal(tensor_path)) from None
            raise UserError(f"distilled set tensors {tensor_path} are unreadable, truncated or corrupt "
                            f"({_first_line(exc)}); distil the set again") from None
        if "images" not in tensors or "labels" not in tensors:
            raise UserError(f"distilled set {tensor_path} lacks 'images' or 'labels'")
        images, labels = tensors["images"], tensors["labels"]
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"distilled set {tensor_path}: expected images (n, C, H, W) and labels (n,), got "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise UserError(f"distilled set {tensor_path} holds no images (shape {tuple(images.shape)}): nothing to "
                            f"train on; expected at least one image per class")
        if not images.is_floating_point():
            raise UserError(f"distilled set {tensor_path}: images are {images.dtype}, expected float pixels in the "
                            f"dataset's transformed space (see the metadata's 'transform'), not raw pixel values")
        images = images.float()  # float16/bfloat16 exactly; float64 rounded to the precision training uses anyway
        if not bool(torch.isfinite(images).all()):  # after the cast: a float64 beyond float32's range is infinite
            raise UserError(f"distilled set {tensor_path} holds non-finite pixels (NaN or infinity): a diverged "
                            f"distillation; distil the set again")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise UserError(f"distilled set {tensor_path}: labels must be class indices (integers), found {labels.dtype}")
        labels = labels.long()  # any integer width: int64 as training expects
        if int(labels.min()) < 0:
            raise UserError(f"distilled set {tensor_path}: labels must be class indices, found {int(labels.min())}")
        soft_labels = tensors.get("soft_labels")
        if soft_labels is not None:
            if not soft_labels.is_floating_point():
                raise UserError(f"distilled set {tensor_path}: soft_labels are {soft_labels.dtype}, expected floating "
                                f"point logits (one per class for each image)")
            soft_labels = soft_labels.float()
            if not bool(torch.isfinite(soft_labels).all()):
                raise UserError(f"distilled set {tensor_path} holds non-finite soft_labels (NaN or infinity); "
                                f"expected finite logits")
        learned_lr = meta.pop("learned_lr", None)
        meta.pop("n_images", None)
        return cls(images, labels, soft_labels, None if learned_lr is None else float(learned_lr), meta)


def check_metadata(meta: dict, meta_path: Path) -> None:
    """Refuse, naming the key and the file, a set's metadata whose keys that ``ddbench evaluate`` reads are of the
    wrong type or out of range. A set that names its dataset must also state its transform: the pixels of a
    mean/std set and of a ZCA set look alike, and evaluating one in the other's space gives a wrong accuracy."""

    def refuse(key: str, value: object, expected: str) -> UserError:
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"distilled set metadata {meta_path}: '{key}' must be {expected}, got {shown}")

    for key in ("dataset", "method", "recipe", "data_fingerprint", "distill_arch"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise refuse(key, meta[key], "a string")
    if "quick" in meta and not isinstance(meta["quick"], bool):
        raise refuse("quick", meta["quick"], "true or false")
    if meta.get("ipc") is not None and not (_is_integer(meta["ipc"]) and meta["ipc"] >= 1):
        raise refuse("ipc", meta["ipc"], "an integer of at least 1 (or null)")
    if meta.get("learned_lr") is not None and not _is_learning_rate(meta["learned_lr"]):
        raise refuse("learned_lr", meta["learned_lr"], f"{LEARNING_RATE} (or null: the protocol's own lr)")
    if "dataset" in meta and "transform" not in meta:
        raise UserError(f"distilled set metadata {meta_path} names a dataset but not its transform: state the space "
                        f'the images are in, e.g. "transform": {{"kind": "mean_std"}} or {{"kind": "zca"}}')
    if "transform" in meta:
        _check_transform(meta["transform"], refuse)
    overrides = meta.get("protocol_overrides")
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise refuse("protocol_overrides", overrides, 'an object of protocol name → settings, e.g. {"soft": {"epochs": 500}}')
    for protocol, settings in overrides.items():
        if not isinstance(settings, dict):
            raise refuse(f"protocol_overrides.{protocol}", settings,
                         f"an object of settings ({', '.join(PROTOCOL_OVERRIDE_KEYS)})")
        for key, value in settings.items():
            if key not in PROTOCOL_OVERRIDE_KEYS:
                raise UserError(f"distilled set metadata {meta_path}: unknown key 'protocol_overrides.{protocol}.{key}'; "
                                f"a protocol's overrides are {', '.join(PROTOCOL_OVERRIDE_KEYS)}")
            if key == "lr" and not _is_learning_rate(value):
                raise refuse(f"protocol_overrides.{protocol}.lr", value, LEARNING_RATE)
            if key == "loss" and value not in PROTOCOL_LOSSES:
                raise refuse(f"protocol_overrides.{protocol}.loss", value, f"one of {', '.join(PROTOCOL_LOSSES)}")
            if key not in ("lr", "loss") and value is not None and not (_is_integer(value) and value >= 1):
                raise refuse(f"protocol_overrides.{protocol}.{key}", value, "an integer of at least 1 (or null)")


def _check_transform(transform: object, refuse: Callable[[str, object, str], UserError]) -> None:
    """A set's ``transform`` as ``bench.data.load_dataset`` writes it: ``kind``, and for ZCA optionally ``eps``,
    ``fitted_on`` and ``fingerprint``, for mean/std optionally ``mean`` and ``std`` (one value per channel)."""
    if not isinstance(transform, dict) or "kind" not in transform:
        raise refuse("transform", transform, 'an object with a kind, e.g. {"kind": "mean_std"} or {"kind": "zca"}')
    if transform["kind"] not in TRANSFORM_KINDS:
        raise refuse("transform.kind", transform["kind"], " or ".join(f"'{kind}'" for kind in TRANSFORM_KINDS))
    if "eps" in transform and not _is_positive_number(transform["eps"]):
        raise refuse("transform.eps", transform["eps"], "a finite number above 0")
    for key in ("fingerprint", "fitted_on"):
        if key in transform and not isinstance(transform[key], str):
            raise refuse(f"transform.{key}", transform[key], "a string")
    for key in ("mean", "std"):
        values = transform.get(key)
        if key in transform and not (isinstance(values, list) and values and all(
                is_finite_number(v) and (key == "mean" or v > 0) for v in values)):
            raise refuse(f"transform.{key}", values,
                         "a list of finite numbers, one per channel" + (", each above 0" if key == "std" else ""))


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (JSON's ``true`` is not a number here) that is neither NaN nor infinite, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range
        return False


def _is_positive_number(value: object) -> bool:
    return is_finite_number(value) and value > 0  # type: ignore[operator]


LEARNING_RATE = "a finite number above 0 and at most 3.4e38 (float32's largest: SGD holds it as one)"


def _is_learning_rate(value: object) -> bool:
    return _is_positive_number(value) and value <= torch.finfo(torch.float32).max  # type: ignore[operator]


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` is named or begins like a pickle: ``torch.save``'s zip archive or a legacy pickle."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in PICKLE_MAGIC)


def _pickle_refusal(path: str | os.PathLike) -> str:
    return (f"{path} looks like a torch.save/pickle file; ddbench reads distilled sets only as STEM.safetensors + "
            f"STEM.json and never unpickles (unpickling runs code): convert it with torch.load(path, "
            f"weights_only=True) and safetensors.torch.save_file (README: 'Bring your own distilled set')")


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks: what the artifacts' integrity checks compare (expert
    cache files, checkpoints) and which set a record evaluated (``content_hash``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a saved set's tensors file (``path``: the set's .json, .safetensors or stem): which images and
    labels a record's numbers come from, whatever the file is called or wherever it is moved."""
    return file_sha256(_with(_stem(Path(path)), ".safetensors"))


def _stem(path: Path) -> Path:
    """A set's common stem: ``path`` without a ``.json`` or ``.safetensors`` ending (any other dot is the name's)."""
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)
