"""``ddbench`` — the command line, a thin layer over ``bench.runner``, ``bench.evaluate`` and ``bench.report``.

Imports are lazy so that ``ddbench --help`` and ``ddbench ls`` answer at once. Bad input (``UserError``) is one
line on stderr and exit code 2, with no traceback; ``run`` exits 3 when a cell's record is not ok, and Ctrl-C
exits 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_CELLS_FAILED = 3  # `run` finished, but some cell's record has a status other than ok
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _ints(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; ``""`` → ``[]`` (the command then says what is missing); ``"1,,2"`` is an error."""
    if not text.strip():
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _archs(text: str) -> list[str]:
    from bench.errors import UserError
    from bench.models import split_arch_list

    try:
        archs = split_arch_list(text)
    except UserError as exc:  # argparse reports only its own error type as a usage error
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not archs:
        raise argparse.ArgumentTypeError(f"expected comma-separated architecture names, got '{text}'")
    return archs


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (and a pointer to ``--help``) instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _options(pairs: list[str] | None) -> dict:
    """``key=value`` pairs, values parsed as YAML scalars (``0.1``, ``true``, ``cifar``)."""
    import yaml

    from bench.errors import UserError

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{pair}'")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise UserError(f"--set {key.strip()}: '{value}' is not a YAML value ({problem})") from None
    return options


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the reduced CPU recipes and the quick protocol (flagged in every record)")
    parser.add_argument("--data-root", default=None, help="folder holding the datasets (default: $DDBENCH_DATA or ./data)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1 … (default: cuda if available); on a GPU, a dataset over a quarter of "
                             "its memory stays in host memory ($DDBENCH_DATASET_ON: auto, host or device)")
    parser.add_argument("--cache-dir", default=None, help="expert cache (default: $DDBENCH_CACHE or ~/.cache/ddbench)")


def _measured(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-sample-ms", type=float, default=10.0, metavar="MS",
                        help="sample the GPU memory through NVML every MS milliseconds (default 10; recorded beside the "
                             "peaks): shorter catches shorter spikes, at more CPU time")


# bench.compare.Thresholds' defaults, for --help without importing pandas (tests/test_cli.py checks they agree)
COMPARE_DEFAULTS = {"acc_tol": 2.0, "acc_k": 2.0, "memory_rel_tol": 0.10, "flops_rel_tol": 0.02, "time_rel_tol": 0.5}
# `run`'s grid options when no suite is named (a suite's grids set them, so with --suite they are refused)
GRID_DEFAULTS = {"dataset": "digits", "ipc": [1, 10], "distill_arch": "convnet", "eval_archs": ["convnet"],
                 "seeds": [0, 1, 2], "distill_seed": 0, "protocol": ["standard"]}
BATCH_SEEDS = ("auto", "on", "off")  # bench.evaluate.BATCH_SEEDS_CHOICES, without importing torch for --help


def _shown(values: list) -> str:
    """A list default as it is typed on the command line: 1,10."""
    return ",".join(map(str, values))
