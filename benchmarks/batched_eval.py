"""Seed-batched vs sequential evaluation on this machine (issue 9): wall time of ``evaluate_distilled`` for S seeds
of ConvNet under the standard protocol, with the seeds trained one after the other (``--batch-seeds off``), all at
once (``on``) and as ``auto`` chooses — first with an empty cache (auto calibrates, and that cost is included),
then again with the choice it cached (what every later run on this machine pays).

Shapes: digits (1×8×8), MNIST (1×28×28) and CIFAR-10 (3×32×32, ``--shapes cifar10``), 10 classes, ipc 1/10/50 (10/100/500 images): random tensors of the
right shape — no data needed; the test set is ``--test-images`` random images (the accuracy pass is timed too).
Each timed evaluation runs in a fresh process, inside a measured ``eval`` phase — as a grid cell runs it (its own
process, memory sampler, the host allocator keeping freed memory: ``bench.host_allocator``), first-call costs
included; the time excludes the process's start and imports. (In one long process, a run right after a batched
one was up to 30 % slower on the same path, and that showed as auto — running the sequential path — at 0.79×
sequential.) ``--repeats`` measures every column that many times, interleaved, with the order of the three groups
(sequential, batched, auto's first + cached run) rotated each repeat; ``--min-column-seconds`` repeats a short
configuration more (up to ``--max-repeats``), until its sequential runs add up to that long. Times are the fastest
repeat's. Speeds are sequential time / time (above 1: faster than sequential), each the median over the repeats of
the ratio of that repeat's two runs — measured seconds apart, so that the machine's drift over minutes (up to
±30 % on the 2-core CI machine) cancels; the last repeat's auto reason is shown. The calibration cost — the time
auto's first run spends calibrating, timed apart (the fastest repeat), as a share of the sequential time — is what
the first run adds when auto then picks the sequential path.

    .venv/bin/python benchmarks/batched_eval.py [--epochs 30] [--seeds 5] [--shapes digits,mnist] [--ipc 1,10,50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import bench.evaluate as evaluate_module
import bench.experts  # noqa: F401  (the harness imports it anyway; auto's first use must not time its import)
from bench.augment import DSA
from bench.data import DATASETS, Dataset
from bench.distilled import DistilledSet
from bench.evaluate import calibrate_seed_batching, evaluate_distilled, get_protocol, read_engine_cache
from bench.measure import environment_stamp, phase
from bench.models import create_network
from bench.seeding import generator_for
from fresh_process import run_fresh

# shape name → (the registered dataset whose info it borrows, side length)
SHAPES = {"digits": ("digits", 8), "mnist": ("mnist", 28), "cifar10": ("cifar10", 32)}


def random_case(shape: str, ipc: int, test_images: int, seed: int = 0) -> tuple[DistilledSet, Dataset]:
    """A distilled set of ``10 × ipc`` random images and a random test set, shaped like ``shape``'s dataset."""
    name, side = SHAPES[shape]
    info = DATASETS.get(name)
    generator = torch.Generator().manual_seed(seed)
    n = info.num_classes * ipc
    images = torch.randn(n, info.channels, side, side, generator=generator)
    labels = torch.arange(n) % info.num_classes
    test = torch.randn(test_images, info.channels, side, side, generator=generator)
    test_labels = torch.randint(info.num_classes, (test_images,), generator=generator)
    dataset = Dataset(info, images, labels, test, test_labels, [str(c) for c in range(info.num_classes)],
                      {"kind": "random"})
    return DistilledSet(images, labels, metadata={"dataset": info.name}), dataset


AUTO_FLOOR = 0.95  # issue 9: auto is never meaningfully slower than sequential
GPU_GOAL, GPU_GOAL_IPC = 3.0, 10  # issue 9's goal on a GPU, at CIFAR-10 shapes (auto may replay CUDA graphs there)
CALIBRATION_SECONDS: list[float] = []  # time spent in auto's calibrations, measured apart from the noisy totals


def _timed_calibration(*args, **kwargs) -> tuple[float, float]:
    start = time.perf_counter()
    try:
        return calibrate_seed_batching(*args, **kwargs)
    finally:
        CALIBRATION_SECONDS.append(time.perf_counter() - start)


def timed_evaluation(distilled: DistilledSet, dataset: Dataset, arch: str, protocol, seeds: list[int],
                     batch_seeds: str, cache_dir: str, device: str = "cpu") -> tuple[float, dict, list[float]]:
    """One evaluation inside a measured ``eval`` phase, as the runner runs it (samplers, host allocator and all)."""
    start = time.perf_counter()
    with phase({}, "eval", device):
        result = evaluate_distilled(distilled, dataset, arch, protocol, seeds, device, batch_seeds=batch_seeds,
                                    cache_dir=cache_dir, log=lambda message: None)
    return time.perf_counter() - start, result.eval_engine, result.acc


