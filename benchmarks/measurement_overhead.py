"""What measuring costs: a quick APM distillation with and without the harness's measurement.

"measured" is the harness's own path (``bench.runner.distill_cell``): the memory samplers around the ``experts``
and ``distill`` phases (on Linux the kernel's peak-RSS mark, with no thread, for the process itself), per-iteration
timing and reporting, and the FLOP-counting window. "plain" calls the same method on the same context with nothing
attached; "no FLOPs" is the harness's path with the FLOP-counting window turned off. The three alternate,
``--repeats`` times each, in this one process (experts cached by a first, unmeasured run).

Two estimates are printed:

* **end to end**: median wall times and their ratios. On a shared 2-core machine whole runs of the same work vary
  by far more than the 1 % being measured (27.6–35.8 s and 9.3–13.8 s in the two logs under
  ``results/cpu/2026-11-30-amd-epyc/``), so this is a sanity check only; the line prints this run's spread;
* **from its parts, measured in the run** (the figure to quote): what measuring adds — the FLOP-counting window's
  excess over an uncounted period of the same run (``iter_time_s.flop_window_s − per_period × median``), the
  per-iteration bookkeeping (meter, progress bar) timed over 20,000 calls, the phases' sampler start/stop, and any
  sampler thread's own CPU time — as a share of the plain run's wall time.

    .venv/bin/python benchmarks/measurement_overhead.py [--repeats 5] [--ipc 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import measure
from bench.data import load_dataset
from bench.registry import create_method, default_recipe
from bench.runner import Cell, RunRequest, distill_cell
from bench.seeding import generator_for
from methods.base import DistillContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; `make bench` gives each cell 1 on 2 cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_dataset("digits")
    spec = f"apm.{default_recipe('apm', 'digits', args.ipc)}"
    method = create_method(spec, quick=True)
    cache = tempfile.mkdtemp(prefix="ddbench-overhead-")
    request = RunRequest(dataset="digits", methods=[spec], ipcs=[args.ipc], eval_archs=["convnet"], seeds=[0],
                         results_dir=Path(cache), quick=True, cache_dir=cache, isolate=False)
    cell = Cell(spec, method, args.ipc, dataset)
    device = torch.device("cpu")

    def plain() -> float:
        ctx = DistillContext(dataset, args.ipc, "convnet", generator_for(0, "distill", "digits", str(args.ipc)),
                             device, quick=True, cache_dir=cache)
        start = time.perf_counter()
        method.distill(ctx)
        return time.perf_counter() - start

    flops = []

    window_excess = []

    def measured() -> float:
        phases: dict = {}
        start = time.perf_counter()
        distill_cell(cell, request, device, phases)
        elapsed = time.perf_counter() - start
        iterations = phases["_iterations"]
        flops.append(iterations["flops_per_iter"])
        per_iteration = iterations["iter_time_s"]
        if per_iteration.get("flop_window_s") is not None:
            window_excess.append(per_iteration["flop_window_s"] - (per_iteration.get("per_period") or 1) * per_iteration["median"])
        return elapsed

    def no_flops() -> float:
        start_counting = measure.FlopCounter.start
        measure.FlopCounter.start = lambda self: None  # the window opens and closes, counting nothing
        try:
            return measured()
        finally:
            measure.FlopCounter.start = start_counting
            flops.pop()

    plain()  # trains and caches the experts; warms up the allocator and the kernels
    series = [("plain", plain), ("measured", measured), ("no FLOPs", no_flops)]
    times: dict[str, list[float]] = {name: [] for name, _ in series}
    cpu_times: dict[str, list[float]] = {name: [] for name, _ in series}
    for r in range(args.repeats):
        for name, fn in series[r % 3:] + series[:r % 3]:  # rotate the order: no series always runs first
            cpu_start = time.process_time()
            times[name].append(fn())
            cpu_times[name].append(time.process_time() - cpu_start)
            print(f"repeat {r} {name:<9} {times[name][-1]:.3f} s (CPU {cpu_times[name][-1]:.3f} s)", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = [m / p for m, p in zip(times["measured"], times["plain"])]
    ratios_no_flops = [m / p for m, p in zip(times["no FLOPs"], times["plain"])]
    print(f"\nquick APM, digits ipc {args.ipc}, {method.config.iterations} iterations, torch threads "
          f"{torch.get_num_threads()}, sampler interval {measure.DEFAULT_SAMPLE_INTERVAL_S * 1000:.0f} ms, {args.repeats} repeats each")
    print(f"plain    median {median['plain']:.3f} s  (min {min(times['plain']):.3f})")
    print(f"measured median {median['measured']:.3f} s  (min {min(times['measured']):.3f})  flops/iter {flops[-1]}")
    print(f"no FLOPs median {median['no FLOPs']:.3f} s  (min {min(times['no FLOPs']):.3f})")
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    print(f"CPU time medians: plain {cpu['plain']:.3f} s, measured {cpu['measured']:.3f} s, no FLOPs {cpu['no FLOPs']:.3f} s")
    every_run = [t for runs in times.values() for t in runs]
    print(f"end to end (whole runs of the same work took {min(every_run):.1f}–{max(every_run):.1f} s here, "
          f"{100 * (max(every_run) / min(every_run) - 1):.0f} % apart):")
    for label, name, paired in (("  overhead", "measured", ratios), ("  without the FLOP window", "no FLOPs", ratios_no_flops)):
        print(f"{label}: medians {100 * (median[name] / median['plain'] - 1):+.2f} %, "
              f"minima {100 * (min(times[name]) / min(times['plain']) - 1):+.2f} %, "
              f"median of paired ratios {100 * (statistics.median(paired) - 1):+.2f} %, "
              f"CPU time medians {100 * (cpu[name] / cpu['plain'] - 1):+.2f} %")
    parts = measured_parts(method.config.iterations, median["plain"])
    parts["FLOP window: excess over an uncounted period"] = statistics.median(window_excess)
    total = sum(parts.values())
    print(f"from its parts, measured in the run (share of the plain run's median {median['plain']:.3f} s):")
    for label, seconds in parts.items():
        print(f"  {label:<52} {seconds * 1000:9.2f} ms  {100 * seconds / median['plain']:6.3f} %")
    print(f"  {'total':<52} {total * 1000:9.2f} ms  {100 * total / median['plain']:6.3f} %")


def measured_parts(iterations: int, distill_s: float) -> dict[str, float]:
    """Seconds the harness adds to one distillation of ``distill_s`` seconds outside the FLOP window, each part
    timed apart."""
    from bench.progress import progress_bar
    from bench.runner import IterationMeter

    calls = 20_000
    meter, bar = IterationMeter(torch.device("cpu"), period=3), progress_bar("bookkeeping", total=calls)
    meter.start(calls)
    meter._counted = True  # time the bookkeeping only: no FLOP window here
    losses = {"loss": 0.5, "disagreement": 1.25, "teacher_ce": 0.01}
    start = time.perf_counter()
    for _ in range(calls):
        meter.iteration_done()
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
    per_iteration = (time.perf_counter() - start) / calls
    bar.close()
    phases: dict = {}
    start = time.perf_counter()
    for _ in range(100):
        with measure.phase(phases, "distill"):
            pass
    per_phase = (time.perf_counter() - start) / 100
    parts = {f"bookkeeping × {iterations} iterations (meter, progress bar)": per_iteration * iterations,
             "2 phases (experts, distill): samplers started, stopped": 2 * per_phase}
    sampler = measure.MemorySampler().start()  # as a phase starts it
    time.sleep(1.0)
    sampler.stop()
    if sampler.thread_cpu_s is None:  # no thread: on Linux the kernel keeps this process's peak RSS
        parts["sampler thread: none (the kernel's peak-RSS mark)"] = 0.0
    else:  # its CPU time over one second, scaled to the distillation's length
        parts["sampler thread: its CPU time"] = sampler.thread_cpu_s * distill_s
    return parts


if __name__ == "__main__":
    main()
