"""Suites: declarative YAML grids (``bench/suites/*.yaml``) that reproduce the paper's tables.

A suite names a version, whether its recipes are the reduced CPU ones (``quick``), defaults shared by its
grids, and a list of grids; every grid is a product of datasets × ipc × methods × protocols, each method
entry either ``name[.recipe]`` or a mapping with options and a row label::

    name: efficiency
    version: 1
    quick: false
    defaults: {distill_arch: convnet, eval_archs: [convnet], protocols: [standard], seeds: [0]}
    grids:
      - datasets: [cifar10]
        ipc: [50]
        methods:
          - {method: apm, label: apm-seg100, options: {segment: 100}}
          - mtt

A grid (or the defaults) may set ``distill_seed`` to a list (``[0, 1, 2, 3, 4]``): each cell is then distilled
once per seed, as the papers' tables average over several distilled sets, and reports pool the sets' evaluations.
It may also set ``batch_seeds: auto | on | off`` — whether evaluations train their seeds
at once (``bench.evaluate.choose_eval_engine``); it changes no record's identity, and ``ddbench run
--batch-seeds`` overrides it.

Files are read with ``yaml.safe_load`` and validated on load: an unknown key or a wrong type is a
``UserError`` naming the key and the file. Names (datasets, methods, recipes, options, architectures,
protocols) are checked by ``check_suite`` without reading any data. ``suite_requests`` turns a suite into one
``RunRequest`` per grid × dataset × protocol (methods with options get a request each, since the runner keys
options by method name).
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import yaml

from bench.errors import UnknownNameError, UserError
from bench.registry import nearest_name

if TYPE_CHECKING:
    from bench.runner import RunRequest

SUITES_DIR = Path(__file__).resolve().parent / "suites"

# key → (type checker, description) for the keys a grid (or the suite's defaults) may set
_LIST_OF_STR = (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v), "a list of names")
_LIST_OF_INT = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                "a list of integers")
_SETTING_KEYS = {
    "distill_arch": (lambda v: isinstance(v, str) and bool(v), "a name"),
    "eval_archs": _LIST_OF_STR,
    "protocols": _LIST_OF_STR,
    "seeds": _LIST_OF_INT,
    "distill_seed": (lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        and len(set(v)) == len(v)), "an integer or a list of distinct integers"),
    "evaluate": (lambda v: isinstance(v, bool), "true or false"),
    # YAML reads a bare on / off as true / false: both spellings are accepted
    "batch_seeds": (lambda v: v in ("auto", "on", "off") or isinstance(v, bool), "auto, on or off"),
}
_GRID_KEYS = {**_SETTING_KEYS, "datasets": _LIST_OF_STR, "ipc": _LIST_OF_INT, "methods": None}
_SUITE_KEYS = {"name", "version", "description", "quick", "defaults", "grids"}
_METHOD_KEYS = {"method", "label", "options"}
DEFAULT_SETTINGS = {"distill_arch": "convnet", "eval_archs": ["convnet"], "protocols": ["standard"],
                    "seeds": [0, 1, 2], "distill_seed": 0, "evaluate": True, "batch_seeds": "auto"}
ONLY_KEYS = ("dataset", "method", "ipc", "protocol", "seed")


@dataclass(frozen=True)
class MethodEntry:
    spec: str  # name[.recipe]
    label: str  # the row label in reports
    options: dict = field(default_factory=dict)


@dataclass
class Grid:
    datasets: list[str]
    ipc: list[int]
    methods: list[MethodEntry]
    distill_arch: str
    eval_archs: list[str]
    protocols: list[str]
    seeds: list[int]
    distill_seeds: list[int]  # the YAML's distill_seed as a list: one distilled set per cell and seed (reports pool them)
    evaluate: bool
    batch_seeds: str = "auto"  # how evaluations train their seeds: auto / on / off (bench.evaluate)


@dataclass
class Suite:
    name: str
    version: int
    description: str
    quick: bool
    grids: list[Grid]
    path: Path


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_file: str) -> Path:
    """A bundled suite's name (``quick``) or a path to a YAML file."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if path.is_dir():
            raise UserError(f"{path} is a folder; a suite is one YAML file (e.g. {path / 'mine.yaml'})")
        if not path.is_file():
            raise UserError(f"suite file {path} does not exist")
        return path
    bundled = SUITES_DIR / f"{name_or_file}.yaml"
    if not bundled.is_file():
        near = nearest_name(name_or_file, list_suites())
        hint = f"; did you mean '{near}'?" if near else ""
        raise UnknownNameError(f"unknown suite '{name_or_file}'{hint} (suites: {', '.join(list_suites())}; or a path to a .yaml file)")
    return bundled