BATCH_SEEDS_HELP = ("train an evaluation's seeds at once as one stacked model (on), one after the other (off), or "
                    "whichever a short calibration finds faster on this machine, remembered in the cache folder "
                    "(auto, the default, which decides by timing); the same computation up to rounding either way, "
                    "recorded as eval_engine: pass on or off for bit-identical reruns")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddbench", description="Benchmark harness for dataset distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list methods, datasets, architectures, protocols or suites")
    ls.add_argument("what", choices=["methods", "datasets", "archs", "protocols", "suites"])

    distill = sub.add_parser("distill", help="distil one set and save it (safetensors + JSON)")
    distill.add_argument("--dataset", required=True)
    distill.add_argument("--method", required=True, help="name or name.recipe, e.g. random, herding")
    distill.add_argument("--ipc", type=int, required=True)
    distill.add_argument("--arch", default="convnet", help="distillation architecture")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--out", required=True, help="output path stem (writes STEM.safetensors and STEM.json)")
    distill.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    _common(distill)

    evaluate = sub.add_parser("evaluate", help="evaluate a saved distilled set")
    evaluate.add_argument("path", help="a distilled set (.json, .safetensors or their common stem)")
    evaluate.add_argument("--archs", type=_archs, default=["convnet"], help="comma-separated architectures (any timm name; options in brackets)")
    evaluate.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    evaluate.add_argument("--protocol", default="standard")
    evaluate.add_argument("--results", default=None, help="also write records into this folder")
    evaluate.add_argument("--batch-seeds", choices=BATCH_SEEDS, default="auto", help=BATCH_SEEDS_HELP)
    evaluate.add_argument("--eval-epochs", type=int, default=None,
                          help="smoke tests only: train each evaluation network this many epochs (recorded in every record)")
    _common(evaluate)
    _measured(evaluate)

    run = sub.add_parser("run", help="distil and evaluate a grid (or a suite), one record per cell × evaluation architecture")
    run.add_argument("--suite", default=None, help="a suite name (ddbench ls suites) or a suite YAML file; replaces the grid options")
    run.add_argument("--only", action="append", metavar="KEY=VALUE",
                     help="with --suite: keep only cells whose dataset, method, ipc, protocol or evaluation seed is VALUE (repeatable)")
    run.add_argument("--dataset", default=None, help=f"default {GRID_DEFAULTS['dataset']}")
    run.add_argument("--methods", type=_names, default=None, help="comma-separated method[.recipe] names, or 'all'")
    run.add_argument("--ipc", type=_ints, default=None, help=f"comma-separated; default {_shown(GRID_DEFAULTS['ipc'])}")
    run.add_argument("--distill-arch", default=None, help=f"default {GRID_DEFAULTS['distill_arch']}")
    run.add_argument("--eval-archs", type=_archs, default=None,
                     help="comma-separated evaluation architectures (any timm name; options in brackets); default "
                          f"{_shown(GRID_DEFAULTS['eval_archs'])}")
    run.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                     help="evaluate every distilled set (default); --no-evaluate: cost-only cells, as a suite's "
                          "evaluate: false")
    run.add_argument("--seeds", type=_ints, default=None,
                     help=f"evaluation seeds (one fresh network each); default {_shown(GRID_DEFAULTS['seeds'])}")
    run.add_argument("--distill-seed", type=int, default=None, help=f"default {GRID_DEFAULTS['distill_seed']}")
    run.add_argument("--protocol", type=_names, default=None,
                     help="comma-separated evaluation protocols (standard,soft: each set is distilled once and "
                          f"evaluated under each); default {_shown(GRID_DEFAULTS['protocol'])}")
    run.add_argument("--results", default=None,
                     help="folder for records and distilled sets (default: results/runs/<suite> or results/runs/default)")
    run.add_argument("--resume", action="store_true", help="skip cells whose records exist")
    run.add_argument("--batch-seeds", choices=BATCH_SEEDS, default=None,
                     help=BATCH_SEEDS_HELP.replace("the default", "the default unless a suite sets batch_seeds"))
    run.add_argument("--eval-epochs", type=int, default=None,
                     help="smoke tests only: train each evaluation network this many epochs (recorded in every record)")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="save a long distillation's loop state (APM, MTT, TESLA) every N iterations under the results "
                          "folder; a rerun of the cell after a crash or kill continues from it with the same result")
    run.add_argument("--yes", action="store_true",
                     help="confirm a very large grid (cells × evaluation architectures): refused without it, as a likely mistake")
    run.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                     help="run each cell in a fresh child process (default): its own memory peaks, and a crash or "
                          "out-of-memory kill costs only that cell")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="where cells run: local (this machine; with several GPUs, one cell per GPU at a time) or "
                          "ray (a Ray cluster, one task per cell; pip install 'ddbench[ray]')")
    run.add_argument("--ray-address", default=None,
                     help="with --executor ray: HOST:PORT of a running cluster, or auto (default): a running one, "
                          "else a new local one")
    run.add_argument("--ray-num-cpus", type=float, default=None, help="with --executor ray: CPUs per cell task (default 1)")
    run.add_argument("--ray-num-gpus", type=float, default=None,
                     help="with --executor ray: GPUs per cell task (default 1 on CUDA, else 0)")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="CPU runs: N cells side by side, each in its own process with cores/N torch threads "
                          "(default 1; recorded as cells_side_by_side)")
    _common(run)
    _measured(run)

    check = sub.add_parser("check", help="the conformance check a method must pass (for a plugin's author): digits, "
                                         "ipc 2, CPU, quick + smoke; exit 1 if any check fails")
    check.add_argument("methods", nargs="+", metavar="METHOD", help="registered method names (ddbench ls methods)")
    check.add_argument("--cache-dir", default=None, help="expert cache (default: $DDBENCH_CACHE or ~/.cache/ddbench)")

    validate = sub.add_parser("validate", help="resolve every cell of a suite and check its names, without running")
    validate.add_argument("--suite", required=True, help="a suite name (ddbench ls suites) or a suite YAML file")
    validate.add_argument("--only", action="append", metavar="KEY=VALUE",
                          help="keep only cells whose dataset, method, ipc, protocol or evaluation seed is VALUE "
                               "(repeatable), as run --only")
    validate.add_argument("--quick", action="store_true", help="resolve the quick recipes, as run --quick would")

    report = sub.add_parser("report", help="Markdown, LaTeX and figures from the records under a results folder")
    report.add_argument("--suite", default=None,
                        help="report this suite: only its records (of results/runs/<suite>, or --results), and every "
                             "cell it plans, those without a record shown as 'not run'")
    report.add_argument("--results", default=None, help="a results folder (default: results/runs/<suite>)")
    report.add_argument("--out", default="reports", help="folder for the .md, .tex and figures/ (default: reports)")

    compare = sub.add_parser("compare", help="regression check: exit 1 when a cell of CURRENT is worse than in BASELINE")
    compare.add_argument("baseline", help="results folder of the baseline (e.g. results/baselines/quick-cpu)")
    compare.add_argument("current", help="results folder to check")
    compare.add_argument("--acc-tol", type=float, default=None,
                         help=f"accuracy: points a mean may drop, whatever the spread (default {COMPARE_DEFAULTS['acc_tol']:g})")
    compare.add_argument("--acc-k", type=float, default=None,
                         help="accuracy: standard errors of the difference of the means a drop must also exceed "
                              f"(default {COMPARE_DEFAULTS['acc_k']:g})")
    compare.add_argument("--memory-rel-tol", type=float, default=None,
                         help=f"peak memory may grow by this fraction (default {COMPARE_DEFAULTS['memory_rel_tol']:g})")
    compare.add_argument("--flops-rel-tol", type=float, default=None,
                         help=f"FLOPs may grow by this fraction (default {COMPARE_DEFAULTS['flops_rel_tol']:g})")
    compare.add_argument("--time-rel-tol", type=float, default=None,
                         help="times, after dividing by the speed factor, may grow by this fraction "
                              f"(default {COMPARE_DEFAULTS['time_rel_tol']:g})")
    compare.add_argument("--only", action="append", metavar="KEY=VALUE",
                         help="compare only cells whose dataset, method, ipc or protocol is VALUE (repeatable), "
                              "e.g. after `run --suite … --only` of the same filters")
    return parser


