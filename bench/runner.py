"""A grid of cells → distilled sets → evaluations → records.

A *cell* is one distillation (method × dataset × ipc × distillation architecture × seed) followed by its
evaluations (one per evaluation architecture, each over every seed) under one protocol; each evaluation
writes one record. ``plan`` checks everything a user can get wrong — names, ipc, data files, whether each
architecture runs at this resolution — before anything is written; ``run`` then executes the cells.

The harness owns seeding here: the distillation generator is derived from (seed, dataset, ipc) — not the
method — so methods that start from real images start from the same ones.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from bench.data import Dataset, load_dataset
from bench.distilled import DistilledSet
from bench.errors import Diverged, UserError
from bench.evaluate import Protocol, evaluate_distilled, get_protocol
from bench.experts import soft_protocol_teacher
from bench.measure import environment_stamp, phase
from bench.models import check_arch, create_network
from bench.registry import create_method, default_recipe, get_method_class, list_methods, split_method_spec
from bench.seeding import generator_for
from bench.store import evaluation_fields, existing_record_ids, record_id, set_fields, stable_hash, write_record

DISTILLED_DIR = "distilled"


@dataclass
class RunRequest:
    dataset: str
    methods: list[str]
    ipcs: list[int]
    eval_archs: list[str]
    seeds: list[int]
    results_dir: Path
    protocol: str = "standard"
    distill_arch: str = "convnet"
    quick: bool = False
    data_root: str | None = None
    device: str = "auto"
    distill_seed: int = 0
    resume: bool = False
    cache_dir: str | None = None
    suite: str | None = None
    method_options: dict = field(default_factory=dict)


@dataclass
class Cell:
    method_spec: str
    method: object
    ipc: int | None  # None: the method ignores ipc (`full`)
    dataset: Dataset


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)


def _check_arch_runs(arch: str, dataset: Dataset) -> None:
    """Build the architecture once and push two images through it, so a misfit fails before any work."""
    check_arch(arch)
    try:
        model = create_network(arch, dataset.num_classes, dataset.channels, dataset.resolution, torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *dataset.image_shape))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"architecture '{arch}' cannot run on {dataset.name} ({dataset.resolution}×{dataset.resolution}): {exc}".splitlines()[0]) from None


def plan(request: RunRequest) -> list[Cell]:
    """Validate the whole request and return its cells; raises ``UserError`` before anything is written."""
    if not request.methods:
        raise UserError("no methods given")
    if not request.seeds:
        raise UserError("no seeds given")
    for ipc in request.ipcs:
        if ipc < 1:
            raise UserError(f"ipc must be at least 1, got {ipc}")
    specs = list_methods() if request.methods == ["all"] else request.methods
    for spec in specs:  # fail fast on a bad name, recipe or option, before any data is read
        create_method(spec, quick=request.quick, **request.method_options.get(spec, {}))
    get_protocol(request.protocol)
    for arch in [request.distill_arch, *request.eval_archs]:
        check_arch(arch)

    datasets: dict[bool, Dataset] = {}
    device = resolve_device(request.device)
    cells = []
    for spec in specs:
        name, recipe = split_method_spec(spec)
        depends_on_ipc = get_method_class(name).depends_on_ipc
        for ipc in request.ipcs if depends_on_ipc else [None]:
            # no recipe named: the method's paper recipe for this dataset and ipc, where it has one
            resolved_spec = spec if recipe or default_recipe(name, request.dataset, ipc) is None else \
                f"{name}.{default_recipe(name, request.dataset, ipc)}"
            method = create_method(resolved_spec, quick=request.quick, **request.method_options.get(spec, {}))
            zca = bool(getattr(method.config, "zca", False))
            if zca not in datasets:
                datasets[zca] = load_dataset(request.dataset, request.data_root, zca=zca, device=device)
            dataset = datasets[zca]
            smallest = min(dataset.class_counts())
            for wanted in request.ipcs:
                if wanted > smallest:
                    raise UserError(
                        f"ipc {wanted} is larger than the smallest class of {dataset.name} ({smallest} training images)"
                    )
            cells.append(Cell(resolved_spec, method, ipc, dataset))
    for dataset in datasets.values():
        for arch in dict.fromkeys([request.distill_arch, *request.eval_archs]):
            _check_arch_runs(arch, dataset.to("cpu") if dataset.device.type != "cpu" else dataset)
    return cells


def _progress(desc: str, total: int | None = None) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr, dynamic_ncols=True)


def log(message: str) -> None:
    """A progress line on stderr that does not break the bars."""
    tqdm.write(message, file=sys.stderr)


def protocol_for(protocol: Protocol, distilled: DistilledSet | None, quick: bool) -> Protocol:
    """The protocol as it runs for this set.

    A method may hand over settings for a protocol in ``metadata["protocol_overrides"][name]`` — APM gives the
    ``soft`` protocol its recipe's ``lr`` and ``epochs`` (Table A9) — and a learned lr (MTT) replaces the lr of
    protocols that accept one. Under ``quick`` the quick epochs stand.
    """
    if distilled is None:
        return protocol.resolve(quick)
    handed = dict((distilled.metadata.get("protocol_overrides") or {}).get(protocol.name) or {})
    resolved = protocol.resolve(quick, None if "lr" in handed else distilled.learned_lr)
    if "lr" in handed:
        resolved = replace(resolved, lr=float(handed["lr"]))
    if "epochs" in handed and not quick:
        resolved = replace(resolved, epochs=int(handed["epochs"]), decay_epoch=int(handed["epochs"]) // 2 + 1)
    return resolved


def cell_metadata(cell: Cell, request: RunRequest) -> dict:
    """What a cell's distilled set is: the metadata it is saved with, and the set fields of its records."""
    return {
        "method": split_method_spec(cell.method_spec)[0],
        "recipe": cell.method.recipe,
        "config": cell.method.resolved_config,
        "quick": request.quick,
        "dataset": cell.dataset.name,
        "transform": cell.dataset.transform,
        "ipc": cell.ipc,
        "distill_arch": request.distill_arch,
        "seed": request.distill_seed,
    }


