"""Datasets: a registry of loaders that turn files on disk into normalised, class-indexed tensors.

Every dataset is registered with its facts (classes, channels, resolution, per-dataset mean/std as in the DC
code, whether it is made of digits, so that DSA drops the flip) and a loader ``(root, resolution) → RawSplits``.
``load_dataset`` then applies the transform every method and the evaluation share:

* mean/std normalisation of [0, 1] pixels, or
* ZCA whitening with eps = 0.1 fitted on the *training* split only (as ``kornia.enhance.ZCAWhitening(eps=0.1)``
  used by MTT, TESLA and APM on CIFAR); no mean/std normalisation then.

Nothing is ever downloaded: the root comes from ``--data-root`` / ``DDBENCH_DATA``; absent or corrupt files
raise ``DataFilesMissing`` naming the files expected and where. ``digits`` (scikit-learn's bundled 8×8 digits)
needs no files at all and is the embedded default.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from bench.errors import DataFilesMissing, UserError
from bench.registry import Registry

DATA_ROOT_ENV = "DDBENCH_DATA"
MEMORY_CHECK_ENV = "DDBENCH_SKIP_MEMORY_CHECK"  # set (to anything) to load a dataset the check says will not fit
DATASET_ON_ENV = "DDBENCH_DATASET_ON"  # where a GPU cell keeps its dataset: auto (default), host or device
DATASET_ON_CHOICES = ("auto", "host", "device")
DEVICE_SHARE = 0.25  # auto: a dataset larger than this share of the GPU's memory stays in host memory
ZCA_EPS = 0.1


@dataclass
class RawSplits:
    """What a loader returns: images as uint8 (0..255) or float (0..1) tensors of shape (N, C, H, W)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]

    def fingerprint(self, images_per_split: int = 4096) -> str:
        """A hash of the data as the loader read it: every label, the images' shapes and types, and the pixels of
        ``images_per_split`` images of each split spread evenly over it (all of a smaller split). Two copies of a
        dataset that differ in their labels, their size, or the sampled pixels (a subset, a re-encoded copy, random
        pixels) get different fingerprints; reading it costs milliseconds even on ImageNet."""
        digest = hashlib.sha256()
        for images, labels in ((self.train_images, self.train_labels), (self.test_images, self.test_labels)):
            digest.update(f"{tuple(images.shape)} {images.dtype} {len(labels)};".encode())
            digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
            picked = torch.linspace(0, len(images) - 1, min(len(images), images_per_split)).round().long().unique()
            digest.update(images[picked].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def from_other_files(fingerprint: str | None, other: str | None) -> bool:
    """Whether two fingerprints (``RawSplits.fingerprint``) say their numbers come from different data files. An
    unknown one (records from before the fingerprint existed, datasets built by hand) is taken as the same."""
    return fingerprint is not None and other is not None and fingerprint != other


Loader = Callable[[Path, "int | None"], RawSplits]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    resolution: int  # native side length; `imagenet` resizes to the requested one
    mean: tuple[float, ...] | None  # None: computed on the training split at load time
    std: tuple[float, ...] | None
    digit_like: bool  # digits/MNIST/SVHN: DSA must not flip
    expected_files: tuple[str, ...]  # relative to the data root, for error messages
    loader: Loader = field(repr=False, compare=False)
    needs_root: bool = True


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    return DATASETS.register(info.name, info)


def list_datasets() -> list[str]:
    return DATASETS.names()


def get_dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)


# --------------------------------------------------------------------------------------------------------------
# ZCA whitening


@dataclass
class ZCA:
    """ZCA whitening x ↦ (x − μ) W with W = U diag((s + eps)^-½) Uᵀ from the SVD of the unbiased covariance.

    Identical to ``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)`` (tested), fitted in float64 here
    for accuracy and stored in float32.
    """

    mean: Tensor  # (1, D)
    transform: Tensor  # (D, D)
    transform_inv: Tensor  # (D, D)
    eps: float = ZCA_EPS

    @classmethod
    def fit(cls, images: Tensor, eps: float = ZCA_EPS) -> "ZCA":
        flat = images.reshape(images.shape[0], -1).double()
        mean = flat.mean(dim=0, keepdim=True)
        centred = flat - mean
        cov = centred.T @ centred / (flat.shape[0] - 1)
        u, s, _ = torch.linalg.svd(cov)
        inv_root = (s + eps).rsqrt()
        root = (s + eps).sqrt()
        transform = (u * inv_root) @ u.T
        transform_inv = (u * root) @ u.T
        return cls(mean.float(), transform.float(), transform_inv.float(), eps)

    def __call__(self, images: Tensor) -> Tensor:
        flat = images.reshape(images.shape[0], -1)
        return ((flat - self.mean.to(flat)) @ self.transform.to(flat)).reshape(images.shape)

    def inverse(self, images: Tensor) -> Tensor:
        flat = images.reshape(images.shape[0], -1)
        return (flat @ self.transform_inv.to(flat) + self.mean.to(flat)).reshape(images.shape)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.transform.numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# The loaded dataset


