"""What keeping freed memory inside a phase (``bench.host_allocator``) changes: evaluation wall time, CPU time in
the kernel, page faults and the phase's peak RSS, with glibc's default malloc settings and with the harness's.

Each measurement is a fresh process that evaluates a random distilled set (``benchmarks/batched_eval.py``'s
shapes) for 5 seeds of ConvNet under the standard protocol, inside ``bench.measure.phase`` as the runner does,
once sequentially and once seed-batched (after one untimed epoch of each). The two settings alternate, process
after process, ``--repeats`` times; the table gives medians and the median of the paired ratios (default time /
kept time, each pair measured back to back, so that the machine's drift cancels).

    .venv/bin/python benchmarks/host_allocator.py [--repeats 3] [--cases digits:10:30,mnist:10:3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from fresh_process import run_fresh

sys.path.insert(0, str(Path(__file__).resolve().parent))  # batched_eval's random_case


def child(shape: str, ipc: int, epochs: int, seeds: int) -> dict:
    """One process's measurement: both paths' wall, user and kernel seconds, page faults and phase peak RSS."""
    from batched_eval import random_case

    from bench.evaluate import evaluate_distilled, get_protocol
    from bench.measure import phase
    from bench.host_allocator import description

    protocol = get_protocol("standard").resolve(quick=True)
    protocol = replace(protocol, epochs=epochs, decay_epoch=epochs // 2 + 1)
    distilled, dataset = random_case(shape, ipc, 100)
    figures = {"host_allocator": description()}
    with tempfile.TemporaryDirectory() as cache:
        for mode in ("off", "on"):
            with phase({}, "eval"):
                evaluate_distilled(distilled, dataset, "convnet", replace(protocol, epochs=1), list(range(seeds)),
                                   "cpu", batch_seeds=mode, cache_dir=cache, log=lambda message: None)
        for mode, path in (("off", "sequential"), ("on", "batched")):
            phases: dict = {}
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            with phase(phases, "eval"):
                evaluate_distilled(distilled, dataset, "convnet", protocol, list(range(seeds)), "cpu",
                                   batch_seeds=mode, cache_dir=cache, log=lambda message: None)
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            figures[path] = {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                             "kernel_s": after.ru_stime - before.ru_stime,
                             "page_faults": after.ru_minflt - before.ru_minflt,
                             "peak_rss_mb": phases["eval"]["cpu_peak_rss_mb"]}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="digits:10:30,digits:50:30,mnist:10:3,mnist:50:1",
                        help="shape:ipc:epochs, comma-separated")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, ipc, epochs = args.child.split(":")
        print(json.dumps(child(shape, int(ipc), int(epochs), args.seeds)))
        return

    settings = {"glibc default": {"DDBENCH_KEEP_FREED_MEMORY": "0"}, "kept in phase": {}}
    print(f"5-seed ConvNet evaluation inside a measured phase, one fresh process per measurement, {args.repeats} "
          f"alternating repeats; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print("| shape | ipc | epochs | path | malloc | wall s | user s | kernel s | page faults | phase peak RSS MB "
          "| default / kept (paired median) |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        shape, ipc, epochs = case.split(":")
        runs: dict[str, list[dict]] = {name: [] for name in settings}
        for repeat in range(args.repeats):
            order = list(settings) if repeat % 2 == 0 else list(settings)[::-1]
            for name in order:
                env = {key: value for key, value in os.environ.items() if key != "DDBENCH_KEEP_FREED_MEMORY"}
                env.update(settings[name])
                runs[name].append(run_fresh(__file__, "--child", case, "--seeds", str(args.seeds), env=env))
        for path in ("sequential", "batched"):
            ratios = [default[path]["wall_s"] / kept[path]["wall_s"]
                      for default, kept in zip(runs["glibc default"], runs["kept in phase"])]
            for name in settings:
                rows = [run[path] for run in runs[name]]
                median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
                ratio = f"{statistics.median(ratios):.2f}× ({', '.join(f'{r:.2f}' for r in ratios)})" \
                    if name == "kept in phase" else ""
                print(f"| {shape} | {ipc} | {epochs} | {path} | {name} | {median['wall_s']:.2f} | {median['user_s']:.2f} "
                      f"| {median['kernel_s']:.2f} | {median['page_faults']:.0f} | {median['peak_rss_mb']:.0f} | {ratio} |",
                      flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for name in settings:
        print(f"{name}: {runs[name][0]['host_allocator']}")


if __name__ == "__main__":
    main()
