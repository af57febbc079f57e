"""What APM's segment size costs in time when the update batch is a small part of the synthetic set (issue 5).

The paper reports, at ImageNet-1K ipc 50 (50,000 synthetic images of 3×64×64, ``batch_syn`` 500), 8.6 / 11.1 /
18.2 s per iteration at segment 500 / 250 / 100. Every segment pass backpropagates to the images; how much work
that pass does *outside* the networks decides whether small segments cost time:

* ``official`` — the bookkeeping of the official code (``mchen725/DD_APM``, ``distill.py``), re-implemented from
  its description: the synthetic set lives on the host; every segment pass (K student passes, each recomputing
  the teacher's forward, then one class-term pass) backpropagates through an index of the whole set, adds the
  whole set's gradient into an accumulator and zeroes it — work proportional to the *set*, once per pass and
  segment;
* ``ddbench`` — ``methods.apm.image_step`` as it is in this checkout (the teacher's forward shared per segment;
  run it on two commits to compare them).

Only the image step is timed (teacher and students are fixed, untrained networks: the student training does not
depend on the segment), with the image optimiser's step, as one iteration of ``APM.distill_group`` spends it.
The networks default to a narrow ConvNet (``--arch``), so that the run fits on a CPU; the bookkeeping does not
depend on them. The set is ``--images`` random tensors. Each (variant, segment) runs in a fresh process, inside a
measured phase as the harness runs a distillation (freed memory kept: ``bench.host_allocator``); its peak RSS is
that phase's.

    .venv/bin/python benchmarks/apm_segment_cost.py [--images 50000] [--segments 500,250,100] [--variants official,ddbench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.measure import phase
from fresh_process import run_fresh
from bench.models import create_network
from methods.apm import image_step


def official_style_step(images: Tensor, labels: Tensor, batch: Tensor, teacher: nn.Module, students: list[nn.Module],
                        ce: float, segment: int, device: torch.device) -> None:
    """The official code's segment loop: per student and segment, the teacher's forward again and a backward
    through ``images[chunk]`` (moved to the networks' device) into the whole set's gradient, added into a
    whole-set accumulator, then zeroed."""
    accumulated = torch.zeros_like(images)
    chunks = batch.split(segment)
    for student in students:
        for chunk in chunks:
            u = images[chunk].to(device)
            loss = -(len(chunk) / len(batch)) * F.l1_loss(student(u), teacher(u))
            loss.backward()
            accumulated += images.grad
            images.grad.zero_()
    for chunk in chunks:
        u = images[chunk].to(device)
        ((len(chunk) / len(batch)) * ce * F.cross_entropy(teacher(u), labels[chunk].to(device))).backward()
        accumulated += images.grad
        images.grad.zero_()
    images.grad = accumulated


def measure(variant: str, segment: int, args: argparse.Namespace) -> dict:
    shape = tuple(int(s) for s in args.shape.split(","))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, *shape, generator=generator).requires_grad_(True)
    labels = torch.arange(args.images) % args.classes
    device = torch.device(args.device)
    networks = [create_network(args.arch, args.classes, shape[0], shape[1], torch.Generator().manual_seed(s)).eval()
                .to(device) for s in range(args.students + 1)]
    for network in networks:
        network.requires_grad_(False)
    teacher, students = networks[0], networks[1:]
    optimizer = torch.optim.SGD([images], lr=1.0, momentum=0.5)
    seconds, phases = [], {}
    with phase(phases, "distill", device):  # as the harness runs a distillation (freed host memory kept)
        _iterate(variant, segment, args, images, labels, teacher, students, optimizer, generator, seconds, device)
    figures = phases["distill"]
    return {"variant": variant, "segment": segment, "s_per_iter": statistics.median(seconds[1:]),
            "all_s": seconds, "peak_rss_mb": figures["cpu_peak_rss_mb"],
            "gpu_allocated_peak_mb": figures["gpu_torch_allocated_peak_mb"], "gpu_nvml_peak_mb": figures["gpu_nvml_peak_mb"]}


def _iterate(variant: str, segment: int, args: argparse.Namespace, images: Tensor, labels: Tensor, teacher: nn.Module,
             students: list[nn.Module], optimizer: torch.optim.Optimizer, generator: torch.Generator,
             seconds: list[float], device: torch.device) -> None:
    for _ in range(args.iterations + 1):
        batch = torch.randperm(args.images, generator=generator)[:args.batch_syn]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if variant == "official":
            official_style_step(images, labels, batch, teacher, students, args.ce, segment, device)
        else:
            image_step(images, labels, batch, teacher, students, args.ce, segment, device)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="synthetic set size (ImageNet-1K ipc 50: 50,000)")
    parser.add_argument("--shape", default="3,64,64")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-syn", type=int, default=500)
    parser.add_argument("--segments", default="500,250,100")
    parser.add_argument("--students", type=int, default=5, help="K")
    parser.add_argument("--ce", type=float, default=0.1)
    parser.add_argument("--arch", default="convnet[width=16]", help="teacher and students (ConvNet-4 at 64×64)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations, after one warm-up")
    parser.add_argument("--variants", default="official,ddbench")
    parser.add_argument("--device", default="cpu", help="where the networks run (the set stays in host memory, as in "
                                                         "the official code and ddbench's APM)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, segment = args.child.split(":")
        print(json.dumps(measure(variant, int(segment), args)))
        return
    print(f"APM image step: {args.images} synthetic images of {args.shape}, batch_syn {args.batch_syn}, K {args.students}, "
          f"{args.arch}, {torch.get_num_threads()} torch threads; median of {args.iterations} iterations after a warm-up; "
          f"each (variant, segment) in a fresh process")
    print(f"device: {args.device}")
    print("| variant | segment | s/iteration | × segment = batch_syn | peak RSS MB | GPU allocator peak MB | GPU NVML peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        first = None
        for segment in [int(s) for s in args.segments.split(",")]:
            row = run_fresh(__file__, *sys.argv[1:], "--child", f"{variant}:{segment}")
            first = first or row["s_per_iter"]
            gpu = [("–" if row[key] is None else f"{row[key]:.0f}") for key in ("gpu_allocated_peak_mb", "gpu_nvml_peak_mb")]
            print(f"| {variant} | {segment} | {row['s_per_iter']:.2f} | {row['s_per_iter'] / first:.2f}× "
                  f"| {row['peak_rss_mb']:.0f} | {gpu[0]} | {gpu[1]} |", flush=True)


if __name__ == "__main__":
    main()
