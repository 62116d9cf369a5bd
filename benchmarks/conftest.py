"""Shared setup of the BSConv-U benchmark suite (``pytest benchmarks --benchmark-only``).

Which set runs: ``--bench-set`` or the environment variable ``BSCONV_BENCH_SET``:

- ``default``: on GPU every shape, fp32 and bf16, fwd/bwd/fwdbwd; reference in NCHW and channels_last; composed
  dense conv, triton and cuda in channels_last; ``torch.compile`` of the reference (channels_last, bf16) on the
  quick shapes only. On CPU: the quick shapes at batch 1, reference and composed contenders only.
- ``quick``: the quick shapes only (with every contender of ``default``).
- ``full``: everything: also NCHW for every contender, ``torch.compile`` on every shape and dtype.

Results: unless ``--benchmark-json`` is given, the JSON goes to ``benchmark-results/bsconv-<cpu|gpu>.json`` (or
``$BSCONV_BENCH_JSON``), which is what ``python benchmarks/report.py`` reads by default.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
try:
    import bsconv_cuda  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bsconv_cuda import bench_harness  # noqa: E402

from _suite import BENCH_SETS, bench_set, on_gpu  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-set", default=None, choices=BENCH_SETS,
                     help="BSConv-U benchmark set (default: $BSCONV_BENCH_SET or 'default')")


def default_json_path() -> Path:
    env = os.environ.get("BSCONV_BENCH_JSON")
    if env:
        return Path(env)
    return REPO / "benchmark-results" / f"bsconv-{'gpu' if on_gpu() else 'cpu'}.json"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark builds its session, so the default JSON path is seen by it.
    if not hasattr(config.option, "benchmark_json"):
        return
    if config.option.benchmark_json is None and not getattr(config.option, "benchmark_disable", False):
        if any("benchmarks" in str(a) for a in config.args) or Path.cwd() == REPO / "benchmarks":
            path = default_json_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            config.option.benchmark_json = open(path, "wb")  # noqa: SIM115 - pytest-benchmark closes it


def pytest_benchmark_update_machine_info(config, machine_info):
    env = bench_harness.environment(torch.device("cuda" if on_gpu() else "cpu"))
    machine_info["bsconv_device"] = env.pop("device")
    machine_info.update(env, bench_set=bench_set(config))


@pytest.fixture(scope="session")
def device() -> torch.device:
    if not on_gpu():
        # One thread: on a shared 2-core CI machine two OpenMP threads stall on each other's scheduler slices
        # (timings jump by whole milliseconds). CPU numbers are a smoke test of the suite, not a CPU benchmark.
        torch.set_num_threads(int(os.environ.get("BSCONV_BENCH_CPU_THREADS", "1")))
    return torch.device("cuda" if on_gpu() else "cpu")


@pytest.fixture(scope="session")
def session(device):
    """The harness's session: each job measured once, so fused contenders find their baselines measured (on
    demand when a baseline test was deselected)."""
    return bench_harness.Session(device)
