"""``FusedBSConvU``: a drop-in for ``bsconv.pytorch.BSConvU``, and :func:`fused_block_forward`, the forward that every
fused block runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, reference
from .functional import bsconv_u


class FusedBSConvU(nn.Sequential):
    """BSConv-U (pointwise 1x1 conv, optional BatchNorm, depthwise KxK conv) run as one fused kernel.

    Same constructor, base class (``nn.Sequential``), submodules (``pw``, ``bn``, ``dw``), parameter names and
    state_dict keys as ``bsconv.pytorch.BSConvU``, and the same outputs. The fused path reads the submodules'
    parameters without calling their ``forward``, so hooks registered on ``pw``/``bn``/``dw`` do not run there. The fused path folds an eval-mode BatchNorm into the pointwise
    stage and handles non-zero padding modes by padding ``x`` first (padding commutes with a per-pixel map, so this
    equals padding the intermediate). Training-mode BatchNorm needs the intermediate's batch statistics, so it runs
    the standard layers.
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

    ``pw``: a bias-free 1x1 ``nn.Conv2d``; ``bn``: an ``nn.BatchNorm2d`` or None; ``dw``: a depthwise ``nn.Conv2d``
    (any padding mode); ``mid_activation``: as in :func:`bsconv_cuda.bsconv_u`. The layers' ``forward`` (and so their
    hooks) is not called. An eval-mode BatchNorm is folded into the pointwise stage; non-zero padding modes pad ``x``
    first (padding commutes with a per-pixel map, so this equals padding the intermediate).
    """
    if bn is not None and (bn.training or bn.running_mean is None):
        # the intermediate's batch statistics are needed: the standard layers. BatchNorm2d's own forward, not a
        # subclass's (timm's BatchNormAct2d applies its activation there; here that is mid_activation)
        return dw(reference.activate(nn.BatchNorm2d.forward(bn, pw(x)), _activation_name(mid_activation)))
    pw_weight, pw_bias = _pointwise_with_bn_folded(pw, bn)
    padding = dw.padding
    if dw.padding_mode != "zeros":
        x = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
        padding = 0
    return bsconv_u(
        x, pw_weight, dw.weight, dw.bias, dw.stride, padding, dw.dilation,
        pw_bias=pw_bias, mid_activation=mid_activation, backend=backend,
    )


def _activation_name(mid_activation: str | None) -> str:
    return "none" if mid_activation is None else mid_activation


def _pointwise_with_bn_folded(pw: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """An eval-mode BatchNorm folded into the pointwise stage: (pw weight * scale, shift)."""
    if bn is None:
        return pw.weight, None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    return pw.weight * scale[:, None, None, None], shift


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
    if bn is not None and type(bn) is not nn.BatchNorm2d:
        return f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}"
    return None
