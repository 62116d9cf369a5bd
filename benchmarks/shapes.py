"""Re-export of the canonical shape table in :mod:`bsconv_cuda.shapes` (one source of truth).

``benchmarks/`` is not part of the installed package, while ``python -m bsconv_cuda.bench`` needs the shapes too, so
the table lives in the package and this module only re-exports it.
"""

from bsconv_cuda.shapes import (
    CIFAR_BATCH,
    IMAGENET_BATCH,
    QUICK_SHAPES,
    SHAPES,
    SHAPES_BY_NAME,
    Shape,
    get_shape,
    select,
)

__all__ = ["CIFAR_BATCH", "IMAGENET_BATCH", "QUICK_SHAPES", "SHAPES", "SHAPES_BY_NAME", "Shape", "get_shape", "select"]
