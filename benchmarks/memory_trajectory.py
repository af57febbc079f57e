"""Peak memory of one MTT and one TESLA iteration against the number of student steps (syn_steps).

MTT back-propagates through a graph of all N student steps, so its memory should grow linearly with N; TESLA
(``methods.mtt.constant_memory_gradient``) keeps one step's graph at a time and should stay flat. Each point
runs in a fresh Python subprocess, so the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
is that point's alone. The problem is CIFAR-sized and random — 3×32×32 images, 10 classes, ipc 10 (all 100
images in every step), ConvNet width 128 depth 3, random start/target parameters, DSA on — so nothing needs to
be trained or downloaded. CPU only.

    .venv/bin/python benchmarks/memory_trajectory.py                 # syn_steps 5, 10, 20, 40
    .venv/bin/python benchmarks/memory_trajectory.py --steps 5,10,20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from fresh_process import run_fresh

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one_point(method: str, syn_steps: int, ipc: int, width: int, threads: int) -> dict:
    """Set up the problem, then run one iteration's gradient; report peak RSS before and after."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.augment import DSA
    from bench.models import create_network
    from methods.mtt import FlatParams, constant_memory_gradient, plan_student_steps, unrolled_gradient

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    classes = 10
    model = create_network(f"convnet[width={width},depth=3]", classes, 3, 32, g)
    layout = FlatParams(model)
    images = torch.randn(classes * ipc, 3, 32, 32, generator=g)
    labels = torch.arange(classes).repeat_interleave(ipc)
    theta_start = layout.flatten(dict(model.named_parameters())).detach()
    theta_target = theta_start + 0.01 * torch.randn(layout.size, generator=g)
    augment = DSA.for_dataset(digit_like=False)
    steps = plan_student_steps(len(images), syn_steps, None, (32, 32), augment, g)
    alpha = torch.tensor(0.01)
    gradient = {"mtt": unrolled_gradient, "tesla": constant_memory_gradient}[method]
    before = rss_mb()
    start = time.perf_counter()
    result = gradient(model, layout, images, labels, alpha, theta_start, theta_target, steps, augment)
    seconds = time.perf_counter() - start
    return {"method": method, "syn_steps": syn_steps, "baseline_mb": round(before, 1), "peak_mb": round(rss_mb(), 1),
            "seconds": round(seconds, 2), "loss": float(result.loss), "params": layout.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,10,20,40", help="comma-separated syn_steps values")
    parser.add_argument("--methods", default="mtt,tesla")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each subprocess")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SYN_STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(one_point(args.one[0], int(args.one[1]), args.ipc, args.width, args.threads)))
        return

    rows = []
    for syn_steps in [int(s) for s in args.steps.split(",")]:
        for method in args.methods.split(","):
            command = [__file__, "--one", method, str(syn_steps), "--ipc", str(args.ipc),
                       "--width", str(args.width), "--threads", str(args.threads)]
            try:
                rows.append(run_fresh(*command, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))))
            except subprocess.CalledProcessError as failed:
                tail = (failed.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
                rows.append({"method": method, "syn_steps": syn_steps, "error": f"exit {failed.returncode}: {tail}"})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"\nPeak RSS of one iteration, CIFAR-sized random problem (3×32×32, 10 classes, ipc {args.ipc}, "
          f"ConvNet width {args.width} depth 3, batch_syn = all), fresh process per point:\n")
    methods = args.methods.split(",")
    print("| syn_steps | " + " | ".join(f"{m} peak RSS (MB) | {m} s" for m in methods) + " |")
    print("|---:|" + "---:|---:|" * len(methods))
    for syn_steps in sorted({r["syn_steps"] for r in rows}):
        cells = []
        for m in methods:
            r = next(r for r in rows if r["method"] == m and r["syn_steps"] == syn_steps)
            cells += [r.get("error", str(r.get("peak_mb"))), str(r.get("seconds", "–"))]
        print(f"| {syn_steps} | " + " | ".join(cells) + " |")
    baseline = min((r["baseline_mb"] for r in rows if "baseline_mb" in r), default=None)
    if baseline is not None:
        print(f"\n(RSS after setup, before the iteration: ~{baseline:.0f} MB)")


if __name__ == "__main__":
    main()
