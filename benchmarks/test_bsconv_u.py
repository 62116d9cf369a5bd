"""BSConv-U layer benchmarks: ``pytest benchmarks --benchmark-only`` (see BENCHMARKS.md).

One test per (shape, dtype, pass, contender, layout); pytest-benchmark groups them per ``shape dtype pass``.

Timing (documented choice):
- GPU: the number that counts is ``extra_info["time_ms"]``, the median of ``triton.testing.do_bench`` (CUDA events,
  warm-up excluded, L2 flushed before every repetition, so L2-sized inputs need no rotation). pytest-benchmark's
  own statistics for GPU tests are wall-clock times of a synchronized call (launch + kernel + sync, 3 rounds): a
  sanity check only. ``benchmarks/report.py`` uses ``time_ms``.
- CPU: pytest-benchmark's wall clock (``benchmark.pedantic``), small batch, reference contenders only; its median is
  min copied to ``extra_info["time_ms"]`` (shared, noisy CPU). CPU timings say nothing about the GPU kernels.

GPU tests also record: ``gbs`` (fused byte floor / time: x + y + weights, each moved once; see
``bsconv_cuda.shapes.Shape.byte_floor``), ``frac_copy_bw`` (that over the measured device-to-device copy bandwidth),
``speedup_vs_best_baseline`` (fused contenders: best non-fused contender of the same shape/dtype/pass, any layout,
over this one), ``peak_mem_bytes`` / ``ref_peak_mem_bytes`` (fwdbwd: torch.cuda.max_memory_allocated above the live
inputs, vs. the reference in the same layout), and ``rel_err`` (fused, fwd: against the reference in fp32).
"""

from __future__ import annotations

import pytest
import torch

from bsconv_cuda import bench
from bsconv_cuda.shapes import QUICK_SHAPES, SHAPES, Shape

from _suite import bench_set, on_gpu

DTYPE_NAMES = ("fp32", "bf16")
CPU_ROUNDS = 5
GPU_SANITY_ROUNDS = 3
REL_ERR_LIMIT = 2e-2  # fused vs fp32 reference on the same (rounded) inputs; the real accuracy tests live in tests/


def contenders(which: str, gpu: bool) -> list[tuple[str, str]]:
    """(contender, layout) pairs of a set, baselines first."""
    if not gpu:
        return [("reference", "nchw"), ("reference", "cl"), ("composed", "nchw"), ("composed", "cl"),
                ("triton", "cl"), ("cuda", "cl")]
    if which == "full":
        return [(c, lay) for c in bench.CONTENDERS for lay in bench.LAYOUTS]
    return [("reference", "nchw"), ("reference", "cl"), ("composed", "cl"), ("compile", "cl"), ("triton", "cl"),
            ("cuda", "cl")]


def plan(which: str, gpu: bool) -> list[tuple[Shape, str, str, str, str]]:
    """(shape, dtype, pass, contender, layout) in run order: for each shape/dtype/pass the baselines come first, so
    the fused contenders find them measured."""
    if not gpu:
        shapes = [s.with_batch(1) for s in QUICK_SHAPES if not s.is_latency]
    else:
        shapes = list(QUICK_SHAPES if which == "quick" else SHAPES)
    out = []
    for shape in shapes:
        for dtype in DTYPE_NAMES:
            for pass_ in bench.PASSES:
                for contender, layout in contenders(which, gpu):
                    out.append((shape, dtype, pass_, contender, layout))
    return out


def compile_skip_reason(which: str, shape: Shape, dtype: str) -> str | None:
    if which == "full":
        return None
    if shape.quick and dtype == "bf16":
        return None
    return "torch.compile is timed on the quick shapes in bf16 only (BSCONV_BENCH_SET=full for all)"


def pytest_generate_tests(metafunc):
    if "shape" not in metafunc.fixturenames:
        return
    params = plan(bench_set(metafunc.config), on_gpu())
    metafunc.parametrize(
        "shape,dtype_name,pass_,contender,layout", params,
        ids=[f"{s.name}-{d}-{p}-{c}-{lay}" for s, d, p, c, lay in params],
    )


_CASES: dict = {}


def get_case(shape: Shape, dtype_name: str, layout: str, device: torch.device) -> bench.Case:
    """The inputs, cached for the few most recent keys (ImageNet batch-64 tensors are big)."""
    key = (shape, dtype_name, layout, device.type)
    if key not in _CASES:
        while len(_CASES) >= 2:
            _CASES.pop(next(iter(_CASES)))
        _CASES[key] = bench.make_case(shape, bench.DTYPES[dtype_name], layout, device)
    return _CASES[key]


