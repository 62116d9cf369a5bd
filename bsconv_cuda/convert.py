"""``convert``: swaps the fusable blocks of a model for their fused form, in place."""

from __future__ import annotations

from torch import nn

from .modules import FusedBSConvU, _bsconvu_mismatch


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces every BSConvU-shaped module in ``model`` (in place) by a FusedBSConvU over the same layers.

    BSConvU-shaped: ``bsconv.pytorch.BSConvU`` or any ``nn.Sequential`` of exactly ``pw`` (bias-free 1x1 Conv2d),
    optional ``bn`` (BatchNorm2d or SyncBatchNorm) and ``dw`` (depthwise Conv2d). Returns the model (a new module when ``model``
    itself is BSConvU-shaped).
    """
    if not isinstance(model, FusedBSConvU) and _bsconvu_mismatch(model) is None:
        return FusedBSConvU.from_bsconvu(model, backend=backend)
    for name, child in model.named_children():
        converted = convert(child, backend)
        if converted is not child:
            setattr(model, name, converted)
    return model
