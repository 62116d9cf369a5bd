"""``bsconv_u``: the functional form. Validates and normalizes arguments, picks the backend once, then runs
:class:`~bsconv_cuda.ops.BSConvUFunction`."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, cuda_backend, reference
from .ops import OPS, BSConvUFunction

if backends.triton_import_error() is None:
    from .kernels import bsconv_u as triton_kernels

# The fused kernels' per-tile halo and on-chip state are sized for kernels up to 7x7 (docs/DESIGN.md, section 5).
MAX_FUSED_KERNEL_SIZE = 7

# What ``backend="auto"`` runs, on every device. On CPU the reference is the only real kernel (Triton's interpreter
# is for tests). On CUDA tensors it is what the GPU measured: on an H200 (BENCHMARKS.md, "GPU: H200, 2026-11-29";
# benchmarks/gpu-runs/2026-11-29-h200) cuDNN through the reference beat both fused backends on every shape class of
# the quick set (MobileNet v1 / v2 / v3 and CIFAR layers, batch 1 to 128), bf16 and fp32, forward and forward +
# backward, by 1.36x to 11x, all in channels_last (the fused kernels on NCHW inputs have not been timed: no
# measurement, so no fused pick). A fused backend becomes auto's pick for a shape class only once it is measured
# faster there; tests/test_backends.py checks this choice against every recorded GPU measurement.
AUTO_BACKEND = "reference"


def bsconv_u(
    x: Tensor,
    pw_weight: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    *,
    pw_bias: Tensor | None = None,
    mid_activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """BSConv-U: a 1x1 pointwise convolution, an optional activation, then a KxK depthwise convolution.

    ``y = depthwise_conv(zero_pad(act(conv1x1(x, pw_weight) + pw_bias)), dw_weight) + dw_bias``, computed by one
    fused kernel on the ``triton`` and ``cuda`` backends.

    Args:
        x: input, (N, C_in, H, W), NCHW or channels_last, or unbatched (C_in, H, W) as torch's convolutions take it.
        pw_weight: pointwise weight, (C_out, C_in) or (C_out, C_in, 1, 1).
        dw_weight: depthwise weight, (C_out, 1, kh, kw).
        dw_bias: depthwise bias, (C_out,), optional.
        stride, dilation: of the depthwise stage; an int or a pair (anything ``operator.index`` takes, e.g. numpy
            integers, counts as an int).
        padding: zero padding of the intermediate: an int, a pair, ``"valid"`` or ``"same"`` (stride 1 only).
        pw_bias: pointwise bias, (C_out,), optional (an eval-mode BatchNorm folded into the pointwise stage).
        mid_activation: None, ``"relu"``, ``"relu6"``, ``"hardswish"`` or ``"silu"``, applied before the depthwise stage.
        backend: ``"auto"`` (what the GPU measurements favour: today the reference everywhere, see
            :data:`AUTO_BACKEND`), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        (N, C_out, H_out, W_out) (or (C_out, H_out, W_out) for an unbatched x), in the memory format that torch's own
        convolutions would give.
    """
    if isinstance(x, Tensor) and x.dim() == 3:
        # unbatched, as torch's convolutions do it: a batch of one, squeezed again
        return bsconv_u(
            x.unsqueeze(0), pw_weight, dw_weight, dw_bias, stride, padding, dilation,
            pw_bias=pw_bias, mid_activation=mid_activation, backend=backend,
        ).squeeze(0)
    call = prepare_call(x, pw_weight, dw_weight, dw_bias, stride, padding, dilation, pw_bias, mid_activation, backend)
    return BSConvUFunction.apply(*call)


class PreparedCall(NamedTuple):
    """A validated ``bsconv_u`` call in the operators' conventions (see :mod:`bsconv_cuda.reference`), in the order
    of :class:`~bsconv_cuda.ops.BSConvUFunction`'s arguments, with the backend that runs it."""

    x: Tensor
    pw_weight: Tensor  # (C_out, C_in), contiguous
    pw_bias: Tensor | None
    dw_weight: Tensor
    dw_bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    activation: str
    backend: str


