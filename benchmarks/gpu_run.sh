#!/usr/bin/env bash
# One command for a GPU machine, no network, under 10 minutes: correctness, the AOTInductor packages, the latency of
# every path side by side with diffusers (eager and with its compiled recipe), and cold starts. Each phase has its own
# time limit and writes its log and results into OUT_DIR as it goes, so a phase killed by its limit still leaves what
# it measured.
#   bash benchmarks/gpu_run.sh [OUT_DIR]          (default: $BENCH_OUT, else benchmarks/.results)
#   BENCH_SUBJECT=tiny bash benchmarks/gpu_run.sh  rehearses every phase on the CPU with the bundled model
#   BENCH_COMPILE=0                                leaves out the torch.compile cases (each compiles for a minute+)
# Phases (seconds, H200 budget): 1. gpu-marked tests (150) beside 2. the subject's checkpoint and its AOTInductor
# packages (export.aoti, 240: the compile must not run beside the timed cases); 3. pytest benchmarks (280: ours
# default, compiled, compiled + tiny decoder, aoti, batch 8; diffusers eager and compiled; 25-step SD); 4. cold starts
# in fresh processes (110: default, compile with the cache phase 3 filled, aoti); 5. the report.
# Packages missing there (diffusers) travel as wheels in .whl/, made here by benchmarks/gpu_prepare.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${BENCH_OUT:-benchmarks/.results}}
subject=${BENCH_SUBJECT:-sd15}
work=${BENCH_WORK:-/tmp/instaflow-bench}
mkdir -p "$out" "$work"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false BENCH_WORK="$work"
export INSTAFLOW_CACHE="$work/cache"  # phase 3's torch.compile fills it; phase 4's warm start reads it
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
status=0  # every phase runs and leaves its log; the exit status says whether all passed
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$out/gpu_info.txt" 2>&1
cat "$out/gpu_info.txt"

echo "== 1+2. gpu-marked tests, beside the checkpoint and its AOTInductor packages"
timeout 240 python3 -m benchmarks.cold_start --subject "$subject" --work "$work" --prepare-only --aoti \
  > "$out/aoti_export.log" 2>&1 &
export_pid=$!
if [ "$subject" = sd15 ]; then
  timeout 150 python3 -m pytest tests -m gpu -q -p no:cacheprovider > "$out/gpu_tests.log" 2>&1 || status=1
  tail -n 3 "$out/gpu_tests.log"
fi
wait $export_pid || { echo "AOTInductor export did not finish (see aoti_export.log)"; status=1; }
tail -n 4 "$out/aoti_export.log"

echo "== 3. benchmarks"
compile_flag=--bench-compile
[ "${BENCH_COMPILE:-1}" = 0 ] && compile_flag=
timeout 280 python3 -m pytest benchmarks/test_latency.py -k "$subject and not batch8_compiled" $compile_flag -q \
  -p no:cacheprovider \
  --bench-out "$out" > "$out/gpu_bench.log" 2>&1 || status=1
tail -n 5 "$out/gpu_bench.log"

echo "== 4. cold starts"
cases=default,aoti
[ "${BENCH_COMPILE:-1}" = 0 ] || cases=default,compile_warm,aoti
timeout 110 python3 -m benchmarks.cold_start --subject "$subject" --work "$work" --cases "$cases" \
  --cache "$INSTAFLOW_CACHE" --out "$out/cold_start.json" > "$out/cold_start.log" 2>&1 || status=1
cat "$out/cold_start.log"

echo "== 5. report"
results=$(ls "$out"/gpu.json "$out"/cpu.json "$out"/cold_start.json 2>/dev/null)
python3 -m benchmarks.report --results $results --out "$out/report/RESULTS.md" || status=1
exit $status
