"""Static report of the fused kernels' machine code, made without a GPU.

    python benchmarks/kernel_report.py [--arch 80,90] [--dtypes bf16,fp16,fp32] [--shapes all|quick|NAMES]
                                       [--jobs N] [--json PATH] [--markdown PATH] [--update-markdown BENCHMARKS.md]

- Triton: every kernel configuration that the Triton launcher (``bsconv_cuda/kernels/bsconv_u.py``) launches for the
  benchmark shape table (``bsconv_cuda.shapes``), per dtype, is compiled for each target (``triton.compile`` on an
  ``ASTSource`` with ``GPUTarget("cuda", arch, 32)``; no driver needed). The configurations come from a provider: the
  launcher's own ``launch_configs(shapes, dtypes)`` when it has one, else :func:`captured_triton_configs` here,
  which runs the launchers ``forward``/``backward`` on meta tensors and records every launch (the launch plans'
  block sizes and constexprs, by their names in the kernels). ``--provider module:function`` plugs in another
  enumeration.
- CUDA: the built extension ``bsconv_cuda/_C*.so`` (if present) is read as is (all the architectures it carries).

Per kernel it reports registers, stack/local memory and spill instructions (``STL``/``LDL`` in SASS), shared memory,
the occupancy those allow (resident warps per SM / 64), whether the matrix stage uses tensor-core instructions
(``HGMMA`` on sm_90, ``HMMA`` on sm_80+), and the widths of the global loads and stores (``LDG``/``STG``; 16 B =
``.128``). Tools: ``cuobjdump`` from Triton's wheel (``triton/backends/nvidia/bin``), else ``$CUDA_HOME/bin``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bsconv_cuda.plan import TARGET_SMS  # noqa: E402 - importable from a source checkout through REPO

# Per-SM limits used for the occupancy estimate (CUDA occupancy calculator values).
ARCH_LIMITS = {
    80: dict(regs=65536, smem=167936, smem_block=166912, warps=64, blocks=32, reserved_smem=1024),
    86: dict(regs=65536, smem=102400, smem_block=101376, warps=48, blocks=16, reserved_smem=1024),
    89: dict(regs=65536, smem=102400, smem_block=101376, warps=48, blocks=24, reserved_smem=1024),
    90: dict(regs=65536, smem=233472, smem_block=232448, warps=64, blocks=32, reserved_smem=1024),
}
TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


# ------------------------------------------------------------------------------------------------------------ tools
def find_tool(name: str) -> str | None:
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except Exception:  # noqa: BLE001
        pass
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / name).exists():
            return str(Path(base) / "bin" / name)
    return shutil.which(name)


def _run(tool: str, *args: str) -> str:
    exe = find_tool(tool)
    if exe is None:
        raise RuntimeError(f"{tool} not found (Triton's wheel carries it in triton/backends/nvidia/bin)")
    res = subprocess.run([exe, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {res.stderr.strip()[:500]}")
    return res.stdout


# ------------------------------------------------------------------------------------------------------ parsing
_RES_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def parse_resource_usage(text: str) -> list[dict]:
    """``cuobjdump --dump-resource-usage`` -> [{arch, function, regs, stack, shared, local}]."""
    out, arch, func = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(line.split("sm_")[1].split()[0].rstrip("a"))
        elif line.startswith("Function "):
            func = line[len("Function "):].rstrip(":").strip()
        elif (m := _RES_LINE.search(line)) and func is not None:
            regs, stack, shared, local = map(int, m.groups())
            out.append(dict(arch=arch, function=func, regs=regs, stack=stack, shared=shared, local=local))
            func = None
    return out


def _access_width(op: str) -> int:
    """Bytes of one LDG/STG instruction from its modifiers (``LDG.E.128`` -> 16, ``LDG.E`` -> 4)."""
    mods = op.split(".")[1:]
    for mod in reversed(mods):
        if mod in _WIDTH:
            return _WIDTH[mod]
    return 4


def parse_sass(text: str) -> dict[tuple[int | None, str], dict]:
    """``cuobjdump --dump-sass`` -> {(arch, function): {tensor_core: Counter, ldg: Counter(bytes), stg: ..., stl, ldl}}."""
    out: dict = {}
    arch, cur = None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = sm_"):
            arch = int(s.split("sm_")[1].split()[0].rstrip("a"))
            continue
        if s.startswith("Function :"):
            cur = out.setdefault((arch, s.split(":", 1)[1].strip()),
                                 dict(tensor_core=Counter(), ldg=Counter(), stg=Counter(), stl=0, ldl=0, instrs=0,
                                      tma=0))
            continue
        if cur is None or not s.startswith("/*"):
            continue
        m = re.match(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", s)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        cur["instrs"] += 1
        if base in ("HGMMA", "HMMA", "IMMA", "WGMMA"):
            cur["tensor_core"][op.split(".")[0] + ("." + op.split(".")[1] if "." in op else "")] += 1
        elif base in ("LDG", "LDGSTS"):  # LDGSTS: cp.async global -> shared (how Triton feeds tl.dot on sm_80+)
            cur["ldg"][_access_width(op)] += 1
        elif base in ("UTMALDG", "UBLKCP", "UTMASTG"):  # Hopper TMA bulk copies
            cur["tma"] += 1
        elif base == "STG":
            cur["stg"][_access_width(op)] += 1
        elif base == "STL":
            cur["stl"] += 1
        elif base == "LDL":
            cur["ldl"] += 1
    return out


_PTX_REGISTER = re.compile(r"%([a-z]+)[0-9]+")
_PTX_DECLARED = re.compile(r"\.reg\s+\.\w+\s+%([a-z]+)<\d+>")
_PTX_FUNCTION = re.compile(r"^\s*(\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\b")
# PTX instructions whose first operand is read, not written (stores, barriers, branches, reductions)
_PTX_NO_DESTINATION = ("st.", "stmatrix", "bar", "bra", "ret", "red.", "cp.", "fence", "membar", "prefetch",
                       "tcgen05.st", "wgmma.fence", "wgmma.commit", "wgmma.wait")


def ptx_undefined_registers(ptx: str) -> list[str]:
    """Registers the PTX reads but never writes, function by function. LLVM's NVPTX backend in Triton 3.6 packed the
    tap row of the forward kernel into an i16x2 add beside an undefined half (``mov.b32 %r, {%rs25, %rs28}`` with
    %rs28 never written), and ptxas then dropped the add: every output row came from the next input row on an H200
    (fp32 NCHW, 9 x 11, pad 1). A read of an undefined register leaves ptxas free to compute anything, so none is
    allowed, used or not. Only the registers a function declares (``.reg``) count, not special ones (%tid, %clock);
    control flow is not followed: a write anywhere in the function counts, so a read on a path that skips it is
    missed."""
    undefined, declared, written, read = set(), set(), set(), set()

    def end_function():
        undefined.update(r for r in read - written if _PTX_REGISTER.match(r).group(1) in declared)
        for found in (declared, written, read):
            found.clear()

    for line in ptx.splitlines():
        code = line.split("//")[0]
        if _PTX_FUNCTION.match(code):
            end_function()
        declared.update(_PTX_DECLARED.findall(code))
        for statement in code.split(";"):
            statement = statement.strip().lstrip("{} \t").replace("\t", " ")
            if not statement or statement.startswith((".", "$", ")", "(")) or statement.endswith(":"):
                continue
            guard = re.match(r"@!?(%p[0-9]+)\s+", statement)
            if guard:
                read.add(guard.group(1))
                statement = statement[guard.end():]
            op, _, operands = statement.partition(" ")
            destination = re.match(r"\s*(\{[^}]*\}|[^,]+),(.*)", operands)
            if op.startswith(_PTX_NO_DESTINATION) or destination is None or destination.group(1).strip()[:1] == "[":
                read.update(m.group(0) for m in _PTX_REGISTER.finditer(operands))
                continue
            written.update(m.group(0) for m in _PTX_REGISTER.finditer(destination.group(1)))  # "%p1|%p2": both
            read.update(m.group(0) for m in _PTX_REGISTER.finditer(destination.group(2)))
    end_function()
    return sorted(undefined)


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident blocks and warps per SM allowed by registers, shared memory and warp/block limits."""
    lim = ARCH_LIMITS.get(arch, ARCH_LIMITS[90])
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps if regs_per_warp else lim["blocks"]
    by_smem = lim["smem"] // (shared + lim["reserved_smem"]) if shared <= lim["smem_block"] else 0
    by_warps = lim["warps"] // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, lim["blocks"]))
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                   ("blocks", lim["blocks"])), key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                occupancy=blocks * num_warps / lim["warps"], limiter=limiter)


