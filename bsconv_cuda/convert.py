"""``convert``: runs the fusable blocks of a model through the fused kernel, in place, and says what it did.

Two ways of fusing, chosen by the kind of block:

- BSConv-U (``bsconv.pytorch.BSConvU`` or any ``nn.Sequential`` of ``pw``, optional ``bn``, ``dw``): the module is
  replaced by a :class:`~bsconv_cuda.FusedBSConvU` over the same layers (same submodule names, so the same
  state_dict keys).
- Inverted residuals (torchvision's MobileNetV2/V3 ``InvertedResidual``, timm's ``InvertedResidual`` and bsconv's
  ``LinearBottleneck``): their expand half, 1x1 conv -> BatchNorm -> activation -> depthwise conv, runs through
  :func:`~bsconv_cuda.modules.fused_block_forward`; the rest of the block (the depthwise conv's BatchNorm and
  activation, squeeze-excitation, projection, residual) runs as before. The block keeps its submodules, parameter
  objects and state_dict keys: only its class changes, to a subclass of its own class (``FusedInvertedResidual``,
  ...) whose ``forward`` is the block's own with the expand half fused. A model converted this way still loads
  checkpoints of the unconverted model and the other way round, and an optimizer created before ``convert`` keeps
  working.

A block is fused only when the fused path computes exactly what the block does: known block class (exactly, not a
subclass), plain ``nn.Conv2d`` and ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) layers of the expected shape, an
activation the fused kernels have,
and no hooks or per-instance ``forward`` on the modules whose ``forward`` the fused path does not call. The
conditions are checked when ``convert`` runs: hooks registered later on those modules do not run. Everything else is
left as it is, with the reason in the summary.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from . import backends
from .modules import FusedBSConvU, _bsconvu_mismatch, fused_block_forward

logger = logging.getLogger(__name__)


@dataclass
class ConvertSummary:
    """What :func:`convert` did, block by block (module paths as in ``model.named_modules()``; ``""`` is the model)."""

    fused: list[tuple[str, str]] = field(default_factory=list)
    """(path, kind) of every block fused by this call."""
    already_fused: list[tuple[str, str]] = field(default_factory=list)
    """(path, kind) of blocks that were fused before this call (left as they are, backend included)."""
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """(path, kind, reason): blocks of a known kind that are not fused because the fused path would differ."""
    not_applicable: list[tuple[str, str, str]] = field(default_factory=list)
    """(path, kind, reason): blocks of a known kind without the pattern, e.g. MobileNetV2's first block, which has no
    expand conv."""

    def fused_counts(self) -> dict[str, int]:
        """Number of blocks fused by this call, per kind."""
        return dict(Counter(kind for _, kind in self.fused))

    def __str__(self) -> str:
        lines = [f"bsconv_cuda.convert: fused {len(self.fused)} block(s)" + _counts_text(self.fused)]
        if self.already_fused:
            lines.append(f"  already fused before: {len(self.already_fused)}" + _counts_text(self.already_fused))
        if self.not_applicable:
            lines.append(f"  without the pattern: {len(self.not_applicable)}")
            lines += [f"    {_path(path)} ({kind}): {reason}" for path, kind, reason in self.not_applicable]
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)}")
            lines += [f"    {_path(path)} ({kind}): {reason}" for path, kind, reason in self.skipped]
        return "\n".join(lines)


def _counts_text(blocks: list[tuple[str, str]]) -> str:
    counts = Counter(kind for _, kind in blocks)
    return "" if not counts else " (" + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"


def _path(path: str) -> str:
    return path or "<model>"


def convert(model: nn.Module, backend: str = "auto", *, return_summary: bool = False):
    """Fuses every block of ``model`` that the fused kernels compute exactly, in place.

    Recognised blocks: BSConv-U (``bsconv.pytorch.BSConvU`` or an ``nn.Sequential`` of exactly ``pw`` (bias-free
    1x1 Conv2d), optional ``bn`` (BatchNorm2d or SyncBatchNorm) and ``dw`` (depthwise Conv2d)), replaced by a
    FusedBSConvU over the
    same layers; and the expand half of torchvision's MobileNetV2/V3 ``InvertedResidual``, timm's
    ``InvertedResidual`` (MobileNetV2/V3, EfficientNet, MNASNet, ... in timm) and bsconv's ``LinearBottleneck``
    (bsconv's MobileNetV2/V3, plain and BSConv-S), which keep their modules, parameters and state_dict keys.

    Args:
        model: the model (or a single block).
        backend: the backend of the fused blocks: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        return_summary: also return a :class:`ConvertSummary` of what was fused and why other blocks were not.

    Returns:
        The model (a new module when ``model`` itself is BSConvU-shaped), or ``(model, summary)`` with
        ``return_summary=True``. Blocks of a known kind that cannot be fused, or a model in which nothing was fused,
        are reported with a warning; the summary is also logged (logger ``bsconv_cuda.convert``, level INFO).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in backends.BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {backends.BACKEND_CHOICES}, got {backend!r}")
    summary = ConvertSummary()
    model = _convert_module(model, "", backend, summary, _global_hooks_reason())
    logger.info("%s", summary)
    if summary.skipped or not (summary.fused or summary.already_fused):
        warnings.warn(_warning_text(model, summary), stacklevel=2)
    return (model, summary) if return_summary else model


def _warning_text(model: nn.Module, summary: ConvertSummary) -> str:
    if summary.fused or summary.already_fused:
        return str(summary)
    if summary.skipped or summary.not_applicable:
        details = str(summary).split("\n", 1)[1]  # without the "fused 0 block(s)" line
        return f"bsconv_cuda.convert fused nothing in {type(model).__name__}:\n{details}"
    return (
        f"bsconv_cuda.convert fused nothing in {type(model).__name__}: it has no block of a kind convert knows "
        f"({', '.join(kind.name for kind in _KINDS)} and BSConvU)"
    )


def _convert_module(module: nn.Module, path: str, backend: str, summary: ConvertSummary, global_hooks: str | None):
    """``module`` converted (itself when changed in place, a new module for BSConv-U), recursing into children that
    are no block of a known kind."""
    if isinstance(module, FusedBSConvU):
        summary.already_fused.append((path, _BSCONVU))
        return module
    if _is_bsconvu_candidate(module):
        reason = global_hooks or _bsconvu_mismatch(module)
        if reason is None:
            summary.fused.append((path, _BSCONVU))
            return FusedBSConvU.from_bsconvu(module, backend=backend)
        summary.skipped.append((path, _BSCONVU, reason))
        return module
    if isinstance(module, _FusedExpandBlock):
        summary.already_fused.append((path, _kind_of(module._unfused_class).name))
        return module
    kind = _kind_of(type(module))
    if kind is not None:
        _convert_block(module, path, kind, backend, summary, global_hooks)
        return module
    subclassed = _subclassed_kind(module)
    if subclassed is not None:
        kind, block_class = subclassed
        reason = f"{type(module).__qualname__} subclasses {block_class.__qualname__}: its forward may differ"
        summary.skipped.append((path, kind.name, reason))
        return module
    for name, child in module.named_children():
        converted = _convert_module(child, f"{path}.{name}" if path else name, backend, summary, global_hooks)
        if converted is not child:
            setattr(module, name, converted)
    return module


_BSCONVU = "BSConvU"


def _is_bsconvu_candidate(module: nn.Module) -> bool:
    """bsconv's BSConvU, or a Sequential named like one (then a mismatch is worth reporting)."""
    bsconvu = _lookup(("bsconv.pytorch.modules",), "BSConvU")
    if bsconvu and isinstance(module, bsconvu):
        return True
    names = [name for name, _ in module.named_children()]
    return isinstance(module, nn.Sequential) and names in (["pw", "dw"], ["pw", "bn", "dw"])


# --- inverted residuals: the block's class becomes a subclass whose forward fuses the expand half -------------------


@dataclass(frozen=True)
class ExpandHalf:
    """What the fused path needs to know of a block's expand half ``dw(act(bn(pw(x))))``, checked fusable (the
    block's fused forward finds pw, bn and dw by their names)."""

    activation: str | None
    """The fused kernels' name of ``act`` (None: none)."""
    bypassed: tuple[tuple[str, nn.Module], ...]
    """(name, module) of every module whose ``forward`` the fused path does not call (pw, bn, activation, dw and the
    containers around them): none may have hooks or a per-instance forward."""


@dataclass(frozen=True)
class BlockKind:
    """A kind of block whose expand half ``convert`` fuses."""

    name: str
    classes: Callable[[], tuple[type, ...]]
    """The block classes, from the libraries already imported (a model cannot hold a block of one that is not)."""
    expand_half: Callable[[nn.Module], ExpandHalf | tuple[bool, str]]
    """The block's expand half, or (applicable, reason): False for a block without the pattern (no expand conv),
    True for a block with it that the fused path would not compute exactly."""
    forward: Callable[[nn.Module, Tensor], Tensor]
    """The block's forward with the expand half fused (becomes the fused class's ``forward``)."""


def _convert_block(
    block: nn.Module, path: str, kind: BlockKind, backend: str, summary: ConvertSummary, global_hooks: str | None
) -> None:
    half = kind.expand_half(block)
    if not isinstance(half, ExpandHalf):
        applicable, reason = half
        (summary.skipped if applicable else summary.not_applicable).append((path, kind.name, reason))
        return
    # the block's own hooks run as before (its __call__ is unchanged); a per-instance forward would hide the fused one
    own_forward = "the block has a per-instance forward" if "forward" in vars(block) else None
    reason = global_hooks or own_forward or _bypass_reason(half.bypassed)
    if reason is not None:
        summary.skipped.append((path, kind.name, reason))
        return
    block._bsconv_cuda_activation = half.activation
    block._bsconv_cuda_backend = backend
    block.__class__ = _fused_class(type(block))
    summary.fused.append((path, kind.name))


class _FusedExpandBlock:
    """Base of the fused block classes (``Fused<Block>``: this, then the block's own class).

    ``copy.deepcopy``, ``pickle`` and ``torch.save`` of a fused block rebuild the fused class from the block's own
    class, which is importable; the fused class itself is made at run time and has no importable name.
    """

    _unfused_class: type
    _bsconv_cuda_activation: str | None
    _bsconv_cuda_backend: str

    def __reduce_ex__(self, protocol):
        return _new_fused_block, (self._unfused_class,), self.__dict__

    def _fused_expand(self, x: Tensor, pw: nn.Conv2d, bn: nn.BatchNorm2d | None, dw: nn.Conv2d) -> Tensor:
        return fused_block_forward(
            x, pw, bn, dw, mid_activation=self._bsconv_cuda_activation, backend=self._bsconv_cuda_backend
        )


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(block_class: type) -> type:
    fused = _FUSED_CLASSES.get(block_class)
    if fused is None:
        kind = _kind_of(block_class)
        fused = type(
            f"Fused{block_class.__name__}",
            (_FusedExpandBlock, block_class),
            {
                "forward": kind.forward,
                "_unfused_class": block_class,
                "__module__": __name__,
                "__doc__": f"{kind.name} with its expand half run by bsconv_cuda's fused kernel (see convert).",
            },
        )
        _FUSED_CLASSES[block_class] = fused
    return fused


def _new_fused_block(block_class: type) -> nn.Module:
    """An empty instance of the fused class of ``block_class`` (its state is restored by pickle / deepcopy)."""
    if _kind_of(block_class) is None:
        raise TypeError(f"{block_class.__qualname__} is no block kind that bsconv_cuda.convert fuses")
    return object.__new__(_fused_class(block_class))


def _kind_of(block_class: type) -> BlockKind | None:
    for kind in _KINDS:
        if block_class in kind.classes():
            return kind
    return None


def _subclassed_kind(module: nn.Module) -> tuple[BlockKind, type] | None:
    for kind in _KINDS:
        for block_class in kind.classes():
            if isinstance(module, block_class):
                return kind, block_class
    return None


def _lookup(module_names: Iterable[str], attribute: str) -> type | None:
    """``module.attribute`` from the first of ``module_names`` that is imported; None when none is."""
    for name in module_names:
        found = getattr(sys.modules.get(name), attribute, None)
        if found is not None:
            return found
    return None


def _classes(module_names: tuple[str, ...], attribute: str) -> Callable[[], tuple[type, ...]]:
    def classes() -> tuple[type, ...]:
        found = _lookup(module_names, attribute)
        return () if found is None else (found,)

    return classes


# --- exact equivalence checks ----------------------------------------------------------------------------------------


def _activation_names() -> dict[type, str | None]:
    names: dict[type, str | None] = {
        nn.Identity: None, nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu",
    }
    bsconv_hswish = _lookup(("bsconv.pytorch.common",), "HSwish")  # x * relu6(x + 3) / 6: hardswish
    if bsconv_hswish is not None:
        names[bsconv_hswish] = "hardswish"
    return names


def _activation_reason(module: nn.Module | None) -> str | None:
    names = _activation_names()
    if module is None or type(module) in names:
        return None
    supported = ", ".join(sorted(cls.__name__ for cls in names))
    return f"activation {type(module).__name__} is not one the fused kernels have ({supported})"


def _activation_name(module: nn.Module | None) -> str | None:
    """The fused kernels' name of ``module``'s activation (None: identity); ``module`` passed _activation_reason."""
    return None if module is None else _activation_names()[type(module)]


def _pointwise_reason(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"expand conv is a {type(conv).__name__}, not an nn.Conv2d"
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return (f"expand conv is not a plain 1x1 conv (kernel {conv.kernel_size}, stride {conv.stride}, "
                f"groups {conv.groups})")
    if conv.padding not in ((0, 0), "valid", "same"):
        return f"expand conv pads its input (padding {conv.padding})"
    if conv.bias is not None:
        return "expand conv has a bias"
    return None


def _depthwise_reason(conv: nn.Module, channels: int) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"depthwise conv is a {type(conv).__name__}, not an nn.Conv2d" + (
            " (TF-'same' dynamic padding: asymmetric zero padding of the intermediate, which the fused op does not "
            "take)" if "Same" in type(conv).__name__ else ""
        )
    if not conv.groups == conv.in_channels == conv.out_channels == channels:
        return (f"conv after the expand conv is not depthwise over its {channels} channels (in {conv.in_channels}, "
                f"out {conv.out_channels}, groups {conv.groups})")
    return None


# The normalization layers the fused path computes exactly (it reads their parameters and buffers; an
# nn.SyncBatchNorm training under torch.distributed has its statistics all-reduced there too)
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _batchnorm_reason(bn: nn.Module | None, channels: int, bn_classes: tuple[type, ...] = _BATCH_NORMS) -> str | None:
    if bn is None:
        return None
    if type(bn) not in bn_classes:
        return (f"normalization is a {type(bn).__name__}, not one of "
                f"{', '.join(cls.__name__ for cls in bn_classes)}")
    if bn.num_features != channels:
        return f"BatchNorm has {bn.num_features} features for {channels} channels"
    return None


def _bypass_reason(bypassed: Iterable[tuple[str, nn.Module]]) -> str | None:
    """Why the fused path, which calls none of these modules' ``forward``, would differ from calling them."""
    hook_kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    for name, module in bypassed:
        if "forward" in vars(module):
            return f"{name} has a per-instance forward"
        for hook_kind in hook_kinds:
            if getattr(module, hook_kind, None):
                return f"{name} has {hook_kind.strip('_').replace('_', ' ')}, which the fused path would not run"
    return None


def _global_hooks_reason() -> str | None:
    for hook_kind in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                      "_global_backward_hooks"):
        if getattr(torch_module, hook_kind, None):
            return (f"global module hooks are registered ({hook_kind.strip('_')}), which the fused path would not "
                    "run for the layers it replaces")
    return None


def _first_reason(*reasons: str | None) -> str | None:
    return next((reason for reason in reasons if reason is not None), None)


def _half_or_reason(
    pw: nn.Module, bn: nn.Module | None, activation_module: nn.Module | None, dw: nn.Module,
    bypassed: tuple[tuple[str, nn.Module], ...], bn_classes: tuple[type, ...] = _BATCH_NORMS,
) -> ExpandHalf | tuple[bool, str]:
    """The expand half pw -> bn -> activation -> dw, or (True, why the fused path would differ)."""
    channels = getattr(pw, "out_channels", 0)
    reason = _first_reason(_pointwise_reason(pw), _batchnorm_reason(bn, channels, bn_classes),
                           _activation_reason(activation_module), _depthwise_reason(dw, channels))
    if reason is not None:
        return True, reason
    return ExpandHalf(_activation_name(activation_module), bypassed)


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


# --- torchvision: MobileNetV2 / MobileNetV3 InvertedResidual ---------------------------------------------------------


def _conv_norm_activation_parts(
    cna: nn.Module, what: str
) -> tuple[nn.Module, nn.Module | None, nn.Module | None] | str:
    """(conv, bn, activation) of a torchvision Conv2dNormActivation, or why it is not conv [-> BatchNorm] [-> act]."""
    conv_norm_activation = _lookup(("torchvision.ops.misc",), "Conv2dNormActivation")
    if type(cna) is not conv_norm_activation:
        return f"{what} is a {type(cna).__name__}, not a Conv2dNormActivation"
    layers = list(cna)
    conv, rest = layers[0], layers[1:]
    bn = rest.pop(0) if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm) else None
    activation = rest.pop(0) if rest else None
    if rest:
        return f"{what} has more layers than conv, norm and activation"
    return conv, bn, activation