def _ls(what: str) -> None:
    if what == "methods":
        from bench.registry import get_method_class, list_methods, method_origin

        for name in list_methods():
            cls = get_method_class(name)
            recipes = ", ".join(f"{name}.{r}" for r in cls.recipes) or "-"
            origin = method_origin(name)
            plugin = f"  (plugin: {origin.get('distribution') or origin.get('entry_point')})" if origin else ""
            print(f"{name:10s} recipes: {recipes}{plugin}")
    elif what == "suites":
        from bench.suite import list_suites, load_suite

        names = list_suites()
        width = max(map(len, names), default=0)
        for name in names:
            suite = load_suite(name)
            print(f"{name:{width}s}  v{suite.version:<3d}{'quick' if suite.quick else '     '}  "
                  f"{suite.description.splitlines()[0] if suite.description else ''}")
    elif what == "datasets":
        from bench.data import DATASETS

        for name in DATASETS.names():
            info = DATASETS.get(name)
            files = ", ".join(info.expected_files[:2]) + (" …" if len(info.expected_files) > 2 else "") or "bundled with scikit-learn"
            print(f"{name:14s} {info.num_classes:4d} classes  {info.channels}×{info.resolution}×{info.resolution}  files: {files}")
    elif what == "archs":
        from bench.models import OUR_ARCHS

        for name in OUR_ARCHS:
            print(name)
        print("… and any timm model name (e.g. resnet18, vit_tiny_patch16_224[patch_size=2]); options go in brackets.")
    else:
        from bench.evaluate import PROTOCOLS

        for name in PROTOCOLS.names():
            p = PROTOCOLS.get(name)
            decay = "epochs//2+1" if p.decay_epoch is None else p.decay_epoch
            print(f"{name:9s} v{p.version}  targets={p.targets} loss={p.loss} epochs={p.epochs} (quick {p.quick_epochs}) "
                  f"SGD lr={p.lr:g} (×0.1 from epoch {decay}; a set's learned lr replaces it: "
                  f"{'yes' if p.accepts_learned_lr else 'no'}) momentum={p.momentum:g} weight_decay={p.weight_decay:g} "
                  f"batch={p.batch_size} dsa={p.dsa} (no flip on digit datasets) reported: last epoch's test accuracy")