def prepare_call(
    x: Tensor, pw_weight: Tensor, dw_weight: Tensor, dw_bias: Tensor | None, stride: int | Sequence[int],
    padding: int | Sequence[int] | str, dilation: int | Sequence[int], pw_bias: Tensor | None,
    mid_activation: str | None, backend: str,
) -> PreparedCall:
    """``bsconv_u``'s arguments validated and normalized, cast to the autocast dtype when autocast is on, with the
    backend chosen (the one home of these rules for every entry point: ``bsconv_u``, ``bsconv_u_batch_norm`` and
    the fused blocks)."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        # Like torch's convolutions under autocast: everything runs in the autocast dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, pw_weight, dw_weight, dw_bias, pw_bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (x, pw_weight, dw_weight, dw_bias, pw_bias)
        )
    _check_tensors(x, pw_weight, dw_weight, dw_bias, pw_bias)
    c_out, c_in = pw_weight.shape[:2]
    kernel_size = tuple(dw_weight.shape[2:])
    stride, padding, dilation = normalize_conv_args(kernel_size, stride, padding, dilation)
    activation = _activation(mid_activation)
    out_h, out_w = reference.output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"x: input of spatial size {tuple(x.shape[2:])} is too small for a {kernel_size} kernel with "
            f"padding {padding} and dilation {dilation} (output would be {out_h}x{out_w})"
        )
    backend = select_backend(backend, x, kernel_size, stride, padding, dilation)
    return PreparedCall(
        x, pw_weight.reshape(c_out, c_in).contiguous(), pw_bias, dw_weight.contiguous(), dw_bias,
        stride, padding, dilation, activation, backend,
    )


def select_backend(
    requested: str, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> str:
    """The backend that runs this call: ``requested`` if it can, the best one that can for ``"auto"``."""
    if requested not in backends.BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {backends.BACKEND_CHOICES}, got {requested!r}")
    if x.numel() == 0:
        return "reference"  # nothing to compute: every backend's answer is the same empty tensor
    if requested == "auto":  # the measured pick where it can run this call, else the reference
        if _call_unsupported_reason(AUTO_BACKEND, x, kernel_size, stride, padding, dilation) is None:
            return AUTO_BACKEND
        return "reference"
    reason = _call_unsupported_reason(requested, x, kernel_size, stride, padding, dilation)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run this call: {reason}")
    return requested


def _call_unsupported_reason(
    backend: str, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> str | None:
    reason = backends.unavailable_reason(backend, x.device)
    if reason is not None or backend == "reference":
        return reason
    if backend not in OPS:
        return f"the {backend} operators are not registered"
    if max(kernel_size) > MAX_FUSED_KERNEL_SIZE:
        return (f"kernel size {tuple(kernel_size)} is larger than the fused kernels' "
                f"{MAX_FUSED_KERNEL_SIZE}x{MAX_FUSED_KERNEL_SIZE}")
    # float64 runs natively only in Triton's interpreter (tests); on a GPU it goes to the reference.
    if x.dtype == torch.float64 and x.device.type == "cuda":
        return "the fused kernels do not support float64 on GPU"
    if backend == "cuda":
        return cuda_backend.unsupported_reason(x, kernel_size, stride, padding, dilation)
    return triton_kernels.unsupported_reason(x, kernel_size, dilation)


def _check_tensors(x, pw_weight, dw_weight, dw_bias, pw_bias) -> None:
    named = {"x": x, "pw_weight": pw_weight, "dw_weight": dw_weight, "dw_bias": dw_bias, "pw_bias": pw_bias}
    for name, tensor in named.items():
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 3-D (C_in, H, W) or 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    if (reason := reference.empty_spatial_size_reason(x)) is not None:
        raise ValueError(f"x: {reason}")
    if pw_weight.dim() not in (2, 4) or (pw_weight.dim() == 4 and tuple(pw_weight.shape[2:]) != (1, 1)):
        raise ValueError(f"pw_weight must be (C_out, C_in) or (C_out, C_in, 1, 1), got shape {tuple(pw_weight.shape)}")
    c_out, c_in = pw_weight.shape[:2]
    if c_out < 1 or c_in < 1:
        raise ValueError(f"pw_weight must have at least one output and one input channel, got shape {tuple(pw_weight.shape)}")
    if x.shape[1] != c_in:
        raise ValueError(f"x has {x.shape[1]} channels but pw_weight expects C_in={c_in} (shape {tuple(pw_weight.shape)})")
    if dw_weight.dim() != 4 or dw_weight.shape[0] != c_out or dw_weight.shape[1] != 1:
        raise ValueError(
            f"dw_weight must be (C_out, 1, kh, kw) with C_out={c_out} from pw_weight, got shape {tuple(dw_weight.shape)}"
        )
    if min(dw_weight.shape[2:]) < 1:
        raise ValueError(f"dw_weight must have a kernel of at least 1x1, got shape {tuple(dw_weight.shape)}")
    for name in ("dw_bias", "pw_bias"):
        bias = named[name]
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"{name} must have shape ({c_out},), got {tuple(bias.shape)}")
    if x.dtype not in reference.SUPPORTED_DTYPES:
        supported = ", ".join(map(str, reference.SUPPORTED_DTYPES))
        raise TypeError(f"x has unsupported dtype {x.dtype}; supported: {supported}")
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; all tensors must share one dtype")
        if tensor.device != x.device:
            raise RuntimeError(f"{name} is on {tensor.device} but x is on {x.device}; all tensors must share one device")


def normalize_conv_args(
    kernel_size: Sequence[int], stride: int | Sequence[int], padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    """``bsconv_u``'s stride, padding and dilation in the operators' form: (sh, sw), (top, bottom, left, right),
    (dh, dw)."""
    stride = _pair("stride", stride, minimum=1)
    dilation = _pair("dilation", dilation, minimum=1)
    return stride, _padding(padding, kernel_size, stride, dilation), dilation


def _pair(name: str, value: int | Sequence[int], minimum: int) -> tuple[int, int]:
    if isinstance(value, Iterable) and not isinstance(value, str) and getattr(value, "ndim", 1) != 0:
        pair = tuple(_as_int(v) for v in value)  # a pair (a tuple, a list, a 1-D array)
    else:
        single = _as_int(value)
        pair = () if single is None else (single, single)
    if len(pair) != 2 or None in pair:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (anything ``operator.index`` takes, such as numpy integers, as
    torch's convolutions accept), else None. bool is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value  # plain ints take this branch: nothing for torch.compile to trace
    try:
        return operator.index(value)
    except TypeError:
        return None


def _padding(
    padding: int | Sequence[int] | str, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right); "same" splits an odd total like torch does (the extra row/column at the end)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in torch.nn.functional.conv2d), got stride={stride}")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        return (totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2)
    pad_h, pad_w = _pair("padding", padding, minimum=0)
    return (pad_h, pad_h, pad_w, pad_w)


def _activation(mid_activation: str | None) -> str:
    activation = "none" if mid_activation is None else mid_activation
    if activation not in reference.ACTIVATIONS:
        choices = ", ".join(repr(a) for a in reference.ACTIVATIONS if a != "none")
        raise ValueError(f"mid_activation must be None or one of {choices}, got {mid_activation!r}")
    return activation
