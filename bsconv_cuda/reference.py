"""The reference BSConv-U computation in plain torch: the truth that every fused backend is tested against.

Every backend implements ``forward`` and ``backward`` with these exact signatures (see ``ops.py``):

- ``x`` (N, C_in, H, W), ``pw_weight`` (C_out, C_in), ``pw_bias`` (C_out,) or None, ``dw_weight`` (C_out, 1, kh, kw),
  ``dw_bias`` (C_out,) or None, all of one dtype and device;
- ``stride`` (sh, sw), ``padding`` (top, bottom, left, right), ``dilation`` (dh, dw);
- ``activation``: one of :data:`ACTIVATIONS`, applied to ``mid`` before the depthwise stage.

``mid = act(x · pw_weightᵀ + pw_bias)`` per pixel; ``mid`` is zero-padded (the padding belongs to ``mid``, not to
``x``); ``y = depthwise_conv(mid, dw_weight, stride, dilation) + dw_bias``. ``backward`` recomputes ``mid`` from ``x``
and returns five gradients, in the order of :data:`GRADIENTS`, the bias gradients included (the autograd layer drops
those of absent biases); ``output_mask`` (five bools in that order) says which are wanted, and an unwanted one is not
computed: it comes back as :func:`skipped_gradient` (an empty tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")
# torch's hardswish gradient at its kinks -3 and 3 changed (pytorch#148049): torch 2.7 puts them in the linear band
# x / 3 + 1/2 (-0.5 and 1.5), torch 2.11 in the flat branches (0 and 1). The fused kernels follow the installed torch:
# asked once here, it is passed to them as the activation "hardswish_closed_band" (kernel_activation).
HARDSWISH_CLOSED_BAND = torch.ops.aten.hardswish_backward(  # on CPU: whatever torch.set_default_device says
    torch.ones(1, device="cpu"), torch.full((1,), 3.0, device="cpu")).item() != 1.0
# The dtypes the package computes in (bsconv_u refuses others; the Triton launchers check them too). The CUDA
# kernels take a subset, cuda_backend.SUPPORTED_DTYPES, and on a GPU float64 goes to the reference.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GRADIENTS = ("x", "pw_weight", "pw_bias", "dw_weight", "dw_bias")  # backward's outputs and output_mask's order
ALL_GRADIENTS = (True,) * len(GRADIENTS)


def skipped_gradient(x: Tensor) -> Tensor:
    """What ``backward`` returns for a gradient that ``output_mask`` does not ask for: a new empty tensor of x's
    dtype and device (operators can return neither None in place of a Tensor nor one tensor twice)."""
    return x.new_empty((0,))


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format torch's convolutions give for input ``x``; fused backends must return the same."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def output_size(
    height: int, width: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    kh, kw = kernel_size
    top, bottom, left, right = padding
    out_h = (height + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w


def empty_spatial_size_reason(x: Tensor) -> str | None:
    """Why ``x`` (N, C_in, H, W) cannot be convolved, or None: torch's convolutions reject an input with H or W = 0
    whatever the padding (only the batch may be empty), and the pointwise stage is such a convolution."""
    if x.shape[2] == 0 or x.shape[3] == 0:
        return (f"input of spatial size {tuple(x.shape[2:])} is empty; as in torch.nn.functional.conv2d, only the "
                f"batch may be empty")
    return None


def check_input(x: Tensor, op: str) -> None:
    """Raises what the operators raise for an ``x`` that :func:`empty_spatial_size_reason` rejects."""
    reason = empty_spatial_size_reason(x)
    if reason is not None:
        raise RuntimeError(f"{op}: x: {reason}")


def activate(pre: Tensor, activation: str) -> Tensor:
    if activation == "none":
        return pre
    if activation == "relu":
        return F.relu(pre)
    if activation == "relu6":
        return F.relu6(pre)
    if activation == "hardswish":
        return F.hardswish(pre)
    if activation == "silu":
        return F.silu(pre)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def kernel_activation(activation: str) -> str:
    """The activation as the fused kernels take it: "hardswish_closed_band" for hardswish where the installed torch's
    gradient has the linear band closed at -3 and 3 (:data:`HARDSWISH_CLOSED_BAND`), else ``activation``."""
    return "hardswish_closed_band" if activation == "hardswish" and HARDSWISH_CLOSED_BAND else activation


def activation_backward(grad_mid: Tensor, pre: Tensor, activation: str) -> Tensor:
    """d act(pre) / d pre · grad_mid, with torch autograd's own formulas (so values at kinks match exactly).

    Where ``pre`` is NaN, relu / relu6 / hardswish pass ``grad_mid`` through, as torch's elementwise kernels do
    (each zeroes the gradient only where a comparison with ``pre`` holds, and none holds for NaN). torch's vectorized
    CPU kernels of hardtanh_backward and hardswish_backward give 0 and NaN there instead, depending on whether an
    element falls in a vector lane or in the scalar tail; the reference follows the elementwise definition on every
    device. silu's gradient at NaN is NaN."""
    if activation == "none":
        return grad_mid
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_mid, pre, 0)
    if activation == "relu6":
        return torch.where(pre.isnan(), grad_mid, torch.ops.aten.hardtanh_backward(grad_mid, pre, 0.0, 6.0))
    if activation == "hardswish":
        return torch.where(pre.isnan(), grad_mid, torch.ops.aten.hardswish_backward(grad_mid, pre))
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_mid, pre)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _padded_mid(x: Tensor, pw_weight: Tensor, pw_bias: Tensor | None, padding: Sequence[int], activation: str):
    pre = F.conv2d(x, pw_weight[:, :, None, None], pw_bias)
    top, bottom, left, right = padding
    return pre, F.pad(activate(pre, activation), (left, right, top, bottom))


