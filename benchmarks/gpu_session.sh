#!/usr/bin/env bash
# One prepared device call per part, for a session lent a GPU (15 minutes of device time in all, start-up included;
# at most 10 minutes a call). Run from the repo root:  bash benchmarks/gpu_session.sh 1   (then 2 if time is left)
#   part 1 (~9 min): correctness checks, the sparse-attention kernel, the llama and MoE training rows
#   part 2 (~7 min): decode, the hybrid training row
# Each script runs under its own time limit, so one that overruns still leaves the next its turn; every script
# appends JSON lines to $OUT and prints its table last. Liger-Kernel (for the fused-loss rows) is not on the GPU
# image: carry it as a wheel (BENCHMARKS.md, "Commands") and it is installed here when present.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-.}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
fused_loss=$(python3 -c "import liger_kernel" 2>/dev/null && echo liger || echo chunked)

step() {  # step SECONDS COMMAND...: run one script under a limit and say how it ended
    local limit=$1
    shift
    echo "=== $* (limit ${limit}s) ==="
    timeout "$limit" "$@"
    echo "=== exit $? after ${SECONDS}s in this part ==="
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-1}" in
1)
    step 90 python3 benchmarks/gpu_checks.py
    step 200 python3 benchmarks/gpu_sparse.py --deadline-s 150
    step 280 python3 benchmarks/gpu_train.py --sections llama,moe --fused-loss "$fused_loss" --deadline-s 220
    ;;
2)
    step 200 python3 benchmarks/gpu_decode.py --deadline-s 160
    step 260 python3 benchmarks/gpu_train.py --sections hybrid --hybrid-flex --deadline-s 200
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh 1|2" >&2
    exit 2
    ;;
esac