def _distill(args: argparse.Namespace) -> None:
    from bench.errors import UserError
    from bench.runner import RunRequest, distill_cell, plan, resolve_device
    from bench.store import check_writable_folder

    request = RunRequest(dataset=args.dataset, methods=[args.method], ipcs=[args.ipc], eval_archs=[],
                         seeds=[0], results_dir=Path("."), distill_arch=args.arch, quick=args.quick,
                         data_root=args.data_root, device=args.device, distill_seed=args.seed,
                         cache_dir=args.cache_dir, method_options={args.method: _options(args.set)},
                         isolate=False)  # distilled here, in this process: its data is loaded on the device
    (cell,) = plan(request)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --out takes a path stem (writes STEM.safetensors and STEM.json), "
                        f"e.g. {out / 'distilled'}")
    check_writable_folder(out.parent, "output folder", "pass --out with a path stem in a folder you can write to")
    distilled = distill_cell(cell, request, resolve_device(args.device), {})
    print(distilled.save(args.out))


def _evaluate(args: argparse.Namespace) -> None:
    from bench.data import from_other_files, load_dataset
    from bench.distilled import DistilledSet, content_hash
    from bench.evaluate import check_compatible, get_protocol, protocol_label
    from bench.measure import environment_stamp
    from bench.runner import (NOT_DISTILLED_HERE, _check_arch_runs, dataset_resident, measured_evaluation,
                              protocol_for, reject_negative_seeds, reject_repeats, resolve_device)
    from bench.errors import UserError
    from bench.experts import check_cache_dir, soft_targets_source
    from bench.store import check_results_dir, set_fields, stable_hash, write_record

    if not args.seeds:
        raise UserError("no seeds given: --seeds expects comma-separated integers, e.g. --seeds 0,1,2")
    reject_repeats(args.seeds, "seed")
    reject_negative_seeds(args.seeds, "evaluation seed")
    reject_repeats(args.archs, "architecture")
    distilled = DistilledSet.load(args.path)
    meta = distilled.metadata
    if "dataset" not in meta:
        raise UserError(f"{args.path}: metadata names no dataset")
    zca = (meta.get("transform") or {}).get("kind") == "zca"
    device = resolve_device(args.device)
    dataset = load_dataset(meta["dataset"], args.data_root, zca=zca, device=device)
    try:
        check_compatible(distilled, dataset)
    except UserError as exc:
        raise UserError(f"{args.path}: {exc}") from None
    if from_other_files(meta.get("data_fingerprint"), dataset.fingerprint):
        print(f"ddbench: warning: {args.path} was distilled from other {meta['dataset']} files (data fingerprint "
              f"{meta['data_fingerprint']}) than the ones evaluated on now ({dataset.fingerprint})", file=sys.stderr)
    protocol = get_protocol(args.protocol)
    if args.eval_epochs is not None and args.eval_epochs < 1:
        raise UserError(f"--eval-epochs must be at least 1, got {args.eval_epochs}")
    if not args.memory_sample_ms > 0:
        raise UserError(f"--memory-sample-ms must be above 0, got {args.memory_sample_ms:g}")
    resolved = protocol_for(protocol, distilled, args.quick, args.eval_epochs)
    for arch in args.archs:
        _check_arch_runs(arch, dataset.to("cpu"))
    check_cache_dir(args.cache_dir)  # the soft protocol's teacher and auto's engine choices live there
    if args.results:
        check_results_dir(args.results)
    teacher = None
    if resolved.targets == "soft" and distilled.soft_labels is None:
        from bench.experts import soft_protocol_teacher
        from bench.runner import log

        teacher = soft_protocol_teacher(dataset, meta.get("distill_arch") or "convnet", args.quick, device, args.cache_dir, log)
    env = environment_stamp()
    label = meta.get("method") or Path(args.path).stem  # a set made elsewhere may name no method
    set_sha256 = content_hash(args.path)  # the file evaluated, in the record and its identity: a replaced file is new
    soft_targets = (soft_targets_source(distilled.soft_labels is not None, dataset, meta.get("distill_arch") or "convnet",
                                        args.quick, device) if resolved.targets == "soft" else None)
    for arch in args.archs:
        phases: dict = {}
        fields = measured_evaluation(distilled, dataset, arch, protocol, resolved, args.seeds, device, phases, teacher,
                                     args.batch_seeds, args.cache_dir, args.memory_sample_ms / 1000)
        print(f"{meta['dataset']} {label} ipc {meta.get('ipc')} → {arch} "
              f"[{protocol_label(protocol.name, args.quick, resolved.as_record())}]: {fields['acc_mean']:.2f} ± {fields['acc_std']:.2f} "
              f"(seeds {args.seeds}: {', '.join(f'{a:.2f}' for a in fields['acc'])})")
        if args.results:
            identity = {"set": str(Path(args.path).resolve()), "set_sha256": set_sha256, "eval_arch": arch,
                        "protocol": [protocol.name, protocol.version], "quick": args.quick, "seeds": args.seeds}
            if args.eval_epochs is not None:
                identity["eval_epochs"] = args.eval_epochs
            write_record(args.results, dict(
                set_fields(meta), data_fingerprint=dataset.fingerprint,  # the data these numbers come from
                label=label, record_id=stable_hash(identity), suite=None, env=env, isolated=False,
                cells_side_by_side=1, cell_evaluations=[[protocol.name, each] for each in args.archs],
                **dataset_resident(dataset),
                eval_epochs_override=args.eval_epochs, soft_targets=soft_targets,
                # quick if any part was: the set's recipe (distilled_quick) or this evaluation's protocol (protocol_quick)
                quick=bool(args.quick or meta.get("quick")), protocol_quick=args.quick,
                distilled_quick=bool(meta.get("quick")), learned_lr=distilled.learned_lr,
                distilled_path=str(Path(args.path).resolve()), distilled_sha256=set_sha256, phases=phases, status="ok", error=None, **NOT_DISTILLED_HERE, **fields,
            ))


