"""The BSConv-U operators, their fake (meta) implementations, and the autograd function that ties them together.

One forward and one backward operator per backend, all with one schema::

    bsconv_cuda::{backend}_forward(Tensor x, Tensor pw_weight, Tensor? pw_bias, Tensor dw_weight, Tensor? dw_bias,
                                   int[] stride, int[] padding, int[] dilation, str activation) -> Tensor
    bsconv_cuda::{backend}_backward(Tensor grad_y, <the same arguments>, bool[] output_mask)
        -> (Tensor, Tensor, Tensor, Tensor, Tensor)

The backward returns the gradients of x, pw_weight, pw_bias, dw_weight, dw_bias (:data:`reference.GRADIENTS`);
``output_mask`` holds five bools in that order, and a gradient it does not ask for is neither computed nor
launched: it comes back as an empty tensor (:func:`reference.skipped_gradient`). :class:`BSConvUFunction` asks for
what ``ctx.needs_input_grad`` says, so frozen weights, an input that needs no gradient and absent biases cost
nothing in backward.

- ``reference``: ``torch.library.custom_op`` over :mod:`bsconv_cuda.reference`.
- ``triton``: ``torch.library.triton_op`` over :mod:`bsconv_cuda.kernels.bsconv_u`, so that ``torch.compile`` sees
  the Triton kernels themselves (on GPU; under Triton's interpreter it can only run them eagerly).
- ``cuda``: defined and implemented in C++ (``csrc/``, loaded as ``bsconv_cuda._C``), with one more argument,
  ``bool allow_tf32=False``, and in the backward another, ``str backward_path="auto"`` (and in C++ ``output_mask``
  defaults to all five); here they get their fakes and ``custom_op`` wrappers
  (``bsconv_cuda::cuda_with_tf32_switch_forward/_backward``, the schema above) that pass torch's TF32 switch for
  fp32 convolutions (:func:`bsconv_cuda.backends.fp32_uses_tf32`), which the Triton launchers read themselves, so
  fp32 precision does not depend on which backend ``auto`` picked, and the path that
  :func:`bsconv_cuda.cuda_backend.force_backward_path` forces (tests and benchmarks). Both fused backends take
  hardswish as :func:`bsconv_cuda.reference.kernel_activation` names it: its gradient at -3 and 3 follows the
  installed torch.

Separate operators per backend (rather than one operator with a backend argument) keep each registration in its
own mechanism and let the backend be chosen once, in :func:`bsconv_cuda.bsconv_u`, before anything is traced.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import backends, cuda_backend, reference

Launcher = Callable[..., object]


def _forward_fake(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation):
    out_h, out_w = reference.output_size(x.shape[2], x.shape[3], dw_weight.shape[2:], stride, padding, dilation)
    return torch.empty(
        (x.shape[0], dw_weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
        memory_format=reference.output_memory_format(x),
    )


def _backward_fake(grad_y, x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation,
                   output_mask):
    c_out = dw_weight.shape[0]
    gradients = (
        lambda: torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=reference.output_memory_format(x)),
        lambda: torch.empty_like(pw_weight, memory_format=torch.contiguous_format),
        lambda: x.new_empty((c_out,)),
        lambda: torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
        lambda: x.new_empty((c_out,)),
    )
    return tuple(gradient() if needed else reference.skipped_gradient(x)
                 for gradient, needed in zip(gradients, output_mask))


def _define(name: str, define, forward: Launcher, backward: Launcher):
    """Registers ``bsconv_cuda::{name}_forward/_backward`` with ``define`` (custom_op or triton_op)."""

    def forward_op(
        x: Tensor, pw_weight: Tensor, pw_bias: Optional[Tensor], dw_weight: Tensor, dw_bias: Optional[Tensor],
        stride: list[int], padding: list[int], dilation: list[int], activation: str,
    ) -> Tensor:
        return forward(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation)

    def backward_op(
        grad_y: Tensor, x: Tensor, pw_weight: Tensor, pw_bias: Optional[Tensor], dw_weight: Tensor,
        dw_bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], activation: str,
        output_mask: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return backward(grad_y, x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation,
                        output_mask)

    forward_op = define(f"bsconv_cuda::{name}_forward", forward_op, mutates_args=())
    backward_op = define(f"bsconv_cuda::{name}_backward", backward_op, mutates_args=())
    forward_op.register_fake(_forward_fake)
    backward_op.register_fake(_backward_fake)
    return forward_op, backward_op


OPS: dict[str, tuple[Callable, Callable]] = {
    "reference": _define("reference", torch.library.custom_op, reference.forward, reference.backward),
}

if backends.triton_import_error() is None:
    from .kernels import bsconv_u as _triton_kernels

    OPS["triton"] = _define(
        "triton", torch.library.triton_op, _triton_kernels.forward, _triton_kernels.backward
    )

if backends.extension_load_error() is None:

    def _cuda_forward_fake(*args, allow_tf32=False):
        return _forward_fake(*args[:9])

    def _cuda_backward_fake(*args, output_mask=reference.ALL_GRADIENTS, allow_tf32=False, backward_path="auto"):
        return _backward_fake(*args[:10], args[10] if len(args) > 10 else output_mask)

    torch.library.register_fake("bsconv_cuda::cuda_forward")(_cuda_forward_fake)
    torch.library.register_fake("bsconv_cuda::cuda_backward")(_cuda_backward_fake)

    def _cuda_forward(*args):
        *operands, activation = args
        return torch.ops.bsconv_cuda.cuda_forward.default(*operands, reference.kernel_activation(activation),
                                                          backends.fp32_uses_tf32())

    def _cuda_backward(*args):
        *operands, activation, output_mask = args
        return torch.ops.bsconv_cuda.cuda_backward.default(*operands, reference.kernel_activation(activation),
                                                           output_mask, backends.fp32_uses_tf32(),
                                                           cuda_backend.forced_backward_path())

    # The C++ operators behind custom operators that read torch's TF32 switch when the call runs (read in traced
    # code, the flag lookups break torch.compile's graph), and name hardswish as the installed torch differentiates
    # it (reference.kernel_activation).
    OPS["cuda"] = _define("cuda_with_tf32_switch", torch.library.custom_op, _cuda_forward, _cuda_backward)


class BSConvUFunction(torch.autograd.Function):
    """Differentiable BSConv-U on one backend. Saves only x and the weights: backward recomputes ``mid``.

    ``apply(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation, backend)`` with the
    argument conventions of :mod:`bsconv_cuda.reference` and ``backend`` one of the keys of :data:`OPS`. Use
    :func:`bsconv_cuda.bsconv_u` instead unless the arguments are already validated and normalized.
    """

    @staticmethod
    def forward(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation, backend):
        forward_op, _ = OPS[backend]
        return forward_op(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation, backend = inputs
        ctx.save_for_backward(x, pw_weight, pw_bias, dw_weight, dw_bias)
        ctx.conv_args = (stride, padding, dilation, activation)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_y):
        x, pw_weight, pw_bias, dw_weight, dw_bias = ctx.saved_tensors
        _, backward_op = OPS[ctx.backend]
        # an absent bias never needs a gradient (needs_input_grad is False for None)
        output_mask = list(ctx.needs_input_grad[:5])
        gradients = backward_op(grad_y, x, pw_weight, pw_bias, dw_weight, dw_bias, *ctx.conv_args, output_mask)
        return (*(g if needed else None for g, needed in zip(gradients, output_mask)), None, None, None, None, None)
