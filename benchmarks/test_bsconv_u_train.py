"""Training-mode BSConv-U with BatchNorm: ``pw -> BatchNorm (batch statistics) -> act -> dw``, one forward + backward
(``pytest benchmarks --benchmark-only``; see BENCHMARKS.md).

Contenders, one test per (shape, dtype, contender), grouped per ``train-bn shape dtype``:

- ``eager``: the standard layers (``nn.Conv2d``, ``nn.BatchNorm2d``, activation, ``nn.Conv2d``), what
  ``bsconv.pytorch.BSConvU(with_bn=True)`` runs; the intermediate is written, normalized and saved for backward.
- ``compile``: ``torch.compile`` of the same layers (GPU only, as in ``test_bsconv_u.py``).
- ``triton``, ``cuda``: the fused training path (``FusedBSConvU(with_bn=True).train()``'s forward,
  :func:`bsconv_cuda.modules.fused_block_forward`): batch statistics from the input's, no intermediate written or saved.

Every contender runs the same modules' parameters on the same channels_last input; the running statistics are updated
by every call, as in training. Recorded in ``extra_info``: ``time_ms`` (GPU: ``bench.time_ms``, CUDA events; CPU: the
min of pytest-benchmark's wall-clock rounds, which says nothing about the GPU kernels), ``peak_mem_bytes``
(``torch.cuda.max_memory_allocated`` above the live inputs during one forward + backward; GPU only) with
``eager_peak_mem_bytes`` and ``peak_mem_vs_eager`` for the other contenders, ``speedup_vs_eager``, and ``rel_err`` of
the fused output against ``eager`` in the same dtype. The keys (``layer``, ``block``) differ from
``test_bsconv_u.py``'s, so ``benchmarks/report.py``'s layer table does not mix these rows in.

On CPU only ``eager`` is timed, at batch 1 on the quick shapes: the machinery runs, GPU numbers come with a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bsconv_cuda import bench
from bsconv_cuda.modules import fused_block_forward
from bsconv_cuda.shapes import QUICK_SHAPES, SHAPES, Shape

from _suite import bench_set, on_gpu

DTYPE_NAMES = ("fp32", "bf16")
CONTENDERS = ("eager", "compile", "triton", "cuda")
FUSED = ("triton", "cuda")
CPU_ROUNDS = 3
GPU_SANITY_ROUNDS = 3
REL_ERR_LIMIT = 2e-2  # fused vs eager in the same dtype; the accuracy tests are tests/test_batchnorm_training.py


class TrainingBlock(nn.Module):
    """pw -> bn -> act -> dw through :func:`fused_block_forward`: ``backend="reference"`` is the standard layers."""

    def __init__(self, shape: Shape, backend: str):
        super().__init__()
        self.pw = nn.Conv2d(shape.c_in, shape.c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(shape.c_out)
        self.dw = nn.Conv2d(shape.c_out, shape.c_out, shape.k, shape.stride, shape.padding, groups=shape.c_out,
                            bias=shape.dw_bias)
        self.activation = None if shape.activation == "none" else shape.activation
        self.backend = backend

    def forward(self, x):
        return fused_block_forward(x, self.pw, self.bn, self.dw, mid_activation=self.activation, backend=self.backend)


def plan(which: str, gpu: bool) -> list[tuple[Shape, str, str]]:
    if not gpu:
        shapes = [s.with_batch(1) for s in QUICK_SHAPES if not s.is_latency]
        return [(s, "fp32", c) for s in shapes for c in CONTENDERS]
    shapes = [s for s in (SHAPES if which == "full" else QUICK_SHAPES) if not s.is_latency]
    return [(s, d, c) for s in shapes for d in DTYPE_NAMES for c in CONTENDERS]


def pytest_generate_tests(metafunc):
    if "train_shape" not in metafunc.fixturenames:
        return
    params = plan(bench_set(metafunc.config), on_gpu())
    metafunc.parametrize("train_shape,dtype_name,block_name", params,
                         ids=[f"{s.name}-{d}-{c}" for s, d, c in params])


def skip_reason(contender: str, device: torch.device) -> str | None:
    if contender == "eager":
        return None
    if contender == "compile":
        return None if device.type == "cuda" else "torch.compile is timed on GPU only"
    return bench.backend_unavailable_reason(contender, device)


_CASES: dict = {}


def get_case(shape: Shape, dtype_name: str, device: torch.device):
    """(x, grad_y, module with the shape's initial parameters), cached for the most recent key."""
    key = (shape, dtype_name, device.type)
    if key not in _CASES:
        _CASES.clear()
        dtype = bench.DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape.batch, shape.c_in, shape.hw, shape.hw, generator=gen).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        grad_y = torch.randn(shape.batch, shape.c_out, shape.hw_out, shape.hw_out, generator=gen).to(device, dtype)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(0)
        module = TrainingBlock(shape, "reference").to(device=device, dtype=dtype).train()
        _CASES[key] = (x, grad_y, module)
    return _CASES[key]


