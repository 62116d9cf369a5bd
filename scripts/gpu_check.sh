#!/usr/bin/env bash
# One command on a GPU machine with no internet (torch, triton, ninja, pytest, pytest-benchmark installed):
# build the CUDA extension for sm_90, run the GPU tests, the whole suite, the benchmarks and the report.
#
#   scripts/gpu_check.sh            # results under $OUT (when set) or ./gpu-check-results
#
# What it leaves in the results folder is two files, so that a device call that returns at most 8 loses nothing:
# summary.txt (one line per stage, written as each ends) and logs.tar.gz (every log, the JUnit XML, the benchmark
# JSON and report, repacked after each stage from a temporary folder). Every stage runs under its own timeout, in
# order of value, so a run killed at the call's limit still returns the stages it finished.
#
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: all cores), CUDA_HOME (default
# /usr/local/cuda), PYTHON (default: python, else python3), BSCONV_GPU_CHECK_SKIP_BENCH=1 skips the benchmarks,
# BSCONV_BENCH_SET (quick / default / full) picks the benchmark set (quick here by default),
# BSCONV_GPU_CHECK_WORKERS (default 8; 1 = none): pytest-xdist workers for the correctness stages, where installed,
# BSCONV_GPU_CHECK_TEST_TIMEOUT (default 150 s): one test's limit there, where pytest-timeout is installed,
# BSCONV_GPU_CHECK_STAGES: the stages to run, comma-separated (default: all, in this order):
#   build, gpu_tests (tests marked cuda), grid (the fused backends' shared grid), suite (the other tests),
#   sass (registers and spills of the built kernels), speed (python -m bsconv_cuda.bench on the quick shapes, bf16
#   and fp32, the fused backends in both layouts, with the composed dense conv), bench (the pytest benchmark
#   suite's quick set + report),
#   paths (the CUDA backward's fused and split paths timed on the quick and the batch-1 latency shapes),
#   kernels (each kernel's time in the CUDA backward's paths, torch.profiler over scripts/gpu_step.py, on the layers
#   where the split path keeps its grad_pre buffer),
#   sanitize (compute-sanitizer memcheck and racecheck on one small forward + backward of each backend and path, and
#   on the fused backward's other cases, scripts/gpu_step.py), ncu (Nsight Compute on the kernels of one larger step,
#   each backend and path).
# Without the build stage, the extension already in bsconv_cuda/ is used: build copies it into the results, so that a
# second device call can carry it (`BSCONV_GPU_CHECK_STAGES=kernels,sanitize,ncu` with bsconv_cuda/_C.abi3.so
# carried).
# Stage timeouts in seconds: BSCONV_GPU_CHECK_TIMEOUT_<STAGE> (defaults below).
# WHEEL=path/to/bsconv_cuda-*.whl: test a prebuilt wheel (scripts/build_wheel.sh, e.g. the one CI builds) instead of
# building, which saves the compile's device time: it is pip-installed (--no-deps --force-reinstall) and pytest runs
# the repo's tests/ and benchmarks/ from an empty folder, so they import the installed wheel, not the source tree.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$(command -v python || command -v python3)}  # the GPU machine's image has python3 only
RESULTS=${OUT:-$REPO/gpu-check-results}
mkdir -p "$RESULTS"
LOGS=$(mktemp -d)  # outside $RESULTS: only summary.txt and the archive of this folder go there
SUMMARY_FILE=$RESULTS/summary.txt
: >"$SUMMARY_FILE"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export BSCONV_CUDA_BUILD=1
export BSCONV_BENCH_SET=${BSCONV_BENCH_SET:-quick}
export PYTHONUNBUFFERED=1
STAGES=${BSCONV_GPU_CHECK_STAGES:-build,gpu_tests,grid,suite,sass,speed,bench,paths,kernels,sanitize,ncu}
[ "${BSCONV_GPU_CHECK_SKIP_BENCH:-0}" = "1" ] \
  && STAGES=$(echo "$STAGES" | sed -E 's/(^|,)(speed|bench|paths|kernels)//g')
FAILED=0

note() { echo "$1" >>"$SUMMARY_FILE"; echo "== $1"; }
# logs.tar.gz replaced atomically, so that a kill mid-pack leaves the previous one
pack() { tar czf "$RESULTS/.logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$RESULTS/.logs.tar.gz.tmp" "$RESULTS/logs.tar.gz"; }
wants() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# stage NAME DEFAULT_TIMEOUT COMMAND...: runs COMMAND under the stage's timeout with output in logs/NAME.log, notes
# its status and the log's last line, and repacks the logs
stage() {
  local name=$1 limit_default=$2
  shift 2
  local var="BSCONV_GPU_CHECK_TIMEOUT_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
  local limit=${!var:-$limit_default}
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED (rc=$rc$([ $rc -eq 124 ] && echo ", timed out after ${limit} s"))" && FAILED=1
  note "$name: $status in $(($(date +%s) - t0)) s: $(tail -1 "$LOGS/$name.log" | cut -c1-200)"
  pack
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$CUDA_HOME/bin/nvcc" --version | tail -1
  git -C "$REPO" log --oneline -1 2>/dev/null; } >"$LOGS/machine.txt" 2>&1
note "machine: $(head -2 "$LOGS/machine.txt" | tr '\n' ' ')"

# bsconv (pure Python) is a test dependency the offline GPU machine lacks: prepare here with
# `pip download --no-deps bsconv -d wheelhouse` and carry wheelhouse/ along
if [ -d wheelhouse ]; then
  "$PY" -m pip install --no-deps --no-index --find-links wheelhouse bsconv >/dev/null 2>&1 \
    && note "bsconv installed from wheelhouse/" || note "bsconv NOT installed (drop-in tests will skip)"
fi

# 1. build (editable, no build isolation: the build must see the installed torch; no deps: no internet) ...
if [ -n "${WHEEL:-}" ]; then  # ... or install a prebuilt wheel and test it from outside the source tree
  stage build 300 "$PY" -m pip install --no-deps --force-reinstall -v "$WHEEL"
  cd "$(mktemp -d)"  # from here on, `import bsconv_cuda` finds the installed wheel (python puts the cwd on sys.path)
elif wants build; then
  rm -f bsconv_cuda/_C*.so
  stage build 420 "$PY" -m pip install --no-build-isolation --no-deps -v -e . && cp bsconv_cuda/_C*.so "$RESULTS/"
else  # the extension carried in (or none: the CUDA stages then say so)
  BSCONV_CUDA_BUILD=0 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1 \
    || note "install without build: FAILED (log: install.log)"
fi
"$PY" -m bsconv_cuda.info >"$LOGS/info.txt" 2>&1
note "info: $(grep -iE "cuda backend|_C " "$LOGS/info.txt" | head -2 | tr '\n' ' ' | cut -c1-200)"

# 2. correctness: the GPU-only tests, then the fused backends' grid on the GPU, then everything else
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
# The correctness stages spend most of their time compiling Triton and cuDNN kernels on one core each: spread them over
# pytest-xdist workers where the machine has it (never the timing stages), and end a hung test (a kernel that never
# returns) after BSCONV_GPU_CHECK_TEST_TIMEOUT seconds with a stack dump rather than losing the whole stage.
# -v (not -q): one line per test as it ends, so a stage killed at its limit still names each outcome
CHECK_PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider)
WORKERS=${BSCONV_GPU_CHECK_WORKERS:-8}
if [ "$WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  # the float64 references run on the CPU: each worker gets its share of the cores, not all of them (8 workers of
  # 16 threads on 16 cores made one reference take 90 s on the first GPU run)
  CHECK_PYTEST=(env OMP_NUM_THREADS=$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 )) "${CHECK_PYTEST[@]}" \
                -n "$WORKERS")
