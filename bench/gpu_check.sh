#!/usr/bin/env bash
# One device call for a session with a GPU: the kernels' correctness on the GPU (fp16 and bf16, every
# group size, every shipped config, split-K determinism, CUDA-graph replay), then bench/kernels.py and
# bench/decode.py. Installs nothing from the network. Results: bench/results/*.json, and copies plus
# the log under $OUT when it is set (the device tool brings $OUT back).
#
#   bash bench/gpu_check.sh     # at most 8 minutes (GPU_CHECK_BUDGET), much of it Triton compiling
#
# bitsandbytes (a baseline of bench/kernels.py) is not in the GPU image; to include it, download its
# wheel here first and carry .whl (see the device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Environment: GPU_CHECK_BUDGET (seconds for all steps, default 480), QUICK=0 for full-length timing.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-480}
results=bench/results
mkdir -p "$results"
log="$results/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
PY=python3
status=0

say() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" | tee -a "$log"; }

# run NAME SECONDS CMD...: one step, bounded by its own limit and by what is left of the budget.
run() {
    local name=$1 limit=$2; shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then say "SKIP $name: budget spent"; status=1; return; fi
    say "START $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    say "END $name rc=$rc"
    (( rc != 0 )) && status=1
}

say "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

# compress itself, offline: an editable install maps compress.kernels to kernels/ (pyproject).
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1; then
    say "editable install failed; falling back to PYTHONPATH and a compress/kernels link"
    ln -sfn ../kernels compress/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/bitsandbytes-*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import compress.kernels.linear" 2>&1 | tee -a "$log" || { say "cannot import compress.kernels"; exit 1; }

quick=--quick
[[ "${QUICK:-1}" == 0 ]] && quick=

run correctness 170 $PY bench/kernels.py --correctness
run kernels 180 $PY bench/kernels.py $quick
run decode 150 $PY bench/decode.py

if [[ -n "${OUT:-}" ]]; then
    cp "$results"/kernels_correctness.json "$results"/kernels.json "$results"/decode.json "$log" "$OUT"/ 2>/dev/null
fi
say "done, status $status"
exit $status
