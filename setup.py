"""Build script: the Python package, plus the compiled CUDA extension `bsconv_cuda._C` when it can be built.

BSCONV_CUDA_BUILD=0   pure-Python install (Triton + reference backends only)
BSCONV_CUDA_BUILD=1   build the extension, fail loudly if that is impossible
(unset)               build it when torch has CUDA and nvcc is found, else skip with a message

TORCH_CUDA_ARCH_LIST  architectures to compile for (default "8.0;8.6;8.9;9.0+PTX"; below 8.0 is dropped: the
                      kernels use bf16 tensor cores). MAX_JOBS limits parallel compile jobs (ninja).
CUDA_HOME             defaults to /usr/local/cuda when that folder exists.
BSCONV_CUDA_LOCAL_VERSION  a PEP 440 local version label appended to the version in the wheel's METADATA (and to
                      `bsconv_cuda.__version__` in the built package), e.g. "cu130torch2.10" gives 0.1.0+cu130torch2.10;
                      set by scripts/build_wheel.sh. Unset: the plain version.

The extension uses only torch's stable C ABI (TORCH_TARGET_VERSION = 2.10) and CPython's limited API (3.10), so one
build loads into every torch >= 2.10 and every Python >= 3.10. Use `pip install --no-build-isolation -e .` so the
build sees the installed torch.
"""

import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
MIN_TORCH = (2, 10)


HERE = os.path.dirname(os.path.abspath(__file__))
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


def _log(msg):
    print(f"[bsconv_cuda setup] {msg}", file=sys.stderr)


def _parse_archs(spec):
    """Keep archs >= 8.0 from a TORCH_CUDA_ARCH_LIST string; returns (kept list, dropped list)."""
    kept, dropped = [], []
    for item in re.split(r"[;\s,]+", spec.strip()):
        if not item:
            continue
        m = re.match(r"^(\d+)\.(\d+)", item)
        if m and (int(m.group(1)), int(m.group(2))) < (8, 0):
            dropped.append(item)
        else:
            kept.append(item)
    return kept, dropped


def _cuda_extension():
    mode = os.environ.get("BSCONV_CUDA_BUILD", "").strip()
    if mode == "0":
        _log("BSCONV_CUDA_BUILD=0: skipping the CUDA extension (Triton + reference only)")
        return [], {}
    force = mode == "1"

    def skip(reason):
        if force:
            raise RuntimeError(f"BSCONV_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
        _log(f"skipping the CUDA extension: {reason} (set BSCONV_CUDA_BUILD=1 to make this an error)")
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable (use `pip install --no-build-isolation` after installing torch)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} has no CUDA support")
    tv = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if tv < MIN_TORCH:
        return skip(f"torch {torch.__version__} < 2.10 has no stable-ABI library registration")
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return skip("nvcc not found (set CUDA_HOME)")

    spec = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    archs, dropped = _parse_archs(spec)
    if dropped:
        _log(f"dropping architectures below 8.0 (no bf16 tensor cores): {dropped}")
    if not archs:
        return skip(f"no architecture >= 8.0 in TORCH_CUDA_ARCH_LIST={spec!r}")
    arch_list = ";".join(archs)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch.utils.cpp_extension

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    # build facts baked into the module (bsconv_cuda._C.compiled_archs / .torch_version), via a generated header
    gen_dir = os.path.join(here, "build", "bsconv_generated")
    os.makedirs(gen_dir, exist_ok=True)
    header = (
        "#pragma once\n"
        f'#define BSCONV_ARCH_LIST "{arch_list}"\n'
        f'#define BSCONV_TORCH_VERSION "{torch.__version__}"\n'
    )
    hpath = os.path.join(gen_dir, "bsconv_build_info.h")
    if not os.path.exists(hpath) or open(hpath).read() != header:
        with open(hpath, "w") as f:
            f.write(header)

    defines = ["-DTORCH_TARGET_VERSION=0x020a000000000000", "-DUSE_CUDA", "-DBSCONV_HAVE_BUILD_INFO"]
    max_jobs = os.environ.get("MAX_JOBS", "")
    nvcc_threads = int(max_jobs) if max_jobs.isdigit() and int(max_jobs) > 0 else (os.cpu_count() or 1)
    ext = CUDAExtension(
        name="bsconv_cuda._C",
        sources=["csrc/bsconv_ops.cpp", "csrc/bsconv_kernels.cu"],
        include_dirs=[os.path.join(here, "csrc"), gen_dir],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *defines],
            # --threads: the architectures of TORCH_CUDA_ARCH_LIST compile in parallel, as many at once as MAX_JOBS
            # (torch's limit on parallel compile jobs) allows (one kernels file: without it the release wheel's four
            # architectures compile one after another on one core)
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", f"--threads={nvcc_threads}",
                     *defines],
        },
        py_limited_api=True,
    )
    _log(f"building bsconv_cuda._C for TORCH_CUDA_ARCH_LIST={arch_list} with {nvcc}")
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


def _version():
    """The base version (`__version__` in bsconv_cuda/__init__.py, the one place it is written) plus the local label
    from BSCONV_CUDA_LOCAL_VERSION, if set."""
    with open(os.path.join(HERE, "bsconv_cuda", "__init__.py")) as f:
        m = _VERSION_LINE.search(f.read())
    if not m:
        raise RuntimeError("bsconv_cuda/__init__.py has no `__version__ = \"...\"` line")
    base = m.group(1)
    label = os.environ.get("BSCONV_CUDA_LOCAL_VERSION", "").strip().lstrip("+")
    if not label:
        return base
    if "+" in base:
        raise RuntimeError(f"the base version {base!r} already has a local label")
    if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", label):
        raise RuntimeError(f"BSCONV_CUDA_LOCAL_VERSION={label!r} is not a PEP 440 local version label")
    return f"{base}+{label}"


VERSION = _version()


class BuildPyWithVersion(build_py):
    """Writes the full version (with the local label) into the built copy of bsconv_cuda/__init__.py, so that
    `bsconv_cuda.__version__` of an installed wheel equals its METADATA version. The source tree is not touched."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "bsconv_cuda", "__init__.py")
        if not os.path.exists(target):
            return
        with open(target) as f:
            text = f.read()
        m = _VERSION_LINE.search(text)
        if m and m.group(1) != VERSION:
            with open(target, "w") as f:
                f.write(text[: m.start(1)] + VERSION + text[m.end(1) :])
            _log(f"bsconv_cuda.__version__ = {VERSION!r} in the built package")


ext_modules, cmdclass = _cuda_extension()
cmdclass = {**cmdclass, "build_py": BuildPyWithVersion}
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
_log(f"version {VERSION}")
setup(version=VERSION, ext_modules=ext_modules, cmdclass=cmdclass, options=options)