fi
"$PY" -c "import pytest_timeout" 2>/dev/null \
  && CHECK_PYTEST+=(--timeout "${BSCONV_GPU_CHECK_TEST_TIMEOUT:-150}" --timeout-method thread)
wants gpu_tests && stage gpu_tests 300 "${CHECK_PYTEST[@]}" "$REPO/tests" -m cuda --junitxml="$LOGS/gpu_tests.xml"
wants grid && stage grid 300 "${CHECK_PYTEST[@]}" "$REPO/tests/test_fused_backends.py" -m "not cuda" \
  --junitxml="$LOGS/grid.xml"
wants suite && stage suite 420 "${CHECK_PYTEST[@]}" "$REPO/tests" -m "not cuda" \
  --ignore="$REPO/tests/test_fused_backends.py" --junitxml="$LOGS/suite.xml"
for log in gpu_tests grid suite; do
  [ -f "$LOGS/$log.log" ] && grep -E "^(FAILED|ERROR)" "$LOGS/$log.log" | head -30 | sed "s/^/  $log: /" \
    >>"$SUMMARY_FILE"
done

# 3. SASS resource usage of the built kernels (registers, spills, shared memory) and tensor-core instructions
sass() {
  local so cuobjdump
  so=$("$PY" -c "import glob, os, bsconv_cuda; print((glob.glob(os.path.join(os.path.dirname(bsconv_cuda.__file__), '_C*.so')) + [''])[0])")
  [ -n "$so" ] || { echo "no built extension"; return 1; }
  cuobjdump=$CUDA_HOME/bin/cuobjdump
  [ -x "$cuobjdump" ] || cuobjdump=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
  "$cuobjdump" --dump-resource-usage "$so" >"$LOGS/resource_usage.txt" 2>&1 || return 1
  echo "$(grep -c 'Function' "$LOGS/resource_usage.txt") kernels, max REG $(grep -oE 'REG:[0-9]+' "$LOGS/resource_usage.txt" | cut -d: -f2 | sort -n | tail -1), $(grep -oE 'LOCAL:[0-9]+' "$LOGS/resource_usage.txt" | grep -vc 'LOCAL:0$') with local memory, $("$cuobjdump" --dump-sass "$so" 2>/dev/null | grep -cE "HMMA|HGMMA") HMMA/HGMMA instructions"
}
export PY LOGS REPO
export -f sass
wants sass && stage sass 120 bash -c sass

