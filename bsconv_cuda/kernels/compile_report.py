"""Compiles the fused Triton kernels for a GPU that need not be present and reports what the code looks like.

    python -m bsconv_cuda.kernels.compile_report [--arch 90]

For a few representative layer shapes, in bf16 / fp16 / fp32, NCHW and channels_last, it compiles the forward and
backward kernels with the launch configuration the launchers would pick (the same ``_fwd_blocks`` / ``_bwd_blocks``)
and prints registers, spill (local memory) bytes, shared memory, and counts of tensor-core (HGMMA / HMMA) and
16-byte global load instructions from the SASS (``cuobjdump`` from Triton's wheel). Needs no GPU and no driver; must
run WITHOUT ``TRITON_INTERPRET=1``. Runtime integer specialization (a stride of 1, multiples of 16) is mimicked
approximately: unit strides become constants; pointers, channel counts and the n/h strides are marked 16-divisible
(what Triton's launcher specializes when they are multiples of 16, as in the benchmark layers).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from . import bsconv_u as K

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _sass_stats(cubin: bytes) -> dict:
    tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else -1  # noqa: E731
    return dict(
        regs=get("REG"), local=get("LOCAL"), stack=get("STACK"),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
        ldg128=len(re.findall(r"LDG\.E\.128", sass)), ldg=len(re.findall(r"\bLDG\.", sass)),
        ldgsts128=len(re.findall(r"LDGSTS\.E\.BYPASS\.128|LDGSTS\.E\.128", sass)),
        ldgsts=len(re.findall(r"\bLDGSTS\.", sass)), stg128=len(re.findall(r"STG\.E\.128", sass)),
        stg=len(re.findall(r"\bSTG\.", sass)),
    )


def _compile(fn, args: list[tuple[str, str | int]], constexprs: dict, num_warps: int, arch: int):
    """args: (name, type) for runtime args, or (name, int) to make a runtime int a compile-time constant (1s)."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, (name, kind) in enumerate(args):
        if isinstance(kind, int):
            signature[name] = "constexpr"
            consts[name] = kind
        else:
            signature[name] = kind
            if kind.startswith("*") or kind == "i32d16":
                attrs[(i,)] = [["tt.divisibility", 16]]
            if kind == "i32d16":
                signature[name] = "i32"
    for name in constexprs:
        signature[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def fwd_report(dtype: str, c_in, c_out, h, w, k, stride, channels_last, act="none", arch=90) -> dict:
    ptr = _PTR[dtype]
    h_out, w_out = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    blk = K._fwd_blocks(c_in, c_out, h_out, w_out, k, k, stride, stride, 1, 1)
    num_warps = blk.pop("num_warps")
    unit = lambda name, cl_unit: (name, 1) if cl_unit == channels_last else (name, "i32d16")  # noqa: E731
    args = [(n, ptr) for n in ("x_ptr", "pw_ptr", "pb_ptr", "dw_ptr", "db_ptr", "y_ptr")]
    args += [("C_in", "i32d16"), ("C_out", "i32d16")] + [(n, "i32") for n in ("H", "W", "H_out", "W_out")]
    args += [("sxn", "i32d16"), unit("sxc", True), ("sxh", "i32d16"), unit("sxw", False)]
    args += [("syn", "i32d16"), unit("syc", True), ("syh", "i32d16"), unit("syw", False)]
    args += [(n, "i32") for n in ("tiles_w", "tiles_per_img", "n_co_blk", "PT", "PL")]
    consts = dict(KH=k, KW=k, SH=stride, SW=stride, DH=1, DW=1, **blk, ACT=K._ACT_CODES[act], HAS_PB=True,
                  HAS_DB=True, PREC="tf32" if dtype == "fp32" else "ieee", ACC64=False, IDX64=False, UPCAST_DOT=False)
    out = _compile(K._fwd_kernel, args, consts, num_warps, arch)
    return dict(blocks={**blk, "num_warps": num_warps}, shared=out.metadata.shared, **_sass_stats(out.asm["cubin"]))


def bwd_report(dtype: str, c_in, c_out, k, stride, channels_last, act="none", arch=90) -> dict:
    ptr = _PTR[dtype]
    blk = K._bwd_blocks(c_in, c_out)
    num_warps = blk.pop("num_warps")
    unit = lambda name, cl_unit: (name, 1) if cl_unit == channels_last else (name, "i32d16")  # noqa: E731
    args = [(n, ptr) for n in ("gy_ptr", "x_ptr", "pw_ptr", "pb_ptr", "dw_ptr", "gx_ptr")] + [("part_ptr", "*fp32")]
    args += [("N", "i32"), ("C_in", "i32d16"), ("C_out", "i32d16")] + [(n, "i32") for n in ("H", "W", "H_out", "W_out")]
    for pre in ("sx", "sg", "sxg"):
        args += [(pre + "n", "i32d16"), unit(pre + "c", True), (pre + "h", "i32d16"), unit(pre + "w", False)]
    args += [(n, "i32") for n in ("PT", "PL", "G", "K_PART")]
    consts = dict(KH=k, KW=k, SH=stride, SW=stride, DH=1, DW=1, **blk, ACT=K._ACT_CODES[act], HAS_PB=True,
                  PREC="tf32" if dtype == "fp32" else "ieee", ACC64=False, IDX64=False, UPCAST_DOT=False)
    out = _compile(K._bwd_kernel, args, consts, num_warps, arch)
    return dict(blocks={**blk, "num_warps": num_warps}, shared=out.metadata.shared, **_sass_stats(out.asm["cubin"]))


# (name, C_in, C_out, H, W, k, stride): MobileNetV1 BSConv-U and MobileNetV2 expand->dw layers
SHAPES = [
    ("mnv1-64x56-k3", 64, 128, 56, 56, 3, 1),
    ("mnv1-256x14-k3", 256, 256, 14, 14, 3, 1),
    ("mnv2-24to144x56-k3", 24, 144, 56, 56, 3, 1),
    ("mnv2-40to240x28-k5s2", 40, 240, 28, 28, 5, 2),
    ("k7-32x32", 32, 64, 32, 32, 7, 1),
]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the report compiles real GPU code")
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    for dtype in args.dtypes.split(","):
        for name, c_in, c_out, h, w, k, s in SHAPES:
            for cl in (False, True):
                tag = f"{dtype} {name} {'NHWC' if cl else 'NCHW'}"
                f = fwd_report(dtype, c_in, c_out, h, w, k, s, cl, arch=args.arch)
                b = bwd_report(dtype, c_in, c_out, k, s, cl, arch=args.arch)
                for kind, r in (("fwd", f), ("bwd", b)):
                    blk = r.pop("blocks")
                    print(f"{tag:38s} {kind} {blk} :: " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
