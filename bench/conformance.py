"""The conformance check every method passes: ``ddbench check NAME`` for a plugin's author, and the test suite's
``tests/test_conformance.py`` for the built-ins — the same checks.

On a tiny problem (digits, ipc 2, CPU, the method's ``quick`` recipe with its ``smoke`` overrides on top) the
method distils twice from one seed, and its set must have the shapes, dtypes and labels the harness relies on,
be the same both times, leave the global torch RNG alone, and carry the metadata every record is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IPC = 2
HARNESS_METADATA = ("method", "recipe", "config", "quick", "dataset", "transform", "ipc", "distill_arch", "seed",
                    "code_version")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


def _distill(name: str, dataset, cache_dir: str | None, seed: int = 0):
    from bench.registry import create_method, get_method_class
    from methods.base import DistillContext

    method = create_method(name, quick=True, **get_method_class(name).smoke)
    ctx = DistillContext(dataset, IPC, "convnet", torch.Generator().manual_seed(seed), torch.device("cpu"),
                         quick=True, cache_dir=cache_dir)
    return method.distill(ctx)


def check_method(name: str, dataset=None, cache_dir: str | None = None) -> list[Check]:
    """Every conformance check of the registered method ``name``, in order; a method that raises fails the first
    check it reaches and the rest are not run. ``dataset``: digits unless given (a loaded ``bench.data.Dataset``)."""
    from bench.data import load_dataset
    from bench.registry import create_method, get_method_class
    from bench.runner import Cell, RunRequest, distill_cell

    cls = get_method_class(name)  # an unknown name is a UserError before anything runs
    dataset = dataset if dataset is not None else load_dataset("digits")
    checks: list[Check] = []

    def check(label: str, passed: bool, detail: str = "") -> bool:
        checks.append(Check(label, bool(passed), "" if passed else detail))
        return bool(passed)

    rng_before = torch.get_rng_state()
    try:
        out = _distill(name, dataset, cache_dir)
    except Exception as exc:  # noqa: BLE001 — the method's own failure is the finding
        check("distils digits at ipc 2", False, f"{type(exc).__name__}: {exc}")
        return checks
    check("distils digits at ipc 2", True)
    check("leaves the global torch RNG alone", torch.equal(rng_before, torch.get_rng_state()),
          "the global RNG was used or reseeded: draw from ctx.generator instead")
    n = IPC * dataset.num_classes if cls.depends_on_ipc else len(dataset.train_images)
    shape = (n, *dataset.image_shape)
    check("images have shape (n, C, H, W)", tuple(out.images.shape) == shape,
          f"expected {shape}, got {tuple(out.images.shape)}")
    check("images are finite float32", out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all()),
          f"dtype {out.images.dtype}, {int((~torch.isfinite(out.images)).sum())} non-finite values")
    labels_ok = out.labels.dtype == torch.int64 and tuple(out.labels.shape) == (n,)
    check("labels are int64 of shape (n,)", labels_ok, f"dtype {out.labels.dtype}, shape {tuple(out.labels.shape)}")
    if labels_ok and cls.depends_on_ipc:
        in_range = bool(((out.labels >= 0) & (out.labels < dataset.num_classes)).all())
        counts = torch.bincount(out.labels.clamp(0, dataset.num_classes - 1), minlength=dataset.num_classes).tolist()
        check(f"{IPC} images of each class", in_range and counts == [IPC] * dataset.num_classes,
              f"images per class {counts}" + ("" if in_range else ", and labels outside 0…num_classes-1"))
    if out.soft_labels is not None:
        expected = (n, dataset.num_classes)
        check("soft labels have shape (n, classes)", tuple(out.soft_labels.shape) == expected,
              f"expected {expected}, got {tuple(out.soft_labels.shape)}")
    if out.learned_lr is not None:
        check("learned lr is positive", out.learned_lr > 0, f"learned_lr = {out.learned_lr}")
    again = _distill(name, dataset, cache_dir)
    check("the same seed gives the same set", torch.equal(out.images, again.images) and torch.equal(out.labels, again.labels),
          "a second distillation from seed 0 differs: seed every draw from ctx.generator")

    method = create_method(name, quick=True, **cls.smoke)
    request = RunRequest(dataset.name, [name], [IPC], [], [0], Path("."), quick=True, cache_dir=cache_dir)
    cell = Cell(name, method, IPC if cls.depends_on_ipc else None, dataset)
    metadata = distill_cell(cell, request, torch.device("cpu"), {}).metadata
    missing = [key for key in HARNESS_METADATA if key not in metadata]
    check("the harness records its metadata", not missing and metadata.get("method") == name
          and metadata.get("quick") is True and metadata.get("config") == method.resolved_config,
          f"missing {missing}" if missing else "method, quick or config differ from what was asked")
    return checks