def _fail(path: Path, where: str, message: str) -> UserError:
    return UserError(f"{path}: {where}: {message}")


def _method_entry(path: Path, where: str, entry: object) -> MethodEntry:
    if isinstance(entry, str) and entry:
        return MethodEntry(entry, entry)
    if not isinstance(entry, dict):
        raise _fail(path, where, "a method is a name or a mapping {method, label, options}")
    unknown = set(entry) - _METHOD_KEYS
    if unknown:
        raise _fail(path, where, f"unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(_METHOD_KEYS))})")
    spec, label, options = entry.get("method"), entry.get("label"), entry.get("options", {})
    if not isinstance(spec, str) or not spec:
        raise _fail(path, f"{where}.method", "must be a method name")
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise _fail(path, f"{where}.options", "must be a mapping of option names to values")
    if label is None:
        label = spec + "".join(f"[{k}={_label_value(v)}]" for k, v in sorted(options.items()))
    if not isinstance(label, str) or not label or "/" in label or ".." in label or not label.isprintable():
        raise _fail(path, f"{where}.label", "must be a plain name (no '/', '..' or control characters)")
    return MethodEntry(spec, label, dict(options))


def _label_value(value: object) -> str:
    """An option's value in a default label: as written for a scalar, shortened for a list or mapping (YAML aliases
    can make a few hundred bytes of suite into a value whose full text would not fit in memory)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    return reprlib.repr(value).replace("...", "…")  # a label may not hold '..'


def _check_settings(path: Path, where: str, mapping: dict, allowed: dict) -> None:
    for key, value in mapping.items():
        if key not in allowed:
            near = nearest_name(key, list(allowed))
            hint = f"; did you mean '{near}'?" if near else ""
            raise _fail(path, where, f"unknown key '{key}'{hint}")
        checker = allowed[key]
        if checker is not None and not checker[0](value):
            raise _fail(path, f"{where}.{key}", f"must be {checker[1]}, got {value!r}")


def load_suite(name_or_file: str) -> Suite:
    """Read and validate a suite (types and keys; names are checked by ``check_suite``)."""
    path = suite_path(name_or_file)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or (str(exc).splitlines()[0] if str(exc) else "malformed YAML")
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        hint = "; a suite is plain YAML, without tags" if isinstance(exc, yaml.constructor.ConstructorError) else ""
        raise UserError(f"{path}: not valid YAML{where}: {problem}{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: not a suite: nested too deeply to read") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite is a mapping with keys {', '.join(sorted(_SUITE_KEYS))}")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        near = nearest_name(key, list(_SUITE_KEYS))
        raise _fail(path, "top level", f"unknown key '{key}'" + (f"; did you mean '{near}'?" if near else ""))
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(path, "name", f"must be letters, digits, '_' or '-', got {name!r}")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "version", f"must be an integer, got {version!r}")
    quick = raw.get("quick", False)
    if not isinstance(quick, bool):
        raise _fail(path, "quick", f"must be true or false, got {quick!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", "must be text")
    defaults = raw.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise _fail(path, "defaults", "must be a mapping")
    _check_settings(path, "defaults", defaults, _SETTING_KEYS)
    grids_raw = raw.get("grids")
    if not isinstance(grids_raw, list) or not grids_raw:
        raise _fail(path, "grids", "must be a non-empty list of grids")

    grids = []
    for g, grid in enumerate(grids_raw):
        where = f"grids[{g}]"
        if not isinstance(grid, dict):
            raise _fail(path, where, "must be a mapping")
        _check_settings(path, where, grid, _GRID_KEYS)
        for required in ("datasets", "ipc", "methods"):
            if required not in grid:
                raise _fail(path, where, f"missing '{required}'")
        if not isinstance(grid["methods"], list) or not grid["methods"]:
            raise _fail(path, f"{where}.methods", "must be a non-empty list")
        methods = [_method_entry(path, f"{where}.methods[{m}]", entry) for m, entry in enumerate(grid["methods"])]
        labels = [m.label for m in methods]
        if len(set(labels)) != len(labels):
            raise _fail(path, f"{where}.methods", "two entries share a label; give each variant its own 'label'")
        settings = {**DEFAULT_SETTINGS, **defaults, **{k: v for k, v in grid.items() if k in _SETTING_KEYS}}
        if isinstance(settings["batch_seeds"], bool):
            settings["batch_seeds"] = "on" if settings["batch_seeds"] else "off"
        seed = settings.pop("distill_seed")
        settings["distill_seeds"] = list(seed) if isinstance(seed, list) else [seed]
        for key in ("datasets", "ipc"):
            if not grid[key]:
                raise _fail(path, f"{where}.{key}", "must not be empty")
        if any(i < 1 for i in grid["ipc"]):
            raise _fail(path, f"{where}.ipc", f"ipc must be at least 1, got {grid['ipc']}")
        if settings["evaluate"] and (not settings["seeds"] or not settings["eval_archs"]):
            raise _fail(path, where, "an evaluated grid needs seeds and eval_archs (or set evaluate: false)")
        grids.append(Grid(datasets=list(grid["datasets"]), ipc=list(grid["ipc"]), methods=methods, **settings))
    return Suite(name=name, version=version, description=description, quick=quick, grids=grids, path=path)


def parse_only(pairs: list[str] | None, keys: Sequence[str] = ONLY_KEYS) -> dict[str, set[str]]:
    """``--only key=value`` filters (repeatable; values comma-separated): keys dataset, method, ipc, protocol and
    seed (evaluation seeds: a cell evaluated on fewer seeds is another cell, with its own record), or the ``keys``
    a command takes."""
    only: dict[str, set[str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in keys or not value:
            raise UserError(f"--only expects KEY=VALUE with KEY one of {', '.join(keys)}, got '{pair}'")
        only.setdefault(key, set()).update(v.strip() for v in value.split(",") if v.strip())
    return only


def _keep(only: dict[str, set[str]], key: str, *names: object) -> bool:
    return key not in only or any(str(n) in only[key] for n in names if n is not None)


def _check_only_values(suite: Suite, only: dict[str, set[str]]) -> None:
    """A ``UserError`` for an ``--only`` value that no grid of the suite has (a typo would otherwise drop the cells
    it meant, silently when other values match), suggesting the nearest one."""
    from bench.registry import split_method_spec

    values: dict[str, set[str]] = {key: set() for key in ONLY_KEYS}
    for grid in suite.grids:
        values["dataset"].update(grid.datasets)
        values["method"].update(name for m in grid.methods for name in (m.spec, m.label, split_method_spec(m.spec)[0]))
        values["ipc"].update(map(str, grid.ipc))
        values["protocol"].update(grid.protocols)
        values["seed"].update(map(str, grid.seeds))
    reject_unknown_only_values(only, values, f"grid of suite '{suite.name}'")


def reject_unknown_only_values(only: dict[str, set[str]], present: dict[str, set[str]], holder: str) -> None:
    """A ``UserError`` naming the first ``--only`` value that is not among ``present``'s values of its key, with the
    nearest one (or the values there are); ``holder`` says where they were looked for (``"baseline cell"``)."""
    for key, wanted in only.items():
        for value in sorted(wanted - present[key]):
            near = nearest_name(value, sorted(present[key]))
            hint = f"; did you mean '{near}'?" if near else f" (it has {', '.join(sorted(present[key]))})"
            raise UserError(f"--only {key}={value}: no {holder} has {key} '{value}'{hint}")


def suite_requests(suite: Suite, results_dir: Path, quick: bool = False, only: dict[str, set[str]] | None = None,
                   **run_options: object) -> list:
    """One ``RunRequest`` per grid × dataset × protocol × distillation seed × (plain methods | each method with
    options).

    ``run_options`` go to every request; a ``batch_seeds`` among them overrides the grids' own."""
    from bench.registry import split_method_spec
    from bench.runner import RunRequest

    only = only or {}
    _check_only_values(suite, only)
    requests = []
    for grid in suite.grids:
        entries = [m for m in grid.methods if _keep(only, "method", m.spec, m.label, split_method_spec(m.spec)[0])]
        ipcs = [i for i in grid.ipc if _keep(only, "ipc", i)]
        protocols = [p for p in grid.protocols if _keep(only, "protocol", p)] if grid.evaluate else grid.protocols[:1]
        datasets = [d for d in grid.datasets if _keep(only, "dataset", d)]
        seeds = [s for s in grid.seeds if _keep(only, "seed", s)] if grid.evaluate else []
        if not (entries and ipcs and protocols and datasets and (seeds or not grid.evaluate)):
            continue
        batches = [[m for m in entries if not m.options]] + [[m] for m in entries if m.options]
        for dataset, protocol, distill_seed, batch in product(datasets, protocols, grid.distill_seeds, batches):
            if not batch:
                continue
            requests.append(RunRequest(
                dataset=dataset, methods=[m.spec for m in batch], ipcs=ipcs,
                eval_archs=list(grid.eval_archs) if grid.evaluate else [],
                seeds=seeds,
                results_dir=results_dir, protocol=protocol, distill_arch=grid.distill_arch,
                quick=quick or suite.quick, distill_seed=distill_seed, suite=suite.name,
                method_options={m.spec: m.options for m in batch if m.options},
                method_labels={m.spec: m.label for m in batch},
                **{"batch_seeds": grid.batch_seeds, **run_options},
            ))
    if not requests:
        shown = " ".join(f"--only {k}={','.join(sorted(v))}" for k, v in only.items())
        raise UserError(f"no cell of suite '{suite.name}' matches {shown}")
    return requests


