#!/usr/bin/env bash
# Issue 20's GPU measurements in one run (~10 minutes of an H100 / H200), from the repository root:
#
#   bash benchmarks/gpu/issue20.sh            # writes everything under $OUT (default benchmarks/results/gpu)
#   DRY_RUN=1 bash benchmarks/gpu/issue20.sh  # on CPU: no installs, --tiny / --cpu-smoke / collect-only
#
# 1. environment (nvidia-smi, versions) -> env.txt
# 2. the project, if `import dopsd` fails (requirements.txt: torch 2.13 + triton 3.7.1; on a bare machine the
#    CUDA torch wheel alone is ~5.5 GB, so most of the budget may go there) -> install.log
# 3. the gpu extras: xformers (wheel, --no-deps so torch stays), flash-attn (binary wheels only: its source build
#    needs CUDA_HOME and takes far longer than this run) -> install.log; a missing one is skipped by the benchmark
# 4. bench_gpu_step.py (real-size Z-Image step, all variants) -> gpu_step.md / .json   [the main figures]
# 5. the kernel, attention and compile tests, compiled Triton (conftest sets TRITON_INTERPRET only without
#    CUDA), inductor for test_compile -> tests.log
# 6. bench_kernels.py (Z-Image sizes) -> kernels_<gpu>.csv
# Every step has a timeout inside one overall budget (BUDGET seconds, default 570) and the script carries on
# after a failure; step status lines go to $OUT/status.txt.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
rm -f "$OUT/status.txt"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
BUDGET=${BUDGET:-570}
DRY=${DRY_RUN:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

step() {  # step NAME CAP_SECONDS LOG -- command...: run with timeout min(CAP, budget left)
  local name=$1 cap=$2 log=$3; shift 4
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$name: skipped (budget spent)" | tee -a "$OUT/status.txt"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  timeout "$cap" "$@" >>"$log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s (limit $cap s)" | tee -a "$OUT/status.txt"
}

{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1; } >"$OUT/env.txt"

if [ "$DRY" = 1 ]; then
  step bench_gpu_step 300 "$OUT/gpu_step.log" -- $PY benchmarks/bench_gpu_step.py --tiny --k 1 --repeats 1 \
    --out "$OUT/gpu_step_tiny.md"
  step tests 120 "$OUT/tests.log" -- $PY -m pytest -q --collect-only tests/test_kernels.py tests/test_kernels_compile.py \
    tests/test_kernels_segmented_lora.py tests/test_kernels_patch.py tests/test_attention.py tests/test_compile.py
  step bench_kernels 120 "$OUT/bench_kernels.log" -- $PY benchmarks/bench_kernels.py --cpu-smoke --models zimage \
    --reps 1 --warmup 0 --no-compile --out "$OUT/kernels_cpu_smoke.csv"
  exit 0
fi

$PY -c "import dopsd, dopsd_kernels" 2>/dev/null || {
  step install_project 200 "$OUT/install.log" -- bash -c "$PY -m pip install torch==2.13.0 && \
    $PY -m pip install -r requirements.txt && $PY -m pip install --no-deps -e ."; }
step install_xformers 60 "$OUT/install.log" -- $PY -m pip install --no-deps xformers
step install_flash_attn 45 "$OUT/install.log" -- $PY -m pip install --no-deps --only-binary :all: flash-attn
$PY -c "from diffusers.models import attention_dispatch as a; print('flash usable', a._CAN_USE_FLASH_ATTN, \
'xformers usable', a._CAN_USE_XFORMERS_ATTN)" >>"$OUT/env.txt" 2>&1

step bench_gpu_step 330 "$OUT/gpu_step.log" -- $PY benchmarks/bench_gpu_step.py --repeats 2 --out "$OUT/gpu_step.md"
step tests 120 "$OUT/tests.log" -- env DOPSD_TEST_COMPILE_BACKEND=inductor $PY -m pytest -q -x tests/test_kernels.py \
  tests/test_kernels_compile.py tests/test_kernels_segmented_lora.py tests/test_kernels_patch.py tests/test_attention.py \
  tests/test_compile.py
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())" 2>/dev/null || echo gpu)
step bench_kernels 90 "$OUT/bench_kernels.log" -- $PY benchmarks/bench_kernels.py --models zimage --reps 10 \
  --out "$OUT/kernels_${GPU}.csv"
cat "$OUT/status.txt"