def forward(
    x: Tensor, pw_weight: Tensor, pw_bias: Tensor | None, dw_weight: Tensor, dw_bias: Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], activation: str,
) -> Tensor:
    check_input(x, "bsconv_cuda::reference_forward")
    _, mid = _padded_mid(x, pw_weight, pw_bias, padding, activation)
    y = F.conv2d(mid, dw_weight, dw_bias, stride, 0, dilation, groups=dw_weight.shape[0])
    return y.contiguous(memory_format=output_memory_format(x))


def backward(
    grad_y: Tensor, x: Tensor, pw_weight: Tensor, pw_bias: Tensor | None, dw_weight: Tensor, dw_bias: Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], activation: str,
    output_mask: Sequence[bool] = ALL_GRADIENTS,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_input(x, "bsconv_cuda::reference_backward")
    need_x, need_pw, need_pb, need_dw, need_db = output_mask
    c_out = dw_weight.shape[0]
    need_pre = need_x or need_pw or need_pb  # the pointwise stage's gradients all start from grad_pre
    grad_x = grad_pw_weight = grad_pw_bias = grad_dw_weight = grad_dw_bias = None
    if need_pre or need_dw:
        pre, mid = _padded_mid(x, pw_weight, pw_bias, padding, activation)
        grad_mid, grad_dw_weight, grad_dw_bias = torch.ops.aten.convolution_backward(
            grad_y, mid, dw_weight, [c_out], list(stride), [0, 0], list(dilation), False, [0, 0], c_out,
            [need_pre, need_dw, need_db],
        )
    elif need_db:
        grad_dw_bias = grad_y.sum((0, 2, 3))  # the only gradient asked for: no need of mid
    if need_pre:
        top, _, left, _ = padding
        grad_mid = grad_mid[:, :, top : top + x.shape[2], left : left + x.shape[3]]
        grad_pre = activation_backward(grad_mid, pre, activation)
        grad_x, grad_pw_weight, grad_pw_bias = torch.ops.aten.convolution_backward(
            grad_pre, x, pw_weight[:, :, None, None], [c_out], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_x, need_pw, need_pb],
        )
    return (
        grad_x.contiguous(memory_format=output_memory_format(x)) if need_x else skipped_gradient(x),
        grad_pw_weight.reshape(pw_weight.shape).contiguous() if need_pw else skipped_gradient(x),
        grad_pw_bias if need_pb else skipped_gradient(x),
        grad_dw_weight.contiguous() if need_dw else skipped_gradient(x),
        grad_dw_bias if need_db else skipped_gradient(x),
    )