def _executor_options(args: argparse.Namespace) -> dict:
    """``--executor`` and its Ray settings as ``RunRequest`` fields."""
    from bench.errors import UserError

    resources = {key: value for key, value in (("num_cpus", args.ray_num_cpus), ("num_gpus", args.ray_num_gpus))
                 if value is not None}
    if args.executor != "ray" and (args.ray_address or resources):
        raise UserError("--ray-address, --ray-num-cpus and --ray-num-gpus go with --executor ray")
    return {"executor": args.executor, "ray_address": args.ray_address or "auto", "ray_resources": resources,
            "jobs": args.jobs}


def _run(args: argparse.Namespace) -> int:
    """Run a grid or a suite; end with a summary paragraph, and exit 3 when a cell's record is not ok."""
    from bench.errors import UserError
    from bench.executors import executor_session
    from bench.runner import RunRequest, check_grid_size, plan_all, reject_repeats, run_planned, summarize

    options = dict(_executor_options(args), memory_sample_s=args.memory_sample_ms / 1000)
    if args.suite:
        from bench.suite import load_suite, naming_the_suite_file, parse_only, run_suite, suite_requests

        if args.methods:
            raise UserError("--suite and --methods exclude each other: the suite names its methods")
        given = [f"--{name.replace('_', '-')}" for name in GRID_DEFAULTS if getattr(args, name) is not None]
        if given:
            raise UserError(f"{', '.join(given)} would be ignored with --suite, whose grids set them: filter its cells "
                            f"with --only (dataset=, ipc=, protocol=, seed=, method=), or copy the suite and edit it")
        if not args.evaluate:
            raise UserError("--no-evaluate is for a grid on the command line; in a suite, a grid says evaluate: false")
        suite = load_suite(args.suite)
        results = Path(args.results or f"results/runs/{suite.name}")
        only = parse_only(args.only)
        batching = {"batch_seeds": args.batch_seeds} if args.batch_seeds else {}  # else the suite's setting
        with naming_the_suite_file(suite):
            size = check_grid_size(suite_requests(suite, results, quick=args.quick, only=only, **options, **batching),
                                   args.yes)
        with executor_session(args.executor, options["ray_address"]):  # one Ray session for the whole suite
            written = run_suite(suite, results, quick=args.quick, only=only, data_root=args.data_root,
                                notes=_full_recipes_on_cpu_note(args.quick or suite.quick, args.device),
                                device=args.device, resume=args.resume, cache_dir=args.cache_dir, isolate=args.isolate,
                                eval_epochs=args.eval_epochs, checkpoint_every=args.checkpoint_every, **options,
                                **batching)
    else:
        if args.only:
            raise UserError("--only filters a suite's cells; use it with --suite")
        if not args.methods:
            raise UserError("name the methods (--methods apm,random or --methods all) or a suite (--suite quick)")
        for name, default in GRID_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        if not args.protocol:
            raise UserError("no protocol given: --protocol expects comma-separated names, e.g. --protocol standard,soft")
        reject_repeats(args.protocol, "protocol")
        results = Path(args.results or "results/runs/default")
        # one request per protocol; run together, a cell's protocols share one distillation (runner.merge_protocols).
        # Cost-only cells (--no-evaluate) keep the first, as a suite's `evaluate: false` grid does: none evaluates.
        protocols = args.protocol if args.evaluate else args.protocol[:1]
        requests = [RunRequest(dataset=args.dataset, methods=args.methods, ipcs=args.ipc,
                               eval_archs=args.eval_archs if args.evaluate else [],
                               seeds=args.seeds if args.evaluate else [], results_dir=results, protocol=protocol,
                               distill_arch=args.distill_arch, quick=args.quick, data_root=args.data_root,
                               device=args.device, distill_seed=args.distill_seed, resume=args.resume,
                               cache_dir=args.cache_dir, isolate=args.isolate, eval_epochs=args.eval_epochs,
                               batch_seeds=args.batch_seeds or "auto", checkpoint_every=args.checkpoint_every,
                               **options)
                    for protocol in protocols]
        size = check_grid_size(requests, args.yes)
        with executor_session(args.executor, options["ray_address"]):
            written = run_planned(plan_all(requests), notes=_full_recipes_on_cpu_note(args.quick, args.device))
    print(summarize(written, size - len(written), results))
    return EXIT_CELLS_FAILED if any(record["status"] != "ok" for record in written) else 0