class ResolvedCell(NamedTuple):
    """One cell of a ``RunRequest``, resolved as ``run`` resolves it but without its data: the method spec with the
    recipe picked for its ipc, and the method built with the request's options."""

    request: RunRequest
    label: str
    method_spec: str
    ipc: int | None
    method: object


def resolve_cells(request: RunRequest) -> list[ResolvedCell]:
    """Every cell of ``request`` (``check_request`` first: an unknown name is a ``UserError``); reads no data."""
    from bench.registry import create_method
    from bench.runner import check_request, resolved_methods

    cells = []
    for spec in check_request(request):
        label = request.method_labels.get(spec, spec)
        for resolved, ipc in resolved_methods(request, spec):
            method = create_method(resolved, quick=request.quick, **request.method_options.get(spec, {}))
            cells.append(ResolvedCell(request, label, resolved, ipc, method))
    return cells


def describe_cells(requests: list) -> list[str]:
    """One line per cell (method with its picked recipe × ipc × evaluation), checking every name and that no two
    cells are one (as ``run`` would refuse them); reads no data."""
    from bench.runner import reject_repeated_cells

    lines: list[str] = []
    reject_repeated_cells(_described_cells(requests, lines))
    return lines


def distilled_sets_note(requests: list) -> str:
    """`` (N distilled sets, …)`` where the requests' cells distil fewer sets than they are (a set is distilled
    once for all its protocols: ``runner.merge_protocols``), else nothing; reads no data."""
    from bench.runner import distillation_count

    described = _described_cells(requests, [])
    cells, sets = sum(len(cells) for _, cells in described), distillation_count(described)
    return f" ({sets} distilled sets, each evaluated under all its protocols)" if sets < cells else ""


