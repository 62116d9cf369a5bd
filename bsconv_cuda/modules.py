"""``FusedBSConvU``: a drop-in for ``bsconv.pytorch.BSConvU``, and :func:`fused_block_forward`, the forward that every
fused block runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, reference
from .batchnorm import batch_norm_call, fold_batch_norm, runs_fused, synchronized_group
from .functional import bsconv_u, prepare_call


class FusedBSConvU(nn.Sequential):
    """BSConv-U (pointwise 1x1 conv, optional BatchNorm, depthwise KxK conv) run as one fused kernel.

    Same constructor, base class (``nn.Sequential``), submodules (``pw``, ``bn``, ``dw``), parameter names and
    state_dict keys as ``bsconv.pytorch.BSConvU``, and the same outputs. The fused path reads the submodules' parameters
    without calling their ``forward``, so hooks registered on ``pw``/``bn``/``dw`` do not run there. The fused path
    folds an eval-mode BatchNorm into the pointwise stage, normalizes a training-mode BatchNorm (or one with
    ``track_running_stats=False``) with the batch statistics derived from the input's
    (:func:`bsconv_cuda.bsconv_u_batch_norm`: nothing of the intermediate's size is written or saved), and handles
    non-zero padding modes by padding ``x`` first (padding commutes with a per-pixel map, so this equals padding the
    intermediate; batch statistics leave the padding out). ``bn`` may be replaced by an ``nn.SyncBatchNorm``
    (``nn.SyncBatchNorm.convert_sync_batchnorm``): training under ``torch.distributed``, the statistics are then the
    process group's. ``backend="reference"`` runs the standard layers.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
        padding_mode="zeros", with_bn=False, bn_kwargs=None, *, backend="auto",
    ):
        super().__init__()
        if backend not in backends.BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {backends.BACKEND_CHOICES}, got {backend!r}")
        self.backend = backend
        self.pw = nn.Conv2d(in_channels, out_channels, kernel_size=(1, 1), bias=False)
        if with_bn:
            self.bn = nn.BatchNorm2d(out_channels, **(bn_kwargs or {}))
        self.dw = nn.Conv2d(
            out_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=out_channels, bias=bias, padding_mode=padding_mode,
        )

    @classmethod
    def from_bsconvu(cls, module: nn.Module, *, backend: str = "auto") -> FusedBSConvU:
        """A FusedBSConvU built from ``module``'s own layers: same parameter objects (an optimizer that holds them keeps
        working), buffers, device, dtype and train/eval mode."""
        reason = _bsconvu_mismatch(module)
        if reason is not None:
            raise TypeError(f"module is not BSConvU-shaped: {reason}")
        pw, dw, bn = module.pw, module.dw, getattr(module, "bn", None)
        bn_kwargs = None
        if bn is not None:
            bn_kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                             track_running_stats=bn.track_running_stats)
        with torch.device("meta"):
            fused = cls(
                pw.in_channels, pw.out_channels, dw.kernel_size, dw.stride, dw.padding, dw.dilation,
                bias=dw.bias is not None, padding_mode=dw.padding_mode, with_bn=bn is not None, bn_kwargs=bn_kwargs,
                backend=backend,
            )
        for name, layer in module.named_children():
            setattr(fused, name, layer)
        return fused.train(module.training)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        return fused_block_forward(x, self.pw, getattr(self, "bn", None), self.dw, backend=self.backend)


