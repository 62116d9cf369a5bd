"""Python side of the compiled ``cuda`` backend (``bsconv_cuda._C``, built from ``csrc/``).

Importing ``bsconv_cuda._C`` registers ``bsconv_cuda::cuda_forward`` / ``bsconv_cuda::cuda_backward`` (schema and
CUDA kernels in C++, torch stable ABI); :mod:`bsconv_cuda.ops` adds their fake implementations. This module says
which calls the kernels support (:func:`unsupported_reason`, restating ``supported_reason`` of
``csrc/bsconv_kernels.cu``, which ``_C.unsupported_reason`` exports), the work they launch (:func:`work_plan`, a model
of their tile plan, which ``_C.tile_plan`` exports, including the backward's path: fused or split) and what was
built (:func:`build_summary`, for ``python -m bsconv_cuda.info``). :func:`force_backward_path` runs the backward on one
path (tests, ``python -m bsconv_cuda.bench --cuda-backward``). The tests compare both restatements with the exports
wherever ``_C`` loads.

What the kernels support: CUDA tensors in float32, float16 or bfloat16 on compute capability >= 8.0 (an
architecture the build includes, or PTX that the driver can JIT); depthwise kernels of any kh, kw in 1..7 (1x1, 3x3,
5x5, 7x7 have compile-time specialised paths); any stride / padding / dilation whose dilated kernel footprint
((kh-1)*dh+1) * ((kw-1)*dw+1) is at most MAX_TILE_PIXELS = 384 pixels (stride and dilation <= 64, padding <= 4096).
Everything else goes to Triton / the reference. fp32 runs on TF32 tensor cores when torch allows TF32 for fp32 convolutions
(:func:`bsconv_cuda.backends.fp32_uses_tf32`, passed by :mod:`bsconv_cuda.ops`), else in full fp32 FMA; fp16 / bf16
use tensor cores; all with fp32 accumulation. NCHW inputs are copied to channels_last for the kernels and the
result copied back.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from typing import Sequence

import torch

from . import reference
from .plan import (BLOCKS_PER_SM, DEPTHWISE_COST, FWD_MAX_DOT_RATIO, L2_RESIDENT_BYTES, TARGET_SMS, Launch, Plan,
                   dram_bytes, halo_extent, halo_read_factor, prefer_fused_backward)

# The limits of the CUDA kernels. Their home is csrc/bsconv_params.h; the compiled module exports them
# (``_C.MAX_TILE_PIXELS``, ...) and tests/test_cuda_extension.py checks these copies against that export wherever it
# loads. Python keeps copies because :func:`unsupported_reason` runs while torch.compile traces the call (dynamo cannot
# trace into the compiled module, nor hand it symbolic sizes) and :func:`work_plan` runs where the module cannot load
# (torch < 2.10, no CUDA). The kernel-size limit is functional.MAX_FUSED_KERNEL_SIZE, checked before this module is
# asked (the same 7 as kMaxKernelSize, also checked by that test).
MAX_TILE_PIXELS = 384  # input pixels (output tile + halo) one forward block keeps in shared memory (kMaxTilePixels)
MAX_STRIDE_OR_DILATION = 64
MAX_PADDING = 4096
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y / gridDim.z: batch, tiles per image, input-channel blocks
MAX_SPATIAL_SIZE = 1 << 24  # H, W, H_out, W_out
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_MAX_CIN = 128  # input channels the fused backward keeps on chip per tile (kFusedMaxCin)
FUSED_MAX_SMEM_BYTES = 99 * 1024  # shared memory of a fused block on every targeted GPU (sm_86 / sm_89's opt-in)

# The backward's paths (csrc/bsconv_kernels.cu): "fused" (bwd_fused_kernel, nothing of mid's size written) or
# "split" (bwd_tile_kernel writes grad_pre, two GEMMs read it); "auto" lets the kernels' traffic model choose.
BACKWARD_PATHS = ("auto", "fused", "split")
_forced_backward_path = "auto"


@contextlib.contextmanager
def force_backward_path(path: str):
    """Runs the CUDA backward on ``path`` (one of :data:`BACKWARD_PATHS`) inside the block, so that tests and
    benchmarks can run both paths on one shape. The fused path takes at most :data:`FUSED_MAX_CIN` input channels (the
    op raises for wider layers)."""
    global _forced_backward_path
    if path not in BACKWARD_PATHS:
        raise ValueError(f"force_backward_path: path must be one of {BACKWARD_PATHS}, got {path!r}")
    saved, _forced_backward_path = _forced_backward_path, path
    try:
        yield
    finally:
        _forced_backward_path = saved


def forced_backward_path() -> str:
    """The path :func:`force_backward_path` set ("auto" outside it): what :mod:`bsconv_cuda.ops` passes the op."""
    return _forced_backward_path


def _module():
    """The extension module, or None when it is not built / did not load. ``bsconv_cuda.backends`` loads it once at
    import (and reports why not); looking it up in sys.modules keeps this traceable by torch.compile."""
    return sys.modules.get("bsconv_cuda._C")


def compiled_archs() -> list[str]:
    """Architectures in the build, as given to TORCH_CUDA_ARCH_LIST (e.g. ``["8.0", "9.0+PTX"]``); [] if not built."""
    module = _module()
    if module is None:
        return []
    return [a for a in re.split(r"[;\s,]+", getattr(module, "compiled_archs", "")) if a]


def built_torch_version() -> str | None:
    module = _module()
    return None if module is None else getattr(module, "torch_version", None)


def built_cuda_version() -> str | None:
    module = _module()
    if module is None or not hasattr(module, "cuda_version"):
        return None
    v = int(module.cuda_version)
    return f"{v // 1000}.{(v % 1000) // 10}"


def build_summary() -> str:
    """One line for ``info``: what the loaded extension was built for."""
    archs = compiled_archs()
    return (
        f"bsconv_cuda._C loaded (compiled for {';'.join(archs) or 'unknown'}; built with torch "
        f"{built_torch_version() or 'unknown'}, CUDA {built_cuda_version() or 'unknown'}; stable ABI, abi3)"
    )


MIN_TORCH = (2, 10)  # the stable-ABI target of csrc/ (TORCH_TARGET_VERSION in setup.py)


def _installed_label() -> str | None:
    """The local version label of the installed distribution (e.g. ``cu130torch2.10`` for a prebuilt wheel)."""
    try:
        import importlib.metadata

        version = importlib.metadata.version("bsconv-cuda")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. a plain source checkout)
        return None
    return version.split("+", 1)[1] if "+" in version else None


def load_failure_hint(error: BaseException | str | None = None) -> str | None:
    """Why ``bsconv_cuda._C`` cannot load into this torch, in words a user can act on, or None when nothing obvious
    explains it (then the raw error is the message). For ``backends`` to add to its load-failure warning / reason.

    Covers the usual mismatches of a prebuilt wheel: a CPU-only torch, a torch older than the stable-ABI target
    (2.10), and a torch built for another CUDA major version than the wheel (read from the wheel's local version
    label, ``cu<major><minor>torch<min torch>``).
    """
    version = torch.__version__
    tv = tuple(int(v) for v in re.findall(r"\d+", version)[:2])
    fallback = "the Triton and reference backends still work"
    if torch.version.cuda is None:
        return (
            f"torch {version} is a CPU-only build, and the compiled CUDA kernels need a CUDA build of torch >= "
            f"{MIN_TORCH[0]}.{MIN_TORCH[1]}; {fallback}"
        )
    if tv < MIN_TORCH:
        return (
            f"bsconv_cuda._C is built on torch's stable ABI, which starts at torch {MIN_TORCH[0]}.{MIN_TORCH[1]}; "
            f"torch {version} is older (upgrade torch to use the compiled kernels); "
            f"{fallback}"
        )
    label = _installed_label()
    m = re.match(r"cu(\d+?)(\d)(?:\D|$)", label or "")
    if m and torch.version.cuda.split(".")[0] != m.group(1):
        return (
            f"this bsconv-cuda build ({label}) is compiled for CUDA {m.group(1)}.x, but torch {version} is built for "
            f"CUDA {torch.version.cuda}; install the bsconv-cuda wheel for CUDA {torch.version.cuda.split('.')[0]}, or "
            f"build from source; {fallback}"
        )
    text = str(error or "")
    if "undefined symbol" in text and ("aoti_torch" in text or "torch_" in text):
        return (
            f"torch {version} lacks a stable-ABI function this build needs (was it built against a newer torch "
            f"than the one installed?); rebuild from source against this torch; {fallback}"
        )
    return None


def _parse_arch(arch: str) -> tuple[int, int, bool] | None:
    m = re.match(r"^(\d+)\.(\d+)", arch)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), arch.endswith("+PTX")


@torch.compiler.assume_constant_result
def device_capability(device_index: int) -> tuple[int, int]:
    """The GPU's compute capability. Constant per GPU: torch.compile bakes it in instead of tracing the query."""
    return torch.cuda.get_device_capability(device_index)


