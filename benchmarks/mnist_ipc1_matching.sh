#!/usr/bin/env bash
# MNIST, ipc 1: DC, DSA and DM with their reduced CPU recipes (`<method>.mnist_ipc1_cpu`: DC/DSA 80 iterations,
# DM 200, real batches of 64), plus random; each evaluated with the quick standard protocol over seeds 0,1,2.
# Two single-threaded chains in parallel, on 2 cores (its run was not logged; make bench-mnist's suite, the same
# cells, is timed in results/cpu/2026-12-01-amd-epyc/mnist_cpu/records).
#   DDBENCH_DATA=/path/holding/MNIST/raw bash benchmarks/mnist_ipc1_matching.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
: "${DDBENCH_DATA:?set DDBENCH_DATA to the folder that holds MNIST/raw}"
OUT=${1:-results/runs/mnist_ipc1}
mkdir -p "$OUT"
B=.venv/bin/ddbench
distill() { $B distill --dataset mnist --method "$1" --ipc 1 --seed 0 --out "$OUT/sets/$2"; }
evaluate() { $B evaluate "$OUT/sets/$1" --quick --seeds 0,1,2 --protocol standard --results "$OUT"; }
chain_a() { distill dc.mnist_ipc1_cpu dc; distill dm.mnist_ipc1_cpu dm; evaluate dm; }
chain_b() { distill random random; evaluate random; distill dsa.mnist_ipc1_cpu dsa; evaluate dsa
            while [ ! -f "$OUT/sets/dc.json" ]; do sleep 10; done; evaluate dc; }
chain_a > "$OUT/chain_a.log" 2>&1 &
chain_b > "$OUT/chain_b.log" 2>&1 &
wait
$B report --results "$OUT" --out reports