def measure(memo, device, shape, dtype_name, pass_, contender, layout) -> dict:
    """GPU time of one contender, measured once per session."""
    key = (shape, dtype_name, pass_, contender, layout)
    if key not in memo.times:
        case = get_case(shape, dtype_name, layout, device)
        memo.times[key] = bench.time_ms(bench.make_runner(contender, case, pass_), device)
    return memo.times[key]


def peak(memo, device, shape, dtype_name, contender, layout) -> int | None:
    key = (shape, dtype_name, contender, layout)
    if key not in memo.peaks:
        case = get_case(shape, dtype_name, layout, device)
        runner = bench.make_runner(contender, case, "fwdbwd")
        runner()  # warm (allocator caches, compile)
        memo.peaks[key] = bench.peak_memory_bytes(runner, device)
    return memo.peaks[key]


def baselines_for(which: str, shape: Shape, dtype_name: str) -> list[tuple[str, str]]:
    """The non-fused contenders that run for this shape/dtype in this set (GPU)."""
    out = []
    for contender, layout in contenders(which, True):
        if contender not in bench.BASELINES:
            continue
        if contender == "composed" and not bench.composed_supported(shape):
            continue
        if contender == "compile" and compile_skip_reason(which, shape, dtype_name):
            continue
        out.append((contender, layout))
    return out


def test_bsconv_u(benchmark, request, device, memo, shape, dtype_name, pass_, contender, layout):
    which = bench_set(request.config)
    benchmark.group = f"{shape.name} {dtype_name} {pass_}"
    reason = bench.backend_unavailable_reason(contender, device, shape)
    if reason is None and contender == "compile":
        reason = compile_skip_reason(which, shape, dtype_name)
    if reason is not None:
        pytest.skip(f"{contender}: {reason}")
    dtype = bench.DTYPES[dtype_name]
    itemsize = torch.finfo(dtype).bits // 8
    info = benchmark.extra_info
    info.update(
        shape=shape.name, describe=shape.describe(), family=shape.family, batch=shape.batch, dtype=dtype_name,
        pass_=pass_, contender=contender, layout=layout, label=f"{contender}-{layout}",
        fused=contender in bench.FUSED, activation=shape.activation, device=device.type,
        byte_floor=shape.byte_floor(pass_, itemsize), flops=shape.flops(pass_),
    )
    case = get_case(shape, dtype_name, layout, device)
    runner = bench.make_runner(contender, case, pass_)

    if device.type != "cuda":
        benchmark.pedantic(runner, rounds=CPU_ROUNDS, warmup_rounds=1, iterations=1)
        # min, not median: this CPU is shared and a round often loses a scheduler slice
        info["time_ms"] = benchmark.stats.stats.min * 1e3
        info["timer"] = "wall-clock, CPU (pytest-benchmark), min of rounds"
        return

    if contender in bench.FUSED and pass_ == "fwd":
        info["rel_err"] = bench.relative_error(contender, case)
        assert info["rel_err"] <= REL_ERR_LIMIT, f"{contender} output differs from the reference: {info['rel_err']}"
    t = measure(memo, device, shape, dtype_name, pass_, contender, layout)
    info.update(time_ms=t["ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], timer=t["timer"])
    copy_bw = bench.copy_bandwidth_gbs(device.index or 0)
    info["gbs"] = info["byte_floor"] / (t["ms"] * 1e-3) / 1e9
    info["frac_copy_bw"] = info["gbs"] / copy_bw
    info["copy_bandwidth_gbs"] = copy_bw
    info["tflops"] = info["flops"] / (t["ms"] * 1e-3) / 1e12
    if contender in bench.FUSED:
        base = {f"{c}-{lay}": measure(memo, device, shape, dtype_name, pass_, c, lay)["ms"]
                for c, lay in baselines_for(which, shape, dtype_name)}
        best = min(base, key=base.get)
        info["best_baseline"] = best
        info["best_baseline_ms"] = base[best]
        info["speedup_vs_best_baseline"] = base[best] / t["ms"]
    if pass_ == "fwdbwd":
        info["peak_mem_bytes"] = peak(memo, device, shape, dtype_name, contender, layout)
        info["ref_peak_mem_bytes"] = peak(memo, device, shape, dtype_name, "reference", layout)
        info["peak_mem_vs_ref"] = info["peak_mem_bytes"] / max(info["ref_peak_mem_bytes"], 1)

    def synced():
        runner()
        torch.cuda.synchronize(device)

    # pytest-benchmark's own (wall-clock) statistics: sanity only, see the module docstring.
    benchmark.pedantic(synced, rounds=GPU_SANITY_ROUNDS, warmup_rounds=1, iterations=1)