@dataclass
class Dataset:
    """A dataset after the transform: float tensors, an index of training images by class.

    ``transform`` describes what was applied (JSON-able); distilled sets copy it into their metadata so
    that evaluation applies the same transform to the test set.
    """

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    transform: dict
    zca: ZCA | None = None
    fingerprint: str | None = None  # ``RawSplits.fingerprint`` of the files it was loaded from; None if built by hand
    compute_device: torch.device | None = None  # where its users compute, when the tensors live elsewhere (host)
    _class_indices: list[Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._class_indices = [
            torch.nonzero(self.train_labels == c).flatten() for c in range(self.info.num_classes)
        ]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def resolution(self) -> int:
        return self.train_images.shape[-1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where the dataset's users compute: the images ``sample_class`` and ``images_of_class`` hand out are here."""
        return self.compute_device if self.compute_device is not None else self.train_images.device

    @property
    def held_apart(self) -> bool:
        """Whether the splits live apart from where their users compute (on the host, for a GPU cell)."""
        return self.compute_device is not None

    @property
    def storage_device(self) -> torch.device:
        """Where the splits live: ``device``, or the host for a dataset too large to keep on the GPU
        (``dataset_storage``); whoever reads whole splits moves what it needs, batch by batch."""
        return self.train_images.device

    def class_indices(self, c: int) -> Tensor:
        return self._class_indices[c]

    def class_counts(self) -> list[int]:
        return [len(ix) for ix in self._class_indices]

    def images_of_class(self, c: int) -> Tensor:
        """Every training image of class ``c``, on ``device``."""
        return self.train_images[self._class_indices[c]].to(self.device)

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` distinct training images of class ``c``, drawn with ``generator`` (on the CPU), on ``device``."""
        ix = self._class_indices[c]
        pick = torch.randperm(len(ix), generator=generator)[:n]
        return self.train_images[ix[pick.to(ix.device)]].to(self.device)

    def to(self, device: torch.device | str) -> "Dataset":
        moved = Dataset(
            self.info,
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.class_names,
            self.transform,
            self.zca,
            self.fingerprint,
        )
        return moved

    def description(self) -> "Dataset":
        """This dataset without its images: name, transform, fingerprint, class names and image shape, which is all
        a process that plans cells and writes their records needs while the cells run in processes of their own
        (each loads the data itself). Its tensors are new and empty, so the loaded ones can be freed."""
        def empty(tensor: Tensor) -> Tensor:
            return torch.empty((0, *tensor.shape[1:]), dtype=tensor.dtype)

        return Dataset(self.info, empty(self.train_images), empty(self.train_labels), empty(self.test_images),
                       empty(self.test_labels), self.class_names, self.transform, None, self.fingerprint)


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """``--data-root`` if given, else ``$DDBENCH_DATA``, else ``./data``."""
    try:
        if data_root:
            return Path(data_root).expanduser()
        env = os.environ.get(DATA_ROOT_ENV)
        return Path(env).expanduser() if env else Path("data")
    except RuntimeError as exc:  # ~name of no user
        raise UserError(f"data root {data_root or os.environ.get(DATA_ROOT_ENV)}: {exc}; set --data-root or "
                        f"{DATA_ROOT_ENV} to the folder that holds the datasets") from None


def _to_unit_float(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def available_host_memory() -> int | None:
    """Bytes the kernel can hand out without swapping (``MemAvailable`` of ``/proc/meminfo``); None where the
    system does not say (not Linux)."""
    from bench.measure import proc_kib_field

    return proc_kib_field("/proc/meminfo", "MemAvailable")


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_fits_in_memory(name: str, raw: RawSplits, zca: bool, device: torch.device) -> None:
    """A ``UserError`` before the transform when the dataset will not fit: its float32 copy of both splits (made
    from uint8 files), ZCA's float64 fit and whitened copy where asked, on a machine with less memory available —
    instead of the kernel's out-of-memory killer minutes later. On a CUDA device, the float32 splits must also fit
    in the device's free memory. Approximate (transient copies are counted, small ones are not); skipped with
    ``DDBENCH_SKIP_MEMORY_CHECK`` set."""
    if os.environ.get(MEMORY_CHECK_ENV):
        return
    images = (raw.train_images, raw.test_images)
    float32_bytes = sum(split.numel() for split in images) * 4
    needed = sum(split.numel() * 4 for split in images if split.dtype != torch.float32)  # the float copy
    if zca:  # the fit's float64 copy and its centred copy, then the whitened float32 splits
        needed += 4 * raw.train_images.numel() * 4 + float32_bytes
    shape = "×".join(map(str, raw.train_images.shape[1:]))
    what = (f"{raw.train_images.shape[0]:,} + {raw.test_images.shape[0]:,} images of {shape} as float32"
            f"{', with the ZCA fit' if zca else ''}")
    advice = f"use a machine with more memory, or set {MEMORY_CHECK_ENV}=1 to try anyway"
    available = available_host_memory()
    if available is not None and needed > available:
        raise UserError(f"dataset '{name}' needs about {_gib(needed)} of memory to load ({what}); this machine has "
                        f"{_gib(available)} available: {advice}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if float32_bytes > free:
            raise UserError(f"dataset '{name}' needs about {_gib(float32_bytes)} on {device} ({what}); it has "
                            f"{_gib(free)} free: {advice}")


def dataset_on() -> str:
    """``DDBENCH_DATASET_ON`` (``auto`` when unset), checked."""
    choice = os.environ.get(DATASET_ON_ENV, "auto") or "auto"
    if choice not in DATASET_ON_CHOICES:
        raise UserError(f"{DATASET_ON_ENV}={choice!r}: use one of {', '.join(DATASET_ON_CHOICES)}")
    return choice


def dataset_storage(nbytes: int, device: torch.device) -> torch.device:
    """Where a dataset of ``nbytes`` (both splits, float32) lives for a cell computing on ``device``: on the device,
    except on a GPU where ``DDBENCH_DATASET_ON`` says ``host``, or says ``auto`` (the default) and the dataset
    would take more than ``DEVICE_SHARE`` of the GPU's memory (ImageNet-1K 64×64, ~63 GB; TESLA's official code,
    too, reads ImageNet through a host-side ``Dataset``). A GPU-held dataset sits inside every GPU peak a cell
    records; one held on the host is read batch by batch."""
    choice = dataset_on()
    if device.type != "cuda" or choice == "device":
        return device
    if choice == "host" or nbytes > DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory:
        return torch.device("cpu")
    return device


def transform_kind(zca: bool) -> str:
    """The name a dataset's transform goes by in metadata and records: ``zca`` or ``mean_std``."""
    return "zca" if zca else "mean_std"


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    zca: bool = False,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load dataset ``name`` and apply its transform (mean/std, or ZCA fitted on the training split), for users
    computing on ``device`` (its splits there, or on the host: ``dataset_storage``)."""
    info = get_dataset_info(name)
    dataset_on()  # a mistyped choice fails before minutes of reading
    root = resolve_data_root(data_root)
    if info.needs_root and not root.is_dir():
        detail = "the data root is a file, not a folder" if root.exists() else "the data root does not exist"
        raise DataFilesMissing(name, root, list(info.expected_files), detail=detail, about_root=True)
    raw = info.loader(root, resolution)
    device = torch.device(device)
    storage = dataset_storage(sum(split.numel() * 4 for split in (raw.train_images, raw.test_images)), device)
    check_fits_in_memory(name, raw, zca, storage)
    fingerprint = raw.fingerprint()
    train = _to_unit_float(raw.train_images)
    test = _to_unit_float(raw.test_images)
    if train.ndim != 4 or test.ndim != 4 or train.shape[1:] != test.shape[1:]:
        raise UserError(f"dataset '{name}': loader returned images of shapes {train.shape} and {test.shape}")
    for split, images in (("training", train), ("test", test)):
        if len(images) == 0:
            raise DataFilesMissing(name, root, list(info.expected_files), detail=f"the {split} split holds no images")
    for split, labels in (("train", raw.train_labels), ("test", raw.test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
            raise DataFilesMissing(name, root, list(info.expected_files),
                                   detail=f"{split} labels outside 0..{info.num_classes - 1}")

    zca_transform: ZCA | None = None
    if zca:
        zca_transform = ZCA.fit(train)
        train, test = zca_transform(train), zca_transform(test)
        transform = {"kind": transform_kind(zca=True), "eps": ZCA_EPS, "fitted_on": "train", "fingerprint": zca_transform.fingerprint()}
    else:
        if info.mean is not None and info.std is not None:
            mean, std = torch.tensor(info.mean), torch.tensor(info.std)
        else:
            mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
        shape = (1, -1, 1, 1)
        train = train.sub_(mean.view(shape)).div_(std.view(shape))  # in place: ImageNet-sized sets fit once
        test = test.sub_(mean.view(shape)).div_(std.view(shape))
        transform = {"kind": transform_kind(zca=False), "mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}

    return Dataset(
        info=info,
        train_images=train.contiguous().to(storage),
        train_labels=raw.train_labels.long().to(storage),
        test_images=test.contiguous().to(storage),
        test_labels=raw.test_labels.long().to(storage),
        class_names=list(raw.class_names),
        transform=transform,
        zca=zca_transform,
        fingerprint=fingerprint,
        compute_device=None if storage == device else device,
    )


# --------------------------------------------------------------------------------------------------------------
# Loaders


def _load_digits(root: Path, resolution: int | None) -> RawSplits:
    """scikit-learn's bundled UCI digits (1797 8×8 images, values 0..16): a stratified 80/20 split, seed 0.

    The file is read where scikit-learn installed it, without importing scikit-learn (1.5 s a process, and every
    cell loads its data afresh); ``stratified_split`` draws the split scikit-learn's ``train_test_split`` draws
    (tested), so it no longer depends on the installed scikit-learn's version."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise UserError("dataset 'digits' ships with scikit-learn, and no installed scikit-learn holds "
                        "datasets/data/digits.csv.gz: pip install scikit-learn")
    with gzip.open(path, "rt") as lines:
        table = np.loadtxt(lines, delimiter=",")  # 64 pixel values, then the label, per row
    images = torch.tensor(table[:, :-1], dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    labels = torch.tensor(table[:, -1].astype(np.int64))
    train_ix, test_ix = stratified_split(labels.numpy(), test_fraction=0.2, seed=0)
    train_ix, test_ix = torch.from_numpy(train_ix), torch.from_numpy(test_ix)
    return RawSplits(images[train_ix], labels[train_ix], images[test_ix], labels[test_ix], [str(d) for d in range(10)])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted train and test indices of scikit-learn's ``train_test_split(range(n), test_size=test_fraction,
    stratify=labels, random_state=seed)``: its ``StratifiedShuffleSplit`` draws, in its order, from a
    ``numpy.random.RandomState(seed)`` — how many of each class go to each side (``_class_shares``), then a
    permutation of each class — and is reimplemented here so that no process need import scikit-learn for it."""
    rng = np.random.RandomState(seed)
    n_test = int(np.ceil(test_fraction * len(labels)))
    classes, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(counts)[:-1])
    to_train = _class_shares(counts, len(labels) - n_test, rng)
    to_test = _class_shares(counts - to_train, n_test, rng)
    train, test = [], []
    for k in range(len(classes)):
        shuffled = members[k][rng.permutation(counts[k])]
        train.extend(shuffled[: to_train[k]])
        test.extend(shuffled[to_train[k]: to_train[k] + to_test[k]])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _class_shares(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` each class gets, in proportion to ``counts`` (scikit-learn's ``_approximate_mode``):
    the floors, then one more to the classes with the largest remainders, ties broken at random."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainders = exact - shares
    for value in np.sort(np.unique(remainders))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainders == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)


register_dataset(
    DatasetInfo(
        name="digits",
        num_classes=10,
        channels=1,
        resolution=8,
        mean=None,
        std=None,
        digit_like=True,
        expected_files=(),
        loader=_load_digits,
        needs_root=False,
    )
)

# The loaders for files on disk (mnist, fashion_mnist, cifar10, cifar100, svhn, tiny_imagenet, imagenet,
# imagenet64) follow.



_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class _Source:
    """The dataset being read, so that every failure names it, its root and the files it expects."""

    dataset: str
    root: Path
    expected: tuple[str, ...]

    def fail(self, detail: str) -> DataFilesMissing:
        return DataFilesMissing(self.dataset, self.root, list(self.expected), detail=detail)

    @contextmanager
    def reading(self, what: str) -> Iterator[None]:
        """Turn any error raised while reading ``what`` (OSError, pickle, numpy, PIL, scipy…) into ``fail``."""
        try:
            yield
        except (DataFilesMissing, MemoryError):
            raise
        except Exception as exc:
            raise self.fail(f"{what} could not be read ({type(exc).__name__}: {exc})") from exc

    def labels(self, values: object, num_classes: int, what: str) -> Tensor:
        """Labels as int64, checked to be one whole number per image in 0..num_classes-1."""
        with self.reading(what):
            array = np.asarray(values)
        if array.ndim != 1:
            raise self.fail(f"{what} holds labels of shape {array.shape}, expected one label per image (N,)")
        if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.array_equal(array, np.round(array))):
            raise self.fail(f"{what} holds labels that are not whole numbers ({array.dtype})")
        array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise self.fail(f"{what} has labels outside 0..{num_classes - 1} (found {array.min()}..{array.max()})")
        return torch.from_numpy(array)


def _read_images(src: _Source, paths: list[Path], size: int, fit: Callable | None = None) -> Tensor:
    """Decode image files to uint8 (N, 3, size, size) with PIL (RGB), ``fit`` resizing each first; threaded."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        rel = paths[i].relative_to(src.root) if paths[i].is_relative_to(src.root) else paths[i]
        with src.reading(str(rel)), Image.open(paths[i]) as image:
            image = image.convert("RGB")
            image = fit(image) if fit is not None else image
            if image.size != (size, size):
                raise src.fail(f"{rel} is {image.size[0]}×{image.size[1]}, expected {size}×{size}")
            out[i] = np.asarray(image).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return torch.from_numpy(out)


# MNIST and Fashion-MNIST: idx files -------------------------------------------------------------------------

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0803 (uint8, 3 dims), 0x0801 (uint8, 1 dim)


def _read_idx(src: _Source, folder: Path, name: str, magic: int) -> np.ndarray:
    """``folder/name`` or ``folder/name.gz``: a big-endian uint32 magic, one uint32 per dimension, uint8 data."""
    path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
    rel = (folder / name).relative_to(src.root)
    if path is None:
        raise src.fail(f"{rel} (or {rel}.gz) is missing")
    with src.reading(path.name):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise src.fail(f"{path.name} is truncated ({len(raw)} bytes, shorter than its header)")
    found, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if found != magic:
        raise src.fail(f"{path.name} has a bad magic number {found}, expected {magic}")
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise src.fail(f"{path.name} has {len(raw) - header} data bytes, expected {size} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_loader(dataset: str, folder: str, class_names: tuple[str, ...]) -> Loader:
    def load(root: Path, resolution: int | None) -> RawSplits:
        src = _Source(dataset, root, tuple(f"{folder}/{f}" for f in _IDX_FILES))
        splits: list[Tensor] = []
        for prefix in ("train", "t10k"):
            images = _read_idx(src, root / folder, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES)
            labels = _read_idx(src, root / folder, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS)
            if images.shape[1:] != (28, 28) or len(images) != len(labels):
                raise src.fail(
                    f"{prefix} files hold images {images.shape} and {len(labels)} labels, expected (N, 28, 28) and N"
                )
            splits += [torch.from_numpy(images).unsqueeze(1), src.labels(labels, 10, f"{prefix}-labels-idx1-ubyte")]
        return RawSplits(*splits, list(class_names))

    load.__doc__ = f"""{dataset}: the four idx files in ``{folder}/`` (torchvision's layout), each plain or ``.gz``."""
    return load


# CIFAR-10 and CIFAR-100: python pickles ---------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python pickles hold a dict of numpy arrays, lists and strings: numpy's array reconstruction is all
    they import. Anything else a file names is refused — plain ``pickle.load`` would import and call whatever a
    tampered file asks for, and so run its code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR file never does; not loaded")
        return super().find_class(module, name)


def _unpickle(src: _Source, folder: Path, name: str, keys: tuple[str, ...]) -> dict:
    """One CIFAR pickle (a dict whose keys may be str or bytes), checked to hold ``keys``."""
    path = folder / name
    if not path.is_file():
        raise src.fail(f"{path.relative_to(src.root)} is missing")
    with src.reading(name), open(path, "rb") as f:
        obj = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise src.fail(f"{name} holds a {type(obj).__name__}, expected a dict")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in obj]
    if missing:
        raise src.fail(f"{name} lacks key(s) {', '.join(missing)}")
    return obj


def _cifar_loader(
    dataset: str, folder: str, train: tuple[str, ...], test: str, meta: str, label_key: str, names_key: str, n: int
) -> Loader:
    expected = tuple(f"{folder}/{f}" for f in (*train, test, meta))

    def split(src: _Source, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name in names:
            batch = _unpickle(src, src.root / folder, name, ("data", label_key))
            with src.reading(name):
                data, label = np.asarray(batch["data"]), src.labels(batch[label_key], n, name)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(label) != len(data):
                raise src.fail(
                    f"{name} holds data {data.dtype} {data.shape} with {len(label)} labels, expected uint8 (N, 3072), N"
                )
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
            labels.append(label)
        return torch.cat(images), torch.cat(labels)

    def load(root: Path, resolution: int | None) -> RawSplits:
        src = _Source(dataset, root, expected)
        names = _unpickle(src, root / folder, meta, (names_key,))[names_key]
        with src.reading(meta):
            names = [x.decode() if isinstance(x, bytes) else str(x) for x in names]
        if len(names) != n:
            raise src.fail(f"{meta} names {len(names)} classes, expected {n}")
        return RawSplits(*split(src, train), *split(src, (test,)), names)

    load.__doc__ = f"""{dataset}: the python-pickle release in ``{folder}/`` (``data`` uint8 (N, 3072) as CHW rows)."""
    return load


# SVHN: MATLAB files -----------------------------------------------------------------------------------------

_SVHN_FILES = ("svhn/train_32x32.mat", "svhn/test_32x32.mat")


def _load_svhn(root: Path, resolution: int | None) -> RawSplits:
    """SVHN cropped digits: ``svhn/{train,test}_32x32.mat`` (or both in the root itself, as torchvision puts them).

    ``X`` is uint8 (32, 32, 3, N) and ``y`` (N, 1) with 10 meaning the digit 0, mapped to 0 as torchvision does.
    """
    from scipy.io import loadmat

    src = _Source("svhn", root, _SVHN_FILES)
    folder = root / "svhn" if (root / "svhn").is_dir() else root
    splits: list[Tensor] = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        if not (folder / name).is_file():
            where = "svhn/" if folder != root else "svhn/ (absent) or the root itself"
            raise src.fail(f"svhn/{name} is missing (looked in {where})")
        with src.reading(name):
            mat = loadmat(folder / name)
        missing = [k for k in ("X", "y") if k not in mat]
        if missing:
            raise src.fail(f"{name} lacks key(s) {', '.join(missing)}")
        x, y = mat["X"], mat["y"].reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise src.fail(f"{name} holds X {x.dtype} {x.shape} and {len(y)} labels, expected uint8 (32, 32, 3, N), N")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (H, W, C, N) → (N, C, H, W)
        splits += [images, src.labels(np.where(y == 10, 0, y), 10, name)]
    return RawSplits(*splits, [str(d) for d in range(10)])


# Tiny ImageNet and ImageNet: JPEG folders -------------------------------------------------------------------

_TINY_FILES = (
    "tiny-imagenet-200/wnids.txt",
    "tiny-imagenet-200/train/<wnid>/images/*.JPEG",
    "tiny-imagenet-200/val/images/*.JPEG",
    "tiny-imagenet-200/val/val_annotations.txt",
)


def _load_tiny_imagenet(root: Path, resolution: int | None, *, num_classes: int = 200) -> RawSplits:
    """Tiny ImageNet as released: ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated file, wnid, box). Classes are the
    sorted wnids; the test split is val. All images are 64×64 (greyscale ones are converted to RGB).
    """
    src = _Source("tiny_imagenet", root, _TINY_FILES)
    base = root / "tiny-imagenet-200"
    for rel in ("wnids.txt", "val/val_annotations.txt"):
        if not (base / rel).is_file():
            raise src.fail(f"tiny-imagenet-200/{rel} is missing")
    with src.reading("wnids.txt"):
        wnids = sorted(set((base / "wnids.txt").read_text().split()))
    if len(wnids) != num_classes:
        raise src.fail(f"wnids.txt lists {len(wnids)} classes, expected {num_classes}")
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for w in wnids:
        files = sorted((base / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise src.fail(f"tiny-imagenet-200/train/{w}/images/ holds no .JPEG images")
        train_paths += files
        train_labels += [index[w]] * len(files)

    val_paths, val_labels = [], []
    with src.reading("val/val_annotations.txt"):
        lines = (base / "val/val_annotations.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line.strip()]
    for i, row in enumerate(rows, 1):
        if len(row) < 2 or row[1] not in index:
            raise src.fail(f"val_annotations.txt line {i} names no known wnid: {row[:2]}")
        val_paths.append(base / "val" / "images" / row[0])
        val_labels.append(index[row[1]])

    return RawSplits(
        _read_images(src, train_paths, 64), torch.tensor(train_labels, dtype=torch.int64),
        _read_images(src, val_paths, 64), torch.tensor(val_labels, dtype=torch.int64), wnids,
    )


_IMAGENET_FILES = ("imagenet/train/<wnid>/*.JPEG", "imagenet/val/<wnid>/*.JPEG")


def _load_imagenet(root: Path, resolution: int | None, *, num_classes: int = 1000) -> RawSplits:
    """ImageNet-1k in ImageFolder layout, ``imagenet/{train,val}/<wnid>/*.JPEG`` (val sorted into wnid folders).

    Classes are the sorted train folder names. Each image is resized (shorter side, bilinear) to ``resolution``
    (64 when None) and centre-cropped, as torchvision's ``Resize(r)`` + ``CenterCrop(r)``.
    At 64×64 the train split is 1.28M × 12288 bytes (15.7 GB uint8); decoding it takes a while.
    """
    import torchvision.transforms.functional as TF
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    src = _Source("imagenet", root, _IMAGENET_FILES)
    size = resolution or 64
    base = root / "imagenet"
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise src.fail(f"imagenet/{split}/ is missing")
    with src.reading("imagenet/train/"):
        classes, class_to_idx = find_classes(str(base / "train"))
    if len(classes) != num_classes:
        raise src.fail(f"imagenet/train/ holds {len(classes)} class folders, expected {num_classes}")
    with src.reading("imagenet/val/"):
        extra = sorted(set(find_classes(str(base / "val"))[0]) - set(classes))
    if extra:
        raise src.fail(f"imagenet/val/ holds class folders absent from train: {', '.join(extra[:5])}")

    def fit(image):  # PIL image → shorter side `size`, centre crop
        return TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR), size)

    samples = {}  # both splits listed before anything is decoded, so that a missing val folder fails fast
    for split in ("train", "val"):
        with src.reading(f"imagenet/{split}/"):
            samples[split] = make_dataset(str(base / split), class_to_idx, IMG_EXTENSIONS)
    splits: list[Tensor] = []
    for split in ("train", "val"):
        paths, labels = [Path(p) for p, _ in samples[split]], [c for _, c in samples[split]]
        splits += [_read_images(src, paths, size, fit), torch.tensor(labels, dtype=torch.int64)]
    return RawSplits(*splits, classes)


# Downsampled ImageNet 64×64: npz batches --------------------------------------------------------------------

_IMAGENET64_NAMES = tuple(f"train_data_batch_{k}.npz" for k in range(1, 11)) + ("val_data.npz",)
_IMAGENET64_FILES = tuple(f"imagenet64/{n}" for n in _IMAGENET64_NAMES)


def _read_npz_batches(src: _Source, paths: list[Path]) -> tuple[Tensor, Tensor]:
    """Labels of every batch first, then the images copied batch by batch into one preallocated tensor."""
    labels = []
    for path in paths:
        with src.reading(path.name), np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("data", "labels") if k not in npz.files]
            if missing:
                raise src.fail(f"{path.name} lacks key(s) {', '.join(missing)}")
            shifted = np.asarray(npz["labels"]) - 1  # 1..1000 → 0..999
            labels.append(src.labels(shifted, 1000, f"{path.name} (1-indexed, shifted by -1)"))
    images = torch.empty((sum(len(x) for x in labels), 3, 64, 64), dtype=torch.uint8)
    start = 0
    for path, lab in zip(paths, labels):
        with src.reading(path.name), np.load(path, allow_pickle=False) as npz:
            data = npz["data"]
        if data.dtype != np.uint8 or data.shape != (len(lab), 12288):
            raise src.fail(f"{path.name} holds data {data.dtype} {data.shape}, expected uint8 ({len(lab)}, 12288)")
        images[start : start + len(lab)] = torch.from_numpy(data.reshape(-1, 3, 64, 64))
        start += len(lab)
    return images, torch.cat(labels)


def _load_imagenet64(root: Path, resolution: int | None) -> RawSplits:
    """Downsampled ImageNet 64×64 (Chrabaszcz et al. 2017), as used by TESLA and APM.

    ``imagenet64/train_data_batch_{1..10}.npz`` and ``imagenet64/val_data.npz`` (or the release's folders
    ``imagenet64/Imagenet64_train_npz/`` and ``imagenet64/Imagenet64_val_npz/``). Each holds ``data``, uint8
    (N, 12288) with the R, G and B planes of a row-major 64×64 image one after the other (so CHW), and
    ``labels`` 1..1000, shifted here to 0..999; ``mean`` is ignored. The release carries no class names, so
    classes are named "0".."999". The whole train split is 1.28M × 12288 bytes: 15.7 GB as uint8, ~63 GB as
    float32.
    """
    src = _Source("imagenet64", root, _IMAGENET64_FILES)
    base = root / "imagenet64"
    paths: dict[str, Path] = {}
    for name in _IMAGENET64_NAMES:
        sub = "Imagenet64_val_npz" if name.startswith("val") else "Imagenet64_train_npz"
        found = next((p for p in (base / name, base / sub / name) if p.is_file()), None)
        if found is not None:
            paths[name] = found
    missing = [n for n in _IMAGENET64_NAMES if n not in paths]
    if missing:
        where = "imagenet64/ and imagenet64/Imagenet64_{train,val}_npz/"
        raise src.fail(f"missing {', '.join(missing)} (looked in {where})")
    train = _read_npz_batches(src, [paths[n] for n in _IMAGENET64_NAMES[:-1]])
    test = _read_npz_batches(src, [paths["val_data.npz"]])
    return RawSplits(*train, *test, [str(c) for c in range(1000)])


_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)
_CIFAR10_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))

