#!/usr/bin/env bash
# Run HERE (PyPI reachable) before sending the tree to a GPU machine that has no network: downloads the wheels that
# its image lacks (diffusers; its other needs are there) into .whl/ (git-ignored via .git/info/exclude), for
# Python 3.12 x86-64. Then run on the GPU machine, carrying .whl:   bash benchmarks/gpu_run.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
diffusers=$(python3 -c "import diffusers; print(diffusers.__version__)" 2>/dev/null || echo 0.42.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$diffusers"
ls -l .whl
