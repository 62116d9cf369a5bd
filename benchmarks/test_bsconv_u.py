"""BSConv-U layer benchmarks: ``pytest benchmarks --benchmark-only`` (see BENCHMARKS.md).

One test per (shape, dtype, pass, contender, layout); pytest-benchmark groups them per ``shape dtype pass``.

Timing (documented choice):
- GPU: the number that counts is ``extra_info["time_ms"]``, the median of ``triton.testing.do_bench`` (CUDA events,
  warm-up excluded, L2 flushed before every repetition, so L2-sized inputs need no rotation). pytest-benchmark's
  own statistics for GPU tests are wall-clock times of a synchronized call (launch + kernel + sync, 3 rounds): a
  sanity check only. ``benchmarks/report.py`` uses ``time_ms``.
- CPU: the median of ``time.perf_counter`` around 3-20 calls (0.3 s), small batch, unfused contenders only. CPU
  timings say nothing about the GPU kernels.

Cases, timing (``bench_harness.Session.measure``), peak memory and speed-ups are ``bsconv_cuda.bench_harness``'s, the
runners ``python -m bsconv_cuda.bench`` prints from: this module only chooses the jobs and records them.

GPU tests also record: ``gbs`` (fused byte floor / time: x + y + weights, each moved once; see
``bsconv_cuda.shapes.Shape.byte_floor``), ``frac_copy_bw`` (that over the measured device-to-device copy bandwidth),
``speedup_vs_best_baseline`` (fused contenders: best non-fused contender of the same shape/dtype/pass, any layout,
over this one), ``peak_mem_bytes`` / ``ref_peak_mem_bytes`` (torch.cuda.max_memory_allocated above the live inputs,
vs. the reference in the same layout), and ``rel_err`` (fused, fwd: against the reference in fp32).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bsconv_cuda import bench_harness as harness
from bsconv_cuda.shapes import Shape

from _suite import DTYPE_NAMES, bench_set, layer_shapes, on_gpu, parametrize, record

REL_ERR_LIMIT = 2e-2  # fused vs fp32 reference on the same (rounded) inputs; the real accuracy tests live in tests/


@functools.cache
def plan(which: str, gpu: bool) -> list[harness.Job]:
    """Every job of a set: the reference in both layouts, composed, compile and the fused backends in channels_last
    (``full``: in both layouts)."""
    layouts = harness.LAYOUTS if which == "full" else ("cl",)
    contenders = harness.layer_contenders(layouts, composed=True, compile=True)
    return harness.layer_jobs(layer_shapes(which, gpu), DTYPE_NAMES, harness.PASSES, contenders)


def compile_skip_reason(which: str, shape: Shape, dtype: str) -> str | None:
    if which == "full":
        return None
    if shape.quick and dtype == "bf16":
        return None
    return "torch.compile is timed on the quick shapes in bf16 only (BSCONV_BENCH_SET=full for all)"


def skip_reason(which: str, job: harness.Job, device: torch.device) -> str | None:
    reason = harness.unavailable_reason(job.contender, device, job.shape)
    if reason is None and job.contender == "compile":
        reason = compile_skip_reason(which, job.shape, job.dtype)
    return reason


def pytest_generate_tests(metafunc):
    parametrize(metafunc, "job", plan, lambda job: f"{job.shape.name}-{job.dtype}-{job.pass_}-{job.label}")


@pytest.fixture(scope="module", autouse=True)
def warmed_up(request, session):
    """The command line's warm-up before the first measurement (``Session.warm_up``), on the selected tests' jobs."""
    which = bench_set(request.config)
    jobs = [item.callspec.params["job"] for item in request.session.items
            if "job" in getattr(getattr(item, "callspec", None), "params", {})]
    session.warm_up([job for job in jobs if skip_reason(which, job, session.device) is None], harness.GLOBAL_WARMUP_S)


def test_bsconv_u(benchmark, request, device, session, job):
    which = bench_set(request.config)
    shape = job.shape
    benchmark.group = f"{shape.name} {job.dtype} {job.pass_}"
    reason = skip_reason(which, job, device)
    if reason is not None:
        pytest.skip(f"{job.contender}: {reason}")
    info = benchmark.extra_info
    info.update(
        shape=shape.name, describe=shape.describe(), family=shape.family, batch=shape.batch, dtype=job.dtype,
        pass_=job.pass_, contender=job.contender, layout=job.layout, label=job.label,
        fused=job.contender in harness.FUSED, activation=shape.activation, device=device.type,
        byte_floor=shape.byte_floor(job.pass_, torch.finfo(harness.DTYPES[job.dtype]).bits // 8),
        flops=shape.flops(job.pass_),
    )
    if job.contender in harness.FUSED and job.pass_ == "fwd":
        info["rel_err"] = session.relative_error(job)
        assert info["rel_err"] <= REL_ERR_LIMIT, f"{job.contender} output differs from the reference: {info['rel_err']}"
    # the baselines first (measured once per session, here when their own tests were deselected), this job last: the
    # session keeps its runner for pytest-benchmark's rounds
    times = {}
    if job.contender in harness.FUSED:
        times = {other.label: session.measure(other).ms for other in plan(which, on_gpu())
                 if harness.same_group(job, other) and other.contender in harness.BASELINES
                 and skip_reason(which, other, device) is None}
    reference = session.measure(harness.Job(shape, job.dtype, job.pass_, "reference", job.layout))
    measured = session.measure(job)
    info.update(harness.throughput(shape, job.pass_, job.dtype, measured.ms, device))
    if device.type == "cuda":
        info["copy_bandwidth_gbs"] = harness.copy_bandwidth_gbs(device.index or 0)
    if times:
        best, speedup = harness.layer_speedups({**times, job.label: measured.ms}, over_baselines=True)
        info.update(best_baseline=best, best_baseline_ms=times[best], speedup_vs_best_baseline=speedup[job.label])
    if measured.peak_mem_bytes is not None:
        info.update(ref_peak_mem_bytes=reference.peak_mem_bytes, peak_mem_vs_ref=measured.peak_memory_vs(reference))
    record(benchmark, session.runner(job), device, measured)
