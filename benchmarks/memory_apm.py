"""Peak memory of APM against K (checkpoints), E (student epochs) and the segment size.

APM's claim (Chen et al. 2023, §4 and Fig. 4): the image step holds one teacher graph and one student graph of
``segment`` images at a time, so peak memory grows with ``segment`` and depends neither on K nor on E. Each point
runs ONE APM iteration — teacher logits, a fresh student trained for E epochs with K checkpoints, the segmented
image step — in a fresh Python subprocess, so its peak RSS (``ru_maxrss``) is that point's alone. The problem is
CIFAR-sized and random: 3×32×32 images, 10 classes, ipc 50 (batch_syn 500, the paper's), ConvNet width 128
depth 3, a random teacher — nothing to train or download. CPU only.

    .venv/bin/python benchmarks/memory_apm.py            # the three sweeps
    .venv/bin/python benchmarks/memory_apm.py --quick    # smaller problem (ipc 20) for a fast look
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from fresh_process import run_fresh

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one_point(checkpoints: int, epochs: int, segment: int, ipc: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.data import Dataset, DatasetInfo
    from bench.models import create_network
    from bench.registry import create_method
    from methods.base import DistillContext

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    info = DatasetInfo("random32", 10, 3, 32, None, None, False, (), loader=lambda root, res: None, needs_root=False)
    images = torch.randn(10 * ipc, 3, 32, 32, generator=g)
    labels = torch.arange(10).repeat_interleave(ipc)
    data = Dataset(info, images, labels, images[:10], labels[:10], [str(c) for c in range(10)], {"kind": "mean_std"})
    teacher = create_network("convnet", 10, 3, 32, g).eval()

    class OneTeacher:
        count = 1

        def network(self, index: int) -> torch.nn.Module:
            return teacher

    method = create_method("apm", iterations=1, student_epochs=epochs, checkpoints=checkpoints, segment=segment,
                           num_experts=1, mid_gap=2)
    ctx = DistillContext(data, ipc, "convnet", g, torch.device("cpu"))
    before = rss_mb()
    start = time.perf_counter()
    method.distill_group(ctx, OneTeacher(), ipc, g)
    return {"K": checkpoints, "E": epochs, "segment": segment, "batch_syn": 10 * ipc, "baseline_mb": round(before, 1),
            "peak_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, type=int, metavar=("K", "E", "SEGMENT"), help=argparse.SUPPRESS)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_point(*args.one, ipc=args.ipc)))
        return
    ipc = 20 if args.quick else args.ipc
    batch = 10 * ipc
    sweeps = {
        "K (E 10, segment 100)": [(k, 10, 100) for k in (1, 5, 10)],
        "E (K 5, segment 100)": [(5, e, 100) for e in (5, 10, 20)],
        f"segment (K 5, E 5, batch_syn {batch})": [(5, 5, s) for s in (25, 100, batch // 2, batch)],
    }
    print(f"APM, one iteration per fresh process, CIFAR-sized random problem, batch_syn {batch}")
    print(f"{'sweep':38s} {'K':>3s} {'E':>4s} {'segment':>8s} {'peak RSS MB':>12s} {'baseline MB':>12s} {'s':>6s}")
    for title, points in sweeps.items():
        for k, e, s in points:
            r = run_fresh(__file__, "--one", str(k), str(e), str(s), "--ipc", str(ipc))
            print(f"{title:38s} {k:3d} {e:4d} {s:8d} {r['peak_mb']:12.1f} {r['baseline_mb']:12.1f} {r['seconds']:6.1f}")


if __name__ == "__main__":
    main()
