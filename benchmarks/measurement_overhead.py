"""What measuring costs: a quick APM distillation with and without the harness's measurement.

"measured" is the harness's own path (``bench.runner.distill_cell``): memory-sampler threads around the
``experts`` and ``distill`` phases (10 ms interval), per-iteration timing and the FLOP-counting window.
"plain" calls the same method on the same context with nothing attached. The two alternate, ``--repeats``
times each, in this one process (experts cached by a first, unmeasured run), and the script prints the median
wall time of each and the overhead. Run it on an otherwise idle machine: two cores shared with anything else
make single runs vary by far more than 1 %.

    .venv/bin/python benchmarks/measurement_overhead.py [--repeats 5] [--ipc 1]
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
    args = parser.parse_args()

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

    def measured() -> float:
        phases: dict = {}
        start = time.perf_counter()
        distill_cell(cell, request, device, phases)
        elapsed = time.perf_counter() - start
        flops.append(phases["_iterations"]["flops_per_iter"])
        return elapsed

    plain()  # trains and caches the experts; warms up the allocator and the kernels
    times: dict[str, list[float]] = {"plain": [], "measured": []}
    for r in range(args.repeats):
        for name, fn in (("plain", plain), ("measured", measured)) if r % 2 == 0 else (("measured", measured), ("plain", plain)):
            times[name].append(fn())
            print(f"repeat {r} {name:<9} {times[name][-1]:.3f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = [m / p for m, p in zip(times["measured"], times["plain"])]
    print(f"\nquick APM, digits ipc {args.ipc}, {method.config.iterations} iterations, torch threads "
          f"{torch.get_num_threads()}, sampler interval {measure.DEFAULT_SAMPLE_INTERVAL_S * 1000:.0f} ms, {args.repeats} repeats each")
    print(f"plain    median {median['plain']:.3f} s  (min {min(times['plain']):.3f})")
    print(f"measured median {median['measured']:.3f} s  (min {min(times['measured']):.3f})  flops/iter {flops[-1]}")
    print(f"overhead: medians {100 * (median['measured'] / median['plain'] - 1):+.2f} %, "
          f"minima {100 * (min(times['measured']) / min(times['plain']) - 1):+.2f} %, "
          f"median of paired ratios {100 * (statistics.median(ratios) - 1):+.2f} %")


if __name__ == "__main__":
    main()
