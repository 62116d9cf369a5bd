#!/usr/bin/env bash
# Build a prebuilt wheel of bsconv-cuda with the compiled CUDA kernels (bsconv_cuda._C) inside, on a machine with
# nvcc and a CUDA build of torch >= 2.10 (no GPU needed), and check it before calling it done.
#
#   scripts/build_wheel.sh        # -> dist/bsconv_cuda-0.1.0+cu130torch2.10-cp310-abi3-linux_x86_64.whl
#
# The wheel: bsconv_cuda._C for every architecture of TORCH_CUDA_ARCH_LIST (SASS for each, PTX for the ones marked
# +PTX), the Triton kernels and the reference. The extension uses only torch's stable C ABI (TORCH_TARGET_VERSION
# 2.10) and Python's limited API (3.10), so the one wheel (tag cp310-abi3) loads into every Python >= 3.10 and every
# torch >= 2.10 built for the same CUDA major version. The local version label says what it needs:
#   cu<CUDA major><minor>  the CUDA toolkit it was compiled with (run it with a torch built for that CUDA major)
#   torch<major>.<minor>   the OLDEST torch it loads into (the stable-ABI target), not the torch it was built with
# The label is in the wheel's METADATA and in bsconv_cuda.__version__, not only in the file name.
#
# Environment:
#   TORCH_CUDA_ARCH_LIST  default "8.0;8.6;8.9;9.0+PTX" (sm_80, sm_86, sm_89, sm_90 SASS + compute_90 PTX)
#   MAX_JOBS              parallel compile jobs (default: all cores)
#   CUDA_HOME             default /usr/local/cuda
#   PYTHON                the Python whose torch the wheel is built against (default: python)
#   DIST                  where the wheel goes (default: <repo>/dist)
#   BSCONV_CUDA_LOCAL_VERSION  override the local version label (default computed as above)
#   BSCONV_CUDA_BUILD=0   build a pure-Python wheel (py3-none-any: Triton + reference, no _C) instead; this is the only
#                         way to get a wheel when torch < 2.10, torch has no CUDA, or there is no nvcc: without it the
#                         script stops with the reason (a silently kernel-less "CUDA" wheel would be worse).
#   BSCONV_WHEEL_KEEP_BUILD=1  keep <repo>/build/wheel (staged sources + objects) for a faster rebuild
#
# The build runs on a staged copy of the working tree (git's tracked + untracked-but-not-ignored files) under
# <repo>/build/wheel, so it neither reads nor disturbs an editable install's in-tree _C*.so or build objects.
# Exit status: 0 = wheel built and verified, 1 = build or verification failed, 2 = cannot build here (reason printed).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DIST=${DIST:-$REPO/dist}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
MODE=${BSCONV_CUDA_BUILD:-1}
MIN_TORCH=2.10
STAGE=$REPO/build/wheel

say() { echo "[build_wheel] $*"; }
die() { echo "[build_wheel] ERROR: $*" >&2; exit 1; }
cannot() { echo "[build_wheel] CANNOT BUILD the CUDA wheel here: $*" >&2
           echo "[build_wheel] (BSCONV_CUDA_BUILD=0 scripts/build_wheel.sh builds a pure-Python wheel instead)" >&2; exit 2; }

T0=$(date +%s)
# ------------------------------------------------------------------ what we build against
read -r TORCH_VERSION TORCH_CUDA TORCH_OK < <("$PY" -c "
import re, torch
v = tuple(int(x) for x in re.findall(r'\d+', torch.__version__)[:2])
print(torch.__version__, torch.version.cuda or 'none', int(v >= tuple(int(x) for x in '$MIN_TORCH'.split('.'))))
") || die "$PY cannot import torch"
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $TORCH_VERSION (CUDA $TORCH_CUDA)"

if [ "$MODE" = "0" ]; then
  say "BSCONV_CUDA_BUILD=0: building a pure-Python wheel (Triton + reference backends, no compiled kernels)"
  LABEL=""
else
  [ "$MODE" = "1" ] || die "BSCONV_CUDA_BUILD must be 0 or 1 (or unset, = 1) for this script, got '$MODE'"
  [ "$TORCH_OK" = "1" ] || cannot "torch $TORCH_VERSION < $MIN_TORCH. bsconv_cuda._C is written against torch's stable
  C ABI (STABLE_TORCH_LIBRARY, TORCH_TARGET_VERSION $MIN_TORCH), which older torch does not have. Install torch >= $MIN_TORCH
  (built for the CUDA you target) in $PY's environment and run this again."
  [ "$TORCH_CUDA" != "none" ] || cannot "torch $TORCH_VERSION is a CPU-only build; install a CUDA build of torch >= $MIN_TORCH."
  NVCC=$CUDA_HOME/bin/nvcc
  [ -x "$NVCC" ] || cannot "no nvcc at $NVCC (set CUDA_HOME to a CUDA toolkit)."
  NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p')
  [ -n "$NVCC_VERSION" ] || die "cannot read the CUDA version from '$NVCC --version'"
  [ "${NVCC_VERSION%%.*}" = "${TORCH_CUDA%%.*}" ] || cannot "nvcc is CUDA $NVCC_VERSION but torch was built for CUDA \
$TORCH_CUDA (the majors must match); point CUDA_HOME at a CUDA ${TORCH_CUDA%%.*}.x toolkit."
  say "nvcc $NVCC_VERSION ($NVCC), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
  LABEL=${BSCONV_CUDA_LOCAL_VERSION:-cu${NVCC_VERSION/./}torch$MIN_TORCH}
fi

# ------------------------------------------------------------------ stage the sources
rm -rf "$STAGE/dist" "$STAGE/log.txt"
if [ "${BSCONV_WHEEL_KEEP_BUILD:-0}" != "1" ]; then rm -rf "$STAGE"; fi
mkdir -p "$STAGE/src" "$STAGE/dist"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) | "$PY" -c "
import os, shutil, sys
repo, dst = sys.argv[1], sys.argv[2]
names = {n for n in sys.stdin.buffer.read().decode().split('\0') if n and os.path.isfile(os.path.join(repo, n))}
for root, dirs, files in os.walk(dst):            # drop staged files that are gone from the tree (kept build/ aside)
    rel = os.path.relpath(root, dst)
    if rel == 'build' or rel.startswith('build' + os.sep) or '.egg-info' in rel:
        continue
    for f in files:
        if os.path.normpath(os.path.join(rel, f)) not in names:
            os.remove(os.path.join(root, f))
