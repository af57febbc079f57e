"""The efficiency comparison through the harness: APM at segment = batch_syn, batch_syn/2 and batch_syn/5 against
MTT and TESLA — same dataset, ipc and architecture, one run, each cell in its own process (``ddbench run``'s
isolation), so every peak is that cell's own.

Reported per cell, from its record: the distill phase's peak RSS (the kernel's high-water mark of the cell's
process), on a GPU its NVML peak and the allocator's peak, seconds per iteration (median after warm-up, outside
the FLOP-counting window; APM's by whole periods, so each student's training is spread over its period's
iterations), APM's seconds per iteration without a student's training (the image steps alone: the part the
segment size acts on) and FLOPs per iteration.

On a CPU (the default): quick recipes, digits ipc 50 (batch_syn 500), ``--iterations`` iterations each (default
12: 2 warm-up iterations, one 3-iteration FLOP window and 7 timed ones).

On a GPU, at the paper's scale: the full CIFAR-10 ipc 50 recipes (``--full``). Memory and time per iteration
depend on the shapes, not on the pixels, so ``--random-cifar10 DIR`` first writes a CIFAR-10-shaped release of
random pixels and labels into DIR and reads it (the records then say ``cifar10``; the table's title and the
results folder say the pixels were random). ``--cheap-experts`` gives APM a pool of one teacher of one epoch and
MTT/TESLA one expert trajectory just long enough for the recipe's segment (start epoch 0, α frozen: see
``cheap_trajectory``): an iteration's cost does not depend on what the experts learnt, and the full pools take
GPU-hours.

    .venv/bin/python benchmarks/efficiency.py [--ipc 50] [--iterations 12] [--results results/runs/efficiency_cpu]
    python3 benchmarks/efficiency.py --full --random-cifar10 /tmp/cifar10-random --cheap-experts --iterations 30 \\
        --results results/gpu/efficiency_cifar10_random
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from bench.runner import RunRequest, run
from bench.store import load_records


def write_random_cifar10(root: Path, per_batch: int = 10_000, seed: int = 0) -> None:
    """CIFAR-10's python release layout (``cifar-10-batches-py``: five training batches of ``per_batch`` images
    (10,000 in the release), a test batch of as many, ``batches.meta``) holding uniformly random pixels and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{c}" for c in range(10)]}))


CHEAP_APM = {"num_experts": 1, "expert_epochs": 1}


