"""Helpers for the convert() tests: a converted model against its unconverted twin, and the activation memory that
autograd saves for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct 4-D activation tensors (batch-sized, not parameters or buffers) that autograd saves for
    backward during ``model(x)``, counted once per storage."""
    state = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[0] == x.shape[0]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in state:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = model(x)
    del y
    return sum(seen.values())