for _info in (
    DatasetInfo(
        "mnist", 10, 1, 28, (0.1307,), (0.3081,), digit_like=True,
        expected_files=tuple(f"MNIST/raw/{f}" for f in _IDX_FILES),
        loader=_idx_loader("mnist", "MNIST/raw", tuple(str(d) for d in range(10))),
    ),
    DatasetInfo(
        "fashion_mnist", 10, 1, 28, (0.2861,), (0.3530,), digit_like=False,
        expected_files=tuple(f"FashionMNIST/raw/{f}" for f in _IDX_FILES),
        loader=_idx_loader("fashion_mnist", "FashionMNIST/raw", _FASHION_NAMES),
    ),
    DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), digit_like=False,
        expected_files=tuple(f"cifar-10-batches-py/{f}" for f in (*_CIFAR10_BATCHES, "test_batch", "batches.meta")),
        loader=_cifar_loader(
            "cifar10", "cifar-10-batches-py", _CIFAR10_BATCHES, "test_batch", "batches.meta",
            label_key="labels", names_key="label_names", n=10,
        ),
    ),
    DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), digit_like=False,
        expected_files=tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
        loader=_cifar_loader(
            "cifar100", "cifar-100-python", ("train",), "test", "meta",
            label_key="fine_labels", names_key="fine_label_names", n=100,
        ),
    ),
    DatasetInfo(
        "svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), digit_like=True,
        expected_files=_SVHN_FILES, loader=_load_svhn,
    ),
    DatasetInfo(
        "tiny_imagenet", 200, 3, 64, _IMAGENET_MEAN, _IMAGENET_STD, digit_like=False,
        expected_files=_TINY_FILES, loader=_load_tiny_imagenet,
    ),
    DatasetInfo(
        "imagenet", 1000, 3, 64, _IMAGENET_MEAN, _IMAGENET_STD, digit_like=False,
        expected_files=_IMAGENET_FILES, loader=_load_imagenet,
    ),
    DatasetInfo(
        "imagenet64", 1000, 3, 64, _IMAGENET_MEAN, _IMAGENET_STD, digit_like=False,
        expected_files=_IMAGENET64_FILES, loader=_load_imagenet64,
    ),
):
    register_dataset(_info)
del _info
