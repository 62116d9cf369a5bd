"""BatchNorm with batch statistics inside the fused block: :func:`bsconv_u_batch_norm`,
``dw(act(batch_norm(pw(x))))`` run by the fused kernels without ever writing the intermediate ``m = pw(x)``.

The pointwise stage is linear, so the intermediate's batch statistics follow from the input's. With M pixels
(N·H·W, summed over the process group when synchronized), μ the per-channel mean of x and
S = Σ_p (x_p − μ)(x_p − μ)ᵀ its C_in×C_in centered scatter (one GEMM over x):

    μ_m = W μ,   var_m = rowsum((W S) ⊙ W) / M,   inv = (var_m + eps)^(-1/2),   s = γ ⊙ inv

and ``batch_norm(W x_p) = s ⊙ W (x_p − μ) + β``: the fused kernels run on the centered input x_c = x − μ with the
pointwise weight ``W' = diag(s) W`` and bias β.

Backward (with small matrices only, plus one C_in×C_in map over the pixels): the fused backward returns
gx' = W'ᵀ g_z, gW' = Σ_p g_z x_cᵀ and gb' = Σ_p g_z (g_z: the gradient of the normalized, affine intermediate).
Then dβ = gb', dγ = inv ⊙ rowsum(W ⊙ gW') (= Σ_p g_z ⊙ x̂_p), t = s ⊙ dβ / M, k = s ⊙ dγ ⊙ inv / M and

    gx_p = gx'_p − Wᵀ diag(k) W x_c,p − Wᵀ t
    gW   = diag(s) gW' − t (Σ_p x_c,p)ᵀ − diag(k) W S + (s ⊙ gb' − n t − k ⊙ W Σ_p x_c,p) μᵀ

(the last two Σ_p x_c,p terms vanish for one process; with a process group they are this rank's share: n its
pixel count, S and gb' its local sums, while μ, M, t and k are the group's). The depthwise gradients are the fused
backward's own.

Numerics. μ, S, the quadratic form, the small matrices and the per-pixel correction are float64 for every input
dtype (:data:`STATISTICS_DTYPE`), and x_c is x − μ in float64 rounded once to x's dtype. What that buys:
- a channel mean far above its spread costs only that rounding (u |x_c|); the uncentered ``W' x + (β − s ⊙ μ_m)``
  would lose u |μ| in every product, and E[x²] − E[x]² would lose its variance to cancellation in float32;
- var_m = wᵀ S w squares the conditioning of a row w that nearly cancels correlated channels (var_m = δ² of its
  inputs' variance: relative error ~ u/δ², u the precision of S), harmless with S in float64; no product here is
  TF32, whatever torch's matmul precision setting.
What it does not: the kernels compute W' x_c in x's dtype, so such a row's z has relative error ~ u/δ (as torch's own
pointwise conv has); and dγ = inv ⊙ rowsum(W ⊙ gW') is a difference of large terms for that row: gW' is the
kernels' float32 sum over the M pixels, so dγ has relative error ~ u √M / δ where torch's layers, which sum
g_z ⊙ x̂ per pixel, have ~ u / δ (measured, δ = 1e-3, M = 256: 1.3e-4 and 1.9e-5). The other gradients take dγ in
only through k; they stayed within float32's strict bound there (tests: test_correlated_channels).

A non-zero padding mode pads x before the fused kernels (the kernels' input is the padded x − μ: subtracting a
per-channel constant commutes with reflect, replicate and circular padding); μ, S, M and the corrections are the
unpadded image's, and the fused gradient gx' reaches the padding pixels, which the pad's own backward folds back.

Synchronized BatchNorm (``process_group``): the group's pixel count and Σx are all-reduced (C_in + 1 numbers), then
each rank's scatter about the group mean (C_in² numbers), and in backward the per-rank (dβ, dγ) sums (2·C_out
numbers), as ``nn.SyncBatchNorm`` does for its own; the parameter gradients stay per rank (DDP reduces them).

Saved for backward: x and the parameters (as by any convolution), plus μ, inv, s (C_in or C_out numbers each) and
this rank's Σ_p x_c,p and S (C_in and C_in²): nothing of the intermediate's size. Transient, per element of x (b
bytes): forward x − μ in float64 (8) and the kernels' input (b; none for float64) plus N·C_in² numbers for the scatter
of an NCHW x; backward the same x − μ and the float64 correction (16). For bf16 that is 5× x's bytes forward and 8×
backward, for float32 3× and 4× (the float32 statistics before: 5× and 5× for bf16, 2× and 2× for float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .functional import PreparedCall, bsconv_u, prepare_call
from .ops import OPS


def bsconv_u_batch_norm(
    x: Tensor,
    pw_weight: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    *,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mid_activation: str | None = None,
    process_group=None,
    backend: str = "auto",
) -> Tensor:
    """BSConv-U with a BatchNorm between the pointwise and the depthwise stage, as ``F.batch_norm`` computes it.

    ``y = depthwise_conv(zero_pad(act(batch_norm(conv1x1(x, pw_weight)))), dw_weight) + dw_bias``, with the
    BatchNorm arguments of :func:`torch.nn.functional.batch_norm`. With ``training=True`` the intermediate is
    normalized with its batch statistics (biased variance), derived from the input's so that the fused kernels never
    write it, and ``running_mean`` / ``running_var`` (when given) are updated in place with ``momentum`` (the
    unbiased variance, as torch does). With ``training=False`` the running statistics are folded into the pointwise
    stage. Nothing of the intermediate's size is saved for backward.

    Args:
        x, pw_weight, dw_weight, dw_bias, stride, padding, dilation, mid_activation, backend: as in
            :func:`bsconv_cuda.bsconv_u` (``x`` may also be unbatched, (C_in, H, W)). In training without a
            ``process_group`` (with one: :func:`runs_fused`), where the backend resolves to ``"reference"``
            (``"auto"`` does, and any backend on an empty batch) the block runs as
            torch's standard computation, ``F.conv2d`` → ``F.batch_norm`` → activation → depthwise ``F.conv2d``,
            as ``FusedBSConvU``'s reference runs its layers; elsewhere fused, with the statistics below.
        running_mean, running_var: (C_out,) buffers, or None (no running statistics; then ``training`` must be True).
        bn_weight, bn_bias: the BatchNorm's affine parameters γ and β, (C_out,), or None (γ = 1, β = 0).
        training: use (and track) the batch statistics; False: use the running statistics.
        momentum: the weight of the batch statistics in the running statistics update.
        eps: added to the variance.
        process_group: a ``torch.distributed`` process group to synchronize the batch statistics over (what
            ``nn.SyncBatchNorm`` does), or None. Used only with ``training=True``; every rank of the group must
            call with the same arguments (its own batch may be empty). With a group of several ranks every
            backend but ``"reference"`` runs the fused path on every rank (a rank whose call resolves to the
            reference runs the reference kernels in it); ``"reference"`` raises: torch's standard layers have no
            functional synchronized BatchNorm.

    The BatchNorm tensors may be float32 when ``x`` is a lower precision (mixed precision, as ``F.batch_norm``
    accepts); their gradients come back in their own dtype.
    """
    unbatched = isinstance(x, Tensor) and x.dim() == 3
    if unbatched:  # like nn.Conv2d: (C, H, W) is a batch of one
        x = x.unsqueeze(0)
    c_out = pw_weight.shape[0] if isinstance(pw_weight, Tensor) else None
    _check_batch_norm_args(x, c_out, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if training:
        call = prepare_call(x, pw_weight, dw_weight, dw_bias, stride, padding, dilation, None, mid_activation, backend)
        group = synchronized_group(process_group)
        if runs_fused(call, backend, group):
            y = batch_norm_call(call, running_mean, running_var, bn_weight, bn_bias, momentum, eps, group)
        elif group is not None:
            raise ValueError(
                "backend='reference' runs torch's standard layers, which synchronize batch statistics only as "
                "nn.SyncBatchNorm modules; with process_group use backend 'auto', 'triton' or 'cuda'"
            )
        else:
            y = _standard_layers(call, running_mean, running_var, bn_weight, bn_bias, momentum, eps)
    else:
        pw_weight, shift = fold_batch_norm(pw_weight, running_mean, running_var, bn_weight, bn_bias, eps)
        y = bsconv_u(x, pw_weight, dw_weight, dw_bias, stride, padding, dilation, pw_bias=shift,
                     mid_activation=mid_activation, backend=backend)
    return y.squeeze(0) if unbatched else y


def synchronized_group(process_group):
    """``process_group`` when it has anything to synchronize, else None: a group of one rank is a plain BatchNorm, as
    ``nn.SyncBatchNorm`` decides. The one home of that rule, for the functional and the modules."""
    if process_group is None or torch.distributed.get_world_size(process_group) == 1:
        return None
    return process_group


def runs_fused(call: PreparedCall, requested_backend: str, process_group) -> bool:
    """Whether a training-mode BatchNorm runs fused (:func:`batch_norm_call`) rather than as torch's standard layers.

    Alone: where the call resolved to a fused backend. With a process group (one :func:`synchronized_group` returned)
    every rank must take the same path, for the two run different collectives, while each rank's own resolution may
    differ (an empty local batch resolves to the reference): there only the requested backend decides, fused unless
    ``"reference"`` was asked for, and a rank whose call resolved to the reference runs the reference kernels
    inside the fused path.
    """
    if process_group is None:
        return call.backend != "reference"
    return requested_backend != "reference"


def batch_norm_call(
    call: PreparedCall, running_mean: Tensor | None, running_var: Tensor | None, bn_weight: Tensor | None,
    bn_bias: Tensor | None, momentum: float, eps: float, process_group=None,
    input_padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> Tensor:
    """The fused training-mode path of :func:`bsconv_u_batch_norm` on a prepared call (``call.pw_bias`` is None, the
    kernels ``call.backend``'s): the fused forward, and the running statistics updated in place when given.

    ``process_group``: None or a group that :func:`synchronized_group` returned (every rank calls this, its own
    batch possibly empty). ``input_padding`` (top, bottom, left, right): how much of ``call.x``'s border is a padding
    of the image (a non-zero ``padding_mode`` applied before the call); those pixels are copies, left out of the
    batch statistics.
    """
    x = call.x
    if process_group is None:  # an empty batch has no statistics of its own: it resolves to the standard layers
        _check_batch_size(_interior(x, input_padding))
    y, batch_mean, batch_var = _BatchNormBSConvU.apply(
        x, call.pw_weight, call.dw_weight, call.dw_bias, bn_weight, bn_bias, eps, call.stride, call.padding,
        call.dilation, call.activation, call.backend, process_group, input_padding,
    )
    if running_mean is not None:
        with torch.no_grad():  # as F.batch_norm: running = (1 - momentum) * running + momentum * batch
            running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
    return y


def _standard_layers(
    call: PreparedCall, running_mean: Tensor | None, running_var: Tensor | None, bn_weight: Tensor | None,
    bn_bias: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """The training-mode block as torch's layers compute it (the functional's ``backend="reference"``)."""
    top, bottom, left, right = call.padding
    mid = F.batch_norm(F.conv2d(call.x, call.pw_weight[:, :, None, None]), running_mean, running_var, bn_weight,
                       bn_bias, training=True, momentum=momentum, eps=eps)
    mid = F.pad(reference.activate(mid, call.activation), (left, right, top, bottom))
    return F.conv2d(mid, call.dw_weight, call.dw_bias, call.stride, 0, call.dilation, groups=call.dw_weight.shape[0])


def fold_batch_norm(
    pw_weight: Tensor, running_mean: Tensor, running_var: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm folded into the pointwise stage: (pw_weight * scale, shift), pw_weight of any rank."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -running_mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    return pw_weight * scale.reshape(-1, *[1] * (pw_weight.dim() - 1)), shift


# The dtype of the batch statistics and the gradient corrections, whatever x's (module docstring, Numerics).
STATISTICS_DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------------ statistics
class _InputStatistics(NamedTuple):
    count: int | Tensor  # pixels in the batch (the group's: a 0-dim float64 tensor when synchronized)
    mean: Tensor  # μ, (C_in,)
    kernel_input: Tensor  # x − μ in x's dtype, in the memory format of x's outputs
    local_centered_sum: Tensor  # Σ_p (x_p − μ) over this rank's pixels, (C_in,)
    local_scatter: Tensor  # Σ_p (x_p − μ)(x_p − μ)ᵀ over this rank's pixels, (C_in, C_in)
    scatter: Tensor  # the same over the whole batch (the group's)


def _input_statistics(x: Tensor, input_padding: tuple[int, int, int, int], process_group) -> _InputStatistics:
    """Mean and centered scatter of the channels of x's image (x without ``input_padding``), two-pass (mean first,
    then the GEMM on the centered input) so that a channel mean much larger than its spread does not cancel the
    variance away; ``kernel_input`` is all of x (padding included) less the mean."""
    image = _interior(x, input_padding)
    channel_sum = image.sum((0, 2, 3), dtype=STATISTICS_DTYPE)
    count = _pixel_count(image)
    if process_group is not None:
        # float64: exact pixel counts and sums of any size; one all-reduce of C_in + 1 numbers
        packed = torch.cat([channel_sum, channel_sum.new_full((1,), count)])
        torch.distributed.all_reduce(packed, group=process_group)
        channel_sum, count = packed[:-1], packed[-1]
    mean = channel_sum / count
    centered = _centered(x, mean)
    centered_image = _interior(centered, input_padding)
    local_scatter = _scatter(centered_image)
    scatter = local_scatter
    if process_group is not None:
        scatter = local_scatter.clone()
        torch.distributed.all_reduce(scatter, group=process_group)
    return _InputStatistics(count, mean, _kernel_input(centered, x.dtype), centered_image.sum((0, 2, 3)),
                            local_scatter, scatter)


def _interior(x: Tensor, padding: tuple[int, int, int, int]) -> Tensor:
    """The view of x without a (top, bottom, left, right) border."""
    top, bottom, left, right = padding
    return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right]


def _pixel_count(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def _check_batch_size(x: Tensor) -> None:
    if _pixel_count(x) == 1:  # F.batch_norm's own check and message
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _channels_last(x: Tensor) -> bool:
    return reference.output_memory_format(x) == torch.channels_last


def _centered(x: Tensor, mean: Tensor) -> Tensor:
    """x − μ in μ's dtype, channels_last exactly when the outputs for x are (so the views below are views)."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return x.to(mean.dtype, memory_format=fmt, copy=True).sub_(mean.view(1, -1, 1, 1))


