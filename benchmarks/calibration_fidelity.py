"""Does auto's calibration predict whole trainings? Its batched / sequential ratio beside the ratio of whole
evaluations' training times, in one process, inside a measured phase as the runner runs it.

Each round: ``calibrate_seed_batching`` on fresh networks (S seeds of ConvNet), then the same S networks trained
for ``--epochs`` one after the other (``train_network``) and all at once (``train_networks_batched``). Random
images of the shape (``benchmarks/batched_eval.py``'s cases), standard protocol, DSA on.

    .venv/bin/python benchmarks/calibration_fidelity.py [--shape digits] [--ipc 10] [--epochs 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # batched_eval's random_case

from batched_eval import random_case  # noqa: E402

from bench.augment import DSA  # noqa: E402
from bench.evaluate import calibrate_seed_batching, get_protocol, train_network, train_networks_batched  # noqa: E402
from bench.measure import phase  # noqa: E402
from bench.models import create_network  # noqa: E402
from bench.seeding import generator_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="digits")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    protocol = get_protocol("standard").resolve(quick=True)
    protocol = replace(protocol, epochs=args.epochs, decay_epoch=args.epochs // 2 + 1)
    distilled, dataset = random_case(args.shape, args.ipc, 100)
    augment = DSA.for_dataset(dataset.info.digit_like)
    steps = args.epochs * -(-len(distilled) // protocol.batch_size)

    def networks() -> list:
        return [create_network("convnet", dataset.num_classes, dataset.channels, dataset.resolution,
                               generator_for(seed, "evaluate", "convnet")) for seed in range(args.seeds)]

    def generators() -> list:
        return [generator_for(seed, "calibration-fidelity") for seed in range(args.seeds)]

    print(f"{args.shape} ipc {args.ipc}, {args.seeds} seeds, {args.epochs} epochs ({steps} steps); ms per step of all "
          f"seeds")
    print("| round | calibration: sequential | batched | ratio | training: sequential | batched | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with phase({}, "eval"):
        for round_ in range(args.rounds):
            sequential_step, batched_step = calibrate_seed_batching(networks(), distilled.images, distilled.labels,
                                                                    protocol, augment)
            start = time.perf_counter()
            for model, generator in zip(networks(), generators()):
                train_network(model, distilled.images, distilled.labels, protocol, generator, augment)
            sequential = (time.perf_counter() - start) / steps
            start = time.perf_counter()
            train_networks_batched(networks(), distilled.images, distilled.labels, protocol, generators(), augment)
            batched = (time.perf_counter() - start) / steps
            print(f"| {round_} | {sequential_step * 1000:.1f} | {batched_step * 1000:.1f} "
                  f"| {batched_step / sequential_step:.2f} | {sequential * 1000:.1f} | {batched * 1000:.1f} "
                  f"| {batched / sequential:.2f} |", flush=True)


if __name__ == "__main__":
    main()