# 4. benchmarks + report, and the CUDA backward's two paths timed on the same shapes and at batch 1, where the path
# rule's launch weight decides (their choice is a model)
# the main job on the quick shapes, bf16 and fp32, the fused backends in both layouts (auto's rule compares within a
# layout), its JSON rewritten after every measurement
if wants speed; then
  for dtype in bf16 fp32; do
    stage "speed_$dtype" 200 "$PY" -m bsconv_cuda.bench --shapes quick --passes fwd,bwd,fwdbwd --dtype "$dtype" \
      --layout both --composed --no-progress --json "$LOGS/speed-$dtype.json"
  done
fi
if wants bench && [ -d "$REPO/benchmarks" ]; then
  export BSCONV_BENCH_JSON="$LOGS/bsconv-gpu.json"
  stage bench 300 "${PYTEST[@]}" "$REPO/benchmarks" --benchmark-only
  if [ -f "$REPO/benchmarks/report.py" ] && [ -f "$BSCONV_BENCH_JSON" ]; then
    stage report 60 "$PY" "$REPO/benchmarks/report.py" "$BSCONV_BENCH_JSON" --out-dir "$LOGS"
  fi
fi
if wants paths; then
  for path in fused split; do
    stage "paths_$path" 150 "$PY" -m bsconv_cuda.bench --shapes quick,latency --passes bwd,fwdbwd --dtype bf16 \
      --cuda-backward "$path" --no-progress --json "$LOGS/cuda-backward-$path.json"
  done
  stage paths_report 60 "$PY" "$REPO/benchmarks/paths_report.py" "$LOGS/cuda-backward-fused.json" \
    "$LOGS/cuda-backward-split.json" --out "$LOGS/paths.md"
fi