for n in names:                                    # copy2 keeps mtimes, so a kept build/ rebuilds only what changed
    s, d = os.path.join(repo, n), os.path.join(dst, n)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    if not os.path.exists(d) or os.stat(d).st_mtime != os.stat(s).st_mtime or os.path.getsize(d) != os.path.getsize(s):
        shutil.copy2(s, d)
print(f'[build_wheel] staged {len(names)} files from {repo} in {dst}')
" "$REPO" "$STAGE/src"
rm -f "$STAGE"/src/bsconv_cuda/_C*.so

# ------------------------------------------------------------------ build
say "building (log: $STAGE/log.txt) ..."
T1=$(date +%s)
if ! (cd "$STAGE/src" && BSCONV_CUDA_BUILD=$MODE BSCONV_CUDA_LOCAL_VERSION=$LABEL \
      "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$STAGE/dist" . >"$STAGE/log.txt" 2>&1); then
  tail -40 "$STAGE/log.txt" >&2
  die "the wheel build failed (full log: $STAGE/log.txt)"
fi
T2=$(date +%s)
shopt -s nullglob
WHEELS=("$STAGE"/dist/*.whl)
[ ${#WHEELS[@]} -eq 1 ] || die "expected one wheel in $STAGE/dist, got: ${WHEELS[*]:-none}"
WHEEL=${WHEELS[0]}
say "built $(basename "$WHEEL") in $((T2 - T1)) s"

# ------------------------------------------------------------------ verify
BASE_VERSION=$(sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$REPO/bsconv_cuda/__init__.py")
if [ -n "$LABEL" ]; then
  VERSION=$BASE_VERSION+$LABEL; TAG=cp310-abi3-linux_x86_64
else
  VERSION=$BASE_VERSION; TAG=py3-none-any
fi
CHECK=$STAGE/check
rm -rf "$CHECK"; mkdir -p "$CHECK"
CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || true)
"$PY" - "$WHEEL" "$VERSION" "$TAG" "$LABEL" "$TORCH_CUDA_ARCH_LIST" "$CHECK" "${CUOBJDUMP:-}" <<'EOF' \
  || die "the wheel failed verification: $WHEEL (staged build kept in $STAGE)"
import os, re, subprocess, sys, zipfile

wheel, version, tag, label, arch_list, check_dir, cuobjdump = sys.argv[1:8]
failures = []

def check(ok, what):
    print(f"[build_wheel]   {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)

name = os.path.basename(wheel)
expected = f"bsconv_cuda-{version}-{tag}.whl"
check(name == expected, f"file name {name} (expected {expected})")
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    check(zf.testzip() is None, "zip CRCs")
    dist_info = f"bsconv_cuda-{version}.dist-info"
    meta = zf.read(f"{dist_info}/METADATA").decode() if f"{dist_info}/METADATA" in names else ""
    check(re.search(rf"^Version: {re.escape(version)}$", meta, re.M) is not None, f"METADATA Version: {version}")
    wheel_meta = zf.read(f"{dist_info}/WHEEL").decode() if f"{dist_info}/WHEEL" in names else ""
    check(f"Tag: {tag}" in wheel_meta, f"WHEEL Tag: {tag}")
    init = zf.read("bsconv_cuda/__init__.py").decode() if "bsconv_cuda/__init__.py" in names else ""
    check(f'__version__ = "{version}"' in init, f'bsconv_cuda/__init__.py has __version__ = "{version}"')
    for required in ("bsconv_cuda/reference.py", "bsconv_cuda/ops.py", "bsconv_cuda/backends.py",
                     "bsconv_cuda/cuda_backend.py", "bsconv_cuda/info.py", "bsconv_cuda/kernels/bsconv_u.py"):
        check(required in names, f"contains {required}")
    sos = [n for n in names if n.endswith(".so")]
    if not label:
        check(not sos, "pure-Python wheel has no shared object")
    else:
        check(sos == ["bsconv_cuda/_C.abi3.so"], f"the only shared object is bsconv_cuda/_C.abi3.so (found {sos})")
        if "bsconv_cuda/_C.abi3.so" in names:
            so = zf.extract("bsconv_cuda/_C.abi3.so", check_dir)
if label and not failures:
    # device code: SASS for every listed architecture, PTX for those marked +PTX, nothing else
    archs = [a for a in re.split(r"[;\s,]+", arch_list) if a]
    want_elf = {"sm_" + a.split("+")[0].replace(".", "") for a in archs}
    want_ptx = {"sm_" + a.split("+")[0].replace(".", "") for a in archs if a.endswith("+PTX")}
    if not cuobjdump or not os.path.exists(cuobjdump):
        check(False, "cuobjdump found (CUDA_HOME/bin or triton/backends/nvidia/bin)")
    else:
        elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
        ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True).stdout
        got_elf = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))
        got_ptx = set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx))
        check(got_elf == want_elf, f"SASS (cubin) for {sorted(want_elf)}: found {sorted(got_elf)}")
        check(got_ptx == want_ptx, f"PTX for {sorted(want_ptx)}: found {sorted(got_ptx)}")
    # host side: only torch's stable C ABI and Python's limited API, so it loads into other torch / Python versions
    nm = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True).stdout
    undefined = [line.split()[-1] for line in nm.splitlines() if line.strip()]
    torch_cxx = [s for s in undefined if re.match(r"_ZN\d*(c10|at|torch|caffe2|c10d)\d", s) or "pybind11" in s]
    check(not torch_cxx, f"no torch C++ (non-stable-ABI) symbols imported ({len(torch_cxx)} found: {torch_cxx[:5]})")
    stable = [s for s in undefined if s.startswith(("aoti_torch_", "torch_"))]
    check(bool(stable), f"imports torch's stable C ABI ({len(stable)} aoti_torch_*/torch_* symbols)")
    readelf = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", readelf)
    check(not any(n.startswith("libpython") for n in needed), f"does not link libpython (NEEDED: {', '.join(needed)})")
    check(not re.search(r"\((RPATH|RUNPATH)\)", readelf), "no RPATH/RUNPATH baked in")
    # the C/C++ runtime it needs from the user's system (the build machine's glibc / libstdc++ set the floor)
    import shutil
    objdump = subprocess.run(["objdump", "-T", so], capture_output=True, text=True).stdout if shutil.which("objdump") else ""
    floor = {}
    for lib, ver in re.findall(r"\b(GLIBC|GLIBCXX|CXXABI)_(\d+(?:\.\d+)*)", objdump):
        floor[lib] = max(floor.get(lib, "0"), ver, key=lambda v: tuple(int(x) for x in v.split(".")))
    print(f"[build_wheel]   info needs from the system: " + ", ".join(f"{k}_{v}" for k, v in sorted(floor.items()))
          + " (glibc 2.28 would match torch's manylinux_2_28 wheels; build in such a container for that)")