def _kernel_input(centered: Tensor, dtype: torch.dtype) -> Tensor:
    """The fused kernels' input: x − μ rounded once to x's dtype."""
    return centered if centered.dtype == dtype else centered.to(dtype)


def _scatter(centered: Tensor) -> Tensor:
    """Σ_p c_p c_pᵀ over the pixels of a tensor made by :func:`_centered` (or its :func:`_interior`, then through a
    copy): GEMMs with K = the pixel count that read the tensor in place."""
    n, c, h, w = centered.shape
    if _channels_last(centered):
        rows = centered.permute(0, 2, 3, 1).reshape(-1, c)  # (M, C), a view
        return rows.T @ rows
    # one GEMM per image on (C, H·W) views, summed: N·C² extra numbers, where one GEMM on (C, M) would first copy
    # all of the tensor (N·C·H·W numbers; more whenever C < H·W)
    columns = centered.reshape(n, c, h * w)
    return torch.bmm(columns, columns.transpose(1, 2)).sum(0)


def _per_pixel(matrix: Tensor, centered: Tensor) -> Tensor:
    """``matrix @ c_p`` for every pixel of a tensor made by :func:`_centered`, in its memory format."""
    n, c, h, w = centered.shape
    if _channels_last(centered):
        rows = centered.permute(0, 2, 3, 1).reshape(-1, c)
        return (rows @ matrix.T).reshape(n, h, w, matrix.shape[0]).permute(0, 3, 1, 2)
    return (matrix @ centered.reshape(n, c, h * w)).reshape(n, matrix.shape[0], h, w)


