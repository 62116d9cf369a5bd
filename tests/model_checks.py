"""Helpers for the convert() tests: a converted model against its unconverted twin, and the activation memory that
autograd saves for backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import bsconv_cuda


def converted_twin(build: Callable[[], nn.Module], backend: str):
    """(``build()``, ``build()`` converted, summary of the conversion): two models built alike rather than a deep
    copy, because bsconv's BSConv-S models do not deep-copy (their regularization closes over the original
    modules)."""
    converted, summary = bsconv_cuda.convert(build(), backend=backend, return_summary=True)
    return build(), converted, summary


def run_step(
    model: nn.Module, x: torch.Tensor, seed: int = 1, extra_loss: Callable[[nn.Module], torch.Tensor | None] = None
) -> dict[str, torch.Tensor]:
    """Output, gradients of input and parameters, and buffers after one forward + backward (random weighting of the
    output, so every gradient depends on every output element, plus ``extra_loss(model)`` when that is not None).
    ``seed`` fixes dropout's masks."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    loss = (y * weights).sum()
    extra = None if extra_loss is None else extra_loss(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    results = {"output": y.detach(), "grad input": x.grad}
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    results.update({f"buffer {name}": b.detach().clone() for name, b in model.named_buffers()})
    return results


def assert_same_step(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rtol=1e-9, atol=1e-9):
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, name
            continue
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, *, shapes_only: bool = False) -> int:
    """Bytes of the distinct activation tensors (4-D, batch first: the models' weights have their output channels
    there) that autograd saves for backward during ``model(x)``, counted once per storage.

    ``shapes_only``: run under torch's FakeTensorMode, which executes the same Python code (backend choice, the
    autograd functions and what they save) on tensors that have shapes but no values, so no kernel computes
    anything: what autograd saves does not depend on the values. (tests check this against a real run.)
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[0] == x.shape[0]:
            storage = tensor.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
        return tensor

    mode = FakeTensorMode(allow_non_fake_inputs=True) if shapes_only else contextlib.nullcontext()
    with mode:
        x = (mode.from_tensor(x) if shapes_only else x.detach().clone()).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y = model(x)  # the saved tensors stay alive (no storage reused) until y goes
        del y
    return sum(seen.values())
