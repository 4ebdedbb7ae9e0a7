#!/usr/bin/env bash
# One command for a GPU machine, no network, under 8 minutes (about 6 on an H200): correctness first, then the GPU
# benchmarks, a profile of the top kernels and the memory-layout comparison. Each phase has its own time limit and
# writes its log and results into OUT_DIR as it goes, so a phase killed by its limit still leaves what it measured.
#   bash benchmarks/gpu_run.sh [OUT_DIR]        (default: $BENCH_OUT, else benchmarks/.results)
#   BENCH_COMPILE=0 bash benchmarks/gpu_run.sh   leaves out the torch.compile cases (each compiles for about a minute)
# Packages missing there (diffusers) travel as wheels in .whl/, made here by benchmarks/gpu_prepare.sh; they are
# installed into /tmp/site first. OUT_DIR/report/RESULTS.md is made there; for the repository's report, here:
#   python -m benchmarks.report --results benchmarks/.results/cpu.json OUT_DIR/gpu.json OUT_DIR/layouts.json
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
echo "== benchmarks (torch.compile case included: BENCH_COMPILE=0 leaves it out)"
compile_flag=--bench-compile
[ "${BENCH_COMPILE:-1}" = 0 ] && compile_flag=
timeout 300 python3 -m pytest benchmarks -m gpu $compile_flag -q -p no:cacheprovider --bench-out "$out" 2>&1 \
  | tee "$out/gpu_bench.log" || status=1
echo "== profile (top kernels per stage)"
timeout 120 python3 -m benchmarks.profile --out "$out/profile.txt" || status=1  # profile.txt grows per table
echo "== memory layouts x torch.compile"
layout_flag=
[ "${BENCH_COMPILE:-1}" = 0 ] && layout_flag=--no-compile
timeout 200 python3 -m benchmarks.layouts $layout_flag --out "$out/layouts.json" || status=1  # JSON after each variant
python3 -m benchmarks.report --results "$out/gpu.json" "$out/layouts.json" --out "$out/report/RESULTS.md" || status=1
exit $status
