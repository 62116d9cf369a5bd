"""Helpers shared by benchmarks/conftest.py and the benchmark modules."""

from __future__ import annotations

import os

import pytest
import torch

BENCH_SETS = ("default", "quick", "full")


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


