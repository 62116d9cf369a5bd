"""Helpers shared by benchmarks/conftest.py and the benchmark modules: which set runs, and how a measurement of
:mod:`bsconv_cuda.bench_harness` (the runners ``python -m bsconv_cuda.bench`` uses too) is recorded."""

from __future__ import annotations

import os

import pytest
import torch

from bsconv_cuda import bench_harness as harness
from bsconv_cuda.shapes import QUICK_SHAPES, SHAPES, Shape

BENCH_SETS = ("default", "quick", "full")
DTYPE_NAMES = ("fp32", "bf16")
# pytest-benchmark's own statistics: wall-clock time of synchronized calls, a sanity check beside the harness's
# measurement (``extra_info["time_ms"]``), which is the number that counts.
SANITY_ROUNDS = 3


def bench_set(config=None) -> str:
    value = None
    if config is not None:
        value = config.getoption("--bench-set", default=None)
    value = value or os.environ.get("BSCONV_BENCH_SET", "default")
    if value not in BENCH_SETS:
        raise pytest.UsageError(f"BSCONV_BENCH_SET must be one of {BENCH_SETS}, got {value!r}")
    return value


def on_gpu() -> bool:
    return torch.cuda.is_available()


def layer_shapes(which: str, gpu: bool, latency: bool = True) -> list[Shape]:
    """The shapes of a set: on CPU the quick throughput shapes at batch 1 (a smoke test of the suite); on GPU the quick
    shapes or (``default``, ``full``) every shape; ``latency=False`` leaves out the batch-1 latency shapes."""
    if not gpu:
        return [s.with_batch(1) for s in QUICK_SHAPES if not s.is_latency]
    return [s for s in (QUICK_SHAPES if which == "quick" else SHAPES) if latency or not s.is_latency]


def parametrize(metafunc, argname: str, plan, job_id) -> None:
    """Parametrizes ``argname`` (when the test asks for it) with the jobs ``plan(set, gpu)`` returns, named by
    ``job_id``."""
    if argname in metafunc.fixturenames:
        jobs = plan(bench_set(metafunc.config), on_gpu())
        metafunc.parametrize(argname, jobs, ids=[job_id(job) for job in jobs])


def record(benchmark, run, device: torch.device, measured: harness.Measurement) -> None:
    """Puts ``measured`` into ``benchmark.extra_info`` and lets pytest-benchmark time ``run`` for its own statistics."""
    benchmark.extra_info.update(time_ms=measured.ms, p20_ms=measured.p20_ms, p80_ms=measured.p80_ms,
                                timer=measured.timer, peak_mem_bytes=measured.peak_mem_bytes)
    benchmark.pedantic(harness.synchronized(run, device), rounds=SANITY_ROUNDS, warmup_rounds=0, iterations=1)
