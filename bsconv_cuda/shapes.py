"""The canonical table of BSConv-U layer shapes used by the benchmarks (one source of truth).

``python -m bsconv_cuda.bench`` and the pytest-benchmark suite in ``benchmarks/`` both read it, so the two always
talk about the same layers.

Notation in the comments: ``a->b@HW sS kK`` means C_in=a, C_out=b, input H=W=HW, depthwise stride S (1 when
omitted), depthwise kernel KxK (3 when omitted), padding K//2, dilation 1.

Where the layers come from:

- ``mbv1``: the 13 BSConv-U blocks of ``bsconv.pytorch.get_model("mobilenetv1_w1_bsconvu")`` at 224x224 (the nine
  distinct ones; 512->512@14 occurs five times in the network). No biases: the model puts a BatchNorm after the
  block (``BSConvU(..., bias=False)``), no mid activation.
- ``mbv2``: MobileNetV2 expand(1x1)->ReLU6->depthwise 3x3, the first block of each stage. In an inference graph the
  BatchNorms fold into the 1x1 and depthwise biases, so ``pw_bias`` and ``dw_bias`` are set.
- ``mbv3``: MobileNetV3-large expand->act->depthwise 5x5 blocks (ReLU at 28x28, hardswish deeper), folded biases.
- ``cifar_mbv1``: ``cifar_mobilenetv1_w1_bsconvu`` at 32x32 (its nine distinct blocks), batch 128.
- ``cifar_resnet``: ``cifar_resnet20_bsconvu`` (also 56/110): the 3x3 convs of the three stages, 16@32, 32@16, 64@8.
- ``*_b1``: batch-1 latency variants of a few of the above.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGENET_BATCH = 64
CIFAR_BATCH = 128


@dataclass(frozen=True)
class Shape:
    """One BSConv-U layer call: x (batch, c_in, hw, hw) -> y (batch, c_out, hw_out, hw_out)."""

    name: str
    family: str
    c_in: int
    c_out: int
    hw: int
    batch: int
    stride: int = 1
    k: int = 3
    activation: str = "none"  # mid activation, as in bsconv_cuda.reference.ACTIVATIONS
    pw_bias: bool = False
    dw_bias: bool = False
    quick: bool = False  # part of the small representative set (bench.py defaults, CPU suite, quick GPU set)

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def hw_out(self) -> int:
        from .reference import output_size  # torch is imported only when a benchmark needs the output size

        return output_size(self.hw, self.hw, (self.k, self.k), (self.stride,) * 2, (self.padding,) * 4, (1, 1))[0]

    @property
    def is_latency(self) -> bool:
        return self.batch == 1

    def with_batch(self, batch: int) -> "Shape":
        return dataclasses.replace(self, batch=batch)

    def describe(self) -> str:
        s = f"{self.c_in}->{self.c_out}@{self.hw}"
        if self.stride != 1:
            s += f" s{self.stride}"
        if self.k != 3:
            s += f" k{self.k}"
        if self.activation != "none":
            s += f" {self.activation}"
        return s + f" N={self.batch}"

    def numels(self) -> dict[str, int]:
        """Element counts of every tensor the fused op must touch at least once."""
        n = {
            "x": self.batch * self.c_in * self.hw * self.hw,
            "y": self.batch * self.c_out * self.hw_out * self.hw_out,
            "mid": self.batch * self.c_out * self.hw * self.hw,
            "pw_weight": self.c_out * self.c_in,
            "dw_weight": self.c_out * self.k * self.k,
            "pw_bias": self.c_out if self.pw_bias else 0,
            "dw_bias": self.c_out if self.dw_bias else 0,
        }
        return n

    def byte_floor(self, pass_: str, itemsize: int) -> int:
        """Bytes a perfectly fused kernel must move, each tensor once.

        forward: read x + weights, write y. backward: read x, grad_y, weights; write grad_x and the weight/bias
        gradients (same sizes as the weights). fwdbwd: the sum of both (the backward re-reads x).
        """
        n = self.numels()
        weights = n["pw_weight"] + n["dw_weight"] + n["pw_bias"] + n["dw_bias"]
        fwd = n["x"] + n["y"] + weights
        bwd = n["x"] + n["y"] + n["x"] + 2 * weights
        total = {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[pass_]
        return total * itemsize

    def flops(self, pass_: str) -> int:
        """Useful FLOPs (multiply-add = 2) of the two convolutions; backward counted as 2x forward."""
        n = self.numels()
        fwd = 2 * n["mid"] * self.c_in + 2 * n["y"] * self.k * self.k
        return {"fwd": fwd, "bwd": 2 * fwd, "fwdbwd": 3 * fwd}[pass_]


def _mk(family, c_in, c_out, hw, batch, stride=1, k=3, activation="none", bias=False, quick=False, suffix=""):
    name = f"{family}_{c_in}x{c_out}_{hw}"
    if stride != 1:
        name += f"_s{stride}"
    if k != 3:
        name += f"_k{k}"
    name += suffix
    return Shape(name=name, family=family, c_in=c_in, c_out=c_out, hw=hw, batch=batch, stride=stride, k=k,
                 activation=activation, pw_bias=bias, dw_bias=bias, quick=quick)


def _build() -> list[Shape]:
    B, C = IMAGENET_BATCH, CIFAR_BATCH
    shapes = [
        # MobileNetV1-BSConvU, 224x224
        _mk("mbv1", 32, 64, 112, B, quick=True),
        _mk("mbv1", 64, 128, 112, B, stride=2),
        _mk("mbv1", 128, 128, 56, B, quick=True),
        _mk("mbv1", 128, 256, 56, B, stride=2),
        _mk("mbv1", 256, 256, 28, B),
        _mk("mbv1", 256, 512, 28, B, stride=2),
        _mk("mbv1", 512, 512, 14, B, quick=True),
        _mk("mbv1", 512, 1024, 14, B, stride=2),
        _mk("mbv1", 1024, 1024, 7, B),
        # MobileNetV2 expand -> ReLU6 -> depthwise 3x3 (folded BN biases)
        _mk("mbv2", 16, 96, 112, B, stride=2, activation="relu6", bias=True),
        _mk("mbv2", 24, 144, 56, B, activation="relu6", bias=True, quick=True),
        _mk("mbv2", 32, 192, 28, B, activation="relu6", bias=True),
        _mk("mbv2", 64, 384, 14, B, activation="relu6", bias=True),
        _mk("mbv2", 96, 576, 14, B, activation="relu6", bias=True),
        _mk("mbv2", 160, 960, 7, B, activation="relu6", bias=True),
        # MobileNetV3-large expand -> act -> depthwise 5x5 (folded BN biases)
        _mk("mbv3", 40, 120, 28, B, k=5, activation="relu", bias=True),
        _mk("mbv3", 112, 672, 14, B, stride=2, k=5, activation="hardswish", bias=True, quick=True),
        _mk("mbv3", 160, 960, 7, B, k=5, activation="hardswish", bias=True),
        # CIFAR MobileNetV1-BSConvU, 32x32
        _mk("cifar_mbv1", 32, 64, 32, C),
        _mk("cifar_mbv1", 64, 128, 32, C),
        _mk("cifar_mbv1", 128, 128, 32, C, quick=True),
        _mk("cifar_mbv1", 128, 256, 32, C, stride=2),
        _mk("cifar_mbv1", 256, 256, 16, C),
        _mk("cifar_mbv1", 256, 512, 16, C, stride=2),
        _mk("cifar_mbv1", 512, 512, 8, C),
        _mk("cifar_mbv1", 512, 1024, 8, C, stride=2),
        _mk("cifar_mbv1", 1024, 1024, 4, C),
        # CIFAR ResNet-BSConvU (cifar_resnet20/56/110_bsconvu), 3x3 convs of the three stages
        _mk("cifar_resnet", 16, 16, 32, C, quick=True),
        _mk("cifar_resnet", 32, 32, 16, C),
        _mk("cifar_resnet", 64, 64, 8, C),
        # batch-1 latency
        _mk("mbv1", 32, 64, 112, 1, suffix="_b1", quick=True),
        _mk("mbv1", 512, 512, 14, 1, suffix="_b1"),
        _mk("mbv2", 24, 144, 56, 1, activation="relu6", bias=True, suffix="_b1"),
        _mk("mbv3", 112, 672, 14, 1, stride=2, k=5, activation="hardswish", bias=True, suffix="_b1"),
    ]
    names = [s.name for s in shapes]
    assert len(names) == len(set(names)), "shape names must be unique"
    return shapes


SHAPES: list[Shape] = _build()
SHAPES_BY_NAME: dict[str, Shape] = {s.name: s for s in SHAPES}
QUICK_SHAPES: list[Shape] = [s for s in SHAPES if s.quick]


def get_shape(name: str) -> Shape:
    try:
        return SHAPES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES_BY_NAME)}") from None


def select(spec: str | None) -> list[Shape]:
    """Shapes by a comma-separated spec: names, family names (``mbv2``), ``quick``, ``all`` or ``latency``."""
    if not spec or spec == "quick":
        return list(QUICK_SHAPES)
    out: list[Shape] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            picked = SHAPES
        elif part == "quick":
            picked = QUICK_SHAPES
        elif part == "latency":
            picked = [s for s in SHAPES if s.is_latency]
        elif part in SHAPES_BY_NAME:
            picked = [SHAPES_BY_NAME[part]]
        else:
            picked = [s for s in SHAPES if s.family == part and not s.is_latency]
            if not picked:
                raise KeyError(f"unknown shape or family {part!r}; known: {', '.join(SHAPES_BY_NAME)}")
        out.extend(s for s in picked if s not in out)
    return out