def distill_cell(cell: Cell, request: RunRequest, device: torch.device, phases: dict) -> DistilledSet:
    """Run the method's distillation for one cell, with a progress bar and NaN detection."""
    from methods.base import DistillContext

    name, _ = split_method_spec(cell.method_spec)
    bar = _progress(f"distill {name} ipc{cell.ipc if cell.ipc is not None else '-'}")

    def start(total: int) -> None:
        bar.reset(total=total)

    def report(iteration: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if losses:
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)

    ctx = DistillContext(
        dataset=cell.dataset,
        ipc=cell.ipc if cell.ipc is not None else 0,
        arch=request.distill_arch,
        generator=generator_for(request.distill_seed, "distill", cell.dataset.name, str(cell.ipc)),
        device=device,
        quick=request.quick,
        cache_dir=request.cache_dir,
        _report=report,
        _start=start,
        _log=log,
    )
    try:
        with phase(phases, "distill", device) as figures:
            distilled = cell.method.distill(ctx)
    finally:
        bar.close()
    if ctx.expert_wall_s:
        phases["experts"] = dict(figures, wall_s=round(ctx.expert_wall_s, 4), trained=ctx.experts_trained)
        figures["wall_s"] = round(figures["wall_s"] - ctx.expert_wall_s, 4)
    stamp = environment_stamp()
    if not torch.isfinite(distilled.images).all():
        raise Diverged("the distilled images contain NaN or infinite values")
    if distilled.learned_lr is not None and not (0 < distilled.learned_lr < float("inf")):
        raise Diverged(f"the learned learning rate is {distilled.learned_lr}")
    distilled.metadata.update(cell_metadata(cell, request), code_version=stamp["ddbench"], git_sha=stamp["git_sha"])
    return distilled


