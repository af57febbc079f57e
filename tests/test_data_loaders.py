"""The on-disk dataset loaders, each fed tiny files written here in the real release format."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench.data as data
from bench.data import get_dataset_info, load_dataset
from bench.errors import DataFilesMissing

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # ../shared beside the clone, if present
ON_DISK = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "imagenet", "imagenet64"]


def detail(exc: pytest.ExceptionInfo) -> str:
    """The part of a DataFilesMissing message before the root and the list of expected files."""
    return str(exc.value).split(" under ")[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def normalised_mean(raw: np.ndarray, info) -> float:
    """The mean that load_dataset's mean/std normalisation should give for uint8 images (N, C, H, W)."""
    x = raw.astype(np.float64) / 255.0
    mean, std = np.array(info.mean).reshape(1, -1, 1, 1), np.array(info.std).reshape(1, -1, 1, 1)
    return float(((x - mean) / std).mean())


def override(monkeypatch, name: str, num_classes: int) -> None:
    """Register ``name`` with fewer classes, for the folder datasets whose class count comes from the files."""
    info = get_dataset_info(name)
    loader = functools.partial(info.loader, num_classes=num_classes)
    monkeypatch.setitem(data.DATASETS._entries, name, dataclasses.replace(info, num_classes=num_classes, loader=loader))


# ----------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def mnist_arrays(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), n_per_class).astype(np.uint8)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    return images, labels


def write_mnist(root: Path, folder: str = "MNIST/raw", gz: str = "plain") -> dict[str, np.ndarray]:
    """gz: "plain", "gz" or "mixed" (images gzipped, labels plain)."""
    out = root / folder
    out.mkdir(parents=True)
    train_x, train_y = mnist_arrays(2, 0)
    test_x, test_y = mnist_arrays(1, 1)
    train_x[3] = (np.arange(784) % 256).reshape(28, 28)  # a known pattern
    arrays = {"train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
              "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y}
    for name, array in arrays.items():
        raw = idx_bytes(array, 2051 if array.ndim == 3 else 2049)
        zipped = gz == "gz" or (gz == "mixed" and "images" in name)
        (out / f"{name}.gz").write_bytes(gzip.compress(raw)) if zipped else (out / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", ["plain", "gz", "mixed"])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_datasets_load(tmp_path, name, folder, gz):
    arrays = write_mnist(tmp_path, folder, gz)
    before = snapshot(tmp_path)
    raw = get_dataset_info(name).loader(tmp_path, None)
    assert raw.train_images.shape == (20, 1, 28, 28) and raw.test_images.shape == (10, 1, 28, 28)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    known = torch.from_numpy((np.arange(784) % 256).reshape(28, 28).astype(np.uint8))
    assert torch.equal(raw.train_images[3, 0], known)
    assert torch.equal(raw.test_images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert raw.train_labels.tolist() == list(range(10)) * 2
    assert len(raw.class_names) == 10
    assert raw.class_names[0] == ("0" if name == "mnist" else "T-shirt/top")

    ds = load_dataset(name, tmp_path)
    info = get_dataset_info(name)
    assert ds.class_counts() == [2] * 10 and ds.image_shape == (1, 28, 28)
    assert ds.train_images.mean().item() == pytest.approx(normalised_mean(raw.train_images.numpy(), info), abs=1e-5)
    assert snapshot(tmp_path) == before  # nothing written into the data root


def test_mnist_info():
    info = get_dataset_info("mnist")
    assert (info.num_classes, info.channels, info.resolution, info.digit_like) == (10, 1, 28, True)
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    assert get_dataset_info("fashion_mnist").digit_like is False


def test_mnist_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("mnist", tmp_path)
    assert "MNIST/raw/t10k-labels-idx1-ubyte (or MNIST/raw/t10k-labels-idx1-ubyte.gz) is missing" in detail(exc)


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 2049) + path.read_bytes()[4:])
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("mnist", tmp_path)
    assert "train-images-idx3-ubyte has a bad magic number 2049, expected 2051" in detail(exc)


@pytest.mark.parametrize("cut", [5, 100])
def test_mnist_truncated(tmp_path, cut):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST/raw/t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("mnist", tmp_path)
    assert "t10k-images-idx3-ubyte" in detail(exc) and ("truncated" in detail(exc) or "data bytes" in detail(exc))


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz="gz")
    path = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("mnist", tmp_path)
    assert "train-labels-idx1-ubyte.gz could not be read" in detail(exc)


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 11, np.uint8), 2049))
    with pytest.raises(DataFilesMissing, match="labels outside 0..9"):
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not (REAL_MNIST / "MNIST/raw").is_dir(), reason=f"real MNIST not present at {REAL_MNIST}")
def test_real_mnist():
    raw = get_dataset_info("mnist").loader(REAL_MNIST, None)
    assert raw.train_images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    assert raw.train_labels[0].item() == 5
    assert raw.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert raw.train_images.float().div(255).mean().item() == pytest.approx(0.1307, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100

PATTERN = (np.arange(3072) % 251).astype(np.uint8)  # a CHW row: R plane, G plane, B plane


def cifar_batch(labels: list[int], seed: int, key_type=str) -> dict:
    data_ = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    data_[0] = PATTERN
    k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
    return {k("data"): data_, k("labels"): labels, k("batch_label"): "testing"}


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    for k in range(1, 6):
        write_pickle(folder / f"data_batch_{k}", cifar_batch(list(range(10)), k))
    write_pickle(folder / "test_batch", cifar_batch(list(range(9, -1, -1)), 9))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})