# Where the time of the split path goes on the layers that keep its grad_pre buffer (wider than 128 input channels:
# no fused path; small maps and large batches: the fused path for comparison), kernel by kernel: the measured reason
# to keep the buffer, or to replace it, comes from these (the grad_pre kernel's time against a GEMM's).
kernel_times() {
  local spec shape k stride rc=0 path
  # N,C_in,C_out,H,W k stride
  for spec in "1,512,512,14,14 3 1" "64,512,512,14,14 3 1" "64,1024,1024,7,7 3 1" "1,96,576,14,14 3 1" \
              "1,112,672,14,14 5 2" "1,128,256,56,56 3 2" "64,128,128,56,56 3 1"; do
    read -r shape k stride <<<"$spec"
    for path in split fused; do
      [ "$path" = fused ] && [ "$(echo "$shape" | cut -d, -f2)" -gt 128 ] && continue
      echo "== $shape k$k s$stride $path"
      "$PY" "$REPO/scripts/gpu_step.py" cuda --path "$path" --shape "$shape" --k "$k" --stride "$stride" \
        --repeat 3 --profile 20 || rc=1
    done
  done
  echo "kernel times: $([ $rc -eq 0 ] && echo ok || echo FAILED) (per-kernel table in kernels.log)"
  return $rc
}
export -f kernel_times
wants kernels && stage kernels 240 bash -c kernel_times

# 5. memory and race checks, then the kernels' hardware counters (Firecracker machines; gVisor refuses both), on
# scripts/gpu_step.py runs of each backend and CUDA backward path
tool() {  # the first of: the CUDA toolkit's, the PATH's, Nsight Compute's own folder
  { ls "$CUDA_HOME/bin/$1" 2>/dev/null; command -v "$1"; ls /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null; } | head -1
}
sanitize() {
  local cs rc=0 run check runs=("cuda --path fused" "cuda --path split" "triton")
  cs=$(tool compute-sanitizer)
  [ -n "$cs" ] || { echo "no compute-sanitizer"; return 1; }
  # the default shape (2 x 40 -> 72 @ 19 x 23, k5): every kernel once, the fused backward in rounds of 16 channels
  # with its slot in shared memory, a tile per block; then the fused backward's other cases: 128 -> 144 @ 56, N = 8
  # (rounds of 16, the slot in global memory, 392 tiles on 264 blocks: the add-into-slot path; memcheck only, as
  # racecheck checks shared memory) and fp32 FMA in rounds of 16 (24 -> 16)
  local checks=("memcheck racecheck" "memcheck racecheck" "memcheck racecheck" "memcheck" "memcheck racecheck")
  runs+=("cuda --path fused --shape 8,128,144,56,56"
         "cuda --path fused --shape 2,24,16,19,23 --dtype float32 --no-tf32")
  local i
  for i in "${!runs[@]}"; do
    run=${runs[$i]}
    for check in ${checks[$i]}; do
      echo "== $check: $run"
      "$cs" --tool "$check" --error-exitcode 9 "$PY" "$REPO/scripts/gpu_step.py" $run --k 5 || rc=1
    done
  done
  echo "sanitizer: $([ $rc -eq 0 ] && echo "no error" || echo "ERRORS (above)") in ${#runs[@]} runs"
  return $rc
}
ncu_profile() {
  local ncu rc=0 run runs=("cuda --path fused" "cuda --path split" "triton")
  ncu=$(tool ncu)
  [ -n "$ncu" ] || { echo "no ncu"; return 1; }
  for run in "${runs[@]}"; do
    echo "== ncu: $run"
    "$ncu" --clock-control none --kernel-name regex:'fwd|bwd|gemm|reduce|colsum' --launch-count 12 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis "$PY" "$REPO/scripts/gpu_step.py" $run --shape 8,32,64,56,56 || rc=1
  done
  echo "ncu: $([ $rc -eq 0 ] && echo ok || echo FAILED) on ${#runs[@]} runs"
  return $rc
}
export -f tool sanitize ncu_profile
wants sanitize && stage sanitize 420 bash -c sanitize
wants ncu && stage ncu 240 bash -c ncu_profile

echo
echo "================ gpu_check summary ================"
cat "$SUMMARY_FILE"
echo "  results: $RESULTS/summary.txt, $RESULTS/logs.tar.gz"
exit $FAILED
