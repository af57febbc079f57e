"""Every registered method, on a tiny problem: shapes, labels, determinism, metadata, no global RNG use.

A method joins this test by registering itself; its ``smoke`` overrides (on top of ``quick``) keep it short.
"""

import pytest
import torch

from bench.data import load_dataset
from bench.registry import create_method, get_method_class, list_methods
from bench.runner import Cell, RunRequest, distill_cell
from methods.base import DistillContext

IPC = 2


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def distill(name, dataset, seed=0):
    cls = get_method_class(name)
    method = create_method(name, quick=True, **cls.smoke)
    ctx = DistillContext(dataset, IPC, "convnet", torch.Generator().manual_seed(seed), torch.device("cpu"), quick=True)
    return method.distill(ctx), cls


@pytest.mark.parametrize("name", list_methods())
def test_method_conformance(name, digits):
    rng_before = torch.get_rng_state()
    out, cls = distill(name, digits)
    assert torch.equal(rng_before, torch.get_rng_state()), "the global RNG was used or reseeded"
    n = len(digits.train_images) if not cls.depends_on_ipc else IPC * digits.num_classes
    assert out.images.shape == (n, *digits.image_shape)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert out.labels.dtype == torch.int64 and out.labels.shape == (n,)
    if cls.depends_on_ipc:
        assert torch.bincount(out.labels, minlength=10).tolist() == [IPC] * 10
    if out.soft_labels is not None:
        assert out.soft_labels.shape == (n, digits.num_classes)
    if out.learned_lr is not None:
        assert out.learned_lr > 0
    again, _ = distill(name, digits)
    assert torch.equal(out.images, again.images), "same seed, different images"
    assert torch.equal(out.labels, again.labels)


@pytest.mark.parametrize("name", list_methods())
def test_harness_metadata(name, digits, tmp_path):
    cls = get_method_class(name)
    request = RunRequest("digits", [name], [IPC], [], [0], tmp_path, quick=True)
    method = create_method(name, quick=True, **cls.smoke)
    out = distill_cell(Cell(name, method, IPC if cls.depends_on_ipc else None, digits), request, torch.device("cpu"), {})
    for key in ("method", "recipe", "config", "quick", "dataset", "transform", "ipc", "distill_arch", "seed", "code_version"):
        assert key in out.metadata
    assert out.metadata["method"] == name and out.metadata["quick"] is True
    assert out.metadata["config"] == method.resolved_config