def fused_block_forward(
    x: Tensor, pw: nn.Conv2d, bn: nn.BatchNorm2d | None, dw: nn.Conv2d, *, mid_activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """``dw(act(bn(pw(x))))`` from the layers' parameters through the fused op: the one forward of every fused block
    (``FusedBSConvU`` and the blocks that :func:`bsconv_cuda.convert` fuses in other models).

    ``pw``: a bias-free 1x1 ``nn.Conv2d``; ``bn``: an ``nn.BatchNorm2d``, an ``nn.SyncBatchNorm`` or None; ``dw``: a
    depthwise ``nn.Conv2d`` (any padding mode); ``mid_activation``: as in :func:`bsconv_cuda.bsconv_u`. The layers'
    ``forward`` (and so their hooks) is not called on the fused path. An eval-mode BatchNorm is folded into the
    pointwise stage; a BatchNorm that normalizes with batch statistics (training, or ``track_running_stats=False``) runs
    fused through :func:`bsconv_cuda.bsconv_u_batch_norm`, with ``nn.BatchNorm2d``'s semantics (momentum, the cumulative
    average of ``momentum=None``, ``num_batches_tracked``) and, for an ``nn.SyncBatchNorm`` training under
    ``torch.distributed``, statistics over its process group. Where the backend resolves to ``"reference"`` that
    BatchNorm runs as the standard layers; a synchronizing ``nn.SyncBatchNorm`` does so only for
    ``backend="reference"``, since every rank must take the path the others take (``batchnorm.runs_fused``). Non-zero
    padding modes pad ``x`` first (padding commutes with a per-pixel map, so this equals padding the intermediate);
    batch statistics are those of the unpadded image.
    """
    padding = dw.padding
    x_fused = x
    input_padding = (0, 0, 0, 0)  # (top, bottom, left, right) of x_fused that is a padding of x
    if dw.padding_mode != "zeros":
        left, right, top, bottom = dw._reversed_padding_repeated_twice
        x_fused = F.pad(x, (left, right, top, bottom), mode=dw.padding_mode)
        padding, input_padding = 0, (top, bottom, left, right)
    if bn is not None and (bn.training or bn.running_mean is None):
        return _batch_statistics_forward(x, x_fused, padding, input_padding, pw, bn, dw,
                                         _activation_name(mid_activation), backend)
    pw_weight, pw_bias = _pointwise_with_bn_folded(pw, bn)
    return bsconv_u(
        x_fused, pw_weight, dw.weight, dw.bias, dw.stride, padding, dw.dilation,
        pw_bias=pw_bias, mid_activation=mid_activation, backend=backend,
    )


def _batch_statistics_forward(
    x: Tensor, x_fused: Tensor, padding, input_padding: tuple[int, int, int, int], pw: nn.Conv2d,
    bn: nn.BatchNorm2d, dw: nn.Conv2d, activation: str, backend: str,
) -> Tensor:
    """The block with a BatchNorm that normalizes with batch statistics, fused or as the standard layers as
    :func:`~bsconv_cuda.batchnorm.runs_fused` decides. An unbatched (C, H, W) input is a batch of one, on both paths
    (``nn.BatchNorm2d`` alone rejects it)."""
    unbatched = x.dim() == 3
    if unbatched:
        x, x_fused = x.unsqueeze(0), x_fused.unsqueeze(0)
    # One resolution for both paths, so an explicit backend that cannot run this call raises here, in training as
    # in eval (select_backend's error); auto resolves to the reference wherever its measured pick cannot run.
    call = prepare_call(x_fused, pw.weight, dw.weight, dw.bias, dw.stride, padding, dw.dilation, None, activation,
                        backend)
    group = _sync_group(bn)
    if not runs_fused(call, backend, group):
        y = dw(reference.activate(_normalize(bn, pw(x)), activation))
    else:
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:  # as _BatchNorm.forward
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # the cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        tracking = bn.training and bn.track_running_stats
        y = batch_norm_call(
            call, bn.running_mean if tracking else None, bn.running_var if tracking else None, bn.weight, bn.bias,
            momentum, bn.eps, group, input_padding,
        )
    return y.squeeze(0) if unbatched else y


def _normalize(bn: nn.BatchNorm2d, mid: Tensor) -> Tensor:
    """``bn``'s normalization alone, as the fused path computes it: the forward of nn.BatchNorm2d (or
    nn.SyncBatchNorm), not a subclass's, which may do more (timm's BatchNormAct2d applies its activation there; here
    that is ``mid_activation``)."""
    normalization = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d
    return normalization.forward(bn, mid)


def _sync_group(bn: nn.BatchNorm2d):
    """The process group an ``nn.SyncBatchNorm`` synchronizes over now, as its own forward decides; else None."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return synchronized_group(bn.process_group or torch.distributed.group.WORLD)


def _activation_name(mid_activation: str | None) -> str:
    return "none" if mid_activation is None else mid_activation


def _pointwise_with_bn_folded(pw: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """An eval-mode BatchNorm folded into the pointwise stage: (pw weight * scale, shift)."""
    if bn is None:
        return pw.weight, None
    return fold_batch_norm(pw.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _bsconvu_mismatch(module: nn.Module) -> str | None:
    """None when ``module`` computes dw(bn(pw(x))) with BSConvU's layers, else what differs."""
    if not isinstance(module, nn.Sequential):
        return f"expected an nn.Sequential of pw, [bn], dw, got {type(module).__name__}"
    names = [name for name, _ in module.named_children()]
    if names not in (["pw", "dw"], ["pw", "bn", "dw"]):
        return f"expected children ['pw', ('bn',) 'dw'], got {names}"
    pw, dw, bn = module.pw, module.dw, getattr(module, "bn", None)
    if type(pw) is not nn.Conv2d or (pw.kernel_size, pw.stride, pw.padding, pw.dilation, pw.groups) != (
        (1, 1), (1, 1), (0, 0), (1, 1), 1
    ) or pw.bias is not None:
        return "pw must be a bias-free 1x1 nn.Conv2d with stride 1, no padding and groups 1"
    if type(dw) is not nn.Conv2d or not (dw.groups == dw.in_channels == dw.out_channels == pw.out_channels):
        return "dw must be a depthwise nn.Conv2d over pw's output channels"
    if bn is not None and type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"bn must be an nn.BatchNorm2d or nn.SyncBatchNorm, got {type(bn).__name__}"
    return None