def _described_cells(requests: list, lines: list[str]) -> list:
    """Every request with its cells as ``DescribedCell``s (no data read); each cell's line appended to ``lines``."""
    from bench.data import transform_kind
    from bench.runner import DescribedCell, works_in_zca_space

    described = []
    for request in requests:
        cells = []
        for cell in resolve_cells(request):
            cells.append(DescribedCell(cell.method_spec, cell.method, cell.ipc, request.dataset,
                                       transform_kind(works_in_zca_space(cell.method)), cell.label))
            evaluation = (f"evaluate {','.join(request.eval_archs)} × seeds {','.join(map(str, request.seeds))}"
                          if request.eval_archs else "not evaluated (costs only)")
            lines.append(f"{request.dataset} ipc {cell.ipc if cell.ipc is not None else 'all'} {cell.label}"
                         f"{f' ({cell.method_spec})' if cell.method_spec != cell.label else ''} [{request.protocol}"
                         f"{', quick' if request.quick else ''}] distil {request.distill_arch}"
                         f"{f' (distill seed {request.distill_seed})' if request.distill_seed else ''}; {evaluation}")
        described.append((request, cells))
    return described


@contextmanager
def naming_the_suite_file(suite: Suite) -> Iterator[None]:
    """Prefix a ``UserError`` raised inside with the suite's file, which the error is about."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"suite {suite.path}: {exc}") from None


def describe_suite_cells(suite: Suite, requests: list) -> list[str]:
    """``describe_cells`` of a suite's requests, its errors naming the suite's file."""
    with naming_the_suite_file(suite):
        return describe_cells(requests)


def run_suite(suite: Suite, results_dir: Path, quick: bool = False, only: dict[str, set[str]] | None = None,
              echo=print, notes: Sequence[str] = (), **run_options: object) -> list[dict]:
    """Plan every request of the suite first (so a bad name, missing data or an unwritable results folder fails
    before any work), then run all their cells as one pool (``runner.run_planned``): with ``--jobs``, several GPUs
    or Ray, cells of different requests — a suite's option variants — run side by side."""
    from bench.runner import plan_all, run_planned
    from bench.store import DISTILLED_DIR, check_results_dir

    requests = suite_requests(suite, results_dir, quick, only, **run_options)
    describe_suite_cells(suite, requests)  # also refuses two cells that are one, before any data is read
    planned = plan_all(requests)
    check_results_dir(results_dir, (DISTILLED_DIR,))
    count = sum(len(cells) for _, cells in planned)
    echo(f"suite {suite.name} v{suite.version}: {count} cell{'' if count == 1 else 's'}{distilled_sets_note(requests)} "
         f"→ {results_dir}")
    return run_planned(planned, echo, notes)
