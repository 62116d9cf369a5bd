#!/usr/bin/env bash
# Install a prebuilt bsconv-cuda wheel into fresh virtual environments and check what a user would see.
#
#   scripts/check_wheel.sh [path/to/bsconv_cuda-*.whl]      # default: the newest dist/bsconv_cuda-*.whl
#
# 1. "same torch": a clean venv with the torch the wheel was built against (default: the version of $PYTHON's torch,
#    installed by pip; on the project machine it comes from the local wheel store). The wheel installs, `import
#    bsconv_cuda` warns nothing, __version__ equals the METADATA version, _C loads and registers the cuda ops,
#    `python -m bsconv_cuda.info` lists the compiled architectures, tests/test_cuda_extension.py passes (its CPU part;
#    the GPU part too when there is a GPU), and the Triton kernels run (interpreter on CPU, natively on a GPU).
# 2. "CPU torch": a clean venv with a CPU-only torch (default torch==2.13.0, a +cpu wheel on the project machine).
#    The wheel installs, `import bsconv_cuda` warns exactly once (the _C load failure, with the reason), the
#    reference backend computes, and `python -m bsconv_cuda.info` explains why `cuda` is unavailable.
# 3. Tags: pip on every other CPython >= 3.10 found (PYTHONS, default: python3.10 / 3.12 / 3.13 from PATH or pyenv)
#    accepts the abi3 wheel (`pip install --dry-run --no-deps`, nothing is installed).
# 4. Other torch versions: for each torch / triton pair of TORCH_PAIRS, a clean venv with that pair and the wheel
#    with its test extra (`pip install WHEEL[test]`), then the whole test suite (the repo's tests/, run from an
#    empty folder so that it imports the installed wheel) with the Triton kernels under the interpreter; the pairs run
#    concurrently (each test run keeps about one core busy; one's download overlaps another's tests). Default:
#    the GPU machine's pair (torch 2.11.0 + triton 3.6.0, where _C loads) and the oldest claimed pair (torch 2.7.0 +
#    triton 3.3.0, older than the stable ABI: _C fails to load, with one warning, and the cuda backend is unavailable;
#    no float64 tl.dot, so the Triton float64 tests are replaced by a test of the refusal).
#
# Environment: PYTHON (default python), WHEEL_CHECK_DIR (venvs, default /tmp/bsconv-wheel-check; reused when their
# torch matches, so a second run takes seconds), TORCH_SAME (pip spec, default torch==<$PYTHON's torch version>),
# TORCH_CPU (default torch==2.13.0, on the project machine a +cpu wheel from /opt/wheels; elsewhere give pip the CPU
# index too: TORCH_CPU="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"; "skip" skips step 2), PYTHONS (space-separated interpreters for step 3,
# "skip" skips it), TORCH_PAIRS (";"-separated pip specs for step 4, "skip" skips it), WHEEL_CHECK_FRESH=1 rebuilds
# the venvs.
# Exit status 0 when every check passed.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WHEEL=${1:-$(ls -t "$REPO"/dist/bsconv_cuda-*.whl 2>/dev/null | head -1)}
[ -n "$WHEEL" ] && [ -f "$WHEEL" ] || { echo "usage: $0 path/to/bsconv_cuda-*.whl (none in $REPO/dist)" >&2; exit 2; }
WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
ROOT=${WHEEL_CHECK_DIR:-/tmp/bsconv-wheel-check}
mkdir -p "$ROOT"
TORCH_SAME=${TORCH_SAME:-torch==$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}
# numpy<2.4 with triton < 3.7: that interpreter turns one-element arrays into loop bounds with int(), which numpy 2.4
# refuses (bsconv_cuda.backends.interpreter_numpy_conflict)
TORCH_PAIRS=${TORCH_PAIRS:-torch==2.11.0 triton==3.6.0 numpy<2.4;torch==2.7.0 triton==3.3.0 numpy<2.4}
VERSION=$(basename "$WHEEL" | cut -d- -f2)
LABEL=${VERSION#*+}; [ "$LABEL" = "$VERSION" ] && LABEL=""
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET PYTHONPATH

declare -a SUMMARY=()
FAILED=0
result() {  # result <rc> <what>
  if [ "$1" -eq 0 ]; then SUMMARY+=("ok    $2"); else SUMMARY+=("FAIL  $2"); FAILED=1; fi
  echo "== $([ "$1" -eq 0 ] && echo ok || echo FAIL): $2"
}

# make_venv <dir> <torch spec> [extra packages...]: a clean venv with that torch (reused when it already has it)
make_venv() {
  local dir=$1 spec=$2; shift 2
  local want
  want=$(echo "$spec" | sed -n 's/.*torch==\([^ +]*\).*/\1/p')
  if [ "${WHEEL_CHECK_FRESH:-0}" = "1" ] || ! "$dir/bin/python" -c "
import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$want' else 1)" 2>/dev/null; then
    rm -rf "$dir"
    "$PY" -m venv "$dir" || return 1
    # $spec unquoted on purpose: it may carry pip options, e.g. "torch==2.13.0 --index-url .../whl/cpu"
    "$dir/bin/python" -m pip install -q $spec "$@" 2>&1 | grep -v "^WARNING: Location" || true
  else
    [ $# -eq 0 ] || "$dir/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "$dir/bin/python" -c "import torch; print('   venv', '$dir', 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
}

install_wheel() {  # install_wheel <venv>: the wheel with its dependencies (torch is already there)
  "$1/bin/python" -m pip uninstall -q -y bsconv-cuda >/dev/null 2>&1
  "$1/bin/python" -m pip install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location"
  "$1/bin/python" -m pip show bsconv-cuda | grep -E "^(Version|Location)"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"  # never import bsconv_cuda from the repo by accident
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1)), version $VERSION"

# ------------------------------------------------------------------------------------------------ 1. same torch
T0=$(date +%s)
SAME=$ROOT/same-torch
echo "== 1. same torch ($TORCH_SAME) in $SAME"
make_venv "$SAME" "$TORCH_SAME" numpy pytest
result $? "venv with $TORCH_SAME ($(($(date +%s) - T0)) s)"
install_wheel "$SAME"
result $? "pip install the wheel next to $TORCH_SAME"
"$SAME/bin/python" - "$VERSION" "$LABEL" <<'EOF'
import importlib.metadata, os, sys, warnings
version, label = sys.argv[1:3]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import bsconv_cuda
    from bsconv_cuda import backends, cuda_backend
ours = [str(w.message) for w in caught if "bsconv" in str(w.message)]
assert not ours, f"unexpected warnings: {ours}"
assert "site-packages" in bsconv_cuda.__file__, bsconv_cuda.__file__
assert bsconv_cuda.__version__ == importlib.metadata.version("bsconv-cuda") == version, (
    bsconv_cuda.__version__, importlib.metadata.version("bsconv-cuda"), version)
if label:
    assert backends.extension_load_error() is None, backends.extension_load_error()
    assert hasattr(torch.ops.bsconv_cuda, "cuda_forward"), "cuda ops not registered"
    print("   ", cuda_backend.build_summary())
    assert cuda_backend.compiled_archs(), "no compiled architectures reported"
else:
    assert backends.extension_load_error() is not None
print("   import ok, version", bsconv_cuda.__version__, "from", os.path.dirname(bsconv_cuda.__file__))
EOF
result $? "import bsconv_cuda: no warning, __version__ == METADATA == $VERSION, _C loads"
"$SAME/bin/python" -m bsconv_cuda.info >"$WORK/info_same.txt" 2>&1
rc=$?; sed 's/^/    /' "$WORK/info_same.txt"
if [ -n "$LABEL" ]; then grep -q "_C  *bsconv_cuda._C loaded (compiled for [0-9]" "$WORK/info_same.txt"; rc=$((rc + $?)); fi
result $rc "python -m bsconv_cuda.info lists the compiled architectures"
TRITON_INTERPRET=1 "$SAME/bin/python" - <<'EOF'
import torch, bsconv_cuda
from bsconv_cuda import reference
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
x = torch.randn(2, 8, 9, 9, dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
pw = torch.randn(16, 8, dtype=x.dtype, device=device)
dw = torch.randn(16, 1, 3, 3, dtype=x.dtype, device=device)
ref = bsconv_cuda.bsconv_u(x, pw, dw, stride=2, padding=1, backend="reference")
backends = ["triton"] + (["cuda"] if device == "cuda" else [])
for backend in backends:
    y = bsconv_cuda.bsconv_u(x, pw, dw, stride=2, padding=1, backend=backend)
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), (backend, err)
    print(f"    {backend} on {device}: max abs err vs reference {err:.2e}")
EOF
result $? "fused kernels run from the installed wheel (Triton$([ -n "$LABEL" ] && echo ", and cuda on a GPU"))"
if [ -n "$LABEL" ]; then
  cp -r "$REPO/tests" "$WORK/t" && cp "$REPO/pyproject.toml" "$WORK/"
  (cd "$WORK" && BSCONV_CUDA_BUILD=1 "$SAME/bin/python" -m pytest -q -rs -p no:cacheprovider t/test_cuda_extension.py \
     >"$WORK/pytest_same.txt" 2>&1)
  rc=$?; tail -3 "$WORK/pytest_same.txt" | sed 's/^/    /'
  result $rc "tests/test_cuda_extension.py against the installed wheel ($(tail -1 "$WORK/pytest_same.txt" | tr -d '=' | xargs))"
fi
T1=$(date +%s)

# ------------------------------------------------------------------------------------------------ 2. CPU torch
if [ "$TORCH_CPU" != "skip" ]; then
  CPU=$ROOT/cpu-torch
  echo "== 2. CPU-only torch ($TORCH_CPU) in $CPU"
  make_venv "$CPU" "$TORCH_CPU"
  result $? "venv with $TORCH_CPU"
  install_wheel "$CPU"
  result $? "pip install the wheel next to $TORCH_CPU"
  "$CPU/bin/python" - "$LABEL" <<'EOF'
import sys, warnings
label = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import bsconv_cuda
    from bsconv_cuda import backends
    bsconv_cuda.available_backends("cpu"); backends.extension_load_error()   # cached: no second warning
ours = [str(w.message) for w in caught if "bsconv" in str(w.message)]
if label:
    assert len(ours) == 1 and "_C" in ours[0], ours
    print("    warning:", ours[0])
else:
    assert not ours, ours
assert torch.version.cuda is None, "expected a CPU-only torch"
assert backends.extension_load_error() is not None
assert bsconv_cuda.available_backends("cpu") == ["reference"], bsconv_cuda.available_backends("cpu")
x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
pw = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
dw = torch.randn(16, 1, 3, 3, dtype=torch.float64, requires_grad=True)
y = bsconv_cuda.bsconv_u(x, pw, dw, stride=2, padding=1)
ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, pw[:, :, None, None]), dw, stride=2, padding=1, groups=16)
assert torch.allclose(y, ref), (y - ref).abs().max()
y.sum().backward()
m = bsconv_cuda.FusedBSConvU(8, 16, 3, padding=1)
assert m(x.float()).shape == (2, 16, 9, 9)
print("    falls back: available_backends('cpu') =", bsconv_cuda.available_backends("cpu"), "; reference forward/backward ok")
EOF
  result $? "import next to a CPU-only torch: $([ -n "$LABEL" ] && echo "one warning, ")falls back to the reference"
  "$CPU/bin/python" -m bsconv_cuda.info >"$WORK/info_cpu.txt" 2>&1
  rc=$?; sed 's/^/    /' "$WORK/info_cpu.txt"
  result $rc "python -m bsconv_cuda.info next to a CPU-only torch"