def _identity(cell: Cell, request: RunRequest, eval_arch: str, protocol: Protocol) -> dict:
    return {
        "method": cell.method_spec,
        "config_hash": stable_hash(cell.method.resolved_config),
        "dataset": cell.dataset.name,
        "transform": cell.dataset.transform["kind"],
        "ipc": cell.ipc,
        "distill_arch": request.distill_arch,
        "distill_seed": request.distill_seed,
        "quick": request.quick,
        "eval_arch": eval_arch,
        "protocol": [protocol.name, protocol.version],
        "seeds": request.seeds,
    }


def run(request: RunRequest, echo: Callable[[str], None] = print) -> list[dict]:
    """Plan, then distil and evaluate every cell; returns the records written."""
    cells = plan(request)
    device = resolve_device(request.device)
    protocol = get_protocol(request.protocol)
    done = existing_record_ids(request.results_dir) if request.resume else set()
    environment = environment_stamp()
    teachers: dict[str, torch.nn.Module] = {}
    records = []
    for cell in cells:
        ids = {arch: record_id(_identity(cell, request, arch, protocol)) for arch in request.eval_archs}
        if all(ids[arch] in done for arch in request.eval_archs):
            echo(f"skip {cell.method_spec} ipc {cell.ipc}: records exist (--resume)")
            continue
        phases: dict = {}
        base = dict(set_fields(cell_metadata(cell, request)), suite=request.suite, quick=request.quick,
                    environment=environment)
        distilled, status, error = None, "ok", None
        try:
            distilled = distill_cell(cell, request, device, phases)
            stem = Path(request.results_dir) / DISTILLED_DIR / f"{cell.dataset.name}_ipc{cell.ipc or 'all'}_{cell.method_spec}_{ids[request.eval_archs[0]]}"
            base["distilled_path"] = str(distilled.save(stem))
            base["learned_lr"] = distilled.learned_lr
        except Diverged as exc:
            status, error = "diverged", str(exc)
        except Exception as exc:  # a failing cell must not take the grid down
            status, error = "failed", "".join(traceback.format_exception_only(exc)).strip()
            traceback.print_exc(file=sys.stderr)

        for arch in request.eval_archs:
            if request.resume and ids[arch] in done:
                continue
            resolved = protocol_for(protocol, distilled, request.quick)
            record = dict(base, record_id=ids[arch], status=status, error=error,
                          **evaluation_fields(arch, protocol, resolved, request.seeds))
            cell_phases = dict(phases)
            if distilled is not None:
                try:
                    bar = _progress(f"evaluate {arch} × {len(request.seeds)} seeds", resolved.epochs * len(request.seeds))
                    teacher = None
                    if resolved.targets == "soft" and distilled.soft_labels is None:
                        key = cell.dataset.transform["kind"]
                        if key not in teachers:
                            teachers[key] = soft_protocol_teacher(cell.dataset, request.distill_arch, request.quick,
                                                                  device, request.cache_dir, log)
                        teacher = teachers[key]
                    with phase(cell_phases, "eval", device):
                        result = evaluate_distilled(distilled, cell.dataset, arch, resolved, request.seeds, device,
                                                    teacher=teacher, on_epoch=lambda e, l: bar.update(1))
                    bar.close()
                    record.update(evaluation_fields(arch, protocol, resolved, request.seeds, result))
                except Exception as exc:
                    record.update(status="failed", error="".join(traceback.format_exception_only(exc)).strip())
                    traceback.print_exc(file=sys.stderr)
            record["phases"] = cell_phases
            path = write_record(request.results_dir, record)
            records.append(record)
            summary = (f"{record['acc_mean']:.2f} ± {record['acc_std']:.2f} (n={len(record['acc'])})"
                       if record["status"] == "ok" else f"{record['status']}: {record['error']}")
            echo(f"{cell.dataset.name} ipc {cell.ipc if cell.ipc is not None else 'all'} {cell.method_spec} → "
                 f"{arch} [{protocol.name}{', quick' if request.quick else ''}]: {summary}  ({path})")
    return records
