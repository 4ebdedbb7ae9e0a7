#!/usr/bin/env bash
# One command for a GPU machine, no network, well under 8 minutes: correctness first, then the GPU benchmarks,
# then a profile of the top kernels. Each phase has its own time limit and writes its log and results into OUT_DIR
# as it goes, so a phase killed by its limit still leaves what it measured.
#   bash benchmarks/gpu_run.sh [OUT_DIR]        (default: $BENCH_OUT, else benchmarks/.results)
#   BENCH_COMPILE=1 bash benchmarks/gpu_run.sh   adds a torch.compile phase (a few minutes more)
# Packages missing there (diffusers) travel as wheels in .whl/, made here by benchmarks/gpu_prepare.sh; they are
# installed into /tmp/site first. Then on this machine: python -m benchmarks.report --results OUT_DIR/*.json
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${BENCH_OUT:-benchmarks/.results}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
status=0  # every phase runs and leaves its log; the exit status says whether all passed
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu_info.txt" 2>&1 || status=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" \
  >> "$out/gpu_info.txt" 2>&1 || status=1
cat "$out/gpu_info.txt"
echo "== correctness (gpu-marked tests)"
timeout 180 python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
echo "== benchmarks"
timeout 300 python3 -m pytest benchmarks -m gpu -q -p no:cacheprovider --bench-out "$out" 2>&1 \
  | tee "$out/gpu_bench.log" || status=1
python3 -m benchmarks.report --results "$out/gpu.json" --out "$out/RESULTS_gpu.md" || status=1
echo "== profile (top kernels per stage)"
timeout 120 python3 -m benchmarks.profile --out "$out/profile.txt" || status=1  # profile.txt grows per table
if [ "${BENCH_COMPILE:-0}" = 1 ]; then  # optional phase 2 (a few more minutes): torch.compile inside the graphs
  echo "== torch.compile"
  timeout "${BENCH_COMPILE_TIMEOUT:-300}" python3 -m pytest benchmarks -m gpu -k "ours_1step or gate" --bench-compile \
    -q -p no:cacheprovider --bench-out "$out/compile" 2>&1 | tee "$out/gpu_compile.log" || status=1
fi
exit $status