def arch_reason(device: torch.device | str | int | None = None) -> str | None:
    """None when the build has code that runs on ``device`` (SASS of the same major and a lower-or-equal minor, or
    PTX of a lower-or-equal architecture), else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if isinstance(device, torch.device) and device.index is not None:  # a tensor's device: the traced path
        index = device.index
    else:
        index = torch.cuda._utils._get_device_index(device, optional=True)
    major, minor = device_capability(index)
    if (major, minor) < (8, 0):
        return f"the CUDA kernels need compute capability >= 8.0, this GPU is sm_{major}{minor}"
    archs = compiled_archs()
    if not archs:
        return None  # unknown build contents: let the launch decide
    for arch in archs:
        parsed = _parse_arch(arch)
        if parsed is None:
            continue
        a_major, a_minor, ptx = parsed
        if arch.split("+")[0].endswith("a"):  # arch-specific SASS (e.g. 9.0a) runs on that arch only
            if (a_major, a_minor) == (major, minor):
                return None
        elif a_major == major and a_minor <= minor:  # SASS runs on later minors of the same major
            return None
        if ptx and (a_major, a_minor) <= (major, minor):  # PTX is JIT-compiled for any later GPU
            return None
    return f"bsconv_cuda._C was compiled for {';'.join(archs)}, which has no code for sm_{major}{minor}"


def _fwd_tiles(h_out: int, w_out: int, kh: int, kw: int, stride, dilation):
    """The forward's candidate output tiles (TH, TW, IH, IW, tiles per image): halo within MAX_TILE_PIXELS, tile
    count within the grid; TH ascending, then TW."""
    narrowest_iw = halo_extent(1, 1, kw, dilation[1])
    for th in range(1, h_out + 1):
        ih = halo_extent(th, stride[0], kh, dilation[0])
        if ih * narrowest_iw > MAX_TILE_PIXELS:  # taller tiles only have more rows
            break
        for tw in range(1, w_out + 1):
            iw = halo_extent(tw, stride[1], kw, dilation[1])
            if ih * iw > MAX_TILE_PIXELS:
                break
            tiles = math.ceil(h_out / th) * math.ceil(w_out / tw)
            if tiles <= MAX_GRID_YZ:
                yield th, tw, ih, iw, tiles


# Output channels per forward block, in the model's order of preference (kFwdChannelBlocks in csrc); 16 on tensor
# cores only (bf16 / fp16 / TF32).
FWD_CHANNEL_BLOCKS = (32, 16)


def _fwd_candidates(n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32=False):
    """The forward's candidate blocks, each as (key, (TH, TW, IH, IW, tiles per image, CB), blocks) with the key
    (ratio capped below at FWD_MAX_DOT_RATIO, modeled time, -SMs occupied, MMA multiply-adds, -CB, -TW) that
    choose_fwd_tile of csrc minimizes (its comment gives the model; the constants are :mod:`bsconv_cuda.plan`'s). The
    sums run in floats in the kernel's order, so that ties break alike."""
    fp32 = dtype == torch.float32
    k_chunk = 16 if fp32 else 32
    c_in_padded = float(_round_up(c_in, k_chunk))
    depthwise_cost = float(DEPTHWISE_COST["tc" if not fp32 else "tf32" if tf32 else "fma"])
    pointwise = float(n) * h * w * c_in * c_out
    block_slots = float(TARGET_SMS * BLOCKS_PER_SM)
    for cb in FWD_CHANNEL_BLOCKS:
        if cb == 16 and fp32 and not tf32:
            continue
        blocks_per_tile = float(n) * math.ceil(c_out / cb)
        for th, tw, ih, iw, tiles in _fwd_tiles(h_out, w_out, kh, kw, stride, dilation):
            blocks = blocks_per_tile * tiles
            block_macs = float(_round_up(ih * iw, 16)) * cb * c_in_padded
            macs = blocks * block_macs
            ratio = max(macs / pointwise, FWD_MAX_DOT_RATIO)
            time = (block_macs + depthwise_cost * th * tw * kh * kw * cb) * max(blocks / block_slots, 1.0)
            sms = min(blocks, float(TARGET_SMS))
            yield (ratio, time, -sms, macs, -cb, -tw), (th, tw, ih, iw, tiles, cb), int(blocks)


def _fwd_choice(n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32=False):
    """((TH, TW, IH, IW, tiles per image, CB) of the forward kernel, the most blocks its candidates allow), or
    (None, 0) when no tile fits. The first is choose_fwd_tile of csrc restated; the second, the most blocks any
    candidate launches at the least capped work ratio: what the forward's blocks allow without more MMA work than
    FWD_MAX_DOT_RATIO pointwise stages (or, where no tile stays within it, than the least-work tile)."""
    candidates = list(_fwd_candidates(n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32))
    if not candidates:
        return None, 0
    best = min(candidates, key=lambda candidate: candidate[0])
    return best[1], max(blocks for key, _, blocks in candidates if key[0] == best[0][0])


def _fwd_tile(n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32=False):
    """(TH, TW, IH, IW, tiles per image, CB) of the forward kernel (choose_fwd_tile of csrc restated), or None when
    no tile fits."""
    return _fwd_choice(n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32)[0]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _mid_ld(cb: int) -> int:
    """Leading dimension (floats) of an fp32 tile of cb channels in shared memory (mid_ld in csrc)."""
    return 16 if cb == 16 else cb + 4


# The kernels' constants (csrc/bsconv_kernels.cu): output channels per block of the split backward's tile kernel
# (CB; the forward and the fused backward also run 16: _fwd_candidates, _fused_channel_block), most mid pixels per
# backward tile block (kBwdPix), the GEMM block's rows (GBM; its columns: _gemm_block_n), input channels per
# shared-memory chunk (KC) and the GEMM's K step (BK): 32 for fp16 / bf16, 16 for fp32 (TF32 or FMA).
_CB = 32
_BWD_PIX = 256
_GEMM_BLOCK_M = 64
_MAX_TAPS = 7 * 7  # kMaxKernelSize squared: room the tile plans and the run-time kernel-size variant keep for taps


def _gemm_block_n(columns: int) -> int:
    """Columns of a backward GEMM's blocks (gemm_block_n in csrc): 32 up to 32 columns, else 64."""
    return 32 if columns <= 32 else 64


def _grad_x_transposed(m: int, c_in: int) -> bool:
    """Whether the grad_x GEMM runs transposed, with the input channels as its rows and the m pixels as its columns
    (grad_x_transposed in csrc): where that pads strictly less, which only m <= 32 can."""

    def padded(rows, columns):
        return _round_up(rows, _GEMM_BLOCK_M) * _round_up(columns, _gemm_block_n(columns))
    return padded(c_in, m) < padded(m, c_in)


def _bwd_tile(h: int, w: int) -> tuple[int, int, int]:
    """(TH, TW, tiles per image) of the backward tile block (choose_bwd_tile in csrc): W cut into equal parts of at
    most 32 columns, H into equal parts of at most 256 / TW rows."""
    tw = math.ceil(w / math.ceil(w / 32))
    th = math.ceil(h / math.ceil(h / (_BWD_PIX // tw)))
    return th, tw, math.ceil(h / th) * math.ceil(w / tw)


def _fused_channel_block(c_out: int) -> int:
    """Output channels per round of the fused backward (fused_channel_block in csrc): 16 where that pads C_out less
    than 32 (16 -> 16, 24 -> 144), else 32."""
    return 16 if _round_up(c_out, 16) < _round_up(c_out, _CB) else _CB


def _fused_tiles(n: int, c_in: int, c_out: int, h: int, w: int, taps: int, itemsize: int):
    """(rows, C_in padded, C_out padded, tiles, blocks, slot_in_smem, CB) of the fused backward (choose_fused_tiles
    in csrc): rounds of CB output channels (_fused_channel_block), tiles of the largest of 64, 32, 16 pixels that
    still gives every SM one and fits FUSED_MAX_SMEM_BYTES, the grad_pw_weight slot in shared memory too where it
    fits beside them, and as many persistent blocks as one wave holds and the partials' L2 budget allows. None where
    C_in > FUSED_MAX_CIN. itemsize: bytes of the dtype's element."""
    if c_in > FUSED_MAX_CIN:
        return None
    m = n * h * w
    cb = _fused_channel_block(c_out)
    c_in_padded, c_out_padded = _round_up(c_in, 16), _round_up(c_out, cb)
    rows = next((r for r in (64, 32) if math.ceil(m / r) >= TARGET_SMS
                 and _fused_smem_bytes(c_in_padded, r, itemsize, cb=cb) <= FUSED_MAX_SMEM_BYTES), 16)
    smem_with_slot = _fused_smem_bytes(c_in_padded, rows, itemsize, cb=cb, c_out_slot=c_out_padded)
    slot_in_smem = smem_with_slot <= FUSED_MAX_SMEM_BYTES
    tiles = math.ceil(m / rows)
    slot = _fused_weight_slot_bytes(c_in_padded, c_out_padded) + _fused_channel_slot_bytes(c_out, taps)
    blocks = max(1, min(TARGET_SMS * BLOCKS_PER_SM, L2_RESIDENT_BYTES // slot, tiles))
    return rows, c_in_padded, c_out_padded, tiles, blocks, slot_in_smem, cb


def _fused_smem_bytes(c_in_padded: int, rows: int, itemsize: int, *, cb: int = _CB, c_out_slot: int = 0,
                      taps: int = _MAX_TAPS) -> int:
    """Shared memory of a fused backward block of cb output channels per round (FusedSmem in csrc: x and W tiles,
    grad_pre, pre, the grad_x accumulator, 256 threads' sums, pixel coordinates, taps and bias, and c_out_slot rows of
    the grad_pw_weight slot; arrays on 128-byte boundaries). The tile plan sizes it for 7 x 7 taps; a launch has
    room for its kernel's (_kernel_taps)."""
    pad = 4 if itemsize == 4 else 8
    ld_x, ld_gp, ld_gx = c_in_padded + pad, cb + pad, c_in_padded + 4
    arrays = (rows * ld_x * itemsize, cb * ld_x * itemsize, rows * ld_gp * itemsize, rows * _mid_ld(cb) * 4,
              rows * ld_gx * 4)
    thread_sums, pixels, tap_weights = 256 * 4, 3 * rows * 4, (taps + 1) * cb * 4
    return (sum(_round_up(a, 128) for a in arrays) + thread_sums + _round_up(pixels, 128)
            + _round_up(tap_weights, 128) + c_out_slot * ld_gx * 4)


def _region0_bytes(region_rows: int, itemsize: int, cb: int) -> int:
    """Shared memory of the pointwise stage of a forward or backward tile block (region0_bytes in csrc): the x and W
    chunks of the GEMM, reused for the fp32 result, whichever is larger, on a 128-byte boundary."""
    kc, pad = (16, 4) if itemsize == 4 else (32, 8)
    gemm = (region_rows + cb) * (kc + pad) * itemsize
    return _round_up(max(gemm, region_rows * _mid_ld(cb) * 4), 128)


def _fwd_smem_bytes(region_rows: int, itemsize: int, cb: int, taps: int) -> int:
    """Dynamic shared memory of a forward block (fwd_smem_bytes in csrc): the pointwise stage, then the depthwise
    taps, pw_bias and dw_bias of its channels."""
    return _region0_bytes(region_rows, itemsize, cb) + (taps + 2) * cb * 4


def _bwd_tile_smem_bytes(itemsize: int, taps: int) -> int:
    """Dynamic shared memory of a split-path backward tile block (bwd_smem_bytes in csrc)."""
    return _region0_bytes(_BWD_PIX, itemsize, _CB) + (taps + 1) * _CB * 4


def _kernel_taps(kh: int, kw: int) -> int:
    """Taps a kernel instance has room for: its compile-time size's (BSCONV_DISPATCH_K in csrc: a square 1, 3, 5 or
    7), else 7 x 7 (the run-time size variant, K = 0)."""
    return _kernel_size_arg(kh, kw) ** 2 or _MAX_TAPS


def _kernel_size_arg(kh: int, kw: int) -> int:
    """The kernels' kernel-size template argument (BSCONV_DISPATCH_K): a square 1, 3, 5 or 7, else 0."""
    return kh if kh == kw and kh in (1, 3, 5, 7) else 0


def _math_type(dtype: torch.dtype, tf32: bool) -> str:
    """The kernels' math-type template argument, named as benchmarks/kernel_report names the compiled instances."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "Tf32" if tf32 else "float")


def _fused_weight_slot_bytes(c_in_padded: int, c_out_padded: int) -> int:
    """One fused block's fp32 grad_pw_weight partials."""
    return 4 * c_out_padded * c_in_padded


def _fused_channel_slot_bytes(c_out: int, taps: int) -> int:
    """One fused block's fp32 grad_dw_weight and grad_pw_bias partials."""
    return 4 * c_out * (taps + 1)


def work_plan(n, c_in, c_out, h, w, h_out, w_out, kernel_size, stride, padding, dilation, dtype, tf32=False,
              backward_path="auto"):
    """The forward and backward :class:`bsconv_cuda.plan.Plan` of the CUDA kernels for one call (grids and the
    multiply-adds of their MMA / FMA loops, from the tile plan of ``csrc/bsconv_kernels.cu``). padding: (top,
    bottom, left, right); dtype: a torch dtype; tf32: float32 on TF32 tensor cores; backward_path: one of
    :data:`BACKWARD_PATHS`. Pure arithmetic: needs neither the extension nor a GPU."""
    kh, kw = kernel_size
    itemsize = torch.empty((), dtype=dtype).element_size()
    kc = 16 if dtype == torch.float32 else 32  # KC and the GEMM's BK
    conv = (n, c_in, c_out, h, w, h_out, w_out, kh, kw, stride, dilation, dtype, tf32)
    (th, tw, ih, iw, tiles, fwd_cb), finest = _fwd_choice(*conv)
    fwd_n_cb = math.ceil(c_out / fwd_cb)
    halo = halo_read_factor(h, w, h_out, w_out, (th, tw), stride, (padding[0], padding[2]), (ih, iw))
    halo_bytes = round((halo - 1) * n * h * w * c_in * itemsize)
    # the compiled instances' template arguments (kernel_report's names): math type, kernel size, channel block
    mt, ks, taps = _math_type(dtype, tf32), _kernel_size_arg(kh, kw), _kernel_taps(kh, kw)
    region_rows = _round_up(ih * iw, 16)
    fwd = Plan(path="cuda", blocks=dict(TH=th, TW=tw, region_rows=region_rows, CB=fwd_cb, KC=kc),
               launches=(Launch("fwd_kernel", (fwd_n_cb, tiles, n),
                                n * tiles * fwd_n_cb * region_rows * fwd_cb * _round_up(c_in, kc), finest=finest,
                                image=f"fwd_kernel<{mt}, {ks}, {fwd_cb}>",
                                smem_bytes=_fwd_smem_bytes(region_rows, itemsize, fwd_cb, taps)),),
               params={}, extra_traffic_bytes=halo_bytes, extra_hbm_bytes=halo_bytes)
    n_cb = math.ceil(c_out / _CB)

    # bwd_geom in csrc
    bth, btw, b_tiles = _bwd_tile(h, w)
    m = n * h * w
    block_n = _gemm_block_n(c_in)
    mn_tiles = math.ceil(c_out / _GEMM_BLOCK_M) * math.ceil(c_in / block_n)
    splits = max(1, min(math.ceil(512 / mn_tiles), math.ceil(m / 256)))
    kchunk = _round_up(math.ceil(m / splits), kc)
    splits = math.ceil(m / kchunk)
    m_out = n * h_out * w_out
    col_rows = max(math.ceil(m_out / 32768), 1024)
    col_blocks = math.ceil(m_out / col_rows)
    element = _math_type(dtype, tf32=False)  # the column sums' template argument: the element type
    colsum = Launch("colsum_kernel", (math.ceil(c_out / 32), col_blocks), 0, image=f"colsum_kernel<{element}>")
    col_bytes = 4 * col_blocks * c_out
    if backward_path not in BACKWARD_PATHS:
        raise ValueError(f"backward_path must be one of {BACKWARD_PATHS}, got {backward_path!r}")
    fused_tiles = _fused_tiles(n, c_in, c_out, h, w, kh * kw, itemsize)
    if backward_path == "fused" and fused_tiles is None:
        raise ValueError(f"the fused backward takes at most {FUSED_MAX_CIN} input channels, got {c_in}")

    gw_k = (splits - 1) * kchunk + _round_up(m - (splits - 1) * kchunk, kc)  # each split's K loop, padded to BK
    gx_transposed = _grad_x_transposed(m, c_in)
    gx_rows, gx_columns = (c_in, m) if gx_transposed else (m, c_in)
    gx_block_n = _gemm_block_n(gx_columns)
    gx_grid = math.ceil(gx_rows / _GEMM_BLOCK_M), math.ceil(gx_columns / gx_block_n)
    gpre = m * c_out * itemsize
    split_partials = 4 * (n * b_tiles * c_out * (kh * kw + 1) + splits * c_out * c_in)
    split = Plan(path="split", blocks=dict(TW=btw, TH=bth, CB=_CB, KC=kc, GEMM_N=block_n,
                                           grad_x_transposed=gx_transposed),
                 launches=(Launch("bwd_tile_kernel", (n_cb, b_tiles, n),
                                  n * b_tiles * n_cb * _round_up(bth * btw, 16) * _CB * _round_up(c_in, kc),
                                  image=f"bwd_tile_kernel<{mt}, {ks}>",
                                  smem_bytes=_bwd_tile_smem_bytes(itemsize, taps)),
                           Launch("gemm_kernel<grad_x>", gx_grid,
                                  math.prod(gx_grid) * _GEMM_BLOCK_M * gx_block_n * _round_up(c_out, kc),
                                  image=f"gemm_kernel<{mt}, false, {gx_block_n}, {str(gx_transposed).lower()}>"),
                           Launch("gemm_kernel<grad_pw>", (math.ceil(c_out / _GEMM_BLOCK_M), math.ceil(c_in / block_n),
                                                           splits),
                                  mn_tiles * _GEMM_BLOCK_M * block_n * gw_k,
                                  image=f"gemm_kernel<{mt}, true, {block_n}, false>"),
                           colsum),
                 params=dict(splits=splits, kchunk=kchunk),
                 # gpre written, read by both GEMMs; x read again by the grad_pw GEMM; partials written once and
                 # read by the reductions
                 extra_traffic_bytes=3 * gpre + m * c_in * itemsize + 2 * (split_partials + col_bytes),
                 extra_hbm_bytes=(dram_bytes(gpre, 3) + dram_bytes(m * c_in * itemsize, 1)
                                  + dram_bytes(split_partials + col_bytes, 2)),
                 partial_bytes=split_partials + col_bytes,
                 scratch_bytes=gpre)
    if fused_tiles is None or backward_path == "split":
        return fwd, split
    rows, c_in_padded, c_out_padded, f_tiles, blocks, slot_in_smem, f_cb = fused_tiles
    weight_slot = _fused_weight_slot_bytes(c_in_padded, c_out_padded)
    channel_slot = _fused_channel_slot_bytes(c_out, kh * kw)
    slot = weight_slot + channel_slot
    fused = Plan(path="fused", blocks=dict(rows=rows, CB=f_cb, c_in_padded=c_in_padded, slot_in_smem=slot_in_smem),
                 # per (tile, round of f_cb output channels): the recompute, grad_x's and grad_pw's MMAs
                 launches=(Launch("bwd_fused_kernel", (blocks,), 3 * f_tiles * rows * c_out_padded * c_in_padded,
                                  finest=math.ceil(m / 16), image=f"bwd_fused_kernel<{mt}, {ks}, {f_cb}>",
                                  smem_bytes=_fused_smem_bytes(c_in_padded, rows, itemsize, cb=f_cb, taps=taps,
                                                               c_out_slot=c_out_padded if slot_in_smem else 0)),
                           colsum),
                 params=dict(tiles=f_tiles, blocks=blocks),
                 # fused_partial_traffic in csrc: a slot in global memory is stored by a block's first tile, read
                 # and stored again by each later one and read once by the reduction; one in shared memory is
                 # stored once per block and read by the reduction (neither path counts its operands staged again
                 # from L2: W per tile, the GEMMs' operands per block row or column)
                 extra_traffic_bytes=(2 * (blocks if slot_in_smem else f_tiles) * weight_slot
                                      + 2 * f_tiles * channel_slot + 2 * col_bytes),
                 extra_hbm_bytes=dram_bytes(blocks * slot + col_bytes, 2),
                 partial_bytes=blocks * slot + col_bytes)
    if backward_path == "fused":
        return fwd, fused
    # choose_bwd_path in csrc: the same rule as the Triton backward's (bsconv_cuda.kernels.bsconv_u.backward_plan)
    return fwd, fused if prefer_fused_backward(fused, split, blocks, n_cb * n * b_tiles) else split


def unsupported_reason(
    x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> str | None:
    """None when the CUDA kernels support this call, else why not (the caller then uses Triton / the reference).

    ``x`` (N, C_in, H, W); ``kernel_size`` = (kh, kw) up to functional.MAX_FUSED_KERNEL_SIZE; ``stride`` = [sh, sw],
    ``padding`` = [top, bottom, left, right], ``dilation`` = [dh, dw] as in the ops.
    """
    if x.device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got a {x.device.type} tensor"
    if x.dim() != 4:
        return "x must be 4-D"
    reason = shape_reason(*x.shape, kernel_size, stride, padding, dilation, x.dtype)
    return reason if reason is not None else arch_reason(x.device)


def shape_reason(
    n: int, c_in: int, h: int, w: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], dtype: torch.dtype,
) -> str | None:
    """The shape and dtype part of :func:`unsupported_reason`: ``supported_reason`` of ``csrc/bsconv_kernels.cu``
    restated (exported as ``_C.unsupported_reason``; tests/test_cuda_extension.py compares the two on a grid of
    calls). Needs no GPU. C_out does not enter it: the ops accept any C_out >= 1, and C_out = 0 (an empty output)
    never reaches the kernels."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the CUDA kernels support float32, float16 and bfloat16, not {dtype}"
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    stride, padding, dilation = [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]
    h_out, w_out = reference.output_size(h, w, (kh, kw), stride, padding, dilation)
    if min(n, c_in, h, w, h_out, w_out) < 1:
        return "the input or the output is empty"
    if n > MAX_GRID_YZ:
        return f"batch size {n} > {MAX_GRID_YZ}"
    if max(h, w, h_out, w_out) > MAX_SPATIAL_SIZE:
        return "spatial size > 2^24"
    if max(stride) > MAX_STRIDE_OR_DILATION or max(dilation) > MAX_STRIDE_OR_DILATION:
        return f"stride / dilation > {MAX_STRIDE_OR_DILATION}"
    if max(padding) > MAX_PADDING:
        return f"padding > {MAX_PADDING}"
    footprint = halo_extent(1, 1, kh, dilation[0]) * halo_extent(1, 1, kw, dilation[1])  # a 1 x 1 tile's
    if footprint > MAX_TILE_PIXELS:
        return (f"the dilated kernel covers {footprint} pixels, more than the {MAX_TILE_PIXELS} input pixels a "
                f"forward block keeps in shared memory")
    if next(_fwd_tiles(h_out, w_out, kh, kw, stride, dilation), None) is None:
        return f"no forward tile fits in shared memory with at most {MAX_GRID_YZ} tiles per image"
    if _bwd_tile(h, w)[2] > MAX_GRID_YZ:
        return "image too large for the backward tile grid"
    if math.ceil(c_in / _gemm_block_n(c_in)) > MAX_GRID_YZ:
        return "too many input channels for the grad_x GEMM's grid"
    return None
