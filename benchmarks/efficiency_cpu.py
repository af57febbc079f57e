"""The efficiency comparison on CPU, through the harness: APM at segment = batch_syn, batch_syn/2 and batch_syn/5,
MTT and TESLA — same dataset, ipc and architecture, one run, each cell in its own process (``ddbench run``'s
isolation), so every peak is that cell's own.

Reported per cell, from its record: the distill phase's peak RSS (the kernel's high-water mark of the cell's
process), seconds per iteration (median after warm-up, outside the FLOP-counting window) and FLOPs per
iteration. Quick recipes with ``--iterations`` iterations each (default 12: enough for 2 warm-up iterations,
one 3-iteration FLOP window and 7 timed ones), digits ipc 50 (batch_syn 500), evaluated once (seed 0).

    .venv/bin/python benchmarks/efficiency_cpu.py [--ipc 50] [--iterations 12] [--results results/runs/efficiency_cpu]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.runner import RunRequest, run
from bench.store import load_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--results", default="results/runs/efficiency_cpu")
    args = parser.parse_args()
    batch_syn = 10 * args.ipc
    results = Path(args.results)
    common = dict(dataset=args.dataset, ipcs=[args.ipc], eval_archs=["convnet"], seeds=[0], results_dir=results,
                  quick=True, resume=True)
    for segment in (batch_syn, batch_syn // 2, batch_syn // 5):
        run(RunRequest(methods=["apm"], method_options={"apm": {"segment": segment, "iterations": args.iterations}},
                       **common))
    run(RunRequest(methods=["mtt", "tesla"], method_options={m: {"iterations": args.iterations} for m in ("mtt", "tesla")},
                   **common))

    rows = []
    for r in load_records(results):
        if r["ipc"] != args.ipc or r["status"] != "ok":
            continue
        cfg = r["config"]
        label = f"apm segment {cfg['segment']}" if r["method"].startswith("apm") else \
            f"{r['method'].split('.')[0]} syn_steps {cfg.get('syn_steps')}"
        d = r["phases"]["distill"]
        rows.append((label, d["cpu_peak_rss_mb"], r["process_peak_rss_mb"], r["iter_time_s"]["median"],
                     r["iter_time_s"]["n"], r["flops_per_iter"], d["wall_s"]))
    rows.sort(key=lambda row: (not row[0].startswith("apm"), row[0].startswith("apm") and -int(row[0].split()[-1])))
    print(f"\n{args.dataset} ipc {args.ipc}, ConvNet, quick recipes, {args.iterations} iterations, CPU "
          f"({r['env']['cpu_model']}, {r['env']['cpu_threads']} threads)")
    print("| cell | distill peak RSS MB ↓ | process peak RSS MB ↓ | s/iteration ↓ (n) | GFLOPs/iteration ↓ | distill wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, peak, process, median, n, flops, wall in rows:
        print(f"| {label} | {peak:.0f} | {process:.0f} | {median:.4f} ({n}) | {flops / 1e9:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