def child_measurement(request: dict) -> dict:
    """The timed evaluation of one fresh process (``--child``): what a grid cell's process pays for it."""
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    evaluate_module.calibrate_seed_batching = _timed_calibration  # auto calls it through the module
    standard = get_protocol("standard").resolve(quick=not request["full_protocol"])
    protocol = replace(standard, epochs=request["epochs"], decay_epoch=request["epochs"] // 2 + 1)
    distilled, dataset = random_case(request["shape"], request["ipc"], request["test_images"])
    seconds, engine, acc = timed_evaluation(distilled, dataset, request["arch"], protocol, list(range(request["seeds"])),
                                            request["mode"], request["cache"], request["device"])
    return {"seconds": seconds, "engine": engine, "acc": acc, "calibration_s": CALIBRATION_SECONDS}


def measure_in_fresh_process(request: dict) -> dict:
    return run_fresh(__file__, "--child", json.dumps(request))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per network (lr decay at epochs//2+1)")
    parser.add_argument("--mnist-epochs", type=int, default=None,
                        help="epochs for the MNIST shapes (default: --epochs); 28×28 costs ~10–50× more per step")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shapes", default="digits,mnist")
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--arch", default="convnet", help="ConvNet: depth 1 at 8×8, 3 at 28×28; width 128, instance norm")
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run of issue 9: --device cuda "
                        "--shapes cifar10 --epochs 300 --full-protocol)")
    parser.add_argument("--full-protocol", action="store_true",
                        help="the standard protocol's full recipe (batch size and all) instead of its quick copy")
    parser.add_argument("--json", default=None, help="also write the rows and the environment stamp to this file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each column at least this many times, interleaved, and keep the fastest")
    parser.add_argument("--min-column-seconds", type=float, default=0.0,
                        help="repeat a configuration until its sequential runs add up to this many seconds")
    parser.add_argument("--max-repeats", type=int, default=15, help="the most repeats --min-column-seconds may take")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_measurement(json.loads(args.child))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    standard = get_protocol("standard").resolve(quick=not args.full_protocol)
    where = (f"{torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else
             f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    rows: list[dict] = []
    print(f"ConvNet ({args.arch}), standard protocol ({args.epochs} epochs"
          f"{f', MNIST shapes {args.mnist_epochs}' if args.mnist_epochs else ''}), {len(seeds)} seeds, batch "
          f"{standard.batch_size}, DSA on, {args.test_images} test images; {where}, "
          f"{'full' if args.full_protocol else 'quick'} protocol recipe, load average {os.getloadavg()[0]:.1f} at the start")
    print("| shape | ipc | epochs | steps | sequential s | batched s | auto, 1st run s | auto, cached s | batched speed "
          "| auto 1st speed | auto cached speed | calibration cost | calibration: batched step / S sequential steps "
          "| auto's path (reason) | repeats |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        epochs = args.mnist_epochs if shape == "mnist" and args.mnist_epochs else args.epochs
        protocol = replace(standard, epochs=epochs, decay_epoch=epochs // 2 + 1)
        for ipc in [int(i) for i in args.ipc.split(",") if i.strip()]:
            distilled, dataset = random_case(shape, ipc, args.test_images)
            times: dict[str, list[float]] = {"off": [], "on": [], "auto 1st": [], "auto cached": []}
            calibration_seconds: list[float] = []
            repeat = 0
            # at least --repeats, and more for short trainings (as timeit's autorange): a 2-second column's noise is a
            # large fraction of it
            while repeat < args.repeats or (sum(times["off"]) < args.min_column_seconds and repeat < args.max_repeats):
                with tempfile.TemporaryDirectory() as cache:  # auto's first run finds an empty cache
                    engines, accs = {}, {}
                    # rotated each repeat, so that no column always runs first (or last) on a drifting machine; auto's
                    # cached run needs its first run's choice, so the two stay together and in order
                    groups = [[("off", "off")], [("on", "on")], [("auto 1st", "auto"), ("auto cached", "auto")]]
                    for group in groups[repeat % 3:] + groups[:repeat % 3]:
                        for column, mode in group:
                            measured = measure_in_fresh_process(dict(
                                shape=shape, ipc=ipc, epochs=epochs, seeds=args.seeds, mode=mode, cache=cache,
                                arch=args.arch, device=args.device, test_images=args.test_images,
                                full_protocol=args.full_protocol, threads=args.threads))
                            times[column].append(measured["seconds"])
                            engines[column], accs[column] = measured["engine"], measured["acc"]
                            calibration_seconds += measured["calibration_s"]
                    calibrated = list(read_engine_cache(cache).values())
                acc_sequential, acc_batched = accs["off"], accs["on"]
                engine, cached_engine = engines["auto 1st"], engines["auto cached"]
                repeat += 1
            sequential, batched, auto_first, auto_cached = (min(times[column]) for column in times)
            # speeds from the runs of one repeat (seconds apart), so that the machine's drift over minutes cancels
            speed = {column: statistics.median(s / t for s, t in zip(times["off"], times[column])) for column in times}
            calibration = (f"{min(calibration_seconds):.2f} s = {100 * min(calibration_seconds) / sequential:.1f} %"
                           if calibration_seconds else "none")
            n = len(distilled)
            steps = epochs * -(-n // protocol.batch_size)
            if calibrated:  # auto calibrated in its first run
                step_s = (calibrated[0]["batched_step_s"], calibrated[0]["sequential_step_s"])
                source = "auto's"
            else:  # too short a training for auto to calibrate: what it would measure in a longer one
                models = [create_network(args.arch, 10, dataset.info.channels, dataset.resolution,
                                         generator_for(seed, "evaluate", args.arch)).to(args.device) for seed in seeds]
                augment = DSA.for_dataset(dataset.info.digit_like)
                step_s = calibrate_seed_batching(models, distilled.images.to(args.device),
                                                 distilled.labels.to(args.device), protocol, augment)[::-1]
                source = "calibrated apart"
            assert cached_engine["path"] == engine["path"]
            print(f"| {shape} {tuple(distilled.images.shape[1:])} | {ipc} | {epochs} | {steps} | {sequential:.2f} "
                  f"| {batched:.2f} | {auto_first:.2f} | {auto_cached:.2f} | {speed['on']:.2f}× "
                  f"| {speed['auto 1st']:.2f}× | {speed['auto cached']:.2f}× | {calibration} "
                  f"| {step_s[0] * 1000:.1f} / {step_s[1] * 1000:.1f} ms = {step_s[0] / step_s[1]:.2f} ({source}) "
                  f"| {engine['path']} ({engine['reason']}) | {repeat} |", flush=True)
            rows.append(dict(shape=shape, image_shape=list(distilled.images.shape[1:]), ipc=ipc, epochs=epochs,
                             steps=steps, seeds=len(seeds), sequential_s=sequential, batched_s=batched,
                             auto_first_s=auto_first, auto_cached_s=auto_cached, paired_speed=speed,
                             auto_path=engine["path"],
                             auto_reason=engine["reason"], batched_step_s=step_s[0], sequential_steps_s=step_s[1],
                             repeats=repeat, all_times_s=times))
            if max(abs(a - b) for a, b in zip(acc_sequential, acc_batched)) > 1.0:
                print(f"  note: batched and sequential accuracies differ: {acc_batched} vs {acc_sequential}")
    for column, label in (("auto 1st", "auto's first run"), ("auto cached", "auto with its cached choice")):
        if rows:
            low = min(rows, key=lambda row: row["paired_speed"][column])
            verdict = "yes" if low["paired_speed"][column] >= AUTO_FLOOR else "NO"
            print(f"{label} at least {AUTO_FLOOR}× sequential in every row: {verdict} (lowest "
                  f"{low['paired_speed'][column]:.2f}×, {low['shape']} ipc {low['ipc']})")
    for row in rows:
        if row["shape"] == "cifar10" and row["ipc"] == GPU_GOAL_IPC:
            columns = ("on", "auto cached") if row["auto_path"] == "batched" else ("on",)  # else auto is sequential
            best = max(columns, key=lambda column: row["paired_speed"][column])
            verdict = "yes" if row["paired_speed"][best] >= GPU_GOAL else "NO"
            print(f"GPU goal, batched at least {GPU_GOAL}× sequential at CIFAR-10 ipc {GPU_GOAL_IPC}: {verdict} "
                  f"(batched {row['paired_speed']['on']:.2f}×, auto cached {row['paired_speed']['auto cached']:.2f}×: "
                  f"{row['auto_reason']})")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "batched_eval", "argv": sys.argv[1:],
                                                "protocol": "full" if args.full_protocol else "quick",
                                                "device": args.device, "env": environment_stamp(), "rows": rows},
                                               indent=1))


if __name__ == "__main__":
    main()