def write_cifar100(root: Path) -> None:
    """Bytes keys and bytes names, as a python-3 pickle of the original bytes-keyed dicts would have."""
    folder = root / "cifar-100-python"
    for name, seed in (("train", 0), ("test", 1)):
        batch = cifar_batch(list(range(100)), seed, bytes)
        batch[b"fine_labels"] = batch.pop(b"labels")
        batch[b"coarse_labels"] = [c // 5 for c in range(100)]
        write_pickle(folder / name, batch)
    write_pickle(folder / "meta", {b"fine_label_names": [f"class{c:03d}".encode() for c in range(100)]})


def test_cifar10_loads(tmp_path):
    write_cifar10(tmp_path)
    raw = get_dataset_info("cifar10").loader(tmp_path, None)
    assert raw.train_images.shape == (50, 3, 32, 32) and raw.test_images.shape == (10, 3, 32, 32)
    assert raw.train_images.dtype == torch.uint8 and raw.test_labels.dtype == torch.int64
    expected = torch.from_numpy(PATTERN.reshape(3, 32, 32))
    for i in (0, 10, 40):  # the first image of batches 1, 2 and 5
        assert torch.equal(raw.train_images[i], expected)
    assert raw.train_images[0, 1, 2, 3].item() == (1024 + 2 * 32 + 3) % 251  # channel G, row 2, column 3
    assert raw.train_labels.tolist() == list(range(10)) * 5 and raw.test_labels.tolist() == list(range(9, -1, -1))
    assert raw.class_names[0] == "airplane" and raw.class_names[9] == "truck"

    ds = load_dataset("cifar10", tmp_path)
    assert ds.class_counts() == [5] * 10
    assert ds.train_images.mean().item() == pytest.approx(normalised_mean(raw.train_images.numpy(), ds.info), abs=1e-5)


def test_cifar100_loads_bytes_keys(tmp_path):
    write_cifar100(tmp_path)
    raw = get_dataset_info("cifar100").loader(tmp_path, None)
    assert raw.train_images.shape == (100, 3, 32, 32) and raw.test_images.shape == (100, 3, 32, 32)
    assert torch.equal(raw.train_images[0], torch.from_numpy(PATTERN.reshape(3, 32, 32)))
    assert raw.train_labels.tolist() == list(range(100))
    assert raw.class_names[:2] == ["class000", "class001"] and len(raw.class_names) == 100
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_counts() == [1] * 100


class _RunsCode:
    """What a tampered pickle does: call a function of the file's choice on load (here a harmless one)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    write_pickle(tmp_path / "cifar-10-batches-py/data_batch_3", dict(cifar_batch(list(range(10)), 3),
                                                                     batch_label=_RunsCode(marker)))
    with pytest.raises(DataFilesMissing, match=r"data_batch_3 could not be read \(UnpicklingError: it asks for "):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_pickles_written_by_python_2_numpy_load(tmp_path):
    """The published files name numpy.core.multiarray (this numpy's pickles name numpy._core.multiarray)."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py/data_batch_1"
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    raw = get_dataset_info("cifar10").loader(tmp_path, None)
    assert torch.equal(raw.train_images[0], torch.from_numpy(PATTERN.reshape(3, 32, 32)))


def test_cifar_missing_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py/test_batch").unlink()
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-batches-py/test_batch is missing" in detail(exc)


def test_cifar_truncated_pickle(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py/data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3 could not be read" in detail(exc)


def test_cifar_not_a_pickle(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py/batches.meta").write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(DataFilesMissing, match="batches.meta could not be read"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_key(tmp_path):
    write_cifar100(tmp_path)
    write_pickle(tmp_path / "cifar-100-python/test", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("cifar100", tmp_path)
    assert "test lacks key(s) fine_labels" in detail(exc)


def test_cifar_wrong_shape(tmp_path):
    write_cifar10(tmp_path)
    batch = {"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}
    write_pickle(tmp_path / "cifar-10-batches-py/data_batch_2", batch)
    with pytest.raises(DataFilesMissing, match=r"data_batch_2 holds data uint8 \(2, 3000\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar_malformed_labels_and_names(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "data_batch_2", cifar_batch([0.0, 1.7, 2, 3, 4, 5, 6, 7, 8, 9], 2))
    with pytest.raises(DataFilesMissing, match=r"data_batch_2 holds labels that are not whole numbers \(float64\)"):
        load_dataset("cifar10", tmp_path)
    write_pickle(folder / "data_batch_2", cifar_batch([[0, 1]] * 5, 2))
    with pytest.raises(DataFilesMissing, match=r"data_batch_2 holds labels of shape \(5, 2\), expected one label per"):
        load_dataset("cifar10", tmp_path)
    write_cifar10(tmp_path)
    write_pickle(folder / "batches.meta", {"label_names": 10})  # used to be a TypeError traceback
    with pytest.raises(DataFilesMissing, match="batches.meta could not be read"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# SVHN


def write_svhn(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3, 20), dtype=np.uint8)
    x[..., 0] = (np.arange(3072) % 253).reshape(32, 32, 3)  # known image n=0, indexed [h, w, c]
    y = np.tile(np.arange(1, 11), 2).reshape(-1, 1).astype(np.uint8)  # 1..10, 10 meaning the digit 0
    savemat(folder / "train_32x32.mat", {"X": x, "y": y})
    savemat(folder / "test_32x32.mat", {"X": x[..., :10], "y": y[:10]})
    return x, y


@pytest.mark.parametrize("layout", ["svhn", "root"])
def test_svhn_loads(tmp_path, layout):
    x, _ = write_svhn(tmp_path / "svhn" if layout == "svhn" else tmp_path)
    raw = get_dataset_info("svhn").loader(tmp_path, None)
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (10, 3, 32, 32)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    assert torch.equal(raw.train_images[0], torch.from_numpy(x[..., 0].transpose(2, 0, 1).copy()))
    assert raw.train_images[0, 2, 1, 5].item() == x[1, 5, 2, 0]  # channel B, row 1, column 5
    assert raw.train_labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] * 2  # 10 → 0
    assert raw.class_names == [str(d) for d in range(10)]
    ds = load_dataset("svhn", tmp_path)
    assert ds.class_counts() == [2] * 10 and ds.info.digit_like
    assert ds.test_images.mean().item() == pytest.approx(normalised_mean(raw.test_images.numpy(), ds.info), abs=1e-5)


def test_svhn_missing_and_corrupt(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn/test_32x32.mat").unlink()
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("svhn", tmp_path)
    assert "svhn/test_32x32.mat is missing" in detail(exc)

    savemat(tmp_path / "svhn/test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataFilesMissing, match="test_32x32.mat lacks key.s. y"):
        load_dataset("svhn", tmp_path)

    (tmp_path / "svhn/test_32x32.mat").write_bytes(b"MATLAB? no." * 20)
    with pytest.raises(DataFilesMissing, match="test_32x32.mat could not be read"):
        load_dataset("svhn", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Tiny ImageNet and ImageNet (real JPEGs)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def two_tone(size: tuple[int, int], top, bottom) -> Image.Image:
    """Top half ``top``, bottom half ``bottom``: block-aligned, so quality-100 JPEG keeps it within a few levels."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[: h // 2], array[h // 2 :] = top, bottom
    return Image.fromarray(array)


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=100, subsampling=0)


def write_tiny(root: Path) -> list[str]:
    base = root / "tiny-imagenet-200"
    wnids = ["n03000000", "n01000000", "n02000000"]  # unsorted on purpose; classes are the sorted wnids
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        c = sorted(wnids).index(w)
        for k in range(2):
            save_jpeg(two_tone((64, 64), COLOURS[c], (k * 200,) * 3), base / "train" / w / "images" / f"{w}_{k}.JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    rows = []
    for i, w in enumerate(["n02000000", "n03000000", "n01000000", "n03000000"]):
        c = sorted(wnids).index(w)
        save_jpeg(two_tone((64, 64), COLOURS[c], (0, 0, 0)), base / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 128).save(base / "val" / "images" / "val_grey.JPEG", "JPEG", quality=100)
    rows.append("val_grey.JPEG\tn01000000\t1\t2\t3\t4")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return sorted(wnids)


def test_tiny_imagenet_loads(tmp_path, monkeypatch):
    wnids = write_tiny(tmp_path)
    raw = data._load_tiny_imagenet(tmp_path, None, num_classes=3)
    assert raw.class_names == wnids
    assert raw.train_images.shape == (6, 3, 64, 64) and raw.test_images.shape == (5, 3, 64, 64)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    assert raw.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert raw.test_labels.tolist() == [1, 2, 0, 2, 0]  # from val_annotations.txt
    for images, labels in ((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)):
        for img, c in zip(images[:4], labels[:4]):  # the top half is the class colour, in RGB order
            assert (img[:, :32].float().mean(dim=(1, 2)) - torch.tensor(COLOURS[c])).abs().max() < 3
    assert (raw.train_images[3, :, 32:].int() - 200).abs().max() < 3  # bottom half of n02000000_1: grey 200
    assert (raw.test_images[4].int() - 128).abs().max() < 3  # the greyscale JPEG, as RGB

    override(monkeypatch, "tiny_imagenet", 3)
    ds = load_dataset("tiny_imagenet", tmp_path)
    assert ds.class_counts() == [2, 2, 2] and ds.image_shape == (3, 64, 64)
    assert ds.train_images.mean().item() == pytest.approx(normalised_mean(raw.train_images.numpy(), ds.info), abs=1e-5)


def test_tiny_imagenet_errors(tmp_path):
    write_tiny(tmp_path)
    with pytest.raises(DataFilesMissing, match="wnids.txt lists 3 classes, expected 200"):
        load_dataset("tiny_imagenet", tmp_path)

    base = tmp_path / "tiny-imagenet-200"
    (base / "val/images/val_2.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataFilesMissing) as exc:
        data._load_tiny_imagenet(tmp_path, None, num_classes=3)
    assert "tiny-imagenet-200/val/images/val_2.JPEG could not be read" in detail(exc)

    ann = base / "val/val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DataFilesMissing, match="line 6 names no known wnid"):
        data._load_tiny_imagenet(tmp_path, None, num_classes=3)

    ann.unlink()
    with pytest.raises(DataFilesMissing) as exc:
        data._load_tiny_imagenet(tmp_path, None, num_classes=3)
    assert "tiny-imagenet-200/val/val_annotations.txt is missing" in detail(exc)


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]


def three_stripes(colour) -> Image.Image:
    """96×48 stripes black | colour | white; resized to 16 and centre-cropped, the colour is in the middle."""
    array = np.zeros((48, 96, 3), np.uint8)
    array[:, 32:64], array[:, 64:] = colour, 255
    return Image.fromarray(array)


def write_imagenet(root: Path) -> None:
    for split, n in (("train", 2), ("val", 1)):
        for c, w in enumerate(IMAGENET_WNIDS):
            for k in range(n):
                save_jpeg(three_stripes(COLOURS[c]), root / "imagenet" / split / w / f"{w}_{k}.JPEG")


def test_imagenet_resizes_and_crops(tmp_path, monkeypatch):
    import torchvision.transforms.functional as TF

    write_imagenet(tmp_path)
    (tmp_path / "imagenet/train" / IMAGENET_WNIDS[0] / "notes.txt").write_text("not an image")
    raw = data._load_imagenet(tmp_path, 16, num_classes=3)
    assert raw.class_names == IMAGENET_WNIDS
    assert raw.train_images.shape == (6, 3, 16, 16) and raw.test_images.shape == (3, 3, 16, 16)
    assert raw.train_images.dtype == torch.uint8
    assert raw.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and raw.test_labels.tolist() == [0, 1, 2]
    path = tmp_path / "imagenet/val" / IMAGENET_WNIDS[2] / f"{IMAGENET_WNIDS[2]}_0.JPEG"
    with Image.open(path) as image:  # exactly torchvision's Resize(16) + CenterCrop(16)
        expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image.convert("RGB"), 16), 16))
    assert torch.equal(raw.test_images[2], expected)
    for img, c in zip(raw.train_images, raw.train_labels):
        centre = img[:, 4:12, 6:10].float().mean(dim=(1, 2))
        assert (centre - torch.tensor(COLOURS[c])).abs().max() < 4
        assert img[:, :, 0].float().mean() < 20 and img[:, :, -1].float().mean() > 235  # black left, white right

    assert data._load_imagenet(tmp_path, None, num_classes=3).train_images.shape == (6, 3, 64, 64)  # default 64

    override(monkeypatch, "imagenet", 3)
    ds = load_dataset("imagenet", tmp_path, resolution=16)
    assert ds.image_shape == (3, 16, 16) and ds.class_counts() == [2, 2, 2]


def test_imagenet_errors(tmp_path):
    write_imagenet(tmp_path)
    with pytest.raises(DataFilesMissing, match="imagenet/train/ holds 3 class folders, expected 1000"):
        load_dataset("imagenet", tmp_path)

    (tmp_path / "imagenet/val/n09999999").mkdir()
    with pytest.raises(DataFilesMissing, match="imagenet/val/ holds class folders absent from train: n09999999"):
        data._load_imagenet(tmp_path, 16, num_classes=3)
    (tmp_path / "imagenet/val/n09999999").rmdir()

    bad = tmp_path / "imagenet/train" / IMAGENET_WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataFilesMissing) as exc:
        data._load_imagenet(tmp_path, 16, num_classes=3)
    assert f"imagenet/train/{IMAGENET_WNIDS[1]}/broken.JPEG could not be read" in detail(exc)
    bad.unlink()

    for p in (tmp_path / "imagenet/val").rglob("*.JPEG"):
        p.unlink()
    with pytest.raises(DataFilesMissing, match="imagenet/val/ could not be read"):
        data._load_imagenet(tmp_path, 16, num_classes=3)


# ----------------------------------------------------------------------------------------------------------------
# Downsampled ImageNet 64×64 (npz)


def imagenet64_batch(labels: list[int], seed: int) -> dict[str, np.ndarray]:
    rows = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 12288), dtype=np.uint8)
    rows[0] = np.arange(12288) % 241  # known image: R plane, G plane, B plane, each row-major 64×64
    return {"data": rows, "labels": labels, "mean": rows.mean(axis=0)}


def write_imagenet64(root: Path, release_folders: bool = False) -> None:
    train = root / "imagenet64" / ("Imagenet64_train_npz" if release_folders else "")
    val = root / "imagenet64" / ("Imagenet64_val_npz" if release_folders else "")
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for k in range(1, 11):
        np.savez(train / f"train_data_batch_{k}.npz", **imagenet64_batch([k, 1000, 1], k))
    batch = imagenet64_batch([500, 1, 2, 1000], 0)
    np.savez(val / "val_data.npz", data=batch["data"], labels=batch["labels"])


@pytest.mark.parametrize("release_folders", [False, True])
def test_imagenet64_loads(tmp_path, release_folders):
    write_imagenet64(tmp_path, release_folders)
    raw = get_dataset_info("imagenet64").loader(tmp_path, None)
    assert raw.train_images.shape == (30, 3, 64, 64) and raw.test_images.shape == (4, 3, 64, 64)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    known = torch.from_numpy((np.arange(12288) % 241).astype(np.uint8).reshape(3, 64, 64))
    assert torch.equal(raw.train_images[0], known) and torch.equal(raw.train_images[27], known)
    assert raw.train_images[0, 1, 2, 3].item() == (4096 + 2 * 64 + 3) % 241  # G plane, row 2, column 3
    assert raw.train_labels[:6].tolist() == [0, 999, 0, 1, 999, 0]  # 1-indexed → 0-indexed
    assert raw.test_labels.tolist() == [499, 0, 1, 999]
    assert len(raw.class_names) == 1000

    ds = load_dataset("imagenet64", tmp_path)
    assert ds.num_classes == 1000 and ds.class_counts()[999] == 10
    assert ds.test_images.mean().item() == pytest.approx(normalised_mean(raw.test_images.numpy(), ds.info), abs=1e-5)


def test_imagenet64_missing_batches(tmp_path):
    write_imagenet64(tmp_path)
    (tmp_path / "imagenet64/train_data_batch_7.npz").unlink()
    (tmp_path / "imagenet64/val_data.npz").unlink()
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset("imagenet64", tmp_path)
    assert detail(exc).startswith("dataset 'imagenet64': missing train_data_batch_7.npz, val_data.npz (looked in")


def test_imagenet64_corrupt(tmp_path):
    write_imagenet64(tmp_path)
    path = tmp_path / "imagenet64/train_data_batch_3.npz"
    np.savez(path, data=np.zeros((3, 12288), np.uint8))
    with pytest.raises(DataFilesMissing, match="train_data_batch_3.npz lacks key.s. labels"):
        load_dataset("imagenet64", tmp_path)

    np.savez(path, data=np.zeros((3, 12288), np.uint8), labels=[0, 1, 2])
    with pytest.raises(DataFilesMissing, match="train_data_batch_3.npz .1-indexed.* has labels outside"):
        load_dataset("imagenet64", tmp_path)

    np.savez(path, data=np.zeros((3, 12288), np.uint8), labels=[[1, 2], [3, 4], [5, 6]])  # the data were blamed
    with pytest.raises(DataFilesMissing, match=r"train_data_batch_3.npz .* holds labels of shape \(3, 2\)"):
        load_dataset("imagenet64", tmp_path)

    np.savez(path, data=np.zeros((3, 64, 64, 3), np.uint8), labels=[1, 2, 3])
    with pytest.raises(DataFilesMissing, match=r"train_data_batch_3.npz holds data uint8 \(3, 64, 64, 3\)"):
        load_dataset("imagenet64", tmp_path)

    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataFilesMissing, match="train_data_batch_3.npz could not be read"):
        load_dataset("imagenet64", tmp_path)

    np.save(tmp_path / "imagenet64/val.npy", np.array([{"a": 1}], dtype=object))  # a pickled object array
    (tmp_path / "imagenet64/val.npy").rename(tmp_path / "imagenet64/val_data.npz")
    write_imagenet64(tmp_path / "fresh")
    (tmp_path / "fresh/imagenet64/val_data.npz").write_bytes((tmp_path / "imagenet64/val_data.npz").read_bytes())
    with pytest.raises(DataFilesMissing, match="val_data.npz could not be read"):
        load_dataset("imagenet64", tmp_path / "fresh")


# ----------------------------------------------------------------------------------------------------------------
# Every on-disk dataset


@pytest.mark.parametrize("name", ON_DISK)
def test_empty_root_raises(tmp_path, name):
    with pytest.raises(DataFilesMissing) as exc:
        load_dataset(name, tmp_path)
    assert "missing" in detail(exc)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("name", ON_DISK)
def test_absent_root_raises(tmp_path, name):
    with pytest.raises(DataFilesMissing, match="data root does not exist"):
        load_dataset(name, tmp_path / "nowhere")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataFilesMissing, match="data root is a file, not a folder"):
        load_dataset(name, tmp_path / "a_file")


def test_registered_facts():
    facts = {n: get_dataset_info(n) for n in ON_DISK}
    assert {n: (i.num_classes, i.channels, i.resolution) for n, i in facts.items()} == {
        "mnist": (10, 1, 28), "fashion_mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
        "svhn": (10, 3, 32), "tiny_imagenet": (200, 3, 64), "imagenet": (1000, 3, 64), "imagenet64": (1000, 3, 64),
    }
    assert [n for n, i in facts.items() if i.digit_like] == ["mnist", "svhn"]
    assert all(i.expected_files and i.needs_root and len(i.mean) == i.channels == len(i.std) for i in facts.values())
    assert facts["cifar10"].mean == (0.4914, 0.4822, 0.4465) and facts["svhn"].std == (0.1980, 0.2010, 0.1970)


def test_digits_are_scikit_learns_images_and_split_read_without_importing_it():
    """The loader reads digits.csv.gz itself and draws the split itself; both equal scikit-learn's own functions."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_ix, test_ix = (np.sort(ix) for ix in train_test_split(np.arange(len(bunch.target)), test_size=0.2,
                                                                  stratify=bunch.target, random_state=0))
    raw = data._load_digits(Path("."), None)
    images = torch.tensor(bunch.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    assert torch.equal(raw.train_images, images[train_ix]) and torch.equal(raw.test_images, images[test_ix])
    assert raw.train_labels.tolist() == bunch.target[train_ix].tolist()
    assert raw.test_labels.tolist() == bunch.target[test_ix].tolist()
    probe = "import sys, bench.data; bench.data._load_digits(None, None); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("counts", [[4, 4, 4], [3, 7, 11, 2], [40, 2, 9, 9, 9, 30]])
def test_stratified_split_draws_what_train_test_split_draws(counts, seed):
    """Unequal classes, and tied remainders (three classes of 4 at fraction 0.35: one more training image for one
    of three), which scikit-learn breaks with draws from the same generator."""
    from sklearn.model_selection import train_test_split

    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    for fraction in (0.2, 0.35):
        expected = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
        got = data.stratified_split(labels, fraction, seed)
        assert [ix.tolist() for ix in got] == [np.sort(ix).tolist() for ix in expected]


def test_digits_without_scikit_learn_is_one_line_naming_it(monkeypatch):
    from bench.errors import UserError

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"ships with scikit-learn.*pip install scikit-learn$"):
        data._load_digits(Path("."), None)