fi
T2=$(date +%s)

# ------------------------------------------------------------------------------------------------ 3. other Pythons
if [ "${PYTHONS:-}" != "skip" ]; then
  if [ -z "${PYTHONS:-}" ]; then
    PYTHONS=""
    for v in 3.10 3.12 3.13; do  # pyenv's own interpreters first (its shims fail for versions not selected)
      for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$v*/bin/python$v 2>/dev/null) $(command -v "python$v"); do
        if "$p" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$v'.split('.'))))" 2>/dev/null; then
          PYTHONS="$PYTHONS $p"; break
        fi
      done
    done
  fi
  for p in $PYTHONS; do
    out=$("$p" -m pip install --dry-run --no-deps --no-index --ignore-installed "$WHEEL" 2>&1)
    rc=$?; echo "$out" | grep -E "Would install|ERROR" | sed 's/^/    /'
    result $rc "pip on Python $("$p" -c 'import sys; print(sys.version.split()[0])') accepts $(basename "$WHEEL" | cut -d- -f3-)"
  done
fi

# ------------------------------------------------------------------------------------------------ 4. other torch
# check_pair <pair>: the venv, the wheel and the whole suite next to one pair; what it prints goes to pair_<torch>.log
# and its verdicts, "<rc> <what>" lines, to pair_<torch>.results (the pairs run concurrently: the interpreter uses one
# core, and one pair's download overlaps the other's tests)
check_pair() {
  local pair=$1 want other t0 t1 rc
  want=$(echo "$pair" | sed -n 's/.*torch==\([^ +]*\).*/\1/p')
  other=$ROOT/torch-$want
  exec >"$WORK/pair_$want.log" 2>&1 3>"$WORK/pair_$want.results"
  echo "== 4. the test suite next to $pair in $other"
  t0=$(date +%s)
  make_venv "$other" "$pair"
  echo "$? venv with $pair ($(($(date +%s) - t0)) s)" >&3
  "$other/bin/python" -m pip uninstall -q -y bsconv-cuda >/dev/null 2>&1
  # the pair again ($pair unquoted: several specs): the test extra's torchvision must be the one built for this
  # torch, not the newest, which would pull the newest torch in
  "$other/bin/python" -m pip install -q "$WHEEL[test]" $pair >"$WORK/pip_$want.txt" 2>&1
  rc=$?; grep -v "^WARNING: Location" "$WORK/pip_$want.txt"
  echo "$rc pip install the wheel with its test extra next to $pair" >&3
  t1=$(date +%s)
  # from the empty $WORK: pytest puts tests/ (not the repo root) on sys.path, so bsconv_cuda is the installed wheel;
  # not -q: the header (tests/conftest.py) says which bsconv_cuda, torch, triton and backends were tested
  timeout 2400 "$other/bin/python" -m pytest "$REPO/tests" -rs -p no:cacheprovider --durations=5 \
    >"$WORK/pytest_$want.txt" 2>&1
  rc=$?
  sed -n '/^bsconv_cuda /,/^backends on cpu/p' "$WORK/pytest_$want.txt" | sed 's/^/    /'
  grep -E "^(FAILED|ERROR)" "$WORK/pytest_$want.txt" | head -40 | sed 's/^/    /'
  grep -A5 "slowest 5 durations" "$WORK/pytest_$want.txt" | tail -5 | sed 's/^/    /'
  grep -q "^bsconv_cuda .* from $other/lib/.*/site-packages/bsconv_cuda$" "$WORK/pytest_$want.txt" \
    || { echo "    the suite did not import the installed wheel"; rc=1; }
  grep -q "^backends on cpu: .*'triton'" "$WORK/pytest_$want.txt" \
    || { echo "    the Triton backend is unavailable: its tests did not run"; rc=1; }
  echo "$rc the whole test suite next to $pair ($(tail -1 "$WORK/pytest_$want.txt" | tr -d '=' | xargs), \
$(($(date +%s) - t1)) s)" >&3
}

T3=$(date +%s)
if [ "$TORCH_PAIRS" != "skip" ]; then
  IFS=";" read -r -a PAIRS <<<"$TORCH_PAIRS"
  for pair in "${PAIRS[@]}"; do check_pair "$pair" & done
  wait
  for pair in "${PAIRS[@]}"; do
    want=$(echo "$pair" | sed -n 's/.*torch==\([^ +]*\).*/\1/p')
    cat "$WORK/pair_$want.log"
    grep -q " the whole test suite " "$WORK/pair_$want.results" 2>/dev/null \
      || echo "1 the test suite next to $pair did not run to the end" >>"$WORK/pair_$want.results"
    while read -r rc what; do result "$rc" "$what"; done <"$WORK/pair_$want.results"
  done
fi

echo
echo "================ check_wheel summary: $(basename "$WHEEL") ================"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  times: same torch $((T1 - T0)) s, CPU torch $((T2 - T1)) s, other torch $(($(date +%s) - T3)) s, \
total $(($(date +%s) - T0)) s"
exit $FAILED