def _torchvision_expand_half(block: nn.Module, layers: nn.Module, layers_name: str) -> ExpandHalf | tuple[bool, str]:
    if type(layers) is not nn.Sequential:
        return True, f"{layers_name} is a {type(layers).__name__}, not an nn.Sequential"
    first_conv = next(iter(layers[0].children()), None) if len(layers) >= 2 else None
    if first_conv is None or getattr(first_conv, "groups", 1) != 1:
        # torchvision builds no expand layer for an expansion ratio of 1: the block starts with the depthwise conv
        return False, "no expand conv (expansion ratio 1)"
    expand = _conv_norm_activation_parts(layers[0], f"{layers_name}[0]")
    depthwise = _conv_norm_activation_parts(layers[1], f"{layers_name}[1]")
    for parts in (expand, depthwise):
        if isinstance(parts, str):
            return True, parts
    pw, bn, activation = expand
    bypassed = (
        (layers_name, layers), (f"{layers_name}[0]", layers[0]), (f"{layers_name}[1]", layers[1]),
        *((f"{layers_name}[0][{i}]", m) for i, m in enumerate(layers[0])), (f"{layers_name}[1][0]", depthwise[0]),
    )
    return _half_or_reason(pw, bn, activation, depthwise[0], bypassed)


def _torchvision_layers_forward(block: _FusedExpandBlock, layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers(x)`` with ``layers[0]`` (expand) and the conv of ``layers[1]`` (depthwise) fused."""
    expand, depthwise = layers[0], layers[1]
    bn = expand[1] if len(expand) > 1 and isinstance(expand[1], nn.modules.batchnorm._BatchNorm) else None
    x = block._fused_expand(x, expand[0], bn, depthwise[0])
    for layer in list(depthwise)[1:] + list(layers)[2:]:
        x = layer(x)
    return x


def _torchvision_v2_forward(self, x: Tensor) -> Tensor:
    # torchvision.models.mobilenetv2.InvertedResidual.forward with self.conv's expand half fused
    y = _torchvision_layers_forward(self, self.conv, x)
    return x + y if self.use_res_connect else y


def _torchvision_v3_forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torchvision's name
    # torchvision.models.mobilenetv3.InvertedResidual.forward with self.block's expand half fused
    result = _torchvision_layers_forward(self, self.block, input)
    if self.use_res_connect:
        result += input
    return result


# --- timm: InvertedResidual (MobileNetV2/V3, EfficientNet, MNASNet, ... in timm) -------------------------------------

_TIMM_BLOCKS = ("timm.models._efficientnet_blocks", "timm.models.efficientnet_blocks")
_TIMM_NORM_ACT = ("timm.layers.norm_act", "timm.models.layers.norm_act")
# The children of the timm InvertedResidual whose forward _timm_forward reproduces (timm >= 0.9; s2d from 1.0)
_TIMM_CHILDREN = {"conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path"}
_TIMM_S2D_CHILDREN = {"conv_s2d", "bn_s2d"}


def _timm_expand_half(block: nn.Module) -> ExpandHalf | tuple[bool, str]:
    children = set(_children(block))
    if children not in (_TIMM_CHILDREN, _TIMM_CHILDREN | _TIMM_S2D_CHILDREN):
        return True, f"unknown layout of timm's InvertedResidual (children {sorted(children)})"
    bn1 = block.bn1
    # timm's BatchNorm + activation in one module (the activation is the fused one), and its SyncBatchNorm form
    batch_norm_acts = tuple(filter(None, (_lookup(_TIMM_NORM_ACT, name) for name in ("BatchNormAct2d",
                                                                                     "SyncBatchNormAct"))))
    if type(bn1) not in batch_norm_acts:
        return True, f"bn1 is a {type(bn1).__name__}, not timm's BatchNormAct2d or SyncBatchNormAct"
    if type(bn1.drop) is not nn.Identity:
        return True, f"bn1 has a drop layer ({type(bn1.drop).__name__}) between BatchNorm and activation"
    bypassed = (("conv_pw", block.conv_pw), ("bn1", bn1), ("bn1.drop", bn1.drop), ("bn1.act", bn1.act),
                ("conv_dw", block.conv_dw))
    return _half_or_reason(block.conv_pw, bn1, bn1.act, block.conv_dw, bypassed, bn_classes=batch_norm_acts)


def _timm_forward(self, x: Tensor) -> Tensor:
    # timm's InvertedResidual.forward with conv_pw -> bn1 -> conv_dw fused (bn1's drop is an Identity, its act is
    # the fused activation)
    shortcut = x
    if getattr(self, "conv_s2d", None) is not None:
        x = self.conv_s2d(x)
        x = self.bn_s2d(x)
    x = self._fused_expand(x, self.conv_pw, self.bn1, self.conv_dw)
    x = self.bn2(x)
    x = self.aa(x)
    x = self.se(x)
    x = self.conv_pwl(x)
    x = self.bn3(x)
    if self.has_skip:
        x = self.drop_path(x) + shortcut
    return x


# --- bsconv: LinearBottleneck (bsconv's MobileNetV2/V3, plain and BSConv-S) ------------------------------------------


def _conv_block_parts(block: nn.Module, what: str) -> tuple[nn.Module, nn.Module | None, nn.Module | None] | str:
    """(conv, bn, activation) of a bsconv ConvBlock, or why it is not one."""
    conv_block = _lookup(("bsconv.pytorch.common",), "ConvBlock")
    if type(block) is not conv_block:
        return f"{what} is a {type(block).__name__}, not bsconv's ConvBlock"
    expected = {"conv"} | ({"bn"} if block.use_bn else set()) | ({"activation"} if block.use_activation else set())
    if set(_children(block)) != expected:
        return f"{what} has children {sorted(_children(block))}, expected {sorted(expected)}"
    return block.conv, block.bn if block.use_bn else None, block.activation if block.use_activation else None


def _bsconv_expand_half(block: nn.Module) -> ExpandHalf | tuple[bool, str]:
    expand = _conv_block_parts(block.conv1, "conv1")
    depthwise = _conv_block_parts(block.conv2, "conv2")
    for parts in (expand, depthwise):
        if isinstance(parts, str):
            return True, parts
    pw, bn, activation = expand
    bypassed = (("conv1", block.conv1), *((f"conv1.{name}", m) for name, m in block.conv1.named_children()),
                ("conv2", block.conv2), ("conv2.conv", block.conv2.conv))
    return _half_or_reason(pw, bn, activation, depthwise[0], bypassed)


def _bsconv_forward(self, x: Tensor) -> Tensor:
    # bsconv.pytorch.mobilenet.LinearBottleneck.forward with conv1 -> conv2.conv fused
    if self.use_res_skip:
        residual = x
    x = self._fused_expand(x, self.conv1.conv, self.conv1.bn if self.conv1.use_bn else None, self.conv2.conv)
    if self.conv2.use_bn:
        x = self.conv2.bn(x)
    if self.conv2.use_activation:
        x = self.conv2.activation(x)
    if self.use_se:
        x = self.se_unit(x)
    x = self.conv3(x)
    if self.use_res_skip:
        x = x + residual
    return x


_KINDS = (
    BlockKind(
        "torchvision MobileNetV2 InvertedResidual", _classes(("torchvision.models.mobilenetv2",), "InvertedResidual"),
        lambda block: _torchvision_expand_half(block, block.conv, "conv"), _torchvision_v2_forward,
    ),
    BlockKind(
        "torchvision MobileNetV3 InvertedResidual", _classes(("torchvision.models.mobilenetv3",), "InvertedResidual"),
        lambda block: _torchvision_expand_half(block, block.block, "block"), _torchvision_v3_forward,
    ),
    BlockKind("timm InvertedResidual", _classes(_TIMM_BLOCKS, "InvertedResidual"), _timm_expand_half, _timm_forward),
    BlockKind(
        "bsconv LinearBottleneck", _classes(("bsconv.pytorch.mobilenet",), "LinearBottleneck"), _bsconv_expand_half,
        _bsconv_forward,
    ),
)