# --------------------------------------------------------------------------------------------------- the configs
@dataclass
class KernelConfig:
    """One compilation of a Triton kernel: what the launcher passes (signature, constexprs, num_warps)."""

    kernel: str
    fn: object  # a triton JITFunction, or "module:attribute"
    signature: dict
    constexprs: dict
    num_warps: int
    dtype: str
    matrix_stage: bool  # True when the kernel has a tl.dot stage (tensor cores expected for bf16/fp16)
    num_stages: int | None = None
    uses: list[str] = field(default_factory=list)  # shapes (and dtypes) that launch it
    attrs: dict = field(default_factory=dict)  # {(arg index,): [["tt.divisibility", 16]]}, as Triton's launcher
    spec_ones: list[str] = field(default_factory=list)  # int arguments specialized to the constant 1

    def key(self):
        return (self.kernel, self.dtype, self.num_warps, self.num_stages, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), tuple(sorted(self.attrs)))

    def label(self) -> str:
        skip = {"PREC", "ACC64", "IDX64", "UPCAST_DOT", "DILATION_H", "DILATION_W", *self.spec_ones}
        c = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k not in skip)
        prec = self.constexprs.get("PREC")
        s = f"{self.kernel}[{self.dtype}{'/' + prec if prec and self.dtype == 'fp32' else ''}] w{self.num_warps} {c}"
        if self.spec_ones:
            s += f" | =1: {','.join(self.spec_ones)}"
        return s


def _resolve(fn):
    if isinstance(fn, str):
        mod, _, attr = fn.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return fn


def _signature(fn, constexprs: dict, ptr_types: dict, default_ptr: str) -> dict:
    sig = {}
    for name in _resolve(fn).arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, default_ptr)
        else:
            sig[name] = "i32"
    return sig