if failures:
    print(f"[build_wheel] {len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
EOF

# load test: the extracted wheel (not the repo's package) imports, registers the ops and reports its build
if [ -n "$LABEL" ]; then
  (cd "$CHECK" && "$PY" -m zipfile -e "$WHEEL" . >/dev/null && env -u TRITON_INTERPRET PYTHONPATH="$CHECK" "$PY" -c "
import os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import bsconv_cuda, torch
ours = [str(w.message) for w in caught if 'bsconv' in str(w.message)]
assert not ours, ours
from bsconv_cuda import backends, cuda_backend
assert os.path.dirname(bsconv_cuda.__file__) == os.path.join('$CHECK', 'bsconv_cuda'), bsconv_cuda.__file__
assert bsconv_cuda.__version__ == '$VERSION', bsconv_cuda.__version__
assert backends.extension_load_error() is None, backends.extension_load_error()
assert hasattr(torch.ops.bsconv_cuda, 'cuda_forward') and hasattr(torch.ops.bsconv_cuda, 'cuda_backward')
want = [a for a in '$TORCH_CUDA_ARCH_LIST'.split(';') if a]
assert cuda_backend.compiled_archs() == want, (cuda_backend.compiled_archs(), want)
print('[build_wheel]   ok   loads here:', cuda_backend.build_summary())
") || die "the extracted wheel does not load with $PY's torch"
fi

mkdir -p "$DIST"
rm -f "$DIST/$(basename "$WHEEL")"
cp "$WHEEL" "$DIST/"
if [ "${BSCONV_WHEEL_KEEP_BUILD:-0}" != "1" ]; then rm -rf "$STAGE"; fi
T3=$(date +%s)
say "OK: $DIST/$(basename "$WHEEL") ($(du -h "$DIST/$(basename "$WHEEL")" | cut -f1)); build $((T2 - T1)) s, total $((T3 - T0)) s"