def _full_recipes_on_cpu_note(quick: bool, device: str) -> list[str]:
    """The line printed before the full recipes run on a CPU (once the run is checked): they are sized for a GPU
    (hours to days a cell here), and --quick runs their reduced copies. A note, not a refusal: a small grid may be
    meant."""
    from bench.runner import resolve_device

    if quick or resolve_device(device).type != "cpu":
        return []
    return ["note: the full recipes on a CPU: they are sized for a GPU (hours to days a cell here); "
            "--quick runs their reduced CPU copies, flagged quick in every record"]


def _validate(args: argparse.Namespace) -> None:
    from bench.suite import describe_suite_cells, distilled_sets_note, load_suite, parse_only, suite_requests

    suite = load_suite(args.suite)
    requests = suite_requests(suite, Path("."), quick=args.quick, only=parse_only(args.only))
    lines = describe_suite_cells(suite, requests)
    print("\n".join(lines))
    print(f"suite {suite.name} v{suite.version} ({suite.path}): {len(lines)} cell{'' if len(lines) == 1 else 's'}"
          f"{distilled_sets_note(requests)}, every name resolves")


def _report(args: argparse.Namespace) -> None:
    from bench.errors import UserError
    from bench.report import write_reports

    if not args.suite and not args.results:
        raise UserError("name a suite (--suite quick) or a results folder (--results results/runs/quick)")
    suite = None
    if args.suite:
        from bench.suite import load_suite

        suite = load_suite(args.suite)
    results = args.results or f"results/runs/{suite.name}"
    if not Path(results).is_dir():
        raise UserError(f"no results folder {results}: run the suite first "
                        f"(ddbench run --suite {suite.name if suite else '…'})")
    for path in write_reports(results, args.out, name=suite.name if suite else None, suite=suite):
        print(path)