_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
                    "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _specialize_int(value: int) -> tuple[str, str]:
    """What Triton's launcher does with an int argument: 1 -> constexpr, multiple of 16 -> 'D' (divisibility 16)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        return kind, attr if isinstance(attr, str) else ""
    except Exception:  # noqa: BLE001 - older Triton: the same rules by hand
        if value == 1:
            return "constexpr", ""
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""


def config_from_launch(kernel, args: tuple, kwargs: dict, dtype: str, use: str,
                       inductor: bool = False) -> KernelConfig:
    """A KernelConfig equal to what ``kernel[grid](*args, **kwargs)`` compiles on a GPU: constexpr parameters,
    ints specialized as Triton's launcher does (1 -> constant, multiples of 16 -> divisibility hint; none for the
    kernel's ``do_not_specialize`` arguments), tensors as 16-byte aligned pointers (torch's allocations are).
    ``inductor``: as under torch.compile, whose generated launcher makes every int equal to 1 a constant,
    ``do_not_specialize`` or not."""
    import torch

    names = list(kernel.arg_names)
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    const_params = {p.name for p in kernel.params if p.is_constexpr}
    params = {p.name: p for p in kernel.params}
    signature, constexprs, attrs, spec_ones = {}, {}, {}, []
    for i, name in enumerate(names):
        v = bound.get(name)
        if name in const_params:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(v.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int) and params[name].do_not_specialize and not (inductor and v == 1):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, int):
            kind, attr = _specialize_int(v)
            if kind == "constexpr":
                signature[name], constexprs[name] = "constexpr", v
                spec_ones.append(name)
            else:
                signature[name] = kind
                if attr == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialize argument {name}={v!r}")
    src = getattr(kernel, "src", "") or ""
    return KernelConfig(kernel=kernel.__name__.lstrip("_"), fn=f"{kernel.fn.__module__}:{kernel.fn.__name__}",
                        signature=signature, constexprs=constexprs, num_warps=int(options.get("num_warps", 4)),
                        dtype=dtype, matrix_stage="tl.dot" in src, num_stages=options.get("num_stages"),
                        uses=[use], attrs=attrs, spec_ones=spec_ones)


@contextlib.contextmanager
def recorded_triton_launches(fp32_uses_tf32: bool = True):
    """Inside the block the Triton launchers (``forward``, ``backward``; on meta tensors) record every kernel launch
    in the list it yields, as (kernel, args, kwargs), instead of running it: ``torch.library.wrap_triton``, through
    which they call every kernel, is replaced by a recorder. ``fp32_uses_tf32``: the precision the launchers see."""
    from unittest import mock

    import torch

    from bsconv_cuda.kernels import bsconv_u as K

    launches: list = []

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
            return launch

    with mock.patch.object(torch.library, "wrap_triton", _Recorder), \
            mock.patch.object(K, "fp32_uses_tf32", lambda: fp32_uses_tf32):
        yield launches


def _add_configs(configs: dict, launches, dtype: str, use: str, inductor: bool = False) -> None:
    for kernel, args, kwargs in launches:
        cfg = config_from_launch(kernel, args, kwargs, dtype, use, inductor)
        if cfg.key() in configs:
            configs[cfg.key()].uses.append(use)
        else:
            configs[cfg.key()] = cfg


def captured_triton_configs(shapes, dtypes: Iterable[str], layouts=("cl", "nchw"),
                            tf32_modes=(True, False)) -> list[KernelConfig]:
    """Every kernel launch of the Triton backend's ``forward`` and ``backward`` for ``shapes`` x ``dtypes`` x
    ``layouts``, captured by running the real launchers on meta tensors (:func:`recorded_triton_launches`: nothing
    runs; the launchers' own heuristics choose every block size). fp32 is captured with TF32 on and off
    (``bsconv_cuda.backends.fp32_uses_tf32``), the two precisions the launcher can pick."""
    import torch

    from bsconv_cuda.kernels import bsconv_u as K

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    configs: dict = {}
    for shape, dtype, layout in itertools.product(shapes, dtypes, layouts):
        for tf32 in (tf32_modes if dtype == "fp32" else (True,)):
            with recorded_triton_launches(tf32) as launches:
                _launch_on_meta(K, shape, tdt[dtype], layout)
            _add_configs(configs, launches, dtype, use_label(shape, dtype, layout, tf32))
    return list(configs.values())


def grid_triton_configs(shapes=None, dtypes=None) -> list[KernelConfig]:
    """Every kernel launch of the Triton backend for the cases of ``tests/test_fused_backends.py``'s GRID, the layers
    every GPU run checks against the reference (odd sizes, asymmetric kernels and padding, strided views, each dtype
    and activation): captured as :func:`captured_triton_configs` does, float64 left out (it runs on the reference
    on a GPU), each also as torch.compile specializes it (``config_from_launch(inductor=True)``). A ``--provider``
    (``kernel_report:grid_triton_configs``): the grid brings its own shapes and dtypes."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from bsconv_cuda.functional import normalize_conv_args
    from bsconv_cuda.kernels import bsconv_u as K
    from fused_checks import make_inputs
    from test_fused_backends import GRID

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    configs: dict = {}
    for case in GRID:
        if case.dtype == torch.float64:
            continue
        x, pw, dw, pw_bias, dw_bias = make_inputs(case, torch.device("meta"))
        pw = pw.reshape(pw.shape[0], -1)
        conv = (*normalize_conv_args(case.k, case.stride, case.padding, case.dilation), case.act or "none")
        with recorded_triton_launches(case.tf32) as launches:
            y = K.forward(x, pw, pw_bias, dw, dw_bias, *conv)
            K.backward(torch.empty_like(y), x, pw, pw_bias, dw, dw_bias, *conv)
        for inductor in (False, True):
            _add_configs(configs, launches, names[case.dtype], f"grid[{case}]{' (torch.compile)' if inductor else ''}",
                         inductor)
    return list(configs.values())


def use_label(shape, dtype: str, layout: str, tf32: bool = True) -> str:
    """How a compiled configuration names the call that launches it: shape name, batch, dtype, layout."""
    return f"{shape.name}/N{shape.batch}/{dtype}{'/tf32' if dtype == 'fp32' and tf32 else ''}/{layout}"


def _launch_on_meta(K, shape, dtype, layout) -> None:
    import torch

    from bsconv_cuda import reference

    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    dev = "meta"
    x = torch.empty(shape.batch, shape.c_in, shape.hw, shape.hw, dtype=dtype, device=dev).contiguous(memory_format=fmt)
    pw = torch.empty(shape.c_out, shape.c_in, dtype=dtype, device=dev)
    dw = torch.empty(shape.c_out, 1, shape.k, shape.k, dtype=dtype, device=dev)
    pb = torch.empty(shape.c_out, dtype=dtype, device=dev) if shape.pw_bias else None
    db = torch.empty(shape.c_out, dtype=dtype, device=dev) if shape.dw_bias else None
    stride, padding, dilation = [shape.stride] * 2, [shape.padding] * 4, [1, 1]
    h_out, w_out = reference.output_size(shape.hw, shape.hw, (shape.k, shape.k), stride, padding, dilation)
    K.forward(x, pw, pb, dw, db, stride, padding, dilation, shape.activation)
    gy = torch.empty(shape.batch, shape.c_out, h_out, w_out, dtype=dtype, device=dev).contiguous(memory_format=fmt)
    K.backward(gy, x, pw, pb, dw, db, stride, padding, dilation, shape.activation)


def triton_configs(shapes, dtypes, provider: str | None = None, layouts=("cl", "nchw")) -> list[KernelConfig]:
    """The configurations to compile: ``provider`` ("module:function"), else the launcher's ``launch_configs`` if
    it exposes one, else :func:`captured_triton_configs` (the real launchers, recorded on meta tensors)."""
    if provider:
        return list(_resolve(provider)(shapes, dtypes))
    from bsconv_cuda.kernels import bsconv_u as K

    if hasattr(K, "launch_configs"):
        out = []
        for c in K.launch_configs(shapes, dtypes):
            out.append(c if isinstance(c, KernelConfig) else KernelConfig(**c))
        return out
    return captured_triton_configs(shapes, dtypes, layouts=layouts)


# ------------------------------------------------------------------------------------------------------ analysis
@dataclass
class KernelStats:
    source: str  # "triton" or "cuda"
    kernel: str
    label: str
    arch: int | None
    dtype: str | None
    num_warps: int | None
    matrix_stage: bool | None
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    tensor_core: dict = field(default_factory=dict)
    ldg_bytes: dict = field(default_factory=dict)  # LDG and LDGSTS (cp.async) instructions by bytes per thread
    tma: int = 0  # TMA bulk-copy instructions
    stg_bytes: dict = field(default_factory=dict)
    occupancy: dict = field(default_factory=dict)
    uses: list[str] = field(default_factory=list)
    undefined_registers: list[str] = field(default_factory=list)  # Triton: ptx_undefined_registers of its PTX
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local) or bool(self.spill_stores) or bool(self.spill_loads)

    @property
    def uses_tensor_cores(self) -> bool:
        return sum(self.tensor_core.values()) > 0

    @property
    def needs_tensor_cores(self) -> bool:
        """A bf16/fp16 matrix (pointwise) stage must run on tensor cores."""
        return bool(self.matrix_stage) and self.dtype in ("bf16", "fp16")


