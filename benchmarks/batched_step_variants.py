"""What makes one seed-batched training step faster on this device (issue 9, build item 4): the steady-state time of
one step of S stacked ConvNets (``bench.evaluate._StackedSteps``, DSA on, the standard protocol's batch of 256),
computed in each of these ways:

* ``eager``          — what the batched path runs (grouped convolutions, contiguous images);
* ``channels_last``  — the same with the batch in channels-last memory format;
* ``compile``        — the forward and loss through ``torch.compile`` (inductor; backward through AOTAutograd);
* ``cuda_graphs``    — (CUDA only) the whole step — batch gather, DSA, forward, backward, SGD step — replayed
                      from a CUDA graph (``_CudaGraphSteps``);
* ``avg_pool2d``     — eager with ``avg_pool2d``'s own backward kernel, not ``HalvingAveragePool`` (CUDA only);
* ``sequential``     — the reference the batched path must beat: S one-network steps, one seed after the other
                      (``_OneNetworkSteps``, what ``--batch-seeds off`` runs), timed together;
* ``sequential_graphs`` — (CUDA only) the same, each seed's step replayed from its own CUDA graph.

Any variant's name + ``+cudnn_benchmark`` runs it with cuDNN's autotuner on (``torch.backends.cudnn.benchmark``,
which the harness leaves off): it times the convolution algorithms for each shape once and keeps the fastest,
where the default heuristic may pick a slow one for grouped convolutions. ``--profile`` then prints, for each
shape, the ten kernels with the most device time in four steps of each variant (``torch.profiler``).

Every variant trains its own stack, from the same initial networks, in one process; after a warm-up (and
``torch.compile``'s first call, reported apart), the variants take turns, ``--pairs`` two-step turns each, so
the machine's drift over minutes falls on all of them alike. The figure is the median step; the speed is
eager's median / the variant's (above 1: faster). Shapes are random tensors (10 classes, ipc images each).

    .venv/bin/python benchmarks/batched_step_variants.py [--shapes digits,mnist] [--ipc 1,10,50] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

from bench.augment import DSA
from bench.evaluate import _CudaGraphSteps, _OneNetworkSteps, _stacked_losses, _StackedSteps, _Steps, get_protocol
from bench.measure import environment_stamp
from bench.models import create_network
from bench.seed_stack import SeedStack

SHAPES = {"digits": (1, 8), "mnist": (1, 28), "cifar10": (3, 32)}  # channels, side


AUTOTUNED = "+cudnn_benchmark"
VARIANTS = ("eager", "channels_last", "compile", "cuda_graphs", "avg_pool2d", "sequential", "sequential_graphs")


def variant_steps(variant: str, stack: SeedStack, protocol) -> _Steps:
    steps = _StackedSteps(stack, protocol)
    if variant == "channels_last":
        stack.memory_format = torch.channels_last
    elif variant == "avg_pool2d":
        stack.halving_pool = False
    elif variant == "compile":
        steps.losses = torch.compile(lambda x, t: _stacked_losses(protocol, stack.logits(x), t))
    elif variant == "cuda_graphs":
        return _CudaGraphSteps(steps)
    return steps


def print_profile(title: str, runners: dict[str, Callable[[], None]], device: torch.device) -> None:
    """The ten kernels with the most device time (self time, summed) in four steps of each variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for variant, step in runners.items():
        with profile(activities=activities) as profiler:
            for _ in range(4):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n{title}, {variant}, 4 steps:\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=10,
                                                                                     max_name_column_width=60))


