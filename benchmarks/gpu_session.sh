#!/usr/bin/env bash
# The checks only a GPU can make (issues 3, 5 and 9), as one script for a short lease of a GPU machine.
# Run from the repository root on a machine with an NVIDIA GPU, torch, timm and nvidia-ml-py:
#
#     WORK=/tmp/gpu-session OUT=out timeout 580 bash benchmarks/gpu_session.sh
#
# The stages run in order of need (issue 9's GPU goal first, the diagnostic step_variants last). Their limits add up
# to 680 s, a little over one 600-s command of the device tool, whose whole lease is 900 s: the pack written after
# each stage brings back every stage that finished; `timeout 580` leaves the pack time. The five stages ran in 442 s
# on an H200 at 73afc5d, before step_variants had its sequential reference (results/gpu/2026-11-30-h200-second).
#
# Stages, each under its own time limit, each logged to WORK/<stage>.log; WORK is packed into OUT/gpu_session.tgz
# after every stage (logs and records; distilled sets stay behind, over the device tool's 16 MiB per file), so a
# run cut short still returns what it finished:
#   gpu_tests     pytest -m gpu (NVML and the allocator against a known 1 GiB allocation; the environment stamp;
#                 the evaluation loop reads the device once per training, not once per step; batched steps
#                 replayed from CUDA graphs compute the eager steps, and auto's check rejects a stale replay)
#   batched_eval  seed-batched vs sequential evaluation at CIFAR-10 shapes, ConvNet-3, ipc 1/10/50, 5 seeds,
#                 300 epochs, the full standard protocol (issue 9); every timed evaluation starts a process
#                 (CUDA's start included: about 12 processes)
#   apm_memory    APM's image step at ImageNet-1K ipc-50 proportions (50,000 images of 3×64×64 in host memory,
#                 batch_syn 500, K 5, ConvNet-4 of width 128 on the GPU) at segment 500/250/100: GPU peaks against
#                 the paper's 13.4 / 7.0 / 6.5 GB (issue 5; the image step alone, no student training)
#   efficiency    APM at segment 500/250/100 vs MTT vs TESLA, full CIFAR-10 ipc 50 recipes on random pixels of
#                 CIFAR-10's shape, cheap experts, 30 iterations each (issue 5)
#   step_variants one batched ConvNet step of 5 seeds at CIFAR-10 shapes, ipc 1/10/50: eager vs 5 sequential steps
#                 vs channels-last vs torch.compile vs CUDA graphs, interleaved in one process (issue 9's "what makes it fast")
#   e2e_digits    `ddbench run` of random, DM and APM (quick) on digits on the GPU, evaluated: a full record there
#                 (not by default — it ran on 2026-11-30, results/gpu/2026-11-30-h200; STAGES="... e2e_digits")
set -u
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu-session}
OUT=${OUT:-$WORK/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DDBENCH_CACHE=$WORK/cache
mkdir -p "$WORK" "$OUT"
only=${STAGES:-gpu_tests batched_eval apm_memory efficiency step_variants}

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    case " $only " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 25 "$WORK/$name.log"
    tar czf "$OUT/gpu_session.tgz" -C "$WORK" --exclude cache --exclude random-cifar10 --exclude '*.safetensors' .
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, timm, pynvml; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
stage gpu_tests 90 $PY -m pytest -m gpu tests -q -p no:cacheprovider
stage batched_eval 220 $PY benchmarks/batched_eval.py --device cuda --shapes cifar10 --ipc 1,10,50 --epochs 300 \
    --seeds 5 --full-protocol --json "$WORK/batched_eval.json"
stage apm_memory 100 $PY benchmarks/apm_segment_cost.py --device cuda --arch convnet --variants ddbench --iterations 2
stage efficiency 180 $PY benchmarks/efficiency.py --full --random-cifar10 "$WORK/random-cifar10" --cheap-experts \
    --iterations 30 --results "$WORK/efficiency_cifar10_random" --device cuda
stage step_variants 90 $PY benchmarks/batched_step_variants.py --device cuda --shapes cifar10 --ipc 1,10,50 --pairs 8
stage e2e_digits 100 $PY -m bench.cli run --dataset digits --methods random,dm,apm --ipc 1 --seeds 0,1 --quick \
    --device cuda --results "$WORK/e2e_digits"
echo "== done after $SECONDS s"