def analyze_cubin(path: str | Path) -> list[tuple[dict, dict]]:
    """[(resource usage, sass summary)] per function in a cubin or a host object carrying a fatbin."""
    res = parse_resource_usage(_run("cuobjdump", "--dump-resource-usage", str(path)))
    sass = parse_sass(_run("cuobjdump", "--dump-sass", str(path)))
    out = []
    for r in res:
        s = sass.get((r["arch"], r["function"])) or next(
            (v for (a, f), v in sass.items() if f == r["function"] and (a is None or r["arch"] is None)), None)
        out.append((r, s or {}))
    return out


def _fill(stats: KernelStats, r: dict, s: dict, shared: int | None = None) -> KernelStats:
    stats.regs, stats.stack, stats.local = r["regs"], r["stack"], r["local"]
    stats.shared = r["shared"] if shared is None else shared
    stats.spill_stores, stats.spill_loads = s.get("stl", 0), s.get("ldl", 0)
    stats.tensor_core = dict(s.get("tensor_core", {}))
    stats.ldg_bytes = {int(k): v for k, v in s.get("ldg", {}).items()}
    stats.stg_bytes = {int(k): v for k, v in s.get("stg", {}).items()}
    stats.tma = s.get("tma", 0)
    if stats.num_warps and stats.arch:
        stats.occupancy = occupancy(stats.regs, stats.shared, stats.num_warps, stats.arch)
    return stats


def compile_triton(cfg: KernelConfig, arch: int) -> KernelStats:
    stats = KernelStats("triton", cfg.kernel, cfg.label(), arch, cfg.dtype, cfg.num_warps, cfg.matrix_stage,
                        uses=list(cfg.uses))
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        src = triton.compiler.ASTSource(fn=_resolve(cfg.fn), signature=cfg.signature, constexprs=cfg.constexprs,
                                        attrs=cfg.attrs or None)
        options = {"num_warps": cfg.num_warps}
        if cfg.num_stages is not None:
            options["num_stages"] = cfg.num_stages
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        stats.undefined_registers = ptx_undefined_registers(compiled.asm["ptx"])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(compiled.asm["cubin"])
            (r, s), = analyze_cubin(path)[:1]
        # Triton allocates its shared memory dynamically: the metadata has the real amount.
        _fill(stats, r, s, shared=max(int(getattr(compiled.metadata, "shared", 0) or 0), r["shared"]))
    except Exception as error:  # noqa: BLE001 - one failing configuration must not hide the others
        stats.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300] if str(error) else ''}"
    return stats