def measure(shape: str, ipc: int, seeds: int, pairs: int, device: torch.device, variants: list[str],
            profile: bool = False) -> dict:
    channels, side = SHAPES[shape]
    n = 10 * ipc
    images = torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(n) % 10).to(device)
    protocol = get_protocol("standard")
    augment = DSA.for_dataset(shape != "cifar10")
    initial = [create_network("convnet", 10, channels, side, torch.Generator().manual_seed(s)) for s in range(seeds)]

    def runner(variant: str) -> Callable[[], None]:
        generators = [torch.Generator().manual_seed(s) for s in range(seeds)]
        name = variant.removesuffix(AUTOTUNED)
        if name in ("sequential", "sequential_graphs"):
            alone = [_OneNetworkSteps(copy.deepcopy(m).to(device).train(), protocol) for m in initial]
            each = [_CudaGraphSteps(steps) for steps in alone] if name == "sequential_graphs" else alone

            def step() -> None:
                for steps, generator in zip(each, generators):
                    batch = torch.randperm(n, generator=generator)[: protocol.batch_size].to(device)
                    steps.train_step(images, labels, [batch], [generator], augment)
        else:
            stacked = variant_steps(name, SeedStack([copy.deepcopy(m).to(device) for m in initial]).train(), protocol)

            def step() -> None:
                batches = [torch.randperm(n, generator=g)[: protocol.batch_size].to(device) for g in generators]
                stacked.train_step(images, labels, batches, generators, augment)

        def one_step() -> None:
            with torch.backends.cudnn.flags(enabled=True, benchmark=variant.endswith(AUTOTUNED),
                                            deterministic=False, allow_tf32=torch.backends.cudnn.allow_tf32):
                step()
        return one_step

    def timed(step: Callable[[], None], count: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / count

    runners = {variant: runner(variant) for variant in variants}
    first_call = {variant: timed(step, 1) for variant, step in runners.items()}
    for step in runners.values():
        timed(step, 4)  # warm-up (and, for cuda_graphs, the captures)
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(pairs):
        for variant, step in runners.items():
            seconds[variant].append(timed(step, 2))
    medians = {variant: statistics.median(values) for variant, values in seconds.items()}
    if profile:
        print_profile(f"{shape} ipc {ipc}", runners, device)
    return {"shape": shape, "ipc": ipc, "first_call_s": first_call, "median_step_s": medians,
            "speed_vs_eager": {variant: medians["eager"] / value for variant, value in medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="digits,mnist")
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=12, help="turns of two steps each variant takes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=None, help="default: eager,sequential,channels_last,compile (+cuda_graphs on CUDA)")
    parser.add_argument("--profile", action="store_true", help="print each variant's ten costliest kernels")
    args = parser.parse_args()
    device = torch.device(args.device)
    variants = (args.variants.split(",") if args.variants else
                ["eager", "sequential", "channels_last", "compile", *(["cuda_graphs"] if device.type == "cuda" else [])])
    if variants[0] != "eager":
        parser.error("the first variant must be eager (the reference)")
    unknown = [v for v in variants if v.removesuffix(AUTOTUNED) not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; known: {', '.join(VARIANTS)} (each may end in {AUTOTUNED})")
    env = environment_stamp()
    where = env.get("gpu_name") if device.type == "cuda" else f"{env.get('cpu_model')}, {torch.get_num_threads()} threads"
    print(f"batched ConvNet step, {args.seeds} seeds, DSA, batch 256 — {where}, torch {torch.__version__}, "
          f"git {str(env.get('git_sha'))[:7]}{' (dirty)' if env.get('git_dirty') else ''}")
    print("| shape | ipc | " + " | ".join(f"{v} ms (speed)" for v in variants) + " | compile's first call s |")
    print("|---|---:|" + "---:|" * len(variants) + "---:|")
    for shape in args.shapes.split(","):
        for ipc in (int(value) for value in args.ipc.split(",")):
            row = measure(shape, ipc, args.seeds, args.pairs, device, variants, args.profile)
            cells = [f"{row['median_step_s'][v] * 1000:.2f} ({row['speed_vs_eager'][v]:.2f}×)" for v in variants]
            compile_first = row["first_call_s"].get("compile")
            print(f"| {shape} | {ipc} | " + " | ".join(cells)
                  + f" | {'–' if compile_first is None else f'{compile_first:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
