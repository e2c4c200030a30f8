#!/usr/bin/env bash
# One prepared device call per part, for a session lent a GPU (15 minutes of device time in all, start-up included;
# at most 10 minutes a call). Run from the repo root:  bash benchmarks/gpu_session.sh 1   (then 2 if time is left)
#   part 1 (~9 min): the correctness checks (gpu-marked tests), the sparse-attention kernel, llama and MoE training
#   part 2 (~7 min): decode, the hybrid training row
#   install: only the install step every part begins with (rehearse it on any machine, GPU or not)
# The GPU image has torch and transformers but no internet, and this package is not installed there: each part first
# installs it, without network or dependencies, into /tmp/site (on PYTHONPATH from then on), with what it needs from
# wheels carried in .whl/ (BENCHMARKS.md, "Commands"): setuptools to build it if the image's is older than
# pyproject's license fields need, pytest if the image has none, and Liger-Kernel (fused-loss rows) when carried.
# Each script runs under its own time limit, so one that overruns still leaves the next its turn; every script
# appends JSON lines to $OUT and prints its table last.
set -u
cd "$(dirname "$0")/.."
repo=$PWD
export OUT=$(realpath "${OUT:-.}")
site=/tmp/site
src=/tmp/llama-hybrid-src  # built from a fresh copy: setuptools' build/ would keep files from earlier calls
rm -rf "$site" "$src" && mkdir -p "$src" && tar -c --exclude=./build --exclude=./.whl . | tar -x -C "$src"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

carried() {  # carried ARGS...: install from the wheels in .whl/ only (pip picks those the image's Python needs)
    python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --target "$site" "$@"
}
python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null ||
    carried setuptools || echo "no setuptools >= 77: carry its wheel (BENCHMARKS.md)" >&2
python3 -c "import pytest" 2>/dev/null || carried pytest || echo "no pytest: carry its wheels (BENCHMARKS.md)" >&2
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then carried --no-deps liger-kernel; fi
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --no-compile --no-cache-dir \
    --target "$site" "$src" ||
    { echo "could not install the package into $site" >&2; exit 1; }
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
    # run from $site: `python3 -m` puts the working directory first on the import path, and the repo's
    # llama_hybrid/ lacks the folders the install maps into it (llama_hybrid.training, ...)
    step 100 env -C "$site" python3 -m pytest -q -s -p no:cacheprovider -m gpu "$repo/tests/test_gpu_checks.py"
    step 200 python3 benchmarks/gpu_sparse.py --deadline-s 150
    step 260 python3 benchmarks/gpu_train.py --sections llama,moe --fused-loss "$fused_loss" --deadline-s 200
    ;;
2)
    step 200 python3 benchmarks/gpu_decode.py --deadline-s 160
    step 260 python3 benchmarks/gpu_train.py --sections hybrid --hybrid-flex --deadline-s 200
    ;;
install)
    env -C "$site" python3 -c "import llama_hybrid.training as t, pytest; print('installed:', t.__file__)"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh 1|2|install" >&2
    exit 2
    ;;
esac
