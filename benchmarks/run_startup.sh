#!/usr/bin/env bash
# What a short `ddbench run` costs besides its cells' work: the wall time of a quick `random` grid with 2 evaluation
# epochs, one cell (ipc 1) and five cells (ipc 1..5), at each commit given, the commits alternating round by round.
#
#   benchmarks/run_startup.sh ROUNDS COMMIT...     e.g. benchmarks/run_startup.sh 2 5453938 1373b2b
#
# Each commit runs from a git worktree under /tmp with this checkout's .venv (PYTHONPATH puts the worktree first).
set -euo pipefail
rounds=$1; shift
python=$(pwd)/.venv/bin/python
for commit in "$@"; do
    rm -rf "/tmp/startup-$commit"; git worktree add -f --detach "/tmp/startup-$commit" "$commit" >/dev/null 2>&1
done
for round in $(seq "$rounds"); do
    for commit in "$@"; do
        for ipcs in 1 1,2,3,4,5; do
            results=$(mktemp -d)
            start=$(date +%s.%N)
            (cd "/tmp/startup-$commit" && OMP_NUM_THREADS=1 PYTHONPATH="/tmp/startup-$commit" "$python" -m bench.cli run \
                --methods random --ipc "$ipcs" --seeds 0 --quick --eval-epochs 2 --batch-seeds off \
                --results "$results" >/dev/null 2>&1)
            printf 'round %s  %-8s  ipc %-9s  %6.1f s\n' "$round" "$commit" "$ipcs" "$(echo "$(date +%s.%N) - $start" | bc)"
            rm -rf "$results"
        done
    done
done
for commit in "$@"; do git worktree remove --force "/tmp/startup-$commit"; done