def load_json(path: str | Path) -> list[KernelStats]:
    """The ``--json`` output read back as KernelStats."""
    names = {f.name for f in dataclasses.fields(KernelStats)}
    out = []
    for d in json.loads(Path(path).read_text()):
        st = KernelStats(**{k: v for k, v in d.items() if k in names})
        st.ldg_bytes = {int(k): v for k, v in st.ldg_bytes.items()}
        st.stg_bytes = {int(k): v for k, v in st.stg_bytes.items()}
        out.append(st)
    return out


def _compile_job(args):
    cfg, arch = args
    return compile_triton(cfg, arch)


def compile_all(configs: list[KernelConfig], archs: Iterable[int], jobs: int = 1,
                progress: Callable[[int, int], None] | None = None) -> list[KernelStats]:
    work = [(c, a) for a in archs for c in configs]
    if jobs <= 1 or len(work) <= 1:
        out = []
        for i, w in enumerate(work):
            out.append(_compile_job(w))
            if progress:
                progress(i + 1, len(work))
        return out
    from concurrent.futures import ProcessPoolExecutor

    # Configs whose fn is a JITFunction object cannot cross processes: pass its qualified name instead.
    for cfg, _ in work:
        if not isinstance(cfg.fn, str):
            fn = cfg.fn
            cfg.fn = f"{fn.fn.__module__}:{fn.fn.__name__}"
    out = []
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for i, st in enumerate(ex.map(_compile_job, work)):
            out.append(st)
            if progress:
                progress(i + 1, len(work))
    return out


def _demangle(names: list[str]) -> dict[str, str]:
    exe = shutil.which("c++filt") or shutil.which("cu++filt") or find_tool("cu++filt")
    if not exe or not names:
        return {n: n for n in names}
    res = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def _short_cuda_name(demangled: str) -> str:
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"\([^()]*\)$", "", s)  # drop the parameter list
    s = s.replace("bsconv::", "")
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return s.replace("void ", "")


def _cuda_dtype(name: str) -> str | None:
    if "bf16" in name or "bfloat16" in name:
        return "bf16"
    if "fp16" in name or "__half" in name or "<half" in name:
        return "fp16"
    if "<float" in name or "float>" in name or "float," in name:
        return "fp32"
    if "<double" in name or "double>" in name or "double," in name:
        return "fp64"
    return None


CUDA_MATRIX_STAGE = re.compile(r"fwd|bwd_tile|gemm|pointwise|fused", re.I)
CUDA_WARPS = 8  # every kernel of csrc/bsconv_kernels.cu runs blocks of 256 threads (kThreads)


def find_extension() -> Path | None:
    hits = sorted((REPO / "bsconv_cuda").glob("_C*.so"))
    return hits[0] if hits else None


def cuda_extension_stats(so_path: str | Path | None = None) -> list[KernelStats]:
    """Every kernel in the built extension, per architecture it carries. Matrix stage: a kernel whose name says
    fwd / bwd_tile / gemm / pointwise / fused (tensor cores expected there for bf16/fp16)."""
    so_path = so_path or find_extension()
    if so_path is None:
        return []
    pairs = analyze_cubin(so_path)
    names = _demangle([r["function"] for r, _ in pairs])
    out = []
    for r, s in pairs:
        short = _short_cuda_name(names[r["function"]])
        st = KernelStats("cuda", short.split("<")[0], short, r["arch"], _cuda_dtype(short), CUDA_WARPS,
                         bool(CUDA_MATRIX_STAGE.search(short.split("<")[0])))
        out.append(_fill(st, r, s))
    return out