def make_runner(contender: str, shape: Shape, dtype_name: str, device: torch.device):
    """A zero-argument forward + backward of ``contender`` (gradients of x and every parameter via
    ``torch.autograd.grad``, so nothing accumulates), and its module."""
    x, grad_y, base = get_case(shape, dtype_name, device)
    module = copy.deepcopy(base)
    module.backend = "reference" if contender in ("eager", "compile") else contender
    block = torch.compile(module, dynamic=False) if contender == "compile" else module
    leaves = [x, *module.parameters()]

    def run():
        return torch.autograd.grad(block(x), leaves, grad_y)

    return run, block


def test_bsconv_u_train(benchmark, device, memo, train_shape, dtype_name, block_name):
    shape, contender = train_shape, block_name
    benchmark.group = f"train-bn {shape.name} {dtype_name}"
    reason = skip_reason(contender, device)
    if reason is not None:
        pytest.skip(f"{contender}: {reason}")
    info = benchmark.extra_info
    info.update(suite="bsconv_u_train", layer=shape.name, describe=shape.describe(), family=shape.family,
                batch=shape.batch, dtype=dtype_name, pass_="fwdbwd", block=contender, layout="cl",
                fused=contender in FUSED, activation=shape.activation, device=device.type)
    run, block = make_runner(contender, shape, dtype_name, device)

    if device.type != "cuda":
        benchmark.pedantic(run, rounds=CPU_ROUNDS, warmup_rounds=1, iterations=1)
        info["time_ms"] = benchmark.stats.stats.min * 1e3  # min: a shared CPU often loses a scheduler slice
        info["timer"] = "wall-clock, CPU (pytest-benchmark), min of rounds"
        return

    run()  # warm-up: compilation, autotuning, allocator
    if contender in FUSED:
        x = get_case(shape, dtype_name, device)[0]
        with torch.no_grad():
            _, eager = make_runner("eager", shape, dtype_name, device)
            y, y_ref = block(x).float(), eager(x).float()
        info["rel_err"] = float(torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref).clamp_min(1e-30))
        assert info["rel_err"] <= REL_ERR_LIMIT, f"{contender} output differs from the standard layers"
    info["peak_mem_bytes"] = bench.peak_memory_bytes(run, device)
    key = (shape, dtype_name, contender)
    memo.times[key] = bench.time_ms(run, device)
    t = memo.times[key]
    info.update(time_ms=t["ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], timer=t["timer"])
    if contender != "eager":
        eager_key = (shape, dtype_name, "eager")
        if eager_key not in memo.times or eager_key not in memo.peaks:  # the eager test was deselected
            eager_run, _ = make_runner("eager", shape, dtype_name, device)
            eager_run()
            memo.peaks[eager_key] = bench.peak_memory_bytes(eager_run, device)
            memo.times[eager_key] = bench.time_ms(eager_run, device)
        info["eager_ms"] = memo.times[eager_key]["ms"]
        info["speedup_vs_eager"] = info["eager_ms"] / t["ms"]
        info["eager_peak_mem_bytes"] = memo.peaks[eager_key]
        info["peak_mem_vs_eager"] = info["peak_mem_bytes"] / max(memo.peaks[eager_key], 1)
    else:
        memo.peaks[key] = info["peak_mem_bytes"]

    def synced():
        run()
        torch.cuda.synchronize(device)

    # pytest-benchmark's own (wall-clock) statistics: sanity only, as in test_bsconv_u.py
    benchmark.pedantic(synced, rounds=GPU_SANITY_ROUNDS, warmup_rounds=1, iterations=1)