def _check(args: argparse.Namespace) -> int:
    from bench.conformance import check_method
    from bench.registry import get_method_class

    for name in args.methods:  # every name known before the first one runs
        get_method_class(name)
    failed = 0
    for name in args.methods:
        print(f"{name}:", flush=True)
        for check in check_method(name, cache_dir=args.cache_dir):
            print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}" + (f": {check.detail}" if check.detail else ""),
                  flush=True)
            failed += not check.passed
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from bench.compare import COMPARE_ONLY_KEYS, main_compare
    from bench.suite import parse_only

    overrides = {key: value for key, value in dict(acc_tol=args.acc_tol, acc_k=args.acc_k, memory_rel_tol=args.memory_rel_tol,
                 flops_rel_tol=args.flops_rel_tol, time_rel_tol=args.time_rel_tol).items() if value is not None}
    return main_compare(args.baseline, args.current, parse_only(args.only, COMPARE_ONLY_KEYS), **overrides)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's stop), taken the way Ctrl-C is: the running cells are stopped
    and recorded as interrupted, and ``--resume`` redoes them."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return _dispatch(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _dispatch(args: argparse.Namespace) -> int:
    from bench.errors import Diverged, UserError

    try:
        code = {"ls": lambda: _ls(args.what), "distill": lambda: _distill(args), "evaluate": lambda: _evaluate(args),
                "run": lambda: _run(args), "validate": lambda: _validate(args), "report": lambda: _report(args),
                "compare": lambda: _compare(args), "check": lambda: _check(args)}[args.command]()
    except UserError as exc:
        print(f"ddbench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as exc:  # `distill` (a `run` records it as the cell's status): its recipe, not ddbench, failed
        print(f"ddbench: the distillation diverged ({exc}); nothing was saved", file=sys.stderr)
        return EXIT_CELLS_FAILED
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        print(f"ddbench: {how}; the records written so far are kept, and --resume redoes the rest", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout left (`ddbench ls archs | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # after BrokenPipeError, one of its kind
        if exc.errno != errno.ENAMETOOLONG:
            raise
        print(f"ddbench: error: a path is too long for the file system: {exc.filename}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
