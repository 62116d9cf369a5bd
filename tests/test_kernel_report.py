"""Static machine-code checks of the fused kernels, without a GPU (benchmarks/kernel_report.py).

- The report machinery (cuobjdump parsing, occupancy, tensor-core and load-width detection) is checked on a tiny
  Triton kernel of this test, plugged in through ``--provider``.
- The real kernels: every Triton launch of the quick benchmark shapes (bf16, both layouts, captured from the real
  launchers on meta tensors; compiled for sm_80 and sm_90) and every kernel of the built CUDA extension (when built) must not spill, and their bf16/fp16 matrix
  (pointwise) stages must use tensor-core instructions (HMMA/HGMMA). The Triton block sizes are spill-free from
  triton 3.6 on (CI checks 3.6 and 3.8); older triton compiles some of them with small spills, reported as warnings.

Compilation runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it on GPU-less machines, and
``triton.jit`` then yields interpreter functions that ``triton.compile`` cannot take).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import benchmark_scripts
from bsconv_cuda import backends

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_report.py"


@pytest.fixture(scope="module")
def kr():
    return benchmark_scripts.load("kernel_report")


def _tools_or_skip(kr):
    if kr.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (neither in Triton's wheel nor in CUDA_HOME)")


def _run_report(tmp_path, *args, extra_path=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path or ""), str(REPO), env.get("PYTHONPATH", "")) if p)
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out), "--markdown",
                          str(tmp_path / "report.md")], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.exists(), f"kernel_report failed (rc {res.returncode}):\n{res.stdout}\n{res.stderr}"
    return out, res


TINY_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl
    import sys
    sys.path.insert(0, {bench!r})
    from kernel_report import KernelConfig


    @triton.jit
    def tiny_dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m = tl.arange(0, M)
        n = tl.arange(0, N)
        k = tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        c = tl.dot(a, b)
        tl.store(c_ptr + m[:, None] * N + n[None, :], c.to(c_ptr.dtype.element_ty))


    @triton.jit
    def tiny_scale(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i) * 2)


    def configs(shapes, dtypes):
        out = []
        for dt in dtypes:
            sig = dict(a_ptr="*" + dt, b_ptr="*" + dt, c_ptr="*" + dt, M="constexpr", N="constexpr", K="constexpr")
            out.append(KernelConfig("tiny_dot", __name__ + ":tiny_dot", sig, dict(M=64, N=64, K=32), 4, dt, True,
                                    uses=["tiny"]))
            sig = dict(x_ptr="*" + dt, y_ptr="*" + dt, BLOCK="constexpr")
            out.append(KernelConfig("tiny_scale", __name__ + ":tiny_scale", sig, dict(BLOCK=1024), 4, dt, False))
        return out
''')


def test_parsers_on_canned_output(kr):
    res = kr.parse_resource_usage(textwrap.dedent("""
        Fatbin elf code:
        arch = sm_90
         Function _Z3fooPf:
          REG:40 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
    """))
    assert res == [dict(arch=90, function="_Z3fooPf", regs=40, stack=16, shared=2048, local=8)]
    sass = kr.parse_sass(textwrap.dedent("""
        arch = sm_80
                Function : _Z3fooPf
            /*0010*/                   LDG.E.128 R4, [R2.64] ;
            /*0020*/              @!P0 LDG.E.U16 R8, [R2.64+0x10] ;
            /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
            /*0040*/                   STL [R1], R12 ;
            /*0050*/                   LDL R13, [R1] ;
            /*0060*/                   STG.E.64 [R6.64], R12 ;
            /*0070*/                   STG.E [R6.64], R12 ;
            /*0080*/                   LDGSTS.E.BYPASS.LTC128B.128 [R9], [R2.64] ;
            /*0090*/                   UTMALDG.2D [UR8], [UR4] ;
    """))
    s = sass[(80, "_Z3fooPf")]
    assert s["ldg"] == {16: 2, 2: 1} and s["stg"] == {8: 1, 4: 1} and s["tma"] == 1
    assert s["stl"] == 1 and s["ldl"] == 1 and sum(s["tensor_core"].values()) == 1
    occ = kr.occupancy(regs=255, shared=0, num_warps=4, arch=90)
    assert occ["warps_per_sm"] == 8 and occ["limiter"] == "registers"
    occ = kr.occupancy(regs=32, shared=200 * 1024, num_warps=4, arch=90)
    assert occ["blocks_per_sm"] == 1 and occ["limiter"] == "shared memory"
    st = kr.KernelStats("triton", "k", "k", 90, "bf16", 4, True, regs=40, local=0, spill_stores=1, spill_loads=0)
    assert st.spills and any("spills" in p for p in kr.problems([st]))
    assert any("without tensor-core" in p for p in kr.problems([st]))


def test_ptx_reads_of_undefined_registers_are_found(kr):
    # From the PTX Triton 3.6 made of the forward for an fp32 NCHW 9 x 11 layer (pad 1): %rs28 is read, never
    # written, and ptxas dropped the add that subtracts the padding (the output came out one row off on an H200).
    # Around it, what must not count as such a read (tabs, guards, vector and "%p|%p" destinations, stores, special
    # registers, two statements on a line, code after a brace), and what must: a guard never set, an address
    # register, a register written only in another function.
    ptx = textwrap.dedent("""
        .visible .entry fwd_kernel(
            .param .u64 fwd_kernel_param_0
        )
        {
        \t.reg .pred \t%p<5>;
        \t.reg .b16 \t%rs<30>;
        \t.reg .b32 \t%r<600>;
        \t.reg .b64 \t%rd<3>;
        \tmov.u32 \t%r2, %tid.x;
        \tmul.hi.u16 \t%rs25, %rs24, 171;
        \tmov.b32 \t%r554, {%rs25, %rs28};
        \tmov.b32 \t%r555, 65535;
        \tadd.s16x2 \t%r556, %r554, %r555;
        \tmov.b32 \t{%rs29, _}, %r556;
        \tld.param.u64\t%rd1, [fwd_kernel_param_0];
        \t@%p1 ld.global.v2.b32 { %r1, %r3 }, [ %rd1 + 0 ];
        \tsetp.lt.s32 \t%p2|%p3, %r1, %r3; mov.u32 %r4, %clock;
        \t@!%p2 st.global.b32 [ %rd1 + 0 ], { %r556 };
        { mov.u32 \t%r5, %r4;
        \tcvt.u16.u32 \t%rs24, %r2;
        \tsetp.eq.s32 \t%p1, %r555, 0;
        \t@%p4 mbarrier.init.shared.b64 [%r7], 1;
        \tbar.sync \t0;
        $L__BB0_1:
        \tret;
        }
        }
        .visible .entry other()
        {
        \t.reg .b32 \t%r<9>;
        \tmov.u32 \t%r6, %r5;
        \tret;
        }
    """)
    assert kr.ptx_undefined_registers(ptx) == ["%p4", "%r5", "%r7", "%rs28"]
    st = kr.KernelStats("triton", "k", "k", 90, "fp32", 4, True, regs=40, local=0, spill_stores=0, spill_loads=0,
                        undefined_registers=["%rs28"])
    assert any("never writes (%rs28)" in p for p in kr.problems([st]))


def test_triton_kernels_of_the_grid_read_no_undefined_register(kr, tmp_path):
    """Every Triton launch of the fused backends' test grid (the layers a GPU run checks; 9 x 11 fp32 NCHW among
    them), compiled for sm_90 with the installed Triton: no PTX reads a register it never writes. On Triton 3.6 the
    forward of ten grid layers did before the kernels kept the pads as run-time values, and gave wrong results on an
    H200."""
    _tools_or_skip(kr)
    out, res = _run_report(tmp_path, "--provider", "kernel_report:grid_triton_configs", "--arch", "90", "--no-cuda",
                           "--work", "", "--jobs", str(min(8, os.cpu_count() or 1)))
    stats = kr.load_json(out)
    assert {"fwd_kernel", "bwd_fused_kernel", "bwd_gpre_kernel"} <= {s.kernel for s in stats}, res.stderr
    bad = [f"{s.label} ({', '.join(s.uses)}): {s.error or s.undefined_registers}" for s in stats
           if s.error or s.undefined_registers]
    assert not bad, "\n".join(bad)


def test_report_machinery_on_a_tiny_kernel(kr, tmp_path):
    _tools_or_skip(kr)
    mod = tmp_path / "tiny_kernels.py"
    mod.write_text(TINY_KERNELS.format(bench=str(REPO / "benchmarks")))
    out, res = _run_report(tmp_path, "--provider", "tiny_kernels:configs", "--arch", "80,90", "--dtypes",
                           "bf16,fp16", "--no-cuda", "--jobs", "1", extra_path=tmp_path)
    stats = {(s.kernel, s.arch, s.dtype): s for s in kr.load_json(out)}
    assert len(stats) == 8, res.stderr
    for (kernel, arch, dtype), s in stats.items():
        assert s.error is None, s.error
        assert not s.spills and s.regs > 0 and s.occupancy["warps_per_sm"] > 0
        assert s.ldg_bytes and s.stg_bytes
    assert any(k.startswith("HGMMA") for k in stats[("tiny_dot", 90, "bf16")].tensor_core)
    assert any(k.startswith("HMMA") for k in stats[("tiny_dot", 80, "fp16")].tensor_core)
    assert not stats[("tiny_scale", 90, "bf16")].tensor_core
    assert res.returncode == 0 and kr.problems(stats.values()) == []
    assert "tiny_dot[bf16]" in (tmp_path / "report.md").read_text()


@pytest.fixture(scope="module")
def real_report(kr, tmp_path_factory):
    """One report run: every Triton launch of the quick benchmark shapes (bf16, channels_last and NCHW, captured
    from the real launchers; compiled for sm_80 and sm_90) and the built CUDA extension's kernels."""
    _tools_or_skip(kr)
    if os.environ.get("BSCONV_SKIP_KERNEL_REPORT") == "1":
        pytest.skip("BSCONV_SKIP_KERNEL_REPORT=1")
    tmp = tmp_path_factory.mktemp("kernel_report")
    out, res = _run_report(tmp, "--shapes", "quick", "--arch", "80,90", "--dtypes", "bf16", "--work", "table",
                           "--jobs", str(min(8, os.cpu_count() or 1)))
    stats = kr.load_json(out)
    assert any(s.source == "triton" for s in stats), res.stderr
    return stats


