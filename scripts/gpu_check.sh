#!/usr/bin/env bash
# One command on a GPU machine with no internet (torch, triton, ninja, pytest, pytest-benchmark installed):
# build the CUDA extension for sm_90, run the whole test suite on the GPU, run the benchmarks and the report.
#
#   scripts/gpu_check.sh            # results under $OUT (when set) or ./gpu-check-results
#
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: all cores), CUDA_HOME (default
# /usr/local/cuda), PYTHON (default: python), BSCONV_GPU_CHECK_SKIP_BENCH=1 skips the benchmarks,
# BSCONV_BENCH_SET (quick / default / full) picks the benchmark set; quick here by default, so that the whole script
# fits one 10-minute device call (run BSCONV_GPU_CHECK_SKIP_BENCH=1 first and the default set separately for more).
# WHEEL=path/to/bsconv_cuda-*.whl: test a prebuilt wheel (scripts/build_wheel.sh, e.g. the one CI builds) instead of
# building, which saves the compile's device time: it is pip-installed (--no-deps --force-reinstall) and pytest runs
# the repo's tests/ and benchmarks/ from an empty folder, so they import the installed wheel, not the source tree.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python}
RESULTS=${OUT:-$REPO/gpu-check-results}
mkdir -p "$RESULTS"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export BSCONV_CUDA_BUILD=1
export BSCONV_BENCH_SET=${BSCONV_BENCH_SET:-quick}
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
note() { SUMMARY+=("$1"); echo "== $1"; }
step_rc() { if [ "$1" -eq 0 ]; then echo "ok"; else echo "FAILED (rc=$1)"; fi; }

echo "== machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$CUDA_HOME/bin/nvcc" --version | tail -1; } 2>&1 | tee "$RESULTS/machine.txt"

# bsconv (pure Python) is a test dependency the offline GPU machine lacks: prepare here with
# `pip download --no-deps bsconv -d wheelhouse` and carry wheelhouse/ along
if [ -d wheelhouse ]; then
  "$PY" -m pip install --no-deps --no-index --find-links wheelhouse bsconv >/dev/null 2>&1 \
    && note "bsconv installed from wheelhouse/" || note "bsconv NOT installed (drop-in tests will skip)"
fi

# 1. build (editable, no build isolation: the build must see the installed torch; no deps: no internet)
t0=$(date +%s)
if [ -n "${WHEEL:-}" ]; then  # ... or install a prebuilt wheel and test it from outside the source tree
  "$PY" -m pip install --no-deps --force-reinstall -v "$WHEEL" >"$RESULTS/build.log" 2>&1
  build=$?
  note "install prebuilt wheel $(basename "$WHEEL"): $(step_rc $build) in $(($(date +%s) - t0)) s (log: build.log)"
  [ $build -ne 0 ] && tail -40 "$RESULTS/build.log"
  cd "$(mktemp -d)"  # from here on, `import bsconv_cuda` finds the installed wheel (python puts the cwd on sys.path)
  "$PY" -c "import bsconv_cuda; print('testing', bsconv_cuda.__version__, 'from', bsconv_cuda.__file__)" 2>&1 \
    | tee -a "$RESULTS/machine.txt"
else
rm -f bsconv_cuda/_C*.so
"$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$RESULTS/build.log" 2>&1
build=$?
t1=$(date +%s)
note "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS): $(step_rc $build) in $((t1 - t0)) s (log: build.log)"
[ $build -ne 0 ] && tail -40 "$RESULTS/build.log"
fi

"$PY" -m bsconv_cuda.info 2>&1 | tee "$RESULTS/info.txt"

# SASS resource usage of the built kernels (registers, spills, shared memory) and tensor-core instructions
SO=$("$PY" -c "import glob, os, bsconv_cuda; print((glob.glob(os.path.join(os.path.dirname(bsconv_cuda.__file__), '_C*.so')) + [''])[0])" 2>/dev/null)
if [ -n "$SO" ]; then
  CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
  if [ ! -x "$CUOBJDUMP" ]; then  # Triton's wheel carries one
    CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null)
  fi
  "$CUOBJDUMP" --dump-resource-usage "$SO" >"$RESULTS/resource_usage.txt" 2>&1
  "$CUOBJDUMP" --dump-sass "$SO" 2>/dev/null | grep -cE "HMMA|HGMMA" >"$RESULTS/tensor_core_instr_count.txt"
  note "SASS: $(grep -c 'Function' "$RESULTS/resource_usage.txt") kernels, max REG $(grep -oE 'REG:[0-9]+' "$RESULTS/resource_usage.txt" | cut -d: -f2 | sort -n | tail -1), $(grep -oE 'LOCAL:[0-9]+' "$RESULTS/resource_usage.txt" | grep -vc 'LOCAL:0$') with local memory, $(cat "$RESULTS/tensor_core_instr_count.txt") HMMA/HGMMA instructions"
fi

# 2. the whole test suite on the GPU
"$PY" -m pytest "$REPO/tests" -q -rs -p no:cacheprovider --junitxml="$RESULTS/tests.xml" >"$RESULTS/tests.log" 2>&1
tests=$?
note "tests: $(step_rc $tests): $(tail -1 "$RESULTS/tests.log")"
"$PY" -m pytest "$REPO/tests/test_cuda_extension.py" -q -rs -p no:cacheprovider \
  >"$RESULTS/tests_cuda_extension.log" 2>&1
note "tests/test_cuda_extension.py: $(tail -1 "$RESULTS/tests_cuda_extension.log")"
grep -E "^(FAILED|ERROR)" "$RESULTS/tests.log" | head -40

# 3. benchmarks + report
if [ "${BSCONV_GPU_CHECK_SKIP_BENCH:-0}" != "1" ] && [ -d "$REPO/benchmarks" ]; then
  export BSCONV_BENCH_JSON="$RESULTS/bsconv-gpu.json"
  "$PY" -m pytest "$REPO/benchmarks" --benchmark-only -q -p no:cacheprovider >"$RESULTS/benchmarks.log" 2>&1
  bench=$?
  note "benchmarks: $(step_rc $bench): $(tail -1 "$RESULTS/benchmarks.log")"
  if [ -f "$REPO/benchmarks/report.py" ] && [ -f "$BSCONV_BENCH_JSON" ]; then
    "$PY" "$REPO/benchmarks/report.py" "$BSCONV_BENCH_JSON" --out-dir "$RESULTS" >"$RESULTS/report.log" 2>&1
    note "benchmark report: $(step_rc $?) ($(ls "$RESULTS"/report-*.md 2>/dev/null | xargs -n1 basename 2>/dev/null | tr '\n' ' '))"
    cat "$RESULTS"/report-*.md 2>/dev/null | head -80
  fi
else
  bench=0
fi

echo
echo "================ gpu_check summary ================"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  results: $RESULTS"
[ $build -eq 0 ] && [ $tests -eq 0 ] && [ $bench -eq 0 ]
