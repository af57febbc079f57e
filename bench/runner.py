"""A grid of cells → distilled sets → evaluations → records.

A *cell* is one distillation (method × dataset × ipc × distillation architecture × seed) followed by its
evaluations (one per protocol × evaluation architecture, each over every seed); each evaluation writes one record.
A set is distilled once however many protocols evaluate it: the cells of a run's requests that differ only in
their protocol and evaluation architectures (a suite's ``protocols: [standard, soft]``, or two of its grids) are
run as one (``merge_protocols``). ``plan`` checks everything a user can get wrong — names, ipc, data files, whether
each architecture runs at this resolution — before anything is written; ``run`` then executes the cells.

The harness owns seeding here: the distillation generator is derived from (seed, dataset, ipc) — not the
method — so methods that start from real images start from the same ones.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.data import DATASETS, Dataset, from_other_files, load_dataset, resolve_data_root
from bench.distilled import DistilledSet, content_hash
from bench.errors import Diverged, UserError
from bench.evaluate import BATCH_SEEDS_CHOICES, Protocol, evaluate_distilled, get_protocol, protocol_label
from bench.experts import check_cache_dir, resolve_cache_dir, soft_protocol_teacher, soft_targets_source
from bench.measure import (DEFAULT_SAMPLE_INTERVAL_S, FlopCounter, MemorySampler, environment_stamp, iteration_stats,
                           phase, process_peak_rss_mb)
from bench.models import attention_with_second_derivative, check_arch, create_network
from bench.progress import log, progress_bar
from bench.registry import (create_method, default_recipe, get_method_class, list_methods, method_origin, nearest_name,
                            setting_recipe_names, split_method_spec)
from bench.seeding import generator_for
from bench.store import (CHECKPOINTS_DIR, DISTILLED_DIR, RECORDS_DIR, check_results_dir, evaluation_fields,
                         existing_records, record_id, remove_stale_temporaries, set_fields, stable_hash, write_record,
                         writing_results)

if TYPE_CHECKING:
    from methods.base import Part

ITERATION_WARMUP = 2  # iterations left out of the per-iteration time statistics
MAX_CELLS_UNCONFIRMED = 200  # a larger grid (cells × evaluation architectures) runs only with --yes: likely a typo
INTERRUPTED_ERROR = "interrupted by the user (Ctrl-C)"


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
    method_labels: dict = field(default_factory=dict)  # spec → row label in reports (a suite's variant names)
    eval_epochs: int | None = None  # a smoke test's override of the protocol's epochs (recorded, part of the identity)
    isolate: bool = True  # each cell in a fresh child process (its own memory peaks; a crash costs one cell)
    checkpoint_every: int | None = None  # save a resumable distillation state every N iterations (None: never)
    batch_seeds: str = "auto"  # train an evaluation's seeds at once: auto / on / off (not part of the identity)
    executor: str = "local"  # where cells run: "local" (this machine) or "ray" (a Ray cluster); see bench.executors
    ray_address: str = "auto"  # with the ray executor: a running cluster's HOST:PORT, or auto
    ray_resources: dict = field(default_factory=dict)  # with the ray executor: each cell task's num_cpus / num_gpus
    jobs: int = 1  # CPU runs, local executor: cells run side by side, each with cores // jobs torch threads
    memory_sample_s: float = DEFAULT_SAMPLE_INTERVAL_S  # the NVML sampler's interval (recorded beside its peaks)


class Evaluation(NamedTuple):
    """One evaluation of a cell's set, and one record: a protocol on an architecture (None: a cost-only cell,
    distilled and not evaluated)."""
    protocol: str
    arch: str | None


@dataclass
class Cell:
    method_spec: str
    method: object
    ipc: int | None  # None: the method ignores ipc (`full`)
    dataset: Dataset
    label: str | None = None  # the row label in reports (default: the method spec as given)

    @property
    def dataset_name(self) -> str:
        return self.dataset.name

    @property
    def transform_kind(self) -> str:
        return self.dataset.transform["kind"]


@dataclass
class DescribedCell:
    """A cell as ``ddbench validate`` sees it, without its data: what its records' identities need."""
    method_spec: str
    method: object
    ipc: int | None
    dataset_name: str
    transform_kind: str
    label: str | None = None


def works_in_zca_space(method: object) -> bool:
    """Whether a method distils (and its sets are evaluated) in ZCA-whitened space: its config's ``zca``."""
    return bool(getattr(method.config, "zca", False))