# ------------------------------------------------------------------------------------------------ work accounting
# The goals of the work table (tests/test_kernel_report.py fails on a shape that breaks one): a backward that
# recomputes the pointwise product once and runs the two gradient GEMMs, each at the forward's padding at most
# (backward <= forward + BWD_EXTRA_MACS, in units of the pointwise stage's N*H*W*C_in*C_out); a forward within
# FWD_MAX_MACS on the k3 maps of at least 7x7; weight-gradient partials that fit in the L2 of an H100 / H200; at
# batch 1, every launch that carries MAIN_LAUNCH_SHARE of its pass's dot work runs a program per SM, or as many
# as its smallest blocks allow; two programs per SM wherever there are programs for that. The CUDA backward writes at
# most one transient buffer of the intermediate's size, the split path's grad_pre, where the path rule picks that path
# (always on layers wider than 128 input channels, which have no fused path): where the H200 timed both, the
# buffer-free fused kernel alone took 2.6x to 3.8x as long as the whole split backward (BENCHMARKS.md, "Per-kernel
# times of the CUDA backward"), though the rule itself picked the faster path on 9 of 18 rows.
BWD_EXTRA_MACS = 2.5
FWD_MAX_MACS = 3.0
L2_BYTES = 50 * 2**20  # H100 / H200 SXM
SMS = TARGET_SMS  # H100 / H200 SXM, as the launch plans assume
MAIN_LAUNCH_SHARE = 0.25  # launches that carry at least this share of a pass's dot work must fill the SMs
TRITON_WORK_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@contextlib.contextmanager
def count_dot_macs():
    """Counts the multiply-adds of every ``tl.dot`` that Triton's interpreter runs in the block: M * N * K of each
    (the interpreter's dot is one numpy matmul), summed into the yielded dict's "macs". Needs TRITON_INTERPRET=1
    set before triton was imported (the kernels then run on CPU tensors)."""
    from triton.runtime import interpreter

    counted = {"macs": 0}
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        *batch, m, k = a.data.shape
        counted["macs"] += math.prod(batch) * m * k * b.data.shape[-1]
        return original(self, a, b, d, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield counted
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def call_plans(shape, backend: str, dtype: str = "bf16", layout: str = "cl", tf32: bool = True):
    """(forward Plan, backward Plan) of one backend for one benchmark shape (``bsconv_cuda.plan``)."""
    import torch

    from bsconv_cuda import reference

    stride, padding, dilation = (shape.stride,) * 2, (shape.padding,) * 4, (1, 1)
    k = (shape.k, shape.k)
    h_out, w_out = reference.output_size(shape.hw, shape.hw, k, stride, padding, dilation)
    args = (shape.batch, shape.c_in, shape.c_out, shape.hw, shape.hw, h_out, w_out)
    tdt = getattr(torch, TRITON_WORK_DTYPES[dtype])
    if backend == "cuda":
        from bsconv_cuda import cuda_backend

        return cuda_backend.work_plan(*args, k, stride, padding, dilation, tdt, tf32=dtype == "fp32" and tf32)
    from bsconv_cuda.kernels import bsconv_u as K

    prec = "tf32" if dtype == "fp32" and tf32 else ("ieee" if dtype == "fp32" else None)
    cl = layout == "cl"
    return (K.forward_plan(*args, k, stride, padding, dilation, tdt, prec, channels_last=cl),
            K.backward_plan(*args, k, tdt, prec, channels_last=cl))


@dataclass
class WorkRow:
    """The work of one backend on one shape at one batch size (see :func:`work_rows`)."""

    shape: str
    batch: int
    backend: str
    describe: str
    k: int
    hw: int
    fwd_macs: float  # dot multiply-adds over the pointwise stage's N*H*W*C_in*C_out
    bwd_macs: float
    fwd_bytes: float  # modeled HBM bytes over Shape.byte_floor
    bwd_bytes: float
    bwd_traffic: float  # modeled L2 + HBM traffic of the backward over Shape.byte_floor
    bwd_path: str
    partial_bytes: int  # fp32 weight-gradient partials of the backward
    scratch_bytes: int  # transient buffers of the backward (grad_pre)
    mid_bytes: int  # one tensor of the intermediate's size, N * H * W * C_out, in the dtype
    pointwise_macs: int
    # per launch: pass, kernel, programs, share of its pass's dot work, CTAs per SM (sm_90; None: not compiled)
    launches: list = field(default_factory=list)

    def waves(self, launch) -> float | None:
        ctas = launch["ctas_per_sm"]
        return launch["programs"] / (SMS * ctas) if ctas else None


def work_rows(shapes, batches: Iterable[str] = ("1", "2"), dtype: str = "bf16", layout: str = "cl",
              backends=("triton", "cuda"), stats: Iterable[KernelStats] = (), arch: int = 90,
              tf32: bool = True) -> list[WorkRow]:
    """The work table: per shape (at each of ``batches``: a number, or "table" for the shape table's own batch)
    and backend, the dot multiply-adds of both passes, modeled bytes, partials, and per launch the programs and,
    from compiled ``stats`` (``arch``), the CTAs per SM. Triton's rows come from the launchers' own plans, CUDA's
    from its tile plan (``bsconv_cuda.cuda_backend.work_plan``; CTAs per SM from the compiled instance's registers
    and static shared memory with the launch's dynamic shared memory). tf32: fp32 with TF32 (else IEEE fp32 dots)."""
    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    by_use: dict = {}
    cuda_images: dict = {}
    for st in stats:
        if st.source == "triton" and st.arch == arch and not st.error:
            for use in st.uses:
                by_use[(use, st.kernel)] = st.occupancy.get("blocks_per_sm")
        elif st.source == "cuda" and st.arch == arch:
            cuda_images[st.label] = st

    def cuda_ctas(launch) -> int | None:
        st = cuda_images.get(launch.image)
        return occupancy(st.regs, st.shared + launch.smem_bytes, CUDA_WARPS, arch)["blocks_per_sm"] if st else None

    rows = []
    for shape in shapes:
        for b in dict.fromkeys(shape.batch if b == "table" else int(b) for b in batches):
            s = shape.with_batch(b)
            pointwise = b * s.hw * s.hw * s.c_in * s.c_out
            for backend in backends:
                fwd, bwd = call_plans(s, backend, dtype, layout, tf32)
                launches = []
                for pass_, plan in (("fwd", fwd), ("bwd", bwd)):
                    for launch in plan.launches:
                        ctas = (by_use.get((use_label(s, dtype, layout, tf32), launch.kernel))
                                if backend == "triton" else cuda_ctas(launch))
                        launches.append(dict(pass_=pass_, kernel=launch.kernel, programs=launch.programs,
                                             max_programs=launch.max_programs,
                                             share=launch.dot_macs / max(1, plan.dot_macs), ctas_per_sm=ctas))
                rows.append(WorkRow(
                    shape=s.name, batch=b, backend=backend, describe=s.describe(), k=s.k, hw=s.hw,
                    fwd_macs=fwd.dot_macs / pointwise, bwd_macs=bwd.dot_macs / pointwise,
                    fwd_bytes=1 + fwd.extra_hbm_bytes / s.byte_floor("fwd", itemsize),
                    bwd_bytes=1 + bwd.extra_hbm_bytes / s.byte_floor("bwd", itemsize),
                    bwd_traffic=1 + bwd.extra_traffic_bytes / s.byte_floor("bwd", itemsize),
                    bwd_path=bwd.path, partial_bytes=bwd.partial_bytes, scratch_bytes=bwd.scratch_bytes,
                    mid_bytes=b * s.hw * s.hw * s.c_out * itemsize, pointwise_macs=pointwise, launches=launches))
    return rows


def work_problems(rows: Iterable[WorkRow]) -> list[str]:
    """The goals above, checked row by row: one line per broken goal."""
    out = []
    for r in rows:
        where = f"{r.backend} {r.describe}"
        if r.bwd_macs > r.fwd_macs + BWD_EXTRA_MACS + 1e-9:
            out.append(f"{where}: backward {r.bwd_macs:.2f}x > forward {r.fwd_macs:.2f}x + {BWD_EXTRA_MACS}")
        if r.k == 3 and r.hw >= 7 and r.fwd_macs > FWD_MAX_MACS + 1e-9:
            out.append(f"{where}: forward {r.fwd_macs:.2f}x > {FWD_MAX_MACS}x on a k3 map of 7x7 or more")
        if r.partial_bytes > L2_BYTES:
            out.append(f"{where}: weight-gradient partials {r.partial_bytes / 2**20:.1f} MiB > L2")
        if r.backend == "cuda" and r.scratch_bytes > r.mid_bytes:
            out.append(f"{where}: the backward writes {r.scratch_bytes / 2**20:.2f} MiB of transient buffers, more "
                       f"than one of the intermediate's size ({r.mid_bytes / 2**20:.2f} MiB)")
        for launch in r.launches:
            if (r.batch == 1 and launch["share"] >= MAIN_LAUNCH_SHARE
                    and launch["programs"] < min(SMS, launch["max_programs"])):
                out.append(f"{where}: {launch['kernel']} runs {launch['programs']} programs on {SMS} SMs, "
                           f"its blocks allow {launch['max_programs']}")
        for launch in r.launches:
            ctas = launch["ctas_per_sm"]
            if ctas is not None and ctas < 2 and launch["programs"] >= 2 * SMS and launch["share"] > 0:
                out.append(f"{where}: {launch['kernel']} fits {ctas} CTA per SM ({launch['programs']} programs)")
    return out


def _mib(v: int) -> str:
    return f"{v / 2**20:.1f}" if v else "0"


def work_markdown(rows: list[WorkRow]) -> str:
    """The work table: one line per shape, batch and backend."""
    lines = ["| shape | N | backend | MACs fwd | MACs bwd | bwd path | HBM fwd | HBM bwd | traffic bwd | "
             "partials MiB | grad_pre MiB | programs (CTAs/SM, waves on 132 SMs) |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        parts = []
        for launch in r.launches:
            if launch["share"] == 0:
                continue  # reductions and column sums: no dot work
            occ = (f" ({launch['ctas_per_sm']}, {r.waves(launch):.2f})" if launch["ctas_per_sm"] else "")
            parts.append(f"{launch['kernel']} {launch['programs']}{occ}")
        lines.append(f"| {r.describe.rsplit(' N=', 1)[0]} | {r.batch} | {r.backend} | {r.fwd_macs:.2f} | "
                     f"{r.bwd_macs:.2f} | {r.bwd_path} | {r.fwd_bytes:.2f} | {r.bwd_bytes:.2f} | {r.bwd_traffic:.2f} | "
                     f"{_mib(r.partial_bytes)} | {_mib(r.scratch_bytes)} | {'; '.join(parts)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- output
def _widths(c: dict) -> str:
    return " ".join(f"{b}B×{n}" for b, n in sorted(c.items())) or "–"


def problems(stats: Iterable[KernelStats]) -> list[str]:
    """What the test fails on: spills, bf16/fp16 matrix stages without tensor-core instructions, and PTX that reads
    an undefined register."""
    out = []
    for st in stats:
        where = f"{st.source} sm_{st.arch} {st.label}"
        if st.error:
            out.append(f"{where}: did not compile: {st.error}")
            continue
        if st.spills:
            out.append(f"{where}: spills (local {st.local} B, stack {st.stack} B, {st.spill_stores} STL / "
                       f"{st.spill_loads} LDL)")
        if st.needs_tensor_cores and not st.uses_tensor_cores:
            out.append(f"{where}: {st.dtype} matrix stage without tensor-core instructions")
        if st.undefined_registers:
            out.append(f"{where}: its PTX reads registers it never writes ({', '.join(st.undefined_registers)})")
    return out


def markdown(stats: list[KernelStats]) -> str:
    lines = ["| source | arch | kernel / config | regs | spills (STL/LDL, local B) | stack B | smem KiB | "
             "occupancy (warps/SM, limiter) | tensor cores | global loads (LDG+LDGSTS) | STG widths | used by |",
             "|---|---|---|---:|---|---:|---:|---|---|---|---|---|"]
    for st in stats:
        if st.error:
            lines.append(f"| {st.source} | sm_{st.arch} | `{st.label}` | compile error: {st.error} |||||||||")
            continue
        occ = st.occupancy
        if occ:
            occ_s = f"{100 * occ['occupancy']:.0f}% ({occ['warps_per_sm']}, {occ['limiter']})"
        else:
            occ_s = "–"
        tc = ", ".join(f"{k}×{v}" for k, v in sorted(st.tensor_core.items())) or (
            "**none**" if st.needs_tensor_cores else "none")
        spill = f"{st.spill_stores}/{st.spill_loads}, {st.local}"
        if st.spills:
            spill = f"**{spill}**"
        uses = ", ".join(st.uses[:3]) + (f" +{len(st.uses) - 3}" if len(st.uses) > 3 else "")
        loads = _widths(st.ldg_bytes) + (f" +TMA×{st.tma}" if st.tma else "")
        lines.append(f"| {st.source} | sm_{st.arch} | `{st.label}` | {st.regs} | {spill} | {st.stack} | "
                     f"{st.shared / 1024:.1f} | {occ_s} | {tc} | {loads} | {_widths(st.stg_bytes)} | {uses} |")
    return "\n".join(lines)


def summary_markdown(stats: list[KernelStats], notes: Iterable[str] = ()) -> str:
    probs = problems(stats)
    n_tr = sum(1 for s in stats if s.source == "triton")
    n_cu = sum(1 for s in stats if s.source == "cuda")
    lines = [f"{n_tr} Triton compilations and {n_cu} CUDA-extension kernels analysed; "
             f"{len(probs)} problem(s) (spills, a bf16/fp16 matrix stage without tensor cores, or PTX reading a "
             "register it never writes)."]
    lines += [f"Note: {n}" for n in notes]
    if probs:
        lines.append("")
        lines += [f"- {p}" for p in probs[:40]]
        if len(probs) > 40:
            lines.append(f"- ... and {len(probs) - 40} more")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated SM versions to compile Triton kernels for")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--shapes", default="all", help="shape spec of bsconv_cuda.shapes.select (default: all)")
    p.add_argument("--layouts", default="cl,nchw", help="input layouts to capture launches for (cl, nchw)")
    p.add_argument("--provider", default=None, help="module:function returning the Triton configs to compile")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--extension", type=Path, default=None, help="path of the built _C*.so (default: the package's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="render a previous --json output; compile nothing")
    p.add_argument("--table-arch", default=None,
                   help="comma-separated SM versions whose rows go into the table (problems list all)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here (default: stdout)")
    p.add_argument("--update-markdown", type=Path, default=None, metavar="FILE",
                   help="replace the <!-- kernel-report:begin/end --> section of FILE (e.g. BENCHMARKS.md)")
    p.add_argument("--work", default="1,2,table",
                   help="batch sizes of the work table ('table': the shape table's own; '': no work table); the "
                        "Triton launches of these batches are compiled too (CTAs per SM)")
    p.add_argument("--work-dtype", default="bf16", help="dtype of the work table (layout: the first of --layouts)")
    args = p.parse_args(argv)

    from bsconv_cuda.shapes import select

    stats: list[KernelStats] = []
    notes = []
    shapes = select(args.shapes)
    work_batches = [b for b in args.work.split(",") if b]
    if args.from_json:
        stats = load_json(args.from_json)
        args.no_triton = args.no_cuda = True
    if not args.no_triton:
        compiled_shapes = list(dict.fromkeys(
            s.with_batch(s.batch if b == "table" else int(b)) for s in shapes for b in work_batches or ["table"]))
        configs = triton_configs(compiled_shapes, args.dtypes.split(","), args.provider,
                                 layouts=tuple(args.layouts.split(",")))
        archs = [int(a) for a in args.arch.split(",")]

        def progress(i, n):
            sys.stderr.write(f"\rcompiling Triton configurations: {i}/{n}")
            sys.stderr.flush()

        stats += compile_all(configs, archs, jobs=args.jobs, progress=progress)
        sys.stderr.write("\n")
    if not args.no_cuda:
        if (args.extension or find_extension()) is None:
            notes.append("the CUDA extension bsconv_cuda/_C*.so is not built: no CUDA kernels analysed")
        else:
            try:
                stats += cuda_extension_stats(args.extension)
            except Exception as error:  # noqa: BLE001
                notes.append(f"CUDA extension not analysed: {error}")
    shown = stats
    if args.table_arch:
        keep = {int(a) for a in args.table_arch.split(",")}
        shown = [s for s in stats if s.arch in keep]
        notes.append(f"table rows: sm_{', sm_'.join(map(str, sorted(keep)))} only")
    md = summary_markdown(stats, notes) + "\n\n"
    work_probs = []
    if work_batches:
        rows = work_rows(shapes, work_batches, dtype=args.work_dtype, layout=args.layouts.split(",")[0],
                         stats=stats)
        work_probs = work_problems(rows)
        md += (f"Work table ({args.work_dtype}, {args.layouts.split(',')[0]}; CTAs per SM from the sm_90 "
               f"compilations): {len(work_probs)} goal(s) broken.\n\n")
        md += "".join(f"- {w}\n" for w in work_probs) + ("\n" if work_probs else "")
        md += work_markdown(rows) + "\n\n"
    md += markdown(shown) + "\n"
    if args.markdown:
        args.markdown.write_text(md)
    else:
        print(md)
    if args.update_markdown:
        begin, end = "<!-- kernel-report:begin -->", "<!-- kernel-report:end -->"
        text = args.update_markdown.read_text() if args.update_markdown.exists() else ""
        block = f"{begin}\n{md.rstrip()}\n{end}"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        args.update_markdown.write_text(text)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps([dict(dataclasses.asdict(s), spills=s.spills) for s in stats], indent=1))
    return 1 if problems(stats) else 0


if __name__ == "__main__":
    sys.exit(main())