# -------------------------------------------------------------------------------------------------------- autograd
class _BatchNormBSConvU(torch.autograd.Function):
    """Returns (y, batch mean, unbiased batch variance) of the intermediate; the statistics are not differentiable
    (they only feed the running statistics). The backward is the closed form of the module docstring."""

    @staticmethod
    def forward(ctx, x, pw_weight, dw_weight, dw_bias, bn_weight, bn_bias, eps, stride, padding, dilation,
                activation, backend, process_group, input_padding):
        with _no_autocast(x):
            return _BatchNormBSConvU._forward(ctx, x, pw_weight, dw_weight, dw_bias, bn_weight, bn_bias, eps,
                                              (stride, padding, dilation, activation), backend, process_group,
                                              input_padding)

    @staticmethod
    def _forward(ctx, x, pw_weight, dw_weight, dw_bias, bn_weight, bn_bias, eps, conv, backend, process_group,
                 input_padding):
        stats = _input_statistics(x, input_padding, process_group)
        w = pw_weight.to(stats.mean.dtype)
        count = stats.count
        batch_mean = w @ stats.mean
        batch_var = ((w @ stats.scatter) * w).sum(1).div_(count).clamp_min_(0)  # rounding must not make it < 0
        inv_std = torch.rsqrt(batch_var + eps)
        scale = inv_std if bn_weight is None else bn_weight.to(inv_std.dtype) * inv_std
        forward_op, _ = OPS[backend]
        y = forward_op(stats.kernel_input, *_fused_weights(w, scale, bn_bias, x.dtype), dw_weight, dw_bias, *conv)
        ctx.save_for_backward(
            x, pw_weight, dw_weight, dw_bias, bn_weight, bn_bias, stats.mean, inv_std, scale,
            stats.local_centered_sum, stats.local_scatter, count if isinstance(count, Tensor) else None,
        )
        ctx.count = None if isinstance(count, Tensor) else count
        ctx.local_count = _pixel_count(_interior(x, input_padding))
        ctx.conv, ctx.backend, ctx.process_group, ctx.input_padding = conv, backend, process_group, input_padding
        unbiased_var = batch_var * (count / (count - 1))
        ctx.mark_non_differentiable(batch_mean, unbiased_var)
        return y, batch_mean, unbiased_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        with _no_autocast(grad_y):
            return _BatchNormBSConvU._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        (x, pw_weight, dw_weight, dw_bias, bn_weight, bn_bias, mean, inv_std, scale, local_centered_sum,
         local_scatter, group_count) = ctx.saved_tensors
        count = ctx.count if group_count is None else group_count
        centered = _centered(x, mean)  # bit for bit the forward's: same ops on the same tensors
        kernel_input = _kernel_input(centered, x.dtype)
        w = pw_weight.to(mean.dtype)
        needs = ctx.needs_input_grad
        # (dβ, dγ) = (gb', inv ⊙ rowsum(W ⊙ gW')) enter every gradient of x, W, γ and β (x and W through t and k):
        # the fused pointwise gradients are wanted when any of those is, even with W frozen
        need_sums = needs[0] or needs[1] or needs[4] or needs[5]
        _, backward_op = OPS[ctx.backend]
        grad_x_fused, grad_w_fused, grad_b_fused, grad_dw, grad_dw_bias = backward_op(
            grad_y, kernel_input, *_fused_weights(w, scale, bn_bias, x.dtype), dw_weight, dw_bias, *ctx.conv,
            [needs[0], need_sums, need_sums, needs[2], needs[3]],
        )
        del kernel_input  # not needed below: free it before the correction allocates its own x-sized tensor
        grad_x = grad_w = grad_gamma = grad_beta = None
        if need_sums:
            grad_w_fused = grad_w_fused.to(w.dtype)
            local_sums = torch.stack([grad_b_fused.to(w.dtype), (w * grad_w_fused).sum(1) * inv_std])  # dβ, dγ
            sums = local_sums
            if ctx.process_group is not None:
                sums = local_sums.clone()
                torch.distributed.all_reduce(sums, group=ctx.process_group)
            t = scale * sums[0] / count
            k = scale * sums[1] * inv_std / count
            if bn_weight is not None:
                grad_gamma = local_sums[1].to(bn_weight.dtype)
            if bn_bias is not None:
                grad_beta = local_sums[0].to(bn_bias.dtype)
        if needs[0]:
            # the fused gradient reaches every pixel of x, the statistics' corrections only the image's
            image_grad = _interior(grad_x_fused, ctx.input_padding)
            correction = _per_pixel(w.T @ (k[:, None] * w), _interior(centered, ctx.input_padding))
            image_grad.copy_(correction.add_((w.T @ t).view(1, -1, 1, 1)).neg_().add_(image_grad))
            grad_x = grad_x_fused
        if needs[1]:
            kw = k[:, None] * w
            grad_w = (scale[:, None] * grad_w_fused - t[:, None] * local_centered_sum - kw @ local_scatter
                      + (scale * local_sums[0] - ctx.local_count * t - kw @ local_centered_sum)[:, None] * mean)
            grad_w = grad_w.to(pw_weight.dtype)
        return (grad_x, grad_w, grad_dw if needs[2] else None, grad_dw_bias if needs[3] else None, grad_gamma,
                grad_beta, None, None, None, None, None, None, None, None)


def _no_autocast(x: Tensor):
    """The statistics and corrections are float64 math: an enclosing autocast must not lower them."""
    return torch.autocast(x.device.type, enabled=False)


def _fused_weights(w: Tensor, scale: Tensor, bn_bias: Tensor | None, dtype: torch.dtype):
    """The fused kernels' pointwise weight diag(s)·W and bias β (for the centered input), in the kernels' dtype."""
    return (scale[:, None] * w).to(dtype), None if bn_bias is None else bn_bias.to(dtype)


# ------------------------------------------------------------------------------------------------------ validation
def _check_batch_norm_args(x, c_out, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a real number, got {value!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var are required with training=False")
    named = {"running_mean": running_mean, "running_var": running_var, "bn_weight": bn_weight, "bn_bias": bn_bias}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if c_out is not None and tuple(tensor.shape) != (c_out,):
            raise ValueError(f"{name} must have shape ({c_out},) (C_out of pw_weight), got {tuple(tensor.shape)}")
        if isinstance(x, Tensor) and tensor.device != x.device:
            raise RuntimeError(
                f"{name} is on {tensor.device} but x is on {x.device}; all tensors must share one device"
            )