def cheap_trajectory(expert_epochs: int) -> dict:
    """One expert trajectory of M epochs, every iteration starting at epoch 0; α frozen (lr_lr 0): matching
    trajectories trained on random pixels drives the learned step size below zero within a few iterations, which
    stops the run as diverged. An iteration computes the same either way (α's gradient included)."""
    return {"num_experts": 1, "max_start_epoch": 1, "expert_epochs": expert_epochs, "expert_train_epochs": expert_epochs,
            "lr_lr": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--results", default="results/runs/efficiency_cpu")
    parser.add_argument("--full", action="store_true", help="the full recipes (default: the quick CPU copies)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--random-cifar10", default=None, metavar="DIR",
                        help="write a CIFAR-10-shaped release of random pixels into DIR and run on it as cifar10")
    parser.add_argument("--random-batch-size", type=int, default=10_000,
                        help="images per batch file of --random-cifar10 (10,000 as in the release; less for a dry run)")
    parser.add_argument("--cheap-experts", action="store_true",
                        help="one teacher of one epoch (APM), one short expert trajectory (MTT/TESLA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    if args.random_cifar10:
        write_random_cifar10(Path(args.random_cifar10), args.random_batch_size)
        args.dataset, args.data_root = "cifar10", args.random_cifar10
    batch_syn = 10 * args.ipc
    results = Path(args.results)
    common = dict(dataset=args.dataset, ipcs=[args.ipc], eval_archs=[], seeds=[], results_dir=results,
                  quick=not args.full, resume=True, data_root=args.data_root, device=args.device,
                  cache_dir=args.cache_dir)
    if not args.cheap_experts:  # the CPU benchmark evaluates each set once, as it always has
        common.update(eval_archs=["convnet"], seeds=[0])
    apm_experts = CHEAP_APM if args.cheap_experts else {}
    for segment in (batch_syn, batch_syn // 2, batch_syn // 5):
        run(RunRequest(methods=["apm"], method_options={"apm": {"segment": segment, "iterations": args.iterations,
                                                                **apm_experts}},
                       method_labels={"apm": f"apm[segment={segment}]"}, **common))  # a suite's variant label
    for method in ("mtt", "tesla"):
        options = {"iterations": args.iterations}
        if args.cheap_experts:
            from methods.mtt import MTT  # the recipe's expert_epochs (M) decides the trajectory's length

            recipe = MTT.recipes.get(f"{args.dataset}_ipc{args.ipc}", {})
            options |= cheap_trajectory(recipe.get("expert_epochs", 2))
        run(RunRequest(methods=[method], method_options={method: options}, **common))

    rows, env = [], None
    for r in load_records(results):
        if r["ipc"] != args.ipc or r["status"] != "ok":
            continue
        env = r["env"]
        cfg = r["config"]
        label = f"apm segment {cfg['segment']}" if r["method"].startswith("apm") else \
            f"{r['method'].split('.')[0]} syn_steps {cfg.get('syn_steps')}"
        d = r["phases"]["distill"]
        rows.append(dict(label=label, cpu_peak_rss_mb=d["cpu_peak_rss_mb"], process_peak_rss_mb=r["process_peak_rss_mb"],
                         gpu_nvml_peak_mb=d["gpu_nvml_peak_mb"], gpu_torch_allocated_peak_mb=d["gpu_torch_allocated_peak_mb"],
                         gpu_reason=d["gpu_reason"], s_per_iter=r["iter_time_s"]["median"], n=r["iter_time_s"]["n"],
                         s_per_rest_iter=(r["iter_time_s"].get("rest_of_period") or {}).get("median"),
                         flops_per_iter=r["flops_per_iter"], distill_wall_s=d["wall_s"], quick=r["quick"],
                         record=r["record_id"]))
    if not rows:
        sys.exit("no ok records: see the failed cells' records")
    rows.sort(key=lambda row: (not row["label"].startswith("apm"),
                               row["label"].startswith("apm") and -int(row["label"].split()[-1])))
    where = env.get("gpu_name") or f"CPU ({env['cpu_model']}, {env['cpu_threads']} threads)"
    pixels = "random pixels, " if args.random_cifar10 else ""
    print(f"\n{args.dataset} ipc {args.ipc} ({pixels}{'full' if args.full else 'quick'} recipes"
          f"{', cheap experts' if args.cheap_experts else ''}), ConvNet, {args.iterations} iterations, {where}")
    print("| cell | GPU NVML peak MB ↓ | GPU allocated peak MB ↓ | distill peak RSS MB ↓ | s/iteration ↓ (n) "
          "| s/iteration without a student's training ↓ | GFLOPs/iteration ↓ | distill wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        gpu = [f"{row[k]:.0f}" if row[k] is not None else "–" for k in ("gpu_nvml_peak_mb", "gpu_torch_allocated_peak_mb")]
        flops = f"{row['flops_per_iter'] / 1e9:.2f}" if row["flops_per_iter"] else "–"
        rest = f"{row['s_per_rest_iter']:.4f}" if row["s_per_rest_iter"] is not None else "–"
        print(f"| {row['label']} | {gpu[0]} | {gpu[1]} | {row['cpu_peak_rss_mb']:.0f} | {row['s_per_iter']:.4f} "
              f"({row['n']}) | {rest} | {flops} | {row['distill_wall_s']:.1f} |")
    if rows[0]["gpu_reason"]:
        print(f"GPU columns: {rows[0]['gpu_reason']}")
    (results / "efficiency_table.json").write_text(json.dumps(
        {"argv": sys.argv[1:], "random_pixels": bool(args.random_cifar10), "env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