def check_device_name(device: str) -> None:
    """A ``UserError`` for a device string that names no device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        near = nearest_name(device.partition(":")[0], ["auto", "cpu", "cuda"])
        hint = f"; did you mean '{near}'?" if near else ""
        raise UserError(f"unknown device '{device}': expected auto, cpu, cuda or cuda:N{hint}")


def resolve_device(device: str) -> torch.device:
    """The device a ``--device`` names on this machine; a ``UserError`` for a CUDA device it does not have."""
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"device '{device}' requested but CUDA is not available ({why}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"device '{device}' requested but this machine shows {count} CUDA "
                            f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return parsed


def _check_arch_runs(arch: str, dataset: Dataset) -> torch.nn.Module:
    """Build the architecture once and push two images through it, so a misfit fails before any work; returns
    the network."""
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
    return model


def reject_repeats(values: list, what: str) -> None:
    """A ``UserError`` when a list of the request names one value twice: a repeated seed would train and count one
    network twice, a repeated ipc, method or architecture would run a cell twice and overwrite its record."""
    seen = set()
    for value in values:
        if value in seen:
            raise UserError(f"{what} {value} is named twice in {', '.join(map(str, values))}; name each once")
        seen.add(value)


def reject_negative_seeds(seeds: Iterable[int], what: str) -> None:
    """Seeds are 0 or more, as in a suite file: a negative one would run, under a name no table expects."""
    for seed in seeds:
        if seed < 0:
            raise UserError(f"{what} {seed}: seeds are 0 or more")


def check_request(request: RunRequest) -> list[str]:
    """Check every name and option of a request without reading data; returns its method specs."""
    if not request.methods:
        raise UserError("no methods given")
    if not request.ipcs:
        raise UserError("no ipc given: --ipc expects comma-separated integers, e.g. --ipc 1,10")
    if request.eval_archs and not request.seeds:
        raise UserError("no seeds given: --seeds expects comma-separated integers, e.g. --seeds 0,1,2")
    for values, what in ((request.methods, "method"), (request.ipcs, "ipc"), (request.seeds, "seed"),
                         (request.eval_archs, "evaluation architecture")):
        reject_repeats(values, what)
    for ipc in request.ipcs:
        if ipc < 1:
            raise UserError(f"ipc must be at least 1, got {ipc}")
    reject_negative_seeds(request.seeds, "evaluation seed")
    reject_negative_seeds([request.distill_seed], "distillation seed")
    if request.eval_epochs is not None and request.eval_epochs < 1:
        raise UserError(f"--eval-epochs must be at least 1, got {request.eval_epochs}")
    if request.checkpoint_every is not None and request.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be at least 1 iteration, got {request.checkpoint_every}")
    if not request.memory_sample_s > 0:
        raise UserError(f"--memory-sample-ms must be above 0, got {request.memory_sample_s * 1000:g}")
    if request.batch_seeds not in BATCH_SEEDS_CHOICES:
        raise UserError(f"--batch-seeds must be one of {', '.join(BATCH_SEEDS_CHOICES)}, got {request.batch_seeds!r}")
    check_device_name(request.device)
    DATASETS.get(request.dataset)
    specs = list_methods() if request.methods == ["all"] else request.methods
    for spec in specs:  # fail fast on a bad name, recipe or option, before any data is read
        create_method(spec, quick=request.quick, **request.method_options.get(spec, {}))
    get_protocol(request.protocol)
    for arch in [request.distill_arch, *request.eval_archs]:
        check_arch(arch)
    from bench.executors import check_executor, check_jobs

    check_executor(request)
    if request.executor == "local" and request.device != "auto":  # a cluster's nodes may have the GPUs this one lacks
        resolve_device(request.device)
    check_jobs(request)
    return specs


def resolved_methods(request: RunRequest, spec: str) -> list[tuple[str, int | None]]:
    """(spec with the recipe picked for the setting, ipc) for every ipc of ``spec`` in the request.

    No recipe named: the method's paper recipe for this dataset and ipc (``<dataset>_ipc<k>``), where it has one.
    """
    name, recipe = split_method_spec(spec)
    cells = []
    for ipc in request.ipcs if get_method_class(name).depends_on_ipc else [None]:
        picked = None if recipe else default_recipe(name, request.dataset, ipc)
        cells.append((f"{name}.{picked}" if picked else spec, ipc))
    return cells


def recipe_elsewhere_note(spec: str, dataset: str, ipc: int | None) -> str | None:
    """A note when ``spec`` names a recipe written for another setting (``<dataset>_ipc<k>[_…]``) than the cell's:
    allowed (ablations run a recipe elsewhere on purpose), but said, since nothing else in the output shows it."""
    _, recipe = split_method_spec(spec)
    written_for = re.fullmatch(r"(?P<dataset>.+?)_ipc(?P<ipc>\d+)(?:_.*)?", recipe or "")
    if written_for is None or ipc is None:
        return None
    if f"{written_for['dataset']}_ipc{int(written_for['ipc'])}" in setting_recipe_names(dataset, ipc):
        return None
    return (f"note: recipe {spec} was written for {written_for['dataset']} at ipc {written_for['ipc']}; "
            f"it runs here on {dataset} at ipc {ipc}, as asked")


def recipe_notes(planned: list[tuple[RunRequest, list[Cell]]]) -> list[str]:
    """``recipe_elsewhere_note`` of every planned cell asked for on the command line: a suite's YAML shows its
    choices, the command line does not."""
    notes = (recipe_elsewhere_note(cell.method_spec, request.dataset, cell.ipc)
             for request, cells in planned if not request.suite for cell in cells)
    return [note for note in notes if note]


def cells_run_elsewhere(request: RunRequest) -> bool:
    """Whether the request's cells run in processes of their own (``isolate``, or Ray tasks), each loading its data:
    then this process needs the data only to plan, on the CPU, and keeps only its description."""
    return request.isolate or request.executor != "local"


def plan(request: RunRequest, loaded: dict | None = None) -> list[Cell]:
    """Validate the whole request and return its cells; raises ``UserError`` before anything is written.

    ``loaded`` (a dict the caller keeps while it plans several requests, a suite's) shares each dataset loaded
    here between requests, so that a suite's requests on one dataset hold one copy of it, not one each."""
    specs = check_request(request)
    loaded = {} if loaded is None else loaded
    datasets: dict[bool, Dataset] = {}
    # cells that run elsewhere load their own data on their own device: here it only describes them
    device = torch.device("cpu") if cells_run_elsewhere(request) else resolve_device(request.device)
    cells = []
    for spec in specs:
        for resolved_spec, ipc in resolved_methods(request, spec):
            method = create_method(resolved_spec, quick=request.quick, **request.method_options.get(spec, {}))
            zca = works_in_zca_space(method)
            if zca not in datasets:
                key = (request.dataset, str(resolve_data_root(request.data_root)), zca, str(device))
                if key not in loaded:
                    loaded[key] = load_dataset(request.dataset, request.data_root, zca=zca, device=device)
                datasets[zca] = loaded[key]
            dataset = datasets[zca]
            smallest = min(dataset.class_counts())
            for wanted in request.ipcs:
                if wanted > smallest:
                    raise UserError(
                        f"ipc {wanted} is larger than the smallest class of {dataset.name} ({smallest} training images)"
                        + (f", in suite {request.suite}" if request.suite else "")
                    )
            cells.append(Cell(resolved_spec, method, ipc, dataset, request.method_labels.get(spec, spec)))
    for dataset in datasets.values():
        networks = {arch: _check_arch_runs(arch, dataset.to("cpu") if dataset.device.type != "cpu" else dataset)
                    for arch in dict.fromkeys([request.distill_arch, *request.eval_archs])}
        for cell in cells:
            if cell.dataset is dataset:
                try:
                    cell.method.check_network(networks[request.distill_arch])
                except UserError as exc:
                    raise UserError(f"{cell.method_spec} cannot distil with '{request.distill_arch}': {exc}") from None
    if request.executor == "local":  # last, as it creates the folder; a Ray task uses its node's cache folder
        check_cache_dir(request.cache_dir)
    return cells


def plan_all(requests: list[RunRequest]) -> list[tuple[RunRequest, list[Cell]]]:
    """Every request planned (a suite's, or a command line's one per protocol), loading each dataset (with each
    transform) once for all of them; the shared loads end with this function, so what is left of them is what the
    planned cells hold (and ``run_planned`` lets go of where cells load their own)."""
    loaded: dict = {}
    return [(request, plan(request, loaded)) for request in requests]


def grid_size(requests: list[RunRequest]) -> int:
    """How many records the requests will write (cells × evaluation architectures), counted without reading data."""
    return sum(len(resolved_methods(request, spec)) * max(1, len(request.eval_archs))
               for request in requests for spec in check_request(request))


def check_grid_size(requests: list[RunRequest], confirmed: bool) -> int:
    """The grid's size (``grid_size``); a ``UserError`` above ``MAX_CELLS_UNCONFIRMED`` unless ``confirmed`` (--yes)."""
    size = grid_size(requests)
    if size > MAX_CELLS_UNCONFIRMED and not confirmed:
        raise UserError(f"this grid has {size} cells (cells × evaluation architectures, more than "
                        f"{MAX_CELLS_UNCONFIRMED}); pass --yes to run it")
    return size


def summarize(records: list[dict], skipped: int, results_dir: str | Path) -> str:
    """One paragraph for the end of a run: how many records (one per cell × evaluation architecture) ended in each
    status, and how many --resume skipped."""
    counts = {status: 0 for status in ("ok", "failed", "oom", "diverged")}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    total = len(records) + skipped
    text = (f"{total} record{'' if total == 1 else 's'}: {', '.join(f'{n} {status}' for status, n in counts.items())}, "
            f"{skipped} skipped by --resume; in {Path(results_dir) / RECORDS_DIR}.")
    if any(record["status"] != "ok" for record in records):
        text += " A record that did not end ok keeps its error; --resume reruns its cell."
    return text


def protocol_for(protocol: Protocol, distilled: DistilledSet | None, quick: bool, epochs: int | None = None) -> Protocol:
    """The protocol as it runs for this set.

    A method may hand over settings for a protocol in ``metadata["protocol_overrides"][name]`` — APM gives the
    ``soft`` protocol its recipe's ``lr`` and ``epochs`` (Table A9), TESLA its ``loss`` (cross-entropy on the
    softmax of its soft labels, as its official evaluation trains) — and a learned lr (MTT) replaces the lr of
    protocols that accept one. Under ``quick`` the quick epochs stand, unless the method hands over
    ``quick_epochs`` (``full``: the whole training set needs fewer passes than a few images). ``epochs`` (a smoke
    test's ``--eval-epochs``) overrides them all.
    """
    if epochs is not None:
        return replace(protocol_for(protocol, distilled, quick), epochs=epochs, decay_epoch=epochs // 2 + 1)
    if distilled is None:
        return protocol.resolve(quick)
    handed = dict((distilled.metadata.get("protocol_overrides") or {}).get(protocol.name) or {})
    resolved = protocol.resolve(quick, None if "lr" in handed else distilled.learned_lr)
    if "lr" in handed:
        resolved = replace(resolved, lr=float(handed["lr"]))
    if "loss" in handed:
        resolved = replace(resolved, loss=str(handed["loss"]))
    handed_epochs = handed.get("quick_epochs") if quick else handed.get("epochs")
    if handed_epochs is not None:
        resolved = replace(resolved, epochs=int(handed_epochs), decay_epoch=int(handed_epochs) // 2 + 1)
    return resolved


def cell_metadata(cell: Cell, request: RunRequest) -> dict:
    """What a cell's distilled set is: the metadata it is saved with, and the set fields of its records."""
    return {
        "method": split_method_spec(cell.method_spec)[0],
        "method_origin": method_origin(split_method_spec(cell.method_spec)[0]),
        "recipe": cell.method.recipe,
        "config": cell.method.resolved_config,
        "quick": request.quick,
        "dataset": cell.dataset.name,
        "transform": cell.dataset.transform,
        "data_fingerprint": cell.dataset.fingerprint,
        "ipc": cell.ipc,
        "distill_arch": request.distill_arch,
        "seed": request.distill_seed,
    }


class IterationMeter:
    """Times every iteration the method reports and counts the FLOPs of one window of iterations.

    The window is one ``period`` (the method's repeating unit: APM trains a new student every ``mid_gap + 1``
    iterations, so its iterations alternate long and short); it starts at the first period boundary after
    ``warmup`` iterations, and its iterations are left out of the timing statistics, since counting FLOPs slows
    them down. Warm-up iterations are dropped too. With a period longer than one, the time per iteration is that
    of whole periods (period time / period), so the long iterations are neither hidden by a median nor missed;
    the iterations that do not begin a period are also summarised apart (``rest_of_period``).
    The window's own wall time is kept too (``flop_window_s``): beside ``period × median`` it shows what counting
    cost, measured in the same run.
    """

    def __init__(self, device: torch.device, period: int = 1, warmup: int = ITERATION_WARMUP):
        self.device, self.period, self.warmup = device, max(1, period), warmup
        self.reported = 0
        self.durations: dict[int, float] = {}  # iteration index → seconds, outside the counting window
        self.counter = FlopCounter()
        self.flops: int | None = None
        self.flop_reason: str | None = "the method reported no iterations"
        self._flop_start = 0
        self._counting = self._counted = False
        self._window_began: float | None = None
        self.flop_window_s: float | None = None
        self._last = time.perf_counter()

    def start(self, total: int) -> None:
        first_boundary = -(-self.warmup // self.period) * self.period
        self._flop_start = min(first_boundary, max(0, total - self.period))
        self._last = time.perf_counter()
        self._maybe_begin_count()

    def iteration_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.reported += 1
        if self._counting:
            if self.reported == self._flop_start + self.period:
                self.flops, self.flop_reason = self.counter.stop(), self.counter.reason
                self._counting = False
                self.flop_window_s = time.perf_counter() - self._window_began
        else:
            self.durations[self.reported - 1] = now - self._last
        self._maybe_begin_count()
        self._last = time.perf_counter()

    def _maybe_begin_count(self) -> None:
        if not self._counted and self.reported == self._flop_start:
            self._counting = self._counted = True
            self._window_began = time.perf_counter()
            self.counter.start()

    def _time_per_iteration(self) -> dict:
        if self.period == 1:
            return iteration_stats([self.durations[i] for i in sorted(self.durations)], self.warmup)
        whole_periods = []
        for start in range(0, self.reported, self.period):
            indices = range(start, start + self.period)
            if start >= self.warmup and all(i in self.durations for i in indices):
                whole_periods.append(sum(self.durations[i] for i in indices) / self.period)
        if not whole_periods:  # too short a run for one whole timed period: every timed iteration
            return dict(iteration_stats([self.durations[i] for i in sorted(self.durations)], self.warmup), per_period=None)
        # the iterations that do not begin a period (APM: image steps without a student's training), timed apart
        rest = [self.durations[i] for i in sorted(self.durations) if i % self.period and i - i % self.period >= self.warmup]
        return dict(iteration_stats(whole_periods, 0), per_period=self.period, rest_of_period=iteration_stats(rest, 0))

    def fields(self) -> dict:
        if self._counting:  # the method stopped inside the window
            self.counter.stop()
            self._counting = False
            self.flop_reason = f"the run ended inside the {self.period}-iteration FLOP-counting window"
        return {
            "iterations": self.reported,
            "iter_time_s": dict(self._time_per_iteration(), flop_window_s=self.flop_window_s),
            "flops_per_iter": None if self.flops is None else self.flops // self.period,
            "flops_reason": None if self.flops is not None else self.flop_reason,
        }


def distill_cell(cell: Cell, request: RunRequest, device: torch.device, phases: dict, part: Part | None = None) -> DistilledSet:
    """Run the method's distillation for one cell, with a progress bar, NaN detection and measurement.

    ``phases`` receives ``distill`` (and ``experts`` when the method uses them; the distill phase excludes it)
    and ``phases["_iterations"]`` the iteration statistics.

    With ``request.checkpoint_every``, a method that supports it saves its loop state under
    ``<results_dir>/checkpoints/`` every that many iterations, resumes from it when the cell is run again after a
    crash or kill (its iteration statistics then cover the resumed part only, and the set's metadata says
    ``resumed_from``), and the checkpoint is deleted once the distillation has returned.

    With ``part`` (one of ``cell.method.split``'s), only that part is distilled — its method, its ipc, a
    generator seeded by its seed — and its raw set is returned, for ``merge_parts`` to join.
    """
    from bench.checkpoint import Checkpointer
    from methods.base import DistillContext

    name, _ = split_method_spec(cell.method_spec)
    method, ipc = (cell.method, cell.ipc) if part is None else (part.method, part.ipc)
    bar = progress_bar(f"distill {name} ipc{ipc if ipc is not None else '-'}")
    meter = IterationMeter(device, getattr(method, "iteration_period", 1))

    def start(total: int) -> None:
        bar.reset(total=total)
        meter.start(total)

    def report(iteration: int, losses: dict[str, float]) -> None:
        meter.iteration_done()
        bar.update(1)
        if losses:
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)

    checkpoints = None
    if request.checkpoint_every is not None and part is None:
        config_hash = stable_hash(cell.method.resolved_config)
        folder = (Path(request.results_dir) / CHECKPOINTS_DIR /
                  f"{cell.dataset.name}_ipc{cell.ipc or 'all'}_{cell.method_spec}_{config_hash}_seed{request.distill_seed}")
        checkpoints = Checkpointer(folder, request.checkpoint_every, cell_metadata(cell, request), log)

    ctx = DistillContext(
        dataset=cell.dataset,
        ipc=ipc if ipc is not None else 0,
        arch=request.distill_arch,
        generator=distill_generator(cell, request) if part is None else torch.Generator().manual_seed(part.seed),
        device=device,
        quick=request.quick,
        cache_dir=request.cache_dir,
        checkpoints=checkpoints,
        _report=report,
        _start=start,
        _log=log,
        _phase=lambda phase_name: phase(phases, phase_name, device, request.memory_sample_s),
    )
    try:
        with phase(phases, "distill", device, request.memory_sample_s), (
                attention_with_second_derivative() if method.second_order else nullcontext()):
            distilled = method.distill(ctx)
    finally:
        bar.close()
        phases["_iterations"] = meter.fields()  # also leaves a FLOP-counting window the method raised inside
    if checkpoints is not None:
        checkpoints.clear()
    if "experts" in phases:
        phases["experts"].update(trained=ctx.experts_trained, cached=ctx.experts_cached)
    if part is not None:
        return distilled
    if ctx.resumed_from is not None:
        distilled.metadata["resumed_from"] = ctx.resumed_from
    return checked_set(distilled, cell, request)


def distill_generator(cell: Cell, request: RunRequest) -> torch.Generator:
    """The generator of a cell's distillation (fresh each call): the distillation seed, dataset and ipc."""
    return generator_for(request.distill_seed, "distill", cell.dataset.name, str(cell.ipc))


def checked_set(distilled: DistilledSet, cell: Cell, request: RunRequest) -> DistilledSet:
    """A finished cell's set, checked for divergence (``Diverged``), with the cell's metadata added."""
    stamp = environment_stamp()
    if not torch.isfinite(distilled.images).all():
        raise Diverged("the distilled images contain NaN or infinite values")
    if distilled.learned_lr is not None and not (0 < distilled.learned_lr < float("inf")):
        raise Diverged(f"the learned learning rate is {distilled.learned_lr}")
    distilled.metadata.update(cell_metadata(cell, request), code_version=stamp["ddbench"], git_sha=stamp["git_sha"])
    return distilled


def merge_parts(cell: Cell, request: RunRequest, parts: list[tuple[DistilledSet, dict]], phases: dict) -> DistilledSet:
    """Join the parts of a split distillation (``Method.split``; each ``(set, its phases)`` from
    ``distill_cell(part=…)``, distilled wherever the executor ran them) into the cell's set, and fill ``phases``
    as one distillation's: times and iterations add up, memory peaks are the largest part's, and
    ``distill.part_wall_s`` keeps each part's time (run in parallel, the cell took about the longest)."""
    for name in ("experts", "distill"):
        measured = [part_phases[name] for _, part_phases in parts if name in part_phases]
        if not measured:
            continue
        merged = dict(measured[0])
        for key in merged:
            values = [m[key] for m in measured if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
            if values and isinstance(merged[key], (int, float)) and not isinstance(merged[key], bool):
                merged[key] = sum(values) if key in ("wall_s", "trained", "cached") else max(values)
        if name == "distill":
            merged["part_wall_s"] = [m.get("wall_s") for m in measured]
        phases[name] = merged
    stats = [part_phases["_iterations"] for _, part_phases in parts]
    first = dict(stats[0])
    counted = [s["iterations"] for s in stats if s.get("iterations") is not None]
    first["iterations"] = sum(counted) if counted else None
    phases["_iterations"] = first  # time and FLOPs per iteration: the first part's (all parts have one shape)
    return checked_set(cell.method.merge([distilled for distilled, _ in parts]), cell, request)


def _identity(cell: Cell | DescribedCell, request: RunRequest, eval_arch: str, protocol: Protocol) -> dict:
    return {
        "method": cell.method_spec,
        "config_hash": stable_hash(cell.method.resolved_config),
        "dataset": cell.dataset_name,
        "transform": cell.transform_kind,
        "ipc": cell.ipc,
        "distill_arch": request.distill_arch,
        "distill_seed": request.distill_seed,
        "quick": request.quick,
        "eval_arch": eval_arch,
        "protocol": [protocol.name, protocol.version],
        "seeds": request.seeds,
        **({"eval_epochs": request.eval_epochs} if request.eval_epochs is not None else {}),
    }


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, one-line error) of an exception that ended a cell or an evaluation."""
    text = "".join(traceback.format_exception_only(exc)).strip()
    if isinstance(exc, UserError):  # its message is the whole story (a cache file to delete, say): no type name
        return "failed", str(exc)
    if isinstance(exc, Diverged):
        return "diverged", str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED_ERROR
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "oom", text
    return "failed", text


class EvalFlops:
    """An evaluation's ``on_epoch`` hook that counts the FLOPs of one network's training epoch: the second epoch
    of the first seed — or, when the seeds train at once (every network reports each epoch in turn), the second
    epoch of them all, divided by their number."""

    def __init__(self, bar: tqdm):
        self.bar, self.calls, self.counter = bar, 0, FlopCounter()
        self.flops: int | None = None
        self._first_epoch: int | None = None
        self._networks = 0  # networks that reported the first epoch before the counting window closed

    def __call__(self, epoch: int, loss: Tensor) -> None:
        self.bar.update(1)
        self.calls += 1
        if self.calls == 1:
            self.counter.start()
            self._first_epoch, self._networks = epoch, 1
        elif self._first_epoch is not None:
            if epoch == self._first_epoch:  # another network of a seed-batched evaluation ends the same epoch
                self._networks += 1
            else:
                total = self.counter.stop()
                self.flops = None if total is None else total // self._networks
                self._first_epoch = None

    def close(self) -> None:
        """Leave the counting window if the evaluation ended (or raised) inside it."""
        if self._first_epoch is not None:
            self.counter.stop()
            self._first_epoch, self.flops, self._ended_inside = None, None, True

    _ended_inside = False

    def result(self) -> tuple[int | None, str | None]:
        if self._ended_inside:
            return None, "fewer than two evaluation epochs ran"
        if self._first_epoch is not None or self.calls == 0:
            if self._first_epoch is not None:
                self.counter.stop()
            return None, "fewer than two evaluation epochs ran"
        return self.flops, self.counter.reason


def measured_evaluation(distilled: DistilledSet, dataset: Dataset, arch: str, protocol: Protocol, resolved: Protocol,
                        seeds: list[int], device: torch.device, phases: dict,
                        teacher: torch.nn.Module | None = None, batch_seeds: str = "auto",
                        cache_dir: str | None = None, memory_sample_s: float = DEFAULT_SAMPLE_INTERVAL_S) -> dict:
    """Evaluate ``distilled`` on ``arch`` as the ``eval`` phase of ``phases``: the record's evaluation fields
    (with ``eval_engine``: whether the seeds trained at once, ``batch_seeds`` auto / on / off), with the FLOPs of
    one training epoch."""
    bar = progress_bar(f"evaluate {arch} × {len(seeds)} seeds", resolved.epochs * len(seeds))
    eval_flops = EvalFlops(bar)
    try:
        with phase(phases, "eval", device, memory_sample_s):
            result = evaluate_distilled(distilled, dataset, arch, resolved, seeds, device, teacher=teacher,
                                        on_epoch=eval_flops, batch_seeds=batch_seeds, cache_dir=cache_dir, log=log)
    finally:
        bar.close()
        eval_flops.close()
    flops, reason = eval_flops.result()
    return dict(evaluation_fields(arch, protocol, resolved, seeds, result), flops_per_eval_epoch=flops,
                eval_flops_reason=reason)


NOT_DISTILLED_HERE = {"iterations": None, "iter_time_s": None, "flops_per_iter": None, "process_peak_rss_mb": None,
                      "flops_reason": "an existing set was evaluated: its distillation was not measured here"}


def _base_record(cell: Cell, request: RunRequest, evaluation: Evaluation, ids: dict[Evaluation, str]) -> dict:
    """The fields every record of this cell and evaluation carries, whatever happened."""
    protocol = get_protocol(evaluation.protocol)
    return dict(set_fields(cell_metadata(cell, request)), label=cell.label or cell.method_spec, suite=request.suite,
                quick=request.quick,
                record_id=ids[evaluation], status="ok", error=None, isolated=request.isolate,
                cells_side_by_side=request.jobs, eval_epochs_override=request.eval_epochs, soft_targets=None,
                flops_per_eval_epoch=None, eval_flops_reason="no evaluation ran",
                **evaluation_fields(evaluation.arch, protocol,
                                    protocol_for(protocol, None, request.quick, request.eval_epochs), request.seeds))


def dataset_resident(dataset: Dataset) -> dict:
    """``dataset_resident_mb``: the MB the cell's dataset (both splits as transformed) holds for the whole cell on
    ``dataset_device`` — inside every phase's memory peaks on that device, GPU or CPU: what to subtract from a peak
    to compare a method's own memory with a paper's that kept its data elsewhere. ``compute_device``: where the
    cell computed; a GPU cell keeps a dataset too large for the GPU on the host (``bench.data.dataset_storage``)."""
    tensors = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return {"dataset_resident_mb": round(size / 2**20, 1), "dataset_device": dataset.storage_device.type,
            "compute_device": dataset.device.type}


def run_cell(cell: Cell, request: RunRequest, evaluations: list[Evaluation], ids: dict[Evaluation, str],
             teachers: dict[str, torch.nn.Module] | None = None,
             parts: list[tuple[DistilledSet, dict]] | None = None) -> list[dict]:
    """Distil one cell once and run each of its ``evaluations`` on the set (each protocol on each architecture):
    the cell's records, measured, not yet written. ``request.protocol`` is not read: each evaluation names its own.

    With ``parts`` (the distilled parts of a split method, run elsewhere), the cell's set is their merge."""
    device = resolve_device(request.device)
    teachers = {} if teachers is None else teachers
    # The set is named by its record's id, or by all its records' ids where it has several: a resumed cell that redoes
    # only some of them then names its new set otherwise, never overwriting the set that the records it kept name.
    set_name = ids[evaluations[0]] if len(evaluations) == 1 else stable_hash(sorted(ids[e] for e in evaluations))
    env = environment_stamp()
    phases: dict = {}
    distilled, status, error, extra = None, "ok", None, {}
    try:
        if parts is None:
            distilled = distill_cell(cell, request, device, phases)
        else:
            distilled = merge_parts(cell, request, parts, phases)
        stem = Path(request.results_dir) / DISTILLED_DIR / f"{cell.dataset.name}_ipc{cell.ipc or 'all'}_{cell.method_spec}_{set_name}"
        saved = distilled.save(stem)
        extra = {"distilled_path": str(saved), "distilled_sha256": content_hash(saved), "learned_lr": distilled.learned_lr}
    except Exception as exc:  # a failing cell must not take the grid down
        status, error = _failure(exc)
        if status == "failed" and not isinstance(exc, UserError):  # a UserError's one line is the whole story
            traceback.print_exc(file=sys.stderr)
    iterations = phases.pop("_iterations", {"iterations": None, "iter_time_s": None, "flops_per_iter": None,
                                            "flops_reason": "the distillation did not finish"})

    records = []
    for evaluation in evaluations:
        arch, protocol = evaluation.arch, get_protocol(evaluation.protocol)
        resolved = protocol_for(protocol, distilled, request.quick, request.eval_epochs)
        record = dict(_base_record(cell, request, evaluation, ids), status=status, error=error, env=env,
                      process_peak_rss_mb=None, cell_evaluations=[list(e) for e in evaluations],
                      **dataset_resident(cell.dataset), **extra,
                      **iterations, **evaluation_fields(arch, protocol, resolved, request.seeds))
        cell_phases = {name: dict(figures) for name, figures in phases.items()}
        if resolved.targets == "soft" and distilled is not None and arch is not None:
            record["soft_targets"] = soft_targets_source(distilled.soft_labels is not None, cell.dataset,
                                                         request.distill_arch, request.quick, device)
        if distilled is not None and arch is not None:  # arch None: a cost-only cell, not evaluated
            try:
                teacher = None
                if resolved.targets == "soft" and distilled.soft_labels is None:
                    key = cell.dataset.transform["kind"]
                    if key not in teachers:
                        teachers[key] = soft_protocol_teacher(cell.dataset, request.distill_arch, request.quick,
                                                              device, request.cache_dir, log)
                    teacher = teachers[key]
                record.update(measured_evaluation(distilled, cell.dataset, arch, protocol, resolved, request.seeds,
                                                  device, cell_phases, teacher, request.batch_seeds, request.cache_dir,
                                                  request.memory_sample_s))
            except Exception as exc:
                status_eval, error_eval = _failure(exc)
                if not isinstance(exc, UserError):  # a UserError's one line is the whole story
                    traceback.print_exc(file=sys.stderr)
                record.update(status=status_eval, error=error_eval)
        record["phases"] = cell_phases
        records.append(record)
    return records


@dataclass
class CellTask:
    """What a child process needs to run a cell: the dataset is loaded there, not sent."""
    method_spec: str
    method: object
    ipc: int | None
    zca: bool
    evaluations: list[Evaluation]
    ids: dict[Evaluation, str]
    label: str | None = None
    gpu: str | None = None  # a CUDA_VISIBLE_DEVICES entry: the one GPU the process may use (None: as inherited)
    threads: int | None = None  # torch's intra-op threads in the process (None: torch's default)


def cell_task(cell: Cell, evaluations: list[Evaluation], ids: dict[Evaluation, str], gpu: str | None = None,
              threads: int | None = None) -> CellTask:
    """The ``CellTask`` of a planned cell."""
    return CellTask(cell.method_spec, cell.method, cell.ipc, works_in_zca_space(cell.method), evaluations, ids,
                    cell.label, gpu, threads)


PARENT_WATCH_INTERVAL_S = 1.0
EXIT_ORPHANED = 75  # a cell's process that ended itself because its ddbench process was gone


def _end_with(parent_pid: int) -> None:
    """End this cell's process once the ddbench process that started it is gone (killed with SIGKILL, say, which
    leaves it no chance to stop its cells): an orphaned cell would hold its memory and write a set nobody records,
    beside the cell a ``--resume`` starts again. (The cell's parent process is the forkserver, so the kernel's
    parent-death signal cannot watch ddbench itself.)"""
    import threading

    def watch() -> None:
        while True:
            time.sleep(PARENT_WATCH_INTERVAL_S)
            try:
                os.kill(parent_pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (or its number now another user's process)
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="ddbench-parent-watch", daemon=True).start()


def _cell_child(connection, request: RunRequest, task: CellTask, parent_pid: int | None = None) -> None:
    """Entry point of a cell's child process: run the cell and send its records (or the error) to the parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the forkserver's is bench.cell_server's
    if parent_pid is not None:
        _end_with(parent_pid)
    try:
        if task.gpu is not None:  # set before anything here starts CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = task.gpu
        if task.threads is not None:
            torch.set_num_threads(task.threads)
        dataset = load_dataset(request.dataset, request.data_root, zca=task.zca, device=resolve_device(request.device))
        cell = Cell(task.method_spec, task.method, task.ipc, dataset, task.label)
        records = run_cell(cell, request, task.evaluations, task.ids)
        for record in records:
            record["process_peak_rss_mb"] = process_peak_rss_mb()
        connection.send(records)
    except BaseException as exc:  # reported by the parent as the cell's failure
        status, error = _failure(exc)
        connection.send({"status": status, "error": error})
        if not isinstance(exc, KeyboardInterrupt):  # Ctrl-C reaches the parent too, which records it: no traceback
            raise
    finally:
        connection.close()


_CHILD_CONTEXT = None
RUNNING_CHILDREN: set = set()  # the cells' child processes now running (an executor ends them on Ctrl-C)
# Held while a cell's process starts and joins RUNNING_CHILDREN, and while an executor stops every cell: a cell cannot
# start unseen in the middle of a stop, and then run on (``run_cell_isolated``'s ``stop``).
CHILDREN_LOCK = threading.Lock()
CRASH_WATCH_INTERVAL_S = 0.1  # the parent's RSS watch of a cell's process: only reported if the cell dies
# The main thread never blocks longer than this while cells run. A SIGINT or SIGTERM that the kernel hands to another
# thread of ddbench (the memory watch, an executor's) interrupts no wait of the main thread, and Python runs the
# handler only when the main thread next runs: so it wakes up this often to let it.
SIGNAL_CHECK_S = 0.5


def _child_context():
    """A forkserver (spawn where there is none) whose server imports torch and the harness once for all cells."""
    global _CHILD_CONTEXT
    if _CHILD_CONTEXT is None:
        import multiprocessing

        methods_loaded = list(dict.fromkeys(cls.__module__ for cls in map(get_method_class, list_methods())))
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CHILD_CONTEXT = multiprocessing.get_context("forkserver")
            _CHILD_CONTEXT.set_forkserver_preload(["bench.cell_server", "bench.runner", *methods_loaded])
            _start_forkserver()
        else:
            _CHILD_CONTEXT = multiprocessing.get_context("spawn")
    return _CHILD_CONTEXT


def _start_forkserver() -> None:
    """Start the forkserver with SIGINT blocked, as it inherits, until ``bench.cell_server`` handles it there (as
    CPython starts its resource tracker): a Ctrl-C in the server's start-up then ends it quietly. The resource
    tracker is started first: starting it unblocks SIGINT (and ignores it itself)."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_cell_isolated(cell: Cell, request: RunRequest, evaluations: list[Evaluation], ids: dict[Evaluation, str],
                      gpu: str | None = None, threads: int | None = None,
                      stop: threading.Event | None = None) -> list[dict]:
    """``run_cell`` in a fresh child process (seeing only GPU ``gpu`` when given; with ``threads`` torch threads when
    given): peaks are the cell's own, and a crash or an out-of-memory kill costs only this cell — its records then
    say so, with the peak RSS the parent saw. Once ``stop`` is set (under ``CHILDREN_LOCK``, by an executor ending
    its cells on Ctrl-C), the cell does not start: its records say it was interrupted."""
    context = _child_context()
    receiver, sender = context.Pipe(duplex=False)
    task = cell_task(cell, evaluations, ids, gpu, threads)
    child = context.Process(target=_cell_child, args=(sender, request, task, os.getpid()),
                            name=f"ddbench-cell-{ids[evaluations[0]]}")
    with CHILDREN_LOCK:
        if stop is not None and stop.is_set():  # the run was stopped as this cell's thread was about to start it
            sender.close()
            receiver.close()
            return failure_records(cell, request, evaluations, ids, "interrupted", INTERRUPTED_ERROR)
        try:
            child.start()
        except (EOFError, ConnectionError) as exc:  # the forkserver ended as it started this cell (out of memory, a signal)
            sender.close()
            receiver.close()  # a later cell's start starts a new forkserver, once the old one has been reaped
            return failure_records(cell, request, evaluations, ids, "failed", f"the cell's process could not be started: "
                                   f"the forkserver that starts the cells ended ({type(exc).__name__}: {exc})")
        RUNNING_CHILDREN.add(child)
    sender.close()
    watcher = MemorySampler(pid=child.pid, interval_s=CRASH_WATCH_INTERVAL_S).start()  # wakes rarely: 2 cores are shared
    try:
        try:
            while not receiver.poll(SIGNAL_CHECK_S):
                pass
            message = receiver.recv()
        except EOFError:
            message = None
        child.join()
    except BaseException:
        child.terminate()
        child.join()
        raise
    finally:
        RUNNING_CHILDREN.discard(child)
        seen = watcher.stop().get("cpu_peak_rss_mb")
    if isinstance(message, list):
        return message
    if isinstance(message, dict):
        status, error = message["status"], message["error"]
    elif child.exitcode is not None and child.exitcode < 0:
        name = signal.Signals(-child.exitcode).name
        status = "oom" if name == "SIGKILL" else "failed"
        error = f"the cell's process was killed by {name}" + (
            " (most likely the kernel's out-of-memory killer)" if name == "SIGKILL" else "")
    else:
        status, error = "failed", f"the cell's process exited with code {child.exitcode} without a result"
    return failure_records(cell, request, evaluations, ids, status, error, crash_peak_rss_mb=seen)


def failure_records(cell: Cell, request: RunRequest, evaluations: list[Evaluation], ids: dict[Evaluation, str],
                    status: str, error: str, **extra: object) -> list[dict]:
    """The records of a cell that returned none (its process died, or Ctrl-C stopped it): what it is, and why."""
    env = environment_stamp()
    return [dict(_base_record(cell, request, evaluation, ids), status=status, error=error, env=env, phases={}, **extra)
            for evaluation in evaluations]


@dataclass
class CellJob:
    """A cell for an executor: the request it belongs to (a suite's run holds several; a cell merged from requests
    that differ only in their protocol keeps the first's), the evaluations still to run, and every evaluation's
    record id."""
    cell: Cell
    evaluations: list[Evaluation]
    ids: dict[Evaluation, str]
    request: RunRequest


def reject_repeated_cells(planned: list[tuple[RunRequest, list[Cell] | list[DescribedCell]]]
                          ) -> list[list[dict[Evaluation, str]]]:
    """Every planned cell's record ids (by evaluation: protocol and architecture), per request; a ``UserError``
    when two cells are one — the same record, run twice, the second overwriting the first: ``--methods
    apm,apm.digits_ipc1`` (both pick that recipe), or two grids of a suite that share a cell."""
    first_of: dict[str, Cell | DescribedCell] = {}
    all_ids = []
    for request, cells in planned:
        protocol = get_protocol(request.protocol)
        request_ids = []
        for cell in cells:
            ids = {Evaluation(request.protocol, arch): record_id(_identity(cell, request, arch, protocol))
                   for arch in request.eval_archs or [None]}
            for (_, arch), identity in ids.items():
                earlier = first_of.setdefault(identity, cell)
                if earlier is not cell:
                    where = (f"({cell.method_spec}, {cell.dataset_name} ipc {cell.ipc if cell.ipc is not None else 'all'}"
                             f"{f' → {arch}' if arch else ''}, {request.protocol} protocol)")
                    first, second = earlier.label or earlier.method_spec, cell.label or cell.method_spec
                    if first == second:  # only a suite can name one label twice: in two of its grids
                        raise UserError(f"{first} is in two grids of the suite, for the same cell {where}; "
                                        f"name it in one")
                    raise UserError(f"{first} and {second} are the same cell {where}; name it once")
            request_ids.append(ids)
        all_ids.append(request_ids)
    return all_ids


def _code_since(done: dict[str, dict], ids: Iterable[str], current: str | None) -> str:
    """A warning for a skipped cell whose records another commit wrote than ``current`` (a record's identity holds
    its method's config, not the code): ``--resume`` keeps numbers that this code may no longer give."""
    shas = {(done[i].get("env") or {}).get("git_sha") for i in ids if i in done}
    written = sorted(sha[:7] for sha in shas - {None, current})
    if current is None or not written:
        return ""
    return (f"; WARNING: written by commit {', '.join(written)}, this is {current[:7]}: delete them (or run without "
            f"--resume into a new folder) to measure this code")


# How a run runs, which its executor reads once: the requests run as one pool of cells must share these.
RUN_SETTINGS = ("results_dir", "executor", "ray_address", "ray_resources", "jobs", "isolate", "device", "resume")


def _threads_since(done: dict[str, dict], ids: Iterable[str], threads: int | None) -> str:
    """A warning for a skipped CPU cell whose records were made with another number of torch threads per cell than
    this run gives its cells (``threads``; None: not known here, or not a CPU run): CPU sums then differ in their
    last digits, and so can the numbers ``--resume`` keeps beside the ones this run makes."""
    if threads is None:
        return ""
    kept = set()
    for identity in ids:
        record = done.get(identity) or {}
        env = record.get("env") or {}
        device = record.get("compute_device", record.get("dataset_device"))  # older records: the data's device
        on_cpu = device == "cpu" or (device is None and not env.get("gpu_name"))
        if on_cpu and isinstance(env.get("cpu_threads"), int) and env["cpu_threads"] != threads:
            kept.add(env["cpu_threads"])
    if not kept:
        return ""
    return (f"; WARNING: made with {' / '.join(map(str, sorted(kept)))} torch threads per cell, this run gives {threads}: "
            f"CPU results can differ in their last digits between thread counts")


def run(request: RunRequest, echo: Callable[[str], None] = print, cells: list[Cell] | None = None,
        notes: Sequence[str] = ()) -> list[dict]:
    """Plan (unless ``cells`` were planned already), then distil and evaluate every cell through the request's
    executor: ``run_planned`` of this one request."""
    return run_planned([(request, plan(request) if cells is None else cells)], echo, notes)  # the list is run_planned's


def run_planned(planned: list[tuple[RunRequest, list[Cell]]], echo: Callable[[str], None] = print,
                notes: Sequence[str] = ()) -> list[dict]:
    """Distil and evaluate the planned cells of one or more requests (a suite's) through one executor
    (``bench.executors``: on this machine, each cell in its own process unless ``isolate`` is off, ``--jobs`` of
    them or one per GPU side by side; or on a Ray cluster). The cells of all requests form one pool, so a suite's
    option variants (one request each) run side by side too. This process alone writes the records, as cells
    finish. Returns the records written. ``notes`` (the caller's) and ``recipe_notes`` are printed once every check
    has passed, so that bad input gets its one line of error and nothing before it.

    On Ctrl-C the records written so far stay, the cells being run get records with status ``interrupted`` (which
    ``--resume`` redoes, overwriting them: same identity, same file), and ``KeyboardInterrupt`` goes on up."""
    first = planned[0][0]
    for request, _ in planned[1:]:
        differing = [name for name in RUN_SETTINGS if getattr(request, name) != getattr(first, name)]
        if differing:
            raise ValueError(f"requests run together must share {', '.join(differing)}")
    if cells_run_elsewhere(first):
        _keep_descriptions_only(planned)
    cell_ids = reject_repeated_cells(planned)
    checkpoints = any(request.checkpoint_every for request, _ in planned)
    check_results_dir(first.results_dir, (DISTILLED_DIR, CHECKPOINTS_DIR) if checkpoints else (DISTILLED_DIR,))
    with writing_results(first.results_dir):
        for note in [*notes, *recipe_notes(planned)]:
            log(note)
        return _run_planned(planned, cell_ids, echo)


def _keep_descriptions_only(planned: list[tuple[RunRequest, list[Cell]]]) -> None:
    """Give the planned cells their datasets' descriptions in place of the datasets (in the caller's list, so the
    loaded copies can be freed): cells that run in processes of their own load their data there, and a parent
    holding its copy beside theirs doubles the memory — ImageNet-1K 64×64 is about 63 GB in float32."""
    described: dict[int, tuple[Dataset, Dataset]] = {}  # id → (the dataset, held so its id stays its own; description)
    for index, (request, cells) in enumerate(planned):
        for cell in cells:
            if id(cell.dataset) not in described:
                described[id(cell.dataset)] = (cell.dataset, cell.dataset.description())
        planned[index] = (request, [replace(cell, dataset=described[id(cell.dataset)][1]) for cell in cells])


def _shown_label(cell: Cell) -> str:
    """The cell's method as the console shows it: its recipe, and a suite variant's label beside it."""
    label = cell.label
    if not label or label == cell.method_spec or cell.method_spec.startswith(f"{label}."):
        return cell.method_spec
    return f"{cell.method_spec} ({label})"


def _threads_per_cell(request: RunRequest) -> int | None:
    """The torch threads each cell of a local CPU run gets (None for a GPU or Ray run)."""
    from bench.executors import cpu_threads_per_job

    if request.executor != "local" or resolve_device(request.device).type != "cpu":
        return None
    return cpu_threads_per_job(request.jobs) if request.jobs > 1 else torch.get_num_threads()


def _same_distillation(cell: Cell | DescribedCell, request: RunRequest) -> tuple:
    """What makes a cell's distilled set, and how its evaluations run (seeds, epochs, engine), all but the protocol:
    cells of a run that share it are distilled once (``merge_protocols``). The request's lists of methods, ipcs and
    architectures only plan cells; its method options are in the cell's config."""
    shared = replace(request, protocol="", methods=[], ipcs=[], eval_archs=[], method_options={}, method_labels={})
    return (cell.method_spec, stable_hash(cell.method.resolved_config), cell.ipc, cell.dataset_name, cell.label,
            repr(shared))


def distillation_count(planned: list[tuple[RunRequest, list[Cell] | list[DescribedCell]]]) -> int:
    """How many sets the planned cells distil: fewer than cells where cells differ only in their protocol."""
    return len({_same_distillation(cell, request) for request, cells in planned for cell in cells})


def merge_protocols(jobs: list[CellJob]) -> list[CellJob]:
    """The jobs, with each cell that another job distils the same way (``_same_distillation``: it differs in its
    protocol only) folded into the first such job as further evaluations: one distillation, every protocol's
    records. The Ray executor, too, then sends one task per set."""
    merged: dict[tuple, CellJob] = {}
    for job in jobs:
        key = _same_distillation(job.cell, job.request)
        if key in merged:
            first = merged[key]
            merged[key] = replace(first, evaluations=[*first.evaluations, *job.evaluations],
                                  ids={**first.ids, **job.ids})
        else:
            merged[key] = job
    return list(merged.values())


def _run_planned(planned: list[tuple[RunRequest, list[Cell]]], cell_ids: list[list[dict[Evaluation, str]]],
                 echo: Callable[[str], None]) -> list[dict]:
    first = planned[0][0]
    if first.resume:  # a killed run may have left temporary files; a resumed one is the folder's only writer
        remove_stale_temporaries(first.results_dir)
    done = existing_records(first.results_dir) if first.resume else {}
    this_commit = environment_stamp().get("git_sha") if done else None
    threads = _threads_per_cell(first) if done else None
    jobs = []
    several_protocols = len({request.protocol for request, _ in planned}) > 1
    for (request, cells), request_ids in zip(planned, cell_ids):
        which_protocol = f" [{request.protocol}]" if several_protocols else ""  # the cell's others may still run
        # children must see the same cache and data folders even if the environment changes under the parent
        request = replace(request, cache_dir=str(resolve_cache_dir(request.cache_dir)),
                          data_root=str(resolve_data_root(request.data_root)))
        for cell, ids in zip(cells, request_ids):
            other_data = [key for key in ids if ids[key] in done and from_other_files(done[ids[key]].get("data_fingerprint"),
                                                                                   cell.dataset.fingerprint)]
            if other_data:
                echo(f"redo {_shown_label(cell)} ipc {cell.ipc if cell.ipc is not None else 'all'}{which_protocol}: its records were made from other {cell.dataset.name} "
                     f"files than those under {request.data_root} (data fingerprint "
                     f"{done[ids[other_data[0]]]['data_fingerprint']}, now {cell.dataset.fingerprint})")
            evaluations = [key for key in ids if ids[key] not in done or key in other_data]
            if not evaluations:
                warning = _code_since(done, ids.values(), this_commit) + _threads_since(done, ids.values(), threads)
                echo(f"skip {_shown_label(cell)} ipc {cell.ipc if cell.ipc is not None else 'all'}{which_protocol}: records exist (--resume){warning}")
                continue
            jobs.append(CellJob(cell, evaluations, ids, request))
    jobs = merge_protocols(jobs)
    from bench.executors import create_executor

    executor = create_executor(first)
    finished = executor.results(jobs)  # (job, records) as cells finish
    written = []
    try:
        for job, records in finished:
            cell, request = job.cell, job.request
            for record in records:
                try:
                    path = write_record(request.results_dir, record)
                except OSError as exc:  # a full disk, a folder made read-only or removed during the run
                    finished.close()  # the executor stops what still runs
                    raise UserError(f"cannot write a record under {request.results_dir} ({exc.strerror or exc}): the "
                                    f"records written so far are kept; make room or fix the folder, then run again "
                                    f"with --resume") from None
                written.append(record)
                if record["status"] != "ok":
                    summary = f"{record['status']}: {record['error']}"
                elif record["eval_arch"] is None:
                    iterations = record["iterations"]
                    summary = (f"not evaluated; {iterations} iteration{'' if iterations == 1 else 's'} in "
                               f"{record['phases']['distill']['wall_s']:.1f} s")
                else:
                    summary = f"{record['acc_mean']:.2f} ± {record['acc_std']:.2f} (n={len(record['acc'])})"
                protocol = record["protocol"]
                how = (protocol_label(protocol, request.quick, record["protocol_config"]) if record["eval_arch"]
                       else f"{protocol}{', quick' if request.quick else ''}")
                seed = f" (distill seed {request.distill_seed})" if request.distill_seed else ""
                echo(f"{cell.dataset.name} ipc {cell.ipc if cell.ipc is not None else 'all'} {_shown_label(cell)}{seed} → "
                     f"{record['eval_arch'] or 'no evaluation'} [{how}]: {summary}  ({path})")
    except KeyboardInterrupt:  # the records written so far stay; unfinished cells' say so, and --resume redoes them
        finished.close()  # the executor stops what still runs
        for job in executor.in_flight:
            for record in failure_records(job.cell, job.request, job.evaluations, job.ids, "interrupted", INTERRUPTED_ERROR):
                write_record(job.request.results_dir, record)
        raise
    return written
