"""bsconv-cuda: the BSConv-U block (1x1 pointwise conv -> KxK depthwise conv) as one fused GPU kernel.

``import bsconv_cuda`` works without Triton and without the compiled extension; ``python -m bsconv_cuda.info``
says which backends are usable here and why the others are not.
"""

from .backends import available_backends
from .functional import bsconv_u
from .batchnorm import bsconv_u_batch_norm
from .convert import convert
from .modules import FusedBSConvU
from .ops import BSConvUFunction

__version__ = "0.1.0"

__all__ = [
    "BSConvUFunction", "FusedBSConvU", "available_backends", "bsconv_u", "bsconv_u_batch_norm", "convert", "__version__",
]