def _grouped(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


# The oldest triton whose compiles of the Triton kernels are checked spill-free. Triton 3.3 (the oldest supported)
# spills 8-208 B of stack in 4 bf16 backward configs of the quick shapes (NCHW, sm_80; issue 13's kernels, the
# fused backward's 32-channel chunk the most): slower, still correct.
SPILL_FREE_TRITON = (3, 6)


def test_triton_kernels_do_not_spill_and_use_tensor_cores(kr, real_report):
    stats = [s for s in real_report if s.source == "triton"]
    kernels = {s.kernel for s in stats}
    assert len(kernels) >= 2, f"expected forward and backward kernels, got {kernels}"
    problems = kr.problems(stats)
    triton_version = backends.installed_version("triton")
    if backends.major_minor(triton_version) < SPILL_FREE_TRITON:
        spills = [p for p in problems if ": spills (" in p]
        if spills:
            warnings.warn(f"triton {triton_version} (< {'.'.join(map(str, SPILL_FREE_TRITON))}) compiles "
                          f"{_grouped(spills)}")
        problems = [p for p in problems if p not in spills]
    assert not problems, _grouped(problems)


def test_cuda_extension_kernels_do_not_spill_and_use_tensor_cores(kr, real_report):
    stats = [s for s in real_report if s.source == "cuda"]
    if not stats:
        pytest.skip("the CUDA extension bsconv_cuda/_C*.so is not built")
    assert any(s.needs_tensor_cores for s in stats), "no bf16/fp16 matrix-stage kernel recognised in the extension"
    problems = kr.problems(stats)
    assert not problems, _grouped(problems)


def test_cuda_launches_fit_two_ctas_per_sm(kr, real_report):
    """Every CUDA launch of the shape table (batch 1, 2 and the table's, each dtype and layout) with the programs for
    it fits two CTAs per SM on sm_90: the built instance's registers and static shared memory with the launch's
    dynamic shared memory (cuda_backend.work_plan names the instance and restates the kernels' shared memory)."""
    stats = [s for s in real_report if s.source == "cuda" and s.arch == 90]
    if not stats:
        pytest.skip("the CUDA extension bsconv_cuda/_C*.so is not built for sm_90")
    rows = _goal_rows(kr, "cuda", ("1", "2", "table"), stats)
    launches = [launch for row in rows for launch in row.launches]
    missing = {launch["kernel"] for launch in launches if launch["ctas_per_sm"] is None}
    assert not missing, f"kernel instances of {sorted(missing)} not found in the extension"
    problems = [p for p in kr.work_problems(rows) if "CTA per SM" in p]
    assert not problems, _grouped(problems)
    assert sum(launch["programs"] >= 2 * kr.SMS for launch in launches) >= 100  # the check had launches to check


# A register or spill count ("160 registers", "128 regs", "spilled 8 B", "8-16 B of stack") in a kernel source goes
# stale with the next compiler or block size: the generated report (this script; its table in BENCHMARKS.md) has them.
# Comments say which choice spilled, not by how much.
RESOURCE_COUNT = re.compile(r"\b\d+(\s*[-–]\s*\d+)?\s*(registers|regs)\b"
                            r"|\bspill(s|ed)?\s+\d+(\s*[-–]\s*\d+)?\s*B\b"
                            r"|\b\d+(\s*[-–]\s*\d+)?\s*B\s+(of\s+)?stack\b", re.IGNORECASE)


def test_kernel_sources_leave_register_and_spill_counts_to_the_report():
    sources = sorted((REPO / "bsconv_cuda" / "kernels").glob("*.py")) + sorted(
        p for p in (REPO / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    assert len(sources) >= 4, sources
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sources for number, line in enumerate(path.read_text().splitlines(), 1)
             if RESOURCE_COUNT.search(line)]
    assert not found, "register / spill counts belong in the generated kernel report:\n" + "\n".join(found)


def test_resource_count_pattern():
    for text in ("reached 255 registers", "at 72-128 registers", "128 regs", "spilled 8 B", "spills 16-40 B",
                 "(8-16 B stack", "8-208 B of stack"):
        assert RESOURCE_COUNT.search(text), text
    for text in ("ran out of registers", "256 rows spill", "spilled on sm_90", "16 B = 128 bits", "4 warps"):
        assert not RESOURCE_COUNT.search(text), text


INT64_PROVIDER = textwrap.dedent('''
    import sys
    sys.path.insert(0, {bench!r})
    from kernel_report import captured_triton_configs
    from bsconv_cuda.kernels import bsconv_u as K
    from bsconv_cuda.shapes import Shape


    def configs(shapes, dtypes):
        # 1x1 images: Triton specializes H = W = 1 (and the 1x1 output) to constants, which int64 casts must survive;
        # both backward paths
        shape = Shape("int64_1x1", "test", c_in=16, c_out=16, hw=1, batch=2, k=1)
        out = []
        for path in ("fused", "split"):
            with K.force_blocks(forward=dict(IDX64=True), backward=dict(IDX64=True, PATH=path)):
                out += captured_triton_configs([shape], dtypes, layouts=("cl", "nchw"))
        return out
''')


def test_int64_indexing_compiles_for_gpus(kr, tmp_path):
    """The 64-bit indexing path runs in the interpreter on tiny tensors (test_triton_kernels); this compiles it."""
    _tools_or_skip(kr)
    (tmp_path / "int64_provider.py").write_text(INT64_PROVIDER.format(bench=str(REPO / "benchmarks")))
    out, res = _run_report(tmp_path, "--provider", "int64_provider:configs", "--arch", "90", "--dtypes", "bf16",
                           "--no-cuda", "--jobs", "1", extra_path=tmp_path)
    stats = kr.load_json(out)
    assert stats and all(s.error is None for s in stats), [s.error for s in stats if s.error]
    assert {s.kernel for s in stats} >= {"fwd_kernel", "bwd_fused_kernel", "bwd_gpre_kernel", "bwd_gx_kernel",
                                         "bwd_gw_kernel"}
    assert all("H,W" in s.label.split("=1: ")[1] for s in stats if s.kernel != "reduce_kernel"), stats


# ------------------------------------------------------------------------------------------------ work accounting
def test_kernels_fit_two_programs_per_sm(kr, real_report):
    """Every Triton launch of the quick shapes that has programs for two per SM fits two (sm_90 registers and
    shared memory)."""
    from bsconv_cuda.shapes import QUICK_SHAPES

    rows = kr.work_rows(QUICK_SHAPES, ("table",), backends=("triton",), stats=real_report)
    checked = [launch for r in rows for launch in r.launches if launch["ctas_per_sm"] is not None]
    assert checked, "no compiled configuration matched a launch of the work table"
    problems = [p for p in kr.work_problems(rows) if "CTA per SM" in p]
    assert not problems, _grouped(problems)


MAC_COUNT_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {bench!r})
    import torch
    import kernel_report as kr
    from bsconv_cuda.kernels import bsconv_u as K
    from bsconv_cuda import reference

    out = []
    # (N, C_in, C_out, H, W, k, stride, padding, dilation, forced forward, forced backward, depthwise)
    calls = [
        (2, 20, 18, 7, 5, 3, 2, 1, 1, None, None, "gather"),
        (1, 24, 40, 9, 9, 5, 1, 2, 1, None, dict(PATH="fused"), "shifted"),
        (1, 50, 20, 6, 7, 3, 1, 1, 2, dict(TH=2, TW=3, SLOTS=3),
         dict(PATH="fused", CHUNKS=(16, 16, 16, 16), MID_PIXELS=16, TILE_PROGRAMS=2), "shifted"),
        (2, 130, 36, 5, 4, 3, 1, 1, 1, None, None, "gather"),
        (1, 20, 18, 9, 6, 3, 1, 1, 1, dict(BLOCK_CO=16, BLOCK_CI=16),
         dict(PATH="split", MID_PIXELS=16, BLOCK_CI=16, TILE_PROGRAMS=2, PIXEL_SPLITS=3), "gather"),
    ]
    for n, c_in, c_out, h, w, k, s, p, d, fwd, bwd, depthwise in calls:
        x = torch.randn(n, c_in, h, w)
        pw, dw, bias = torch.randn(c_out, c_in), torch.randn(c_out, 1, k, k), torch.randn(c_out)
        conv = ((s, s), (p,) * 4, (d, d), "relu")
        h_out, w_out = reference.output_size(h, w, (k, k), *conv[:3])
        with K.force_blocks(fwd, bwd):
            with kr.count_dot_macs() as fwd_count:
                y = K.forward(x, pw, bias, dw, bias, *conv, depthwise=depthwise)
            with kr.count_dot_macs() as bwd_count:
                K.backward(torch.randn_like(y), x, pw, bias, dw, bias, *conv)
            fwd_plan = K.forward_plan(n, c_in, c_out, h, w, h_out, w_out, (k, k), *conv[:3], x.dtype, "ieee",
                                      depthwise, channels_last=False)
            bwd_plan = K.backward_plan(n, c_in, c_out, h, w, h_out, w_out, (k, k), x.dtype, "ieee",
                                       channels_last=False)
        out.append(dict(call=[n, c_in, c_out, h, w, k, s], path=bwd_plan.path, counted=[fwd_count["macs"],
                        bwd_count["macs"]], planned=[fwd_plan.dot_macs, bwd_plan.dot_macs]))
    print(json.dumps(out))
''')


def test_dot_macs_of_the_plans_match_the_interpreter(tmp_path):
    """The work table counts multiply-adds from the launch plans; Triton's interpreter, with every tl.dot's
    M * N * K summed, must count the same on small calls covering both forward stages and both backward paths."""
    script = tmp_path / "count_macs.py"
    script.write_text(MAC_COUNT_SCRIPT.format(bench=str(REPO / "benchmarks")))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr
    calls = json.loads(res.stdout.strip().splitlines()[-1])
    assert {c["path"] for c in calls} == {"fused", "split"}
    for c in calls:
        assert c["counted"] == c["planned"] and min(c["counted"]) > 0, c


def _goal_rows(kr, backend, batches=("1", "2"), stats=()):
    from bsconv_cuda.shapes import SHAPES

    rows = []
    for dtype, layout, tf32 in [("bf16", "cl", True), ("bf16", "nchw", True), ("fp16", "cl", True),
                                ("fp32", "cl", True), ("fp32", "nchw", False)]:
        rows += kr.work_rows(SHAPES, batches, dtype=dtype, layout=layout, backends=(backend,), tf32=tf32,
                             stats=stats)
    return rows


def test_triton_work_goals(kr):
    """On every shape of the table at batch 1 and 2, in each dtype: backward <= forward + 2.5 and forward <= 3.0
    (k3 maps of 7x7 or more) pointwise stages of dot multiply-adds, weight-gradient partials that fit in L2, and at
    batch 1 a program per SM wherever the blocks allow it (the counts come from the launchers' own plans, which
    test_dot_macs_of_the_plans_match_the_interpreter checks against the interpreter)."""
    from bsconv_cuda.shapes import SHAPES

    rows = _goal_rows(kr, "triton")
    assert len(rows) == 5 * 2 * len(SHAPES)
    problems = kr.work_problems(rows)
    assert not problems, _grouped(problems)
    assert max(r.bwd_macs for r in rows) <= 4.5 and max(r.partial_bytes for r in rows) <= kr.L2_BYTES


def test_cuda_work_accounting_by_hand(kr):
    """The CUDA tile plan's counts on a layer worked out by hand from csrc/bsconv_kernels.cu."""
    import torch

    from bsconv_cuda import cuda_backend
    from bsconv_cuda.shapes import Shape

    # 16 -> 16 @ 32x32, bf16. Forward: 16-channel blocks (no C_out padding); C_in 16 padded to KC = 32 doubles the
    # work, so only tiles with at least 2/3 output pixel per padded halo row stay within 3 pointwise stages. Of those,
    # the least time per block (one wave either way): 8 x 16 tiles, 10 x 18 = 180 -> 192 rows for 128 pixels
    # (3.00; 16 x 16 tiles: 2.63 but twice the rows per block), 8 tiles x 192 rows x 16 channels x 32.
    # Backward, fused (the model's choice: the split path's bytes are within its two extra launches' weight):
    # 1024 pixels in 64 tiles of 16 (fewer than 132 tiles of 32), rounds of 16 output channels, C_in 16: three MMAs
    # of 16 x 16 x 16 per tile, 3.00 pointwise stages.
    # Split: 4 tiles of 8x32 = 256 pixels x 32 x 32; grad_x GEMM 16 x 1 blocks of 64 x 32 x 32 (C_in <= 32:
    # 32-wide blocks; C_out padded to BK); grad_pw GEMM: 512 / 1 block pairs capped at 1024 / 256 = 4 splits of 256
    # pixels, 64 x 32 each: 16.0 stages
    fwd, bwd = kr.call_plans(Shape("t", "t", 16, 16, 32, 1), "cuda")
    assert (fwd.blocks["TH"], fwd.blocks["TW"], fwd.blocks["CB"]) == (8, 16, 16)
    assert fwd.dot_macs == 8 * 192 * 16 * 32 == 3 * 32 * 32 * 16 * 16
    assert bwd.path == "fused" and (bwd.blocks["rows"], bwd.blocks["CB"], bwd.params["tiles"]) == (16, 16, 64)
    assert bwd.dot_macs == 3 * 64 * 16 * 16 * 16 == 3 * 32 * 32 * 16 * 16
    _, split = cuda_backend.work_plan(1, 16, 16, 32, 32, 32, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1),
                                      torch.bfloat16, backward_path="split")
    assert [launch.dot_macs for launch in split.launches[:3]] == [4 * 256 * 32 * 32, 16 * 64 * 32 * 32,
                                                                    4 * 64 * 32 * 256]
    assert split.scratch_bytes == 32 * 32 * 16 * 2
    # 1024 -> 1024 @ 4 x 4, N = 1: 16 pixels. The grad_x GEMM runs transposed: 16 blocks of 64 input channels x 32
    # pixels (16 real) x C_out 1024, 2 pointwise stages instead of the 4 of 64-pixel blocks.
    _, bwd = kr.call_plans(Shape("t", "t", 1024, 1024, 4, 1), "cuda")
    grad_x = next(launch for launch in bwd.launches if launch.kernel == "gemm_kernel<grad_x>")
    assert bwd.blocks["grad_x_transposed"] and grad_x.grid == (16, 1)
    assert grad_x.dot_macs == 16 * 64 * 32 * 1024 == 2 * 16 * 1024 * 1024
    # The fused backward of 32 -> 64 @ 112, N = 1, bf16 (the traffic model's choice there): 12544 pixels in 196 tiles
    # of 64 (196 >= 132 SMs), 2 blocks of 32 output channels, C_in 32 (a multiple of 16); three MMAs per (tile,
    # channel block): 3.00 pointwise stages. Slots of 4 x (64 x 32 + 64 x 10) B: the L2 budget allows 2340 blocks, one
    # wave 264, the tiles 196.
    _, fused = kr.call_plans(Shape("t", "t", 32, 64, 112, 1), "cuda")
    assert fused.path == "fused" and fused.scratch_bytes == 0
    assert fused.launches[0].grid == (196,) and fused.dot_macs == 3 * 196 * 2 * 64 * 32 * 32
    assert fused.partial_bytes == 196 * 4 * (64 * 32 + 64 * 10) + 4 * 64 * 13  # + grad_dw_bias, 13 row blocks
    # 24 -> 144 @ 56, N = 64, bf16 (fused by the traffic model): rounds of 16 output channels, as 144 = 9 x 16 (32-wide
    # rounds would pad it to 160); C_in 24 padded to 32 for the MMAs' 16-steps: 3 x 32 / 24 = 4.00 pointwise stages.
    # 200704 pixels in 3136 tiles of 64; the slot (144 x 36 floats) fits in shared memory beside the tile.
    _, fused = kr.call_plans(Shape("t", "t", 24, 144, 56, 64), "cuda")
    assert fused.path == "fused" and fused.blocks["CB"] == 16 and fused.blocks["slot_in_smem"]
    assert fused.dot_macs == 3 * 3136 * 64 * 144 * 32 == 4 * 64 * 56 * 56 * 24 * 144


def test_cuda_fused_backward_writes_no_grad_pre_and_keeps_its_partials_in_l2(kr):
    """The CUDA fused backward, forced on every shape of the table that it takes (C_in <= FUSED_MAX_CIN), at the
    batches of the goals and at 64: nothing of mid's size, partials within the L2 budget, and three MMAs per (tile,
    round of 16 or 32 output channels), so its work is 3 pointwise stages times the channel padding alone."""
    import torch

    from bsconv_cuda import cuda_backend, reference
    from bsconv_cuda.shapes import SHAPES

    checked = 0
    for shape in SHAPES:
        if shape.c_in > cuda_backend.FUSED_MAX_CIN:
            continue
        for n, dtype in itertools.product((1, 2, 64), (torch.bfloat16, torch.float32)):
            k, stride, padding = (shape.k,) * 2, (shape.stride,) * 2, (shape.padding,) * 4
            h_out, w_out = reference.output_size(shape.hw, shape.hw, k, stride, padding, (1, 1))
            _, bwd = cuda_backend.work_plan(n, shape.c_in, shape.c_out, shape.hw, shape.hw, h_out, w_out, k, stride,
                                            padding, (1, 1), dtype, True, backward_path="fused")
            cb = 16 if math.ceil(shape.c_out / 16) * 16 < math.ceil(shape.c_out / 32) * 32 else 32
            padded = (n * shape.hw * shape.hw * math.ceil(shape.c_in / 16) * 16 * math.ceil(shape.c_out / cb) * cb)
            assert bwd.path == "fused" and bwd.scratch_bytes == 0, shape
            assert bwd.partial_bytes <= kr.L2_BYTES, (shape, n)
            rows = bwd.blocks["rows"]
            assert bwd.dot_macs == 3 * padded * bwd.params["tiles"] * rows // (n * shape.hw * shape.hw), shape
            checked += 1
    assert checked >= 60


def test_cuda_work_goals(kr):
    """Every goal of the work table on every row: the narrow layers' backward (rounds of 16 output channels), the
    batch-1 forward grids (16 -> 16 @ 32 in TF32 takes 96 blocks of 2 x 6 pixels, where 88 of 3 x 4 have the same
    modeled time and a little less padding: equal time goes to the candidate that occupies more SMs), and at most one
    grad_pre buffer, the split path's (wide layers, which have no fused path, and small maps), a path the H200 measured
    faster than the buffer-free fused kernel wherever it timed both."""
    rows = _goal_rows(kr, "cuda")
    problems = kr.work_problems(rows)
    assert not problems, _grouped(problems)
    assert any(r.scratch_bytes == r.mid_bytes for r in rows)  # the split path's one buffer, where it runs
