"""Fused BSConv-U (pointwise -> [activation] -> zero-padded depthwise) in Triton, forward and backward.

Launchers :func:`forward` and :func:`backward` follow the backend contract of :mod:`bsconv_cuda.reference` and launch
every kernel through ``torch.library.wrap_triton`` (so ``torch.library.triton_op`` can trace them). They run from a
launch plan (:func:`forward_plan`, :func:`backward_plan`, records of :mod:`bsconv_cuda.plan`), which also counts
the work: the multiply-adds of every ``tl.dot`` (M * N * K, padding included; ``benchmarks/kernel_report.py``
tabulates them per shape and tests/test_kernel_report.py checks them against Triton's interpreter).

Forward, ONE launch (``_fwd_kernel``). A program owns an output tile: image ``n``, ``TH x TW`` output pixels
(``OUT_PIXELS`` rows, padded to a power of two), ``BLOCK_CO`` channels. It computes ``mid`` for the tile's halo
clipped to the image (at most ``MID_H x MID_W`` input pixels, flattened and padded to ``MID_ROWS``, a power of two)
with a ``tl.dot`` chain over ``C_in`` in blocks of ``BLOCK_CI`` (fp32 accumulation), adds ``pw_bias``, applies the
activation and keeps the result on chip; padding rows are never computed (the depthwise stage reads zeros there).
Two depthwise stages, chosen by ``forward(depthwise=...)``: "gather" picks, per tap, the shifted rows of ``mid``
with ``tl.gather`` (cross-lane shuffles; the gather variant of docs/DESIGN.md, section 5); "shifted" stores ``mid``
in a per-program staging slot of global memory (``MID_ROWS x BLOCK_CO`` fp32; ``SHIFTED_SLOTS`` programs loop over
the work items, so the slots stay in L1/L2) and reads each tap back with plain shifted loads. ``mid`` never
makes a round trip through DRAM. The tile is chosen per image (:func:`_fwd_tile`): among the tiles whose dot work
stays within ``FWD_MAX_DOT_RATIO`` pointwise stages, the least modeled time (dot work + weighted depthwise FMAs,
times the waves over two programs per SM).

Backward, the pointwise product recomputed ONCE and consumed by both gradient GEMMs: 3 pointwise stages of dot
work (recompute, grad_x, grad_pw) plus the padding of the blocks. Two paths, chosen by modeled memory traffic:
- fused (``_bwd_fused_kernel`` + ``_reduce_kernel``): a program owns flat tiles of ``MID_PIXELS`` mid pixels
  (strided over the grid), keeps the x tile and the grad_x accumulator of ALL input channels on chip (up to four
  power-of-two chunks ``CHUNK0..CHUNK3`` covering C_in rounded up to 16, ``FUSED_MAX_CIN`` at most) and loops over
  ``BLOCK_CO`` blocks of C_out:
  ``pre = x . P^T + b_p``, ``grad_mid`` through the depthwise transpose (a masked grad_y load per tap),
  ``grad_pre = grad_mid * act'(pre)``, ``grad_x += grad_pre . P`` and the tile's ``grad_pre^T . x`` added into the
  program's own slot of weight partials [C_out, C_in] (with the grad_dw / bias partials). Nothing of mid's size is
  written. The price: every tile reads and writes its program's slot (C_out x C_in fp32) in L2.
- split (``_bwd_gpre_kernel``, ``_bwd_gx_kernel``, ``_bwd_gw_kernel`` + ``_reduce_kernel``): programs own (tile,
  C_out block), compute ``grad_pre`` once and write it (input dtype, mid's size); grad_x = grad_pre . P is a GEMM
  over C_out, and grad_pw = grad_pre^T . x a GEMM over pixels split ``PIXEL_SPLITS`` ways, each split's partial
  written once.
Both reduce partials in a fixed order, so weight gradients are bitwise reproducible; their partials stay within
``PARTIALS_MAX_BYTES`` (24 MiB, under half the 50 MB L2 of an H100 / H200). Gradients nobody asked for
(``output_mask``) are skipped: constexpr flags (:func:`_gradient_flags`) drop their dots, stores and partials, and
the plan drops their launches (a frozen-weight backward runs 2 of the 3 pointwise stages, a biases-only one 1).

The choice, by the numbers (plan models, bf16; traffic beyond the byte floor that goes through L2 or DRAM):
- the fused path keeps C_in x (2 B of x + 4 B of grad_x) per tile pixel on chip: with two programs of 4 warps per
  SM that is 128 channels at MID_PIXELS = 32 (its registers: the kernel report, below); wider layers do not fit,
  and their partial slots (512 x 512 fp32 = 1 MiB per program) would allow only 24 programs;
- where both fit and the fused programs fill the GPU, the traffic decides (L2 and DRAM bytes alike), the split
  path charged ``LAUNCH_L2_BYTES`` (16 MiB) for each of its two extra launches
  (:func:`bsconv_cuda.plan.prefer_fused_backward`, the CUDA backend's rule too): 16->96 @ 112 s2 -> fused at every
  batch; 32->64 @ 112, N = 64: fused +532 MiB (all in L2: 32-pixel tiles, as 64-pixel ones spill at 32 channels) vs
  split +480 MiB (343 MiB of it DRAM: grad_pre is 98 MiB) + 32 -> split, narrowly; 128->128 @ 56, N = 64: fused
  +875 MiB (C_out x C_in x 8 B per 32-pixel tile) vs split +268 MiB + 32 -> split; 96->576 @ 14, N = 64: fused
  +208 MiB vs split +65 MiB + 32 -> split. At batch 1 and 2 the bytes differ by a few MB, so the launches decide
  where the fused programs fill the GPU (32->64 @ 112, 128->128 @ 56, 24->144 @ 56 -> fused); on smaller maps they
  do not (a program per 16-32 pixels), and the split path stays. ``force_blocks(backward=dict(PATH=...))`` runs
  either path. The first GPU run (an H200, BENCHMARKS.md) timed the CUDA backend's two paths, which this rule
  chooses too: at N = 64 and 128 the split path won every layer but 16->16 @ 32's backward, by 1.27x to 7.5x, and the
  rule picked the faster path on 9 of 18 rows (it picks fused on bytes where the fused kernels lose on time). The
  rule is still to be refitted; these kernels' two paths are still to be timed.
Dot work in pointwise stages, before -> after, bf16 channels_last, N = 1 (the issue's examples; every shape of
``bsconv_cuda.shapes`` at batch 1 and 2 is in BENCHMARKS.md): 32->64 @ 112: forward 2.00 -> 2.00, backward 3.00 ->
3.00; 128->128 @ 56: 2.29 -> 2.00, 6.00 -> 3.00; 512->512 @ 14: 2.61 -> 2.29, 23.5 -> 3.18; 1024->1024 @ 7:
5.22 -> 2.61, 44.4 -> 3.92; 1024->1024 @ 4: 4.00 -> 2.00, 136 -> 3.00; 24->144 @ 56: 3.39 -> 2.67, 4.44 -> 4.00.

Registers and spills of every launch: the generated kernel report (``python benchmarks/kernel_report.py``, which
compiles each launch without a GPU for sm_80 / sm_90 with ``tt.divisibility=16`` attrs where Triton's launcher would
specialize; its table is in BENCHMARKS.md). Comments here say which choice spilled, not by how much. NCHW x loads
are single-element gathers with a 64-bit address each (the channel dimension that the dots reduce over is strided),
so NCHW launches use narrower channel blocks (forward BLOCK_CI <= 32, fused chunks <= 64).

Interpreter notes: under ``TRITON_INTERPRET=1`` (CPU tensors) the kernels run through NumPy; float64 works there
(``_dot``: tl.dot in fp64 from triton 3.5 on, summed broadcast products before), which lets ``gradcheck``
exercise the backward. Triton 3.8's interpreter computes bf16 ``tl.dot`` wrongly, so on CPU tensors bf16 operands
are upcast to fp32 before the dot (exact: bf16 products fit in fp32); on a GPU the dot runs natively on bf16 (tensor
cores).
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import reference
from ..backends import fp32_uses_tf32, major_minor
from ..cuda_backend import device_capability
from ..plan import (BLOCKS_PER_SM, DEPTHWISE_COST, FWD_MAX_DOT_RATIO, L2_RESIDENT_BYTES, TARGET_SMS, Launch, Plan,
                    dram_bytes, halo_extent, halo_read_factor, prefer_fused_backward)

# the activations' codes in the kernels, by their names in reference.kernel_activation
_ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "hardswish": 3, "silu": 4, "hardswish_closed_band": 5}


def _act_code(activation: str) -> int:
    """The kernels' ACT for an activation of reference.ACTIVATIONS (hardswish as the installed torch differentiates
    it)."""
    return _ACT_CODES[reference.kernel_activation(activation)]


# Test hook: block sizes forced by :func:`force_blocks` (None: chosen by shape).
_FORCED: dict[str, dict | None] = {"forward": None, "backward": None}
# The keys force_blocks takes, per pass; the backward's split path alone has BLOCK_CI, pixel splits and the GEMMs'
# blocks and options, the fused path alone channel chunks.
_FORWARD_KEYS = frozenset({"TH", "TW", "BLOCK_CO", "BLOCK_CI", "num_warps", "num_stages", "IDX64", "SLOTS"})
_SPLIT_ONLY_KEYS = frozenset({"BLOCK_CI", "PIXEL_SPLITS", "GX_MID_PIXELS", "GX_BLOCK_CI", "GEMM_WARPS", "GEMM_STAGES"})
_BACKWARD_KEYS = frozenset({"PATH", "MID_PIXELS", "BLOCK_CO", "CHUNKS", "TILE_PROGRAMS", "num_warps", "num_stages",
                            "IDX64"}) | _SPLIT_ONLY_KEYS


@contextlib.contextmanager
def force_blocks(forward: dict | None = None, backward: dict | None = None):
    """Forces block sizes (for tests of tiling edges with tiny shapes).

    forward: any of TH, TW (output tile), BLOCK_CO, BLOCK_CI, num_warps, num_stages, IDX64 (64-bit offsets even for
    small tensors), SLOTS (programs of the shifted depthwise stage, each looping over work items).
    backward: PATH ("fused" or "split"), MID_PIXELS (mid pixels per tile), BLOCK_CO, CHUNKS (fused path: four
    channel-chunk widths, 0 = absent), TILE_PROGRAMS (programs striding over the tiles, one slot of partials each),
    BLOCK_CI, PIXEL_SPLITS (of the grad_pw GEMM), GX_MID_PIXELS, GX_BLOCK_CI (the grad_x GEMM's blocks), GEMM_WARPS,
    GEMM_STAGES (split path), num_warps, num_stages, IDX64.
    """
    for name, forced, keys in (("forward", forward, _FORWARD_KEYS), ("backward", backward, _BACKWARD_KEYS)):
        unknown = sorted(set(forced or ()) - keys)
        if unknown:
            raise ValueError(f"force_blocks: {name} takes {sorted(keys)}, got unknown {unknown}")
    saved = dict(_FORCED)
    _FORCED["forward"], _FORCED["backward"] = forward, backward
    try:
        yield
    finally:
        _FORCED.update(saved)


# ----------------------------------------------------------------------------------------------------------------
# Activation and its derivative (torch autograd's formulas: relu'(0) = 0, relu6' = 1 only on (0, 6),
# hardswish' = 0 up to -3, x/3 + 1/2 on (-3, 3), 1 from 3 on (code 5: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above, as
# torch 2.7 has it: reference.HARDSWISH_CLOSED_BAND); silu' = s (1 + x (1 - s)))
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _act(v, ACT: tl.constexpr):
    # Comparisons written so that NaN is false in every one and passes through, as in torch's relu / relu6
    # (tl.maximum(NaN, 0) may return 0 on a GPU).
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3 or ACT == 5:
        v = v * (tl.where(v < -3.0, 0.0, tl.where(v > 3.0, 6.0, v + 3.0)) / 6.0)
    elif ACT == 4:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _act_grad(g, v, ACT: tl.constexpr):
    # torch's threshold_backward / hardtanh_backward / hardswish_backward zero the gradient only where the
    # comparison is true, so at NaN the gradient passes through.
    if ACT == 1:
        g = tl.where(v <= 0.0, 0.0, g)
    elif ACT == 2:
        g = tl.where((v <= 0.0) | (v >= 6.0), 0.0, g)
    elif ACT == 3:
        g = tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, g * (v / 3.0 + 0.5), g))
    elif ACT == 5:
        g = tl.where(v < -3.0, 0.0, tl.where(v <= 3.0, g * (v / 3.0 + 0.5), g))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        g = g * (s * (1.0 + v * (1.0 - s)))
    return g


# tl.dot takes float64 operands from triton 3.5 on; before, float64 products are summed by broadcasting (see _dot)
FLOAT64_DOT = tl.constexpr(major_minor(triton.__version__) >= (3, 5))


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, ACC64: tl.constexpr):
    """acc + a . b, accumulated in acc's dtype. float64 on a triton without a float64 tl.dot: a broadcast product
    summed over K ([M, K, N] values at once; float64 is the checking dtype, run under the interpreter or on a GPU
    for tests only, so its speed does not matter)."""
    if ACC64 and not FLOAT64_DOT:
        return acc + tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _x_tile(x_ptr, x_row, row_ok, ci, C_in, stride_x_c, IDX64: tl.constexpr, X_VEC: tl.constexpr):
    """x[rows, ci] for consecutive channels ci (zeros beyond C_in and in rows with ``row_ok`` False). X_VEC
    (:func:`_vector_width`): the launcher found C_in and every pixel stride divisible by it with contiguous
    channels; both are promised to Triton (the mask in whole vectors), so loads are X_VEC elements wide."""
    ci_x = ci.to(tl.int64) if IDX64 else ci
    offs = tl.multiple_of(x_row[:, None] + ci_x[None, :] * stride_x_c, [X_VEC, X_VEC])
    return tl.load(x_ptr + offs, mask=row_ok[:, None] & (ci // X_VEC < C_in // X_VEC)[None, :], other=0.0)


@triton.jit
def _pointwise(
    x_ptr, x_row, row_ok, pw_ptr, pb_ptr, co, co_ok, C_in, stride_x_c,
    ROWS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, HAS_PB: tl.constexpr, PREC: tl.constexpr,
    ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
):
    """The pointwise stage of the forward and of the split backward: pre[ROWS, BLOCK_CO] = x[rows, :] . P[co, :]^T
    + b_p[co], a tl.dot chain over C_in blocks of BLOCK_CI. ``x_row`` holds each row's pixel offset; rows with
    ``row_ok`` False read zeros. X_VEC: see :func:`_vector_width`."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pre = tl.zeros((ROWS, BLOCK_CO), dtype=acc_dt)
    for ci0 in range(0, C_in, BLOCK_CI):
        ci = ci0 + tl.arange(0, BLOCK_CI)
        ci_ok = ci < C_in
        xt = _x_tile(x_ptr, x_row, row_ok, ci, C_in, stride_x_c, IDX64, X_VEC)
        wt = tl.load(pw_ptr + (co[None, :] * C_in + ci[:, None]), mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        if UPCAST_DOT:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        pre = _dot(xt, wt, pre, PREC, ACC64)
    if HAS_PB:
        pre += tl.load(pb_ptr + co, mask=co_ok, other=0.0).to(acc_dt)[None, :]
    return pre


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
# The pads are not specialized: Triton makes an int argument equal to 1 a constant, and with pad_top = 1 LLVM (Triton
# 3.6) folded the tap row into a 16-bit pair add beside an undefined half, which ptxas then dropped: on an H200 every
# output row of a one-tile fp32 NCHW layer came from the next row. (torch.compile's launcher specializes them all the
# same; there tile_col below is what keeps the PTX clean. tests/test_kernel_report.py,
# test_triton_kernels_of_the_grid_read_no_undefined_register, compiles both ways.)
@triton.jit(do_not_specialize=["pad_top", "pad_left"])
def _fwd_kernel(
    x_ptr, pw_ptr, pb_ptr, dw_ptr, db_ptr, y_ptr, mid_ptr,
    C_in, C_out, H, W, H_out, W_out,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w,
    tiles_w, tiles_per_img, n_co_blk, n_work, pad_top, pad_left,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DILATION_H: tl.constexpr,
    DILATION_W: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, MID_H: tl.constexpr, MID_W: tl.constexpr,
    OUT_PIXELS: tl.constexpr, MID_ROWS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    SHIFTED: tl.constexpr, ACT: tl.constexpr, HAS_PB: tl.constexpr, HAS_DB: tl.constexpr, PREC: tl.constexpr,
    ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    if SHIFTED:
        # fewer programs than work items, each owning one staging slot of mid and looping over items
        mid_slot = mid_ptr + pid * (MID_ROWS * BLOCK_CO)
        for item in range(pid, n_work, tl.num_programs(0)):
            tl.debug_barrier()  # the previous item's reads of the slot are done before it is overwritten
            _fwd_item(item, x_ptr, pw_ptr, pb_ptr, dw_ptr, db_ptr, y_ptr, mid_slot, C_in, C_out, H, W, H_out, W_out,
                      stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w,
                      tiles_w, tiles_per_img, n_co_blk, pad_top, pad_left, KH, KW, STRIDE_H, STRIDE_W, DILATION_H,
                      DILATION_W, TH, TW, MID_H, MID_W, OUT_PIXELS, MID_ROWS, BLOCK_CO, BLOCK_CI, SHIFTED, ACT,
                      HAS_PB, HAS_DB, PREC, ACC64, IDX64, UPCAST_DOT, X_VEC)
    else:
        _fwd_item(pid, x_ptr, pw_ptr, pb_ptr, dw_ptr, db_ptr, y_ptr, mid_ptr, C_in, C_out, H, W, H_out, W_out,
                  stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w,
                  tiles_w, tiles_per_img, n_co_blk, pad_top, pad_left, KH, KW, STRIDE_H, STRIDE_W, DILATION_H,
                  DILATION_W, TH, TW, MID_H, MID_W, OUT_PIXELS, MID_ROWS, BLOCK_CO, BLOCK_CI, SHIFTED, ACT, HAS_PB,
                  HAS_DB, PREC, ACC64, IDX64, UPCAST_DOT, X_VEC)


@triton.jit
def _fwd_item(
    item, x_ptr, pw_ptr, pb_ptr, dw_ptr, db_ptr, y_ptr, mid_slot, C_in, C_out, H, W, H_out, W_out,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w,
    tiles_w, tiles_per_img, n_co_blk, pad_top, pad_left,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DILATION_H: tl.constexpr,
    DILATION_W: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, MID_H: tl.constexpr, MID_W: tl.constexpr,
    OUT_PIXELS: tl.constexpr, MID_ROWS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    SHIFTED: tl.constexpr, ACT: tl.constexpr, HAS_PB: tl.constexpr, HAS_DB: tl.constexpr, PREC: tl.constexpr,
    ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
):
    """One forward work item: output tile x C_out block ``item``. ``mid_slot``: the shifted stage's staging slot."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    co_local = tl.arange(0, BLOCK_CO)
    co_blk = item % n_co_blk  # channel blocks of one tile are neighbours in launch order: they share x in L2
    tile = item // n_co_blk
    n = tile // tiles_per_img
    tile_in_img = tile % tiles_per_img
    oh0 = (tile_in_img // tiles_w) * TH
    ow0 = (tile_in_img % tiles_w) * TW
    co = co_blk * BLOCK_CO + co_local
    co_ok = co < C_out

    # --- pointwise stage over the tile's halo clipped to the image: region_h x region_w input pixels, flattened to
    # mid_row < region_h * region_w (rows up to MID_ROWS are filler). Padding rows are never computed: the
    # depthwise stage masks them.
    h_lo = oh0 * STRIDE_H - pad_top
    w_lo = ow0 * STRIDE_W - pad_left
    ih0 = tl.maximum(h_lo, 0)
    iw0 = tl.maximum(w_lo, 0)
    region_h = tl.maximum(tl.minimum(h_lo + MID_H, H) - ih0, 0)
    region_w = tl.maximum(tl.minimum(w_lo + MID_W, W) - iw0, 0)
    region_w_div = tl.maximum(region_w, 1)
    mid_row = tl.arange(0, MID_ROWS)
    mid_row_ok = mid_row < region_h * region_w
    ih = ih0 + mid_row // region_w_div
    iw = iw0 + mid_row % region_w_div
    if IDX64:
        n = n.to(tl.int64)
        ih = ih.to(tl.int64)
        iw = iw.to(tl.int64)
    x_row = n * stride_x_n + ih * stride_x_h + iw * stride_x_w
    mid = _act(_pointwise(x_ptr, x_row, mid_row_ok, pw_ptr, pb_ptr, co, co_ok, C_in, stride_x_c, MID_ROWS, BLOCK_CO,
                          BLOCK_CI, HAS_PB, PREC, ACC64, IDX64, UPCAST_DOT, X_VEC), ACT)
    if SHIFTED:
        tl.store(mid_slot + (mid_row[:, None] * BLOCK_CO + co_local[None, :]), mid, mask=mid_row_ok[:, None])
        tl.debug_barrier()  # every row is stored before any thread reads its taps

    # --- depthwise stage: per tap, the mid rows under the shifted output pixels (0 in the padding)
    out_pix = tl.arange(0, OUT_PIXELS)
    tile_row = out_pix // TW
    tile_col = out_pix - tile_row * TW  # not out_pix % TW: LLVM packed those into bytes beside undefined ones
    out_pix_ok = out_pix < TH * TW
    out = tl.zeros((OUT_PIXELS, BLOCK_CO), dtype=acc_dt)
    # a runtime loop over taps (not static_range): unrolled, the per-tap weights and indices of all taps were
    # hoisted and spilled for 5x5 / 7x7 on sm_90
    for tap in tl.range(0, KH * KW):
        i = tap // KW
        j = tap % KW
        tap_h = (oh0 + tile_row) * STRIDE_H - pad_top + i * DILATION_H
        tap_w = (ow0 + tile_col) * STRIDE_W - pad_left + j * DILATION_W
        ok = out_pix_ok & (tap_h >= 0) & (tap_h < H) & (tap_w >= 0) & (tap_w < W)
        idx = tl.where(ok, (tap_h - ih0) * region_w + (tap_w - iw0), 0)
        if SHIFTED:
            g = tl.load(mid_slot + (idx[:, None] * BLOCK_CO + co_local[None, :]), mask=ok[:, None], other=0.0)
        else:
            g = tl.where(ok[:, None], tl.gather(mid, tl.broadcast_to(idx[:, None], (OUT_PIXELS, BLOCK_CO)), 0), 0.0)
        wd = tl.load(dw_ptr + co * (KH * KW) + tap, mask=co_ok, other=0.0).to(acc_dt)
        out += g * wd[None, :]
    if HAS_DB:
        out += tl.load(db_ptr + co, mask=co_ok, other=0.0).to(acc_dt)[None, :]

    oh = oh0 + tile_row
    ow = ow0 + tile_col
    y_ok = out_pix_ok & (oh < H_out) & (ow < W_out)
    co_y = co
    if IDX64:
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        co_y = co.to(tl.int64)
    y_off = n * stride_y_n + co_y[None, :] * stride_y_c + (oh * stride_y_h + ow * stride_y_w)[:, None]
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=y_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _mid_tile(tile, HW, W, n_pix, stride_n, stride_h, stride_w, MID_PIXELS: tl.constexpr, IDX64: tl.constexpr):
    """Flat tile ``tile`` of MID_PIXELS mid (= input) pixels over all images: pixel index, mask, (n, h, w), and the
    row offset of a tensor with these pixel strides (x's or grad_x's)."""
    if IDX64:
        tile = tl.cast(tile, tl.int64)  # tl.cast: the interpreter passes loop indices as Python ints
    p = tile * MID_PIXELS + tl.arange(0, MID_PIXELS)
    p_ok = p < n_pix
    n = p // HW
    rr = p % HW
    h = rr // W
    w = rr % W
    return p, p_ok, n, h, w, n * stride_n + h * stride_h + w * stride_w


@triton.jit
def _grad_pre(
    gy_ptr, dw_ptr, cpart_slot, pre, n, h, w, p_ok, co, co_ok, stride_gy_n, stride_gy_c, stride_gy_h, stride_gy_w,
    H_out, W_out, pad_top, pad_left, accumulate,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DILATION_H: tl.constexpr,
    DILATION_W: tl.constexpr, MID_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr, ACT: tl.constexpr, ACC64: tl.constexpr,
    IDX64: tl.constexpr, NEED_GPRE: tl.constexpr, NEED_PB: tl.constexpr, NEED_DW: tl.constexpr,
):
    """grad_pre[MID_PIXELS, BLOCK_CO] of mid pixels (n, h, w) and channels co, from pre (the recomputed
    pre-activation), grad_y and the depthwise weights; adds this tile's grad_dw_weight and grad_pw_bias terms into
    the program's channel partials ``cpart_slot`` [C_out, KH*KW + 2] (initialized instead when ``accumulate`` is
    False). The NEED_ flags (see :func:`_gradient_flags`) drop what no requested gradient uses; without NEED_GPRE the
    result is meaningless."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    TAPS: tl.constexpr = KH * KW
    mid = _act(pre, ACT)
    co_g = co.to(tl.int64) if IDX64 else co
    # depthwise transpose: mid pixel (h, w) feeds output (oh, ow) through tap (i, j) when
    # oh * STRIDE_H + i * DILATION_H - pad_top == h (and the same for w): a masked load per tap, no on-chip shifting
    gmid = tl.zeros((MID_PIXELS, BLOCK_CO), dtype=acc_dt)
    for tap in tl.range(0, TAPS):  # runtime loop: see the forward kernel
        i = tap // KW
        j = tap % KW
        ohn = h + pad_top - i * DILATION_H
        own = w + pad_left - j * DILATION_W
        oh = ohn // STRIDE_H
        ow = own // STRIDE_W
        ok = (p_ok & (ohn >= 0) & (ohn % STRIDE_H == 0) & (oh < H_out) & (own >= 0) & (own % STRIDE_W == 0)
              & (ow < W_out))
        g_row = n * stride_gy_n + oh * stride_gy_h + ow * stride_gy_w
        gyt = tl.load(gy_ptr + (g_row[:, None] + co_g[None, :] * stride_gy_c), mask=ok[:, None] & co_ok[None, :],
                      other=0.0).to(acc_dt)
        if NEED_GPRE:
            wd = tl.load(dw_ptr + co * TAPS + tap, mask=co_ok, other=0.0).to(acc_dt)
            gmid += gyt * wd[None, :]
        if NEED_DW:
            d_ptr = cpart_slot + co * (TAPS + 2) + tap
            prev = tl.load(d_ptr, mask=co_ok & accumulate, other=0.0)
            tl.store(d_ptr, prev + tl.sum(gyt * mid, axis=0), mask=co_ok)
    gpre = _act_grad(gmid, pre, ACT)
    if NEED_PB:
        b_ptr = cpart_slot + co * (TAPS + 2) + TAPS
        prev = tl.load(b_ptr, mask=co_ok & accumulate, other=0.0)
        tl.store(b_ptr, prev + tl.sum(gpre, axis=0), mask=co_ok)
    return gpre


@triton.jit
def _grad_y_sum(gy_ptr, cpart_slot, co, co_ok, first, step, N, H_out, W_out, stride_gy_n, stride_gy_c, stride_gy_h,
                stride_gy_w, TAPS: tl.constexpr, OUT_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr, ACC64: tl.constexpr,
                IDX64: tl.constexpr):
    """grad_dw_bias partial: the sum of grad_y over flat tiles of OUT_PIXELS output pixels first, first + step, ...
    into column TAPS + 1 of the channel partials."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    HWo = tl.cast(H_out, tl.int64) * W_out if IDX64 else H_out * W_out  # tl.cast: H_out may be a constexpr 1
    n_opix = N * HWo
    co_g = co.to(tl.int64) if IDX64 else co
    s = tl.zeros((BLOCK_CO,), dtype=acc_dt)
    for tile in range(first, tl.cdiv(n_opix, OUT_PIXELS), step):
        o = (tl.cast(tile, tl.int64) if IDX64 else tile) * OUT_PIXELS + tl.arange(0, OUT_PIXELS)
        o_ok = o < n_opix
        no = o // HWo
        ro = o % HWo
        g_row = no * stride_gy_n + (ro // W_out) * stride_gy_h + (ro % W_out) * stride_gy_w
        gyt = tl.load(gy_ptr + (g_row[:, None] + co_g[None, :] * stride_gy_c), mask=o_ok[:, None] & co_ok[None, :],
                      other=0.0)
        s += tl.sum(gyt.to(acc_dt), axis=0)
    tl.store(cpart_slot + co * (TAPS + 2) + (TAPS + 1), s, mask=co_ok)


@triton.jit
def _x_chunk(x_ptr, x_row, p_ok, c0, C_in, stride_x_c, CHUNK: tl.constexpr, IDX64: tl.constexpr,
             UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr):
    """x[pixels, c0 : c0 + CHUNK] (zeros beyond C_in and for masked pixels)."""
    xt = _x_tile(x_ptr, x_row, p_ok, c0 + tl.arange(0, CHUNK), C_in, stride_x_c, IDX64, X_VEC)
    return xt.to(tl.float32) if UPCAST_DOT else xt


@triton.jit
def _pre_chunk(pre, xt, pw_ptr, co, co_ok, c0, C_in, CHUNK: tl.constexpr, PREC: tl.constexpr, ACC64: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """pre += x chunk . P[co, c0 : c0 + CHUNK]^T; also returns that weight chunk [BLOCK_CO, CHUNK] for the gradient
    dots."""
    ci = c0 + tl.arange(0, CHUNK)
    wt = tl.load(pw_ptr + (co[:, None] * C_in + ci[None, :]), mask=co_ok[:, None] & (ci < C_in)[None, :], other=0.0)
    if UPCAST_DOT:
        wt = wt.to(tl.float32)
    pre = _dot(xt, tl.trans(wt), pre, PREC, ACC64)
    return pre, wt


@triton.jit
def _wpart_chunk(gpre_in, xt, wpart_slot, co, co_ok, c0, C_in, accumulate, CHUNK: tl.constexpr, PREC: tl.constexpr,
                 ACC64: tl.constexpr):
    """This tile's grad_pw[co, chunk] term grad_pre^T . x added into the program's weight partials ``wpart_slot``."""
    ci = c0 + tl.arange(0, CHUNK)
    w_ptr = wpart_slot + (co[:, None] * C_in + ci[None, :])
    w_ok = co_ok[:, None] & (ci < C_in)[None, :]
    prev = tl.load(w_ptr, mask=w_ok & accumulate, other=0.0)  # the slot's sum so far (acc dtype), 0 on the first tile
    tl.store(w_ptr, _dot(tl.trans(gpre_in), xt, prev, PREC, ACC64), mask=w_ok)


@triton.jit
def _store_gx_chunk(gx_ptr, gx_row, p_ok, gx, c0, C_in, stride_gx_c, CHUNK: tl.constexpr, IDX64: tl.constexpr,
                    X_VEC: tl.constexpr):
    ci = c0 + tl.arange(0, CHUNK)
    ci_x = ci.to(tl.int64) if IDX64 else ci
    offs = tl.multiple_of(gx_row[:, None] + ci_x[None, :] * stride_gx_c, [X_VEC, X_VEC])  # see _x_tile
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=p_ok[:, None] & (ci // X_VEC < C_in // X_VEC)[None, :])


@triton.jit
def _bwd_fused_kernel(
    gy_ptr, x_ptr, pw_ptr, pb_ptr, dw_ptr, gx_ptr, wpart_ptr, cpart_ptr,
    N, C_in, C_out, H, W, H_out, W_out,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_gy_n, stride_gy_c, stride_gy_h, stride_gy_w,
    stride_gx_n, stride_gx_c, stride_gx_h, stride_gx_w,
    pad_top, pad_left, n_tile_programs,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DILATION_H: tl.constexpr,
    DILATION_W: tl.constexpr, MID_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr,
    CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, CHUNK2: tl.constexpr, CHUNK3: tl.constexpr,
    ACT: tl.constexpr, HAS_PB: tl.constexpr, PREC: tl.constexpr, ACC64: tl.constexpr, IDX64: tl.constexpr,
    UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_PW: tl.constexpr, NEED_PB: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_GPRE: tl.constexpr, NEED_MID: tl.constexpr,
):
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    TAPS: tl.constexpr = KH * KW
    tile_program = tl.program_id(0)
    HW = tl.cast(H, tl.int64) * W if IDX64 else H * W  # tl.cast: H may be specialized to a constexpr 1
    n_pix = N * HW
    # this program's slots: grad_pw [C_out, C_in] and grad_dw | grad_pw_bias | grad_dw_bias [C_out, TAPS + 2]
    wpart_slot = wpart_ptr + tile_program * (C_out * C_in)
    cpart_slot = cpart_ptr + tile_program * (C_out * (TAPS + 2))
    # x's channels in up to four chunks (widths CHUNK0 >= CHUNK1 >= CHUNK2 >= CHUNK3, 0 = absent) at offsets 0,
    # CHUNK0, CHUNK0 + CHUNK1, ...
    CHUNK_OFFSET1: tl.constexpr = CHUNK0
    CHUNK_OFFSET2: tl.constexpr = CHUNK0 + CHUNK1
    CHUNK_OFFSET3: tl.constexpr = CHUNK0 + CHUNK1 + CHUNK2
    if NEED_MID:  # without it only grad_dw_bias is wanted: a sum of grad_y alone
        for tile in range(tile_program, tl.cdiv(n_pix, MID_PIXELS), n_tile_programs):
            # The partial slots are read back and rewritten every tile, possibly by other threads than wrote them:
            # order the previous tile's stores before this tile's loads.
            tl.debug_barrier()
            accumulate = tile != tile_program  # later tiles accumulate into the slots, the first one initializes them
            p, p_ok, n, h, w, x_row = _mid_tile(tile, HW, W, n_pix, stride_x_n, stride_x_h, stride_x_w, MID_PIXELS,
                                                IDX64)
            # the x tile stays on chip for all C_out blocks, and so does the grad_x accumulator
            x0 = _x_chunk(x_ptr, x_row, p_ok, 0, C_in, stride_x_c, CHUNK0, IDX64, UPCAST_DOT, X_VEC)
            if NEED_GX:
                gx0 = tl.zeros((MID_PIXELS, CHUNK0), dtype=acc_dt)
            if CHUNK1 > 0:
                x1 = _x_chunk(x_ptr, x_row, p_ok, CHUNK_OFFSET1, C_in, stride_x_c, CHUNK1, IDX64, UPCAST_DOT, X_VEC)
                if NEED_GX:
                    gx1 = tl.zeros((MID_PIXELS, CHUNK1), dtype=acc_dt)
            if CHUNK2 > 0:
                x2 = _x_chunk(x_ptr, x_row, p_ok, CHUNK_OFFSET2, C_in, stride_x_c, CHUNK2, IDX64, UPCAST_DOT, X_VEC)
                if NEED_GX:
                    gx2 = tl.zeros((MID_PIXELS, CHUNK2), dtype=acc_dt)
            if CHUNK3 > 0:
                x3 = _x_chunk(x_ptr, x_row, p_ok, CHUNK_OFFSET3, C_in, stride_x_c, CHUNK3, IDX64, UPCAST_DOT, X_VEC)
                if NEED_GX:
                    gx3 = tl.zeros((MID_PIXELS, CHUNK3), dtype=acc_dt)
            for co0 in range(0, C_out, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                co_ok = co < C_out
                # pre computed once per (tile, C_out block), consumed in place by both gradient dots
                pre = tl.zeros((MID_PIXELS, BLOCK_CO), dtype=acc_dt)
                pre, w0 = _pre_chunk(pre, x0, pw_ptr, co, co_ok, 0, C_in, CHUNK0, PREC, ACC64, UPCAST_DOT)
                if CHUNK1 > 0:
                    pre, w1 = _pre_chunk(pre, x1, pw_ptr, co, co_ok, CHUNK_OFFSET1, C_in, CHUNK1, PREC, ACC64,
                                         UPCAST_DOT)
                if CHUNK2 > 0:
                    pre, w2 = _pre_chunk(pre, x2, pw_ptr, co, co_ok, CHUNK_OFFSET2, C_in, CHUNK2, PREC, ACC64,
                                         UPCAST_DOT)
                if CHUNK3 > 0:
                    pre, w3 = _pre_chunk(pre, x3, pw_ptr, co, co_ok, CHUNK_OFFSET3, C_in, CHUNK3, PREC, ACC64,
                                         UPCAST_DOT)
                if HAS_PB:
                    pre += tl.load(pb_ptr + co, mask=co_ok, other=0.0).to(acc_dt)[None, :]
                gpre = _grad_pre(gy_ptr, dw_ptr, cpart_slot, pre, n, h, w, p_ok, co, co_ok, stride_gy_n, stride_gy_c,
                                 stride_gy_h, stride_gy_w, H_out, W_out, pad_top, pad_left, accumulate, KH, KW,
                                 STRIDE_H, STRIDE_W, DILATION_H, DILATION_W, MID_PIXELS, BLOCK_CO, ACT, ACC64, IDX64,
                                 NEED_GPRE, NEED_PB, NEED_DW)
                gpre_in = gpre.to(x0.dtype)
                if NEED_GX:  # grad_x chunk += grad_pre . P[co, chunk]
                    gx0 = _dot(gpre_in, w0, gx0, PREC, ACC64)
                    if CHUNK1 > 0:
                        gx1 = _dot(gpre_in, w1, gx1, PREC, ACC64)
                    if CHUNK2 > 0:
                        gx2 = _dot(gpre_in, w2, gx2, PREC, ACC64)
                    if CHUNK3 > 0:
                        gx3 = _dot(gpre_in, w3, gx3, PREC, ACC64)
                if NEED_PW:
                    _wpart_chunk(gpre_in, x0, wpart_slot, co, co_ok, 0, C_in, accumulate, CHUNK0, PREC, ACC64)
                    if CHUNK1 > 0:
                        _wpart_chunk(gpre_in, x1, wpart_slot, co, co_ok, CHUNK_OFFSET1, C_in, accumulate, CHUNK1,
                                     PREC, ACC64)
                    if CHUNK2 > 0:
                        _wpart_chunk(gpre_in, x2, wpart_slot, co, co_ok, CHUNK_OFFSET2, C_in, accumulate, CHUNK2,
                                     PREC, ACC64)
                    if CHUNK3 > 0:
                        _wpart_chunk(gpre_in, x3, wpart_slot, co, co_ok, CHUNK_OFFSET3, C_in, accumulate, CHUNK3,
                                     PREC, ACC64)
            if NEED_GX:
                gx_row = n * stride_gx_n + h * stride_gx_h + w * stride_gx_w
                _store_gx_chunk(gx_ptr, gx_row, p_ok, gx0, 0, C_in, stride_gx_c, CHUNK0, IDX64, X_VEC)
                if CHUNK1 > 0:
                    _store_gx_chunk(gx_ptr, gx_row, p_ok, gx1, CHUNK_OFFSET1, C_in, stride_gx_c, CHUNK1, IDX64, X_VEC)
                if CHUNK2 > 0:
                    _store_gx_chunk(gx_ptr, gx_row, p_ok, gx2, CHUNK_OFFSET2, C_in, stride_gx_c, CHUNK2, IDX64, X_VEC)
                if CHUNK3 > 0:
                    _store_gx_chunk(gx_ptr, gx_row, p_ok, gx3, CHUNK_OFFSET3, C_in, stride_gx_c, CHUNK3, IDX64, X_VEC)
    if NEED_DB:
        for co0 in range(0, C_out, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            _grad_y_sum(gy_ptr, cpart_slot, co, co < C_out, tile_program, n_tile_programs, N, H_out, W_out,
                        stride_gy_n, stride_gy_c, stride_gy_h, stride_gy_w, TAPS, MID_PIXELS, BLOCK_CO, ACC64, IDX64)


@triton.jit
def _bwd_gpre_kernel(
    gy_ptr, x_ptr, pw_ptr, pb_ptr, dw_ptr, gpre_ptr, cpart_ptr,
    N, C_in, C_out, H, W, H_out, W_out,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_gy_n, stride_gy_c, stride_gy_h, stride_gy_w,
    pad_top, pad_left, n_tile_programs,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DILATION_H: tl.constexpr,
    DILATION_W: tl.constexpr, MID_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    ACT: tl.constexpr, HAS_PB: tl.constexpr, PREC: tl.constexpr, ACC64: tl.constexpr, IDX64: tl.constexpr,
    UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
    NEED_PB: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_GPRE: tl.constexpr,
    NEED_MID: tl.constexpr, STORE_GPRE: tl.constexpr,
):
    """grad_pre of a C_out block over tiles tile_program, tile_program + n_tile_programs, ..., stored for the GEMMs
    when STORE_GPRE (a GEMM will consume it), and the program's channel partials."""
    TAPS: tl.constexpr = KH * KW
    co_blk = tl.program_id(0)  # C_out blocks of one tile group are neighbours in launch order: they share x in L2
    tile_program = tl.program_id(1)
    HW = tl.cast(H, tl.int64) * W if IDX64 else H * W
    n_pix = N * HW
    cpart_slot = cpart_ptr + tile_program * (C_out * (TAPS + 2))
    co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_out
    co_g = co.to(tl.int64) if IDX64 else co
    if NEED_MID:
        for tile in range(tile_program, tl.cdiv(n_pix, MID_PIXELS), n_tile_programs):
            tl.debug_barrier()  # see _bwd_fused_kernel
            accumulate = tile != tile_program
            p, p_ok, n, h, w, x_row = _mid_tile(tile, HW, W, n_pix, stride_x_n, stride_x_h, stride_x_w, MID_PIXELS,
                                                IDX64)
            pre = _pointwise(x_ptr, x_row, p_ok, pw_ptr, pb_ptr, co, co_ok, C_in, stride_x_c, MID_PIXELS, BLOCK_CO,
                             BLOCK_CI, HAS_PB, PREC, ACC64, IDX64, UPCAST_DOT, X_VEC)
            gpre = _grad_pre(gy_ptr, dw_ptr, cpart_slot, pre, n, h, w, p_ok, co, co_ok, stride_gy_n, stride_gy_c,
                             stride_gy_h, stride_gy_w, H_out, W_out, pad_top, pad_left, accumulate, KH, KW, STRIDE_H,
                             STRIDE_W, DILATION_H, DILATION_W, MID_PIXELS, BLOCK_CO, ACT, ACC64, IDX64, NEED_GPRE,
                             NEED_PB, NEED_DW)
            if STORE_GPRE:
                tl.store(gpre_ptr + (p[:, None] * C_out + co_g[None, :]), gpre.to(gpre_ptr.dtype.element_ty),
                         mask=p_ok[:, None] & co_ok[None, :])
    if NEED_DB:
        _grad_y_sum(gy_ptr, cpart_slot, co, co_ok, tile_program, n_tile_programs, N, H_out, W_out, stride_gy_n,
                    stride_gy_c, stride_gy_h, stride_gy_w, TAPS, MID_PIXELS, BLOCK_CO, ACC64, IDX64)


@triton.jit
def _bwd_gx_kernel(
    gpre_ptr, pw_ptr, gx_ptr, N, C_in, C_out, H, W, stride_gx_n, stride_gx_c, stride_gx_h, stride_gx_w,
    MID_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, PREC: tl.constexpr, ACC64: tl.constexpr,
    IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
):
    """grad_x[tile, ci block] = grad_pre[tile, :] . P[:, ci block] (a GEMM over C_out)."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    ci_blk = tl.program_id(0)  # C_in blocks of one tile are neighbours: they share the grad_pre rows in L2
    tile = tl.program_id(1)
    HW = tl.cast(H, tl.int64) * W if IDX64 else H * W
    n_pix = N * HW
    p, p_ok, n, h, w, gx_row = _mid_tile(tile, HW, W, n_pix, stride_gx_n, stride_gx_h, stride_gx_w, MID_PIXELS, IDX64)
    ci = ci_blk * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_in
    acc = tl.zeros((MID_PIXELS, BLOCK_CI), dtype=acc_dt)
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        co_ok = co < C_out
        g = tl.load(gpre_ptr + (p[:, None] * C_out + co[None, :]), mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(pw_ptr + (co[:, None] * C_in + ci[None, :]), mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        if UPCAST_DOT:
            g = g.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = _dot(g, wt, acc, PREC, ACC64)
    _store_gx_chunk(gx_ptr, gx_row, p_ok, acc, ci_blk * BLOCK_CI, C_in, stride_gx_c, BLOCK_CI, IDX64, X_VEC)


@triton.jit
def _bwd_gw_kernel(
    gpre_ptr, x_ptr, wpart_ptr, N, C_in, C_out, H, W, stride_x_n, stride_x_c, stride_x_h, stride_x_w, pix_per_split,
    MID_PIXELS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, PREC: tl.constexpr, ACC64: tl.constexpr,
    IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, X_VEC: tl.constexpr,
):
    """grad_pw partial [co block, ci block] over pixel split ``split``: grad_pre[split, co]^T . x[split, ci] (a GEMM
    over pixels), written once to the split's slot."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    co_blk = tl.program_id(0)
    ci_blk = tl.program_id(1)
    split = tl.program_id(2)
    HW = tl.cast(H, tl.int64) * W if IDX64 else H * W
    n_pix = N * HW
    co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_out
    ci = ci_blk * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_in
    tile0 = split * (pix_per_split // MID_PIXELS)  # pix_per_split is a multiple of MID_PIXELS
    n_tiles = tl.minimum(tl.cdiv(n_pix, MID_PIXELS) - tile0, pix_per_split // MID_PIXELS)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=acc_dt)
    for k in range(0, n_tiles):
        p, p_ok, n, h, w, x_row = _mid_tile(tile0 + k, HW, W, n_pix, stride_x_n, stride_x_h, stride_x_w, MID_PIXELS,
                                            IDX64)
        g = tl.load(gpre_ptr + (p[:, None] * C_out + co[None, :]), mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        xt = _x_chunk(x_ptr, x_row, p_ok, ci_blk * BLOCK_CI, C_in, stride_x_c, BLOCK_CI, IDX64, UPCAST_DOT, X_VEC)
        if UPCAST_DOT:
            g = g.to(tl.float32)
        acc = _dot(tl.trans(g), xt, acc, PREC, ACC64)
    w_ok = co_ok[:, None] & ci_ok[None, :]
    tl.store(wpart_ptr + split * (C_out * C_in) + (co[:, None] * C_in + ci[None, :]), acc, mask=w_ok)


@triton.jit
def _reduce_kernel(wpart_ptr, cpart_ptr, gpw_ptr, gdw_ptr, gpb_ptr, gdb_ptr, n_weight_slots, n_channel_slots, C_out,
                   C_in, TAPS: tl.constexpr, BLOCK: tl.constexpr, ACC64: tl.constexpr, FIRST_PART: tl.constexpr,
                   NEED_PB: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr):
    """Sums the partial slots in fixed order (bitwise reproducible) and writes the weight/bias gradients in their
    dtype: part (axis 1 + FIRST_PART) 0: the n_weight_slots grad_pw slots [C_out, C_in]; 1: the n_channel_slots
    channel slots [C_out, TAPS + 2], of which it writes the gradients the NEED_ flags ask for (the other columns were
    never written)."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.zeros((BLOCK,), dtype=acc_dt)
    if tl.program_id(1) + FIRST_PART == 0:
        M = C_out * C_in
        ok = m < M
        for g in range(0, n_weight_slots):
            s += tl.load(wpart_ptr + g * M + m, mask=ok, other=0.0)
        tl.store(gpw_ptr + m, s.to(gpw_ptr.dtype.element_ty), mask=ok)
    else:
        M = C_out * (TAPS + 2)
        ok = m < M
        for g in range(0, n_channel_slots):
            s += tl.load(cpart_ptr + g * M + m, mask=ok, other=0.0)
        co = m // (TAPS + 2)
        k = m % (TAPS + 2)
        if NEED_DW:
            tl.store(gdw_ptr + co * TAPS + k, s.to(gdw_ptr.dtype.element_ty), mask=ok & (k < TAPS))
        if NEED_PB:
            tl.store(gpb_ptr + co, s.to(gpb_ptr.dtype.element_ty), mask=ok & (k == TAPS))
        if NEED_DB:
            tl.store(gdb_ptr + co, s.to(gdb_ptr.dtype.element_ty), mask=ok & (k == TAPS + 1))


# ----------------------------------------------------------------------------------------------------------------
# Launch plans: block sizes, grids, and the work and bytes they imply
# ----------------------------------------------------------------------------------------------------------------
# TARGET_SMS, BLOCKS_PER_SM, FWD_MAX_DOT_RATIO and DEPTHWISE_COST: the model both backends share (bsconv_cuda.plan)
CTA_SLOTS = BLOCKS_PER_SM * TARGET_SMS  # resident programs on the GPU the grids are sized for
PARTIALS_MAX_BYTES = L2_RESIDENT_BYTES  # fp32 weight-gradient partials of one backward
FUSED_MAX_CIN = 128  # the fused backward keeps x and grad_x of all C_in on chip up to this many channels, ...
FUSED_MAX_PROGRAMS = 2 * CTA_SLOTS  # ... in at most this many programs (more would only add partial slots)
# Mid rows (MID_ROWS: tile + halo, padded to a power of two) per forward program: [MID_ROWS, BLOCK_CO = 32] at 4
# warps stays on chip up to FWD_SPILL_FREE_MID_ROWS (256 rows spill); only a large dilated kernel gets more, up to
# FWD_MAX_MID_ROWS, the most a forward program keeps on chip. A different bound from the CUDA forward's
# (cuda_backend.MAX_TILE_PIXELS; docs/DESIGN.md, section 5).
FWD_SPILL_FREE_MID_ROWS = 128
FWD_MAX_MID_ROWS = 256
FWD_MAX_OUT_PIXELS = 128  # output pixels (OUT_PIXELS: TH x TW padded to a power of two) per forward program
SHIFTED_SLOTS = 2 * CTA_SLOTS  # programs (each with one staging slot of mid) of the shifted depthwise stage
MIN_DOT_ROWS = 64  # rows of one Hopper wgmma tile: fewer rows in a tensor-core dot take as long
DEPTHWISE_STAGES = ("gather", "shifted")
DEPTHWISE_STAGE = "gather"  # the default until a GPU run measures both


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


def _padded(c: int, block: int) -> int:
    return triton.cdiv(c, block) * block


def _least_padding(c: int, blocks: tuple[int, ...]) -> int:
    """The block from ``blocks`` that pads ``c`` least (the largest on ties)."""
    return min(blocks, key=lambda b: (_padded(c, b), -b))


def _channel_chunks(c_in: int, max_chunk: int) -> tuple[int, int, int, int] | None:
    """Widths of at most four power-of-two channel chunks (each >= 16, tl.dot's minimum K) that cover C_in rounded
    up to 16, largest first, padded with 0; None when four do not suffice."""
    rest, out = _padded(c_in, 16), []
    while rest:
        out.append(min(max_chunk, 1 << (rest.bit_length() - 1)))
        rest -= out[-1]
    return tuple(out + [0] * (4 - len(out))) if len(out) <= 4 else None


def _fma_dots(dtype, prec) -> bool:
    """True when tl.dot runs on FMA units (fp32 without TF32, fp64): its operands are then held in registers whole
    along K, so the blocks must be smaller. dtype: a torch dtype or "bf16"/"fp16"/"fp32"/"fp64" (None: a
    tensor-core dtype); prec: the launcher's input precision (None: "tf32" for fp32)."""
    name = _dtype_name(dtype)
    return name == "fp64" or (name == "fp32" and (prec or "tf32") != "tf32")


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "") if dtype is not None else "bf16"
    return {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def _dot_kind(dtype, prec) -> str:
    if _fma_dots(dtype, prec):
        return "fma"
    return "tf32" if _dtype_name(dtype) == "fp32" else "tc"


def _mid_rows(mid_h: int, mid_w: int, h: int, w: int) -> int:
    """MID_ROWS of the forward: the tile's halo region clipped to the image, flattened, padded to a power of two
    (and to 16 at least: tl.dot needs M >= 16)."""
    return max(16, _pow2(min(mid_h, h) * min(mid_w, w)))


@functools.lru_cache(maxsize=1024)
def _fwd_tile(n, c_in, block_ci, c_out, h, w, h_out, w_out, kh, kw, stride_h, stride_w, dilation_h, dilation_w,
              dw_fma_cost, min_rows, block_co_choices):
    """(TH, TW, BLOCK_CO) of the forward: among the tiles whose dot multiply-adds stay within FWD_MAX_DOT_RATIO
    times the pointwise stage's, the least modeled time; where no tile does, the fewest multiply-adds.

    Per program: max(MID_ROWS, min_rows) x BLOCK_CO x C_in (pointwise dot; fewer rows than one Hopper wgmma tile take
    as long) plus dw_fma_cost x OUT_PIXELS x BLOCK_CO x taps (depthwise FMAs). Time: the per-program work times the
    waves over CTA_SLOTS programs, counted fractionally, so that a full GPU minimizes the work per image and a batch
    too small to fill CTA_SLOTS programs splits into smaller programs (BLOCK_CO = 16, or finer tiles)."""
    c_in_pad = _padded(c_in, block_ci)
    pointwise = n * h * w * c_in * c_out
    best = None
    for max_mid_rows in (FWD_SPILL_FREE_MID_ROWS, FWD_MAX_MID_ROWS):
        for block_co in block_co_choices:
            ctas_per_tile = n * triton.cdiv(c_out, block_co)
            for th in range(1, min(h_out, 64) + 1):
                mid_h = halo_extent(th, stride_h, kh, dilation_h)
                for tw in range(1, min(w_out, 128) + 1):
                    mid_rows = _mid_rows(mid_h, halo_extent(tw, stride_w, kw, dilation_w), h, w)
                    out_pixels = _pow2(th * tw)
                    if mid_rows > max_mid_rows or out_pixels > FWD_MAX_OUT_PIXELS:
                        break
                    ctas = ctas_per_tile * triton.cdiv(h_out, th) * triton.cdiv(w_out, tw)
                    per_cta = block_co * (max(mid_rows, min_rows) * c_in_pad + dw_fma_cost * out_pixels * kh * kw)
                    macs = ctas * block_co * mid_rows * c_in_pad
                    key = (max(macs / pointwise, FWD_MAX_DOT_RATIO), per_cta * max(1.0, ctas / CTA_SLOTS), macs,
                           -block_co, -tw)
                    if best is None or key < best[0]:
                        best = (key, th, tw, block_co)
        if best is not None:
            return best[1:]
    raise ValueError(f"no output tile keeps tile plus halo within {FWD_MAX_MID_ROWS} mid rows (see unsupported_reason)")


def forward_plan(n, c_in, c_out, h, w, h_out, w_out, kernel_size, stride, padding, dilation, dtype=None,
                 prec=None, depthwise: str = DEPTHWISE_STAGE, channels_last: bool = True) -> Plan:
    """Blocks, grid and work of :func:`forward` (padding: (top, bottom, left, right); dtype and prec as in
    :func:`_fma_dots`; channels_last: x's channel stride is 1)."""
    (kh, kw), (stride_h, stride_w), (dilation_h, dilation_w) = kernel_size, stride, dilation
    forced = {k: v for k, v in (_FORCED["forward"] or {}).items() if k not in ("IDX64", "SLOTS")}
    kind = _dot_kind(dtype, prec)
    # NCHW x loads are gathers of single elements, one 64-bit address each: BLOCK_CI = 64 ran out of registers.
    # TF32: 3 pipeline stages of [MID_ROWS = 128, BLOCK_CI = 64] fp32 x tiles took so much shared memory that one
    # program fit per SM.
    wide = channels_last and kind == "tc"
    block_ci = forced.pop("BLOCK_CI",
                          16 if kind == "fma" else _least_padding(c_in, (64, 32, 16) if wide else (32, 16)))
    th, tw, block_co = _fwd_tile(n, c_in, block_ci, c_out, h, w, h_out, w_out, kh, kw, stride_h, stride_w,
                                 dilation_h, dilation_w, DEPTHWISE_COST[kind], 1 if kind == "fma" else MIN_DOT_ROWS,
                                 (32, 16))
    th, tw, block_co = forced.pop("TH", th), forced.pop("TW", tw), forced.pop("BLOCK_CO", block_co)
    mid_h, mid_w = halo_extent(th, stride_h, kh, dilation_h), halo_extent(tw, stride_w, kw, dilation_w)
    mid_rows = _mid_rows(mid_h, mid_w, h, w)
    blk = dict(TH=th, TW=tw, MID_H=mid_h, MID_W=mid_w, OUT_PIXELS=_pow2(th * tw), MID_ROWS=mid_rows,
               BLOCK_CO=block_co, BLOCK_CI=block_ci, num_warps=8 if mid_rows * block_co > 4096 else 4)
    if kind == "fma":
        # 3 pipeline stages (the default) and 2 left a few live values spilled (sm_80 and sm_90); with 1 stage none
        # spill. The FMA dot is compute-bound, so the lost prefetch costs little.
        blk["num_stages"] = 1
    blk.update(forced)
    tiles_h, tiles_w = triton.cdiv(h_out, blk["TH"]), triton.cdiv(w_out, blk["TW"])
    n_co = triton.cdiv(c_out, blk["BLOCK_CO"])
    n_work = n * tiles_h * tiles_w * n_co
    shifted = depthwise == "shifted"
    programs = min(n_work, (_FORCED["forward"] or {}).get("SLOTS", SHIFTED_SLOTS)) if shifted else n_work
    acc_bytes = 8 if _dtype_name(dtype) == "fp64" else 4
    halo = halo_read_factor(h, w, h_out, w_out, (blk["TH"], blk["TW"]), stride, (padding[0], padding[2]),
                            (mid_h, mid_w))
    itemsize = {"fp64": 8, "fp32": 4}.get(_dtype_name(dtype), 2)
    macs = n_work * blk["MID_ROWS"] * blk["BLOCK_CO"] * _padded(c_in, blk["BLOCK_CI"])
    halo_bytes = round((halo - 1) * n * h * w * c_in * itemsize)
    # shifted: mid written to the slot and read back once per tap (L1 / L2)
    staged = n_work * blk["BLOCK_CO"] * acc_bytes * (blk["MID_ROWS"] + kh * kw * blk["OUT_PIXELS"]) if shifted else 0
    return Plan(path=depthwise, blocks=blk,
                launches=(Launch("fwd_kernel", (programs,), macs, finest=n_work if shifted else 0),),
                params=dict(tiles_w=tiles_w, tiles_per_img=tiles_h * tiles_w, n_co=n_co, n_work=n_work),
                extra_traffic_bytes=halo_bytes + staged, extra_hbm_bytes=halo_bytes,
                scratch_bytes=programs * blk["MID_ROWS"] * blk["BLOCK_CO"] * acc_bytes if shifted else 0)


def _gradient_flags(output_mask) -> dict:
    """The backward kernels' constexpr flags for ``output_mask`` (five bools, in the order of
    :data:`reference.GRADIENTS`): each gradient's own, plus NEED_GPRE (grad_pre, which grad_x, grad_pw_weight and
    grad_pw_bias start from) and NEED_MID (the pointwise stage recomputed: for grad_pre or grad_dw_weight; grad_dw_bias
    alone is a sum of grad_y)."""
    need_gx, need_pw, need_pb, need_dw, need_db = (bool(b) for b in output_mask)
    need_gpre = need_gx or need_pw or need_pb
    return dict(NEED_GX=need_gx, NEED_PW=need_pw, NEED_PB=need_pb, NEED_DW=need_dw, NEED_DB=need_db,
                NEED_GPRE=need_gpre, NEED_MID=need_gpre or need_dw)


def backward_plan(n, c_in, c_out, h, w, h_out, w_out, kernel_size, dtype=None, prec=None,
                  channels_last: bool = True, output_mask=reference.ALL_GRADIENTS) -> Plan:
    """Path, blocks, grids and work of :func:`backward` (dtype and prec as in :func:`_fma_dots`; channels_last:
    x's channel stride is 1; output_mask: the gradients wanted, as in :func:`backward`). The fused path where C_in
    allows it, unless the split path moves fewer bytes, or runs more programs where the fused one would leave SMs
    idle (see the module docstring). The path and blocks are those of all five gradients whatever the mask, so
    that a gradient comes out bit for bit the same whichever others are asked for; the mask drops launches, dots
    and partials (``params["flags"]``: the kernels' flags, :func:`_gradient_flags`)."""
    flags = _gradient_flags(output_mask)
    path = None if all(output_mask) else backward_plan(n, c_in, c_out, h, w, h_out, w_out, kernel_size, dtype,
                                                       prec, channels_last).path
    forced = {k: v for k, v in (_FORCED["backward"] or {}).items() if k != "IDX64"}
    path = forced.pop("PATH", path)
    args = (n, c_in, c_out, h * w, kernel_size[0] * kernel_size[1], _dot_kind(dtype, prec), _dtype_name(dtype),
            channels_last, flags)
    # each path takes the forced blocks it has (the fused kernel has no BLOCK_CI and no pixel splits, the split ones
    # no channel chunks)
    fused_forced = {k: v for k, v in forced.items() if k not in _SPLIT_ONLY_KEYS}
    fused = None if path == "split" else _fused_plan(fused_forced, *args)
    if path == "fused":
        if fused is None:
            raise ValueError(f"the fused backward takes at most {FUSED_MAX_CIN} input channels, got {c_in}")
        return fused
    split = _split_plan({k: v for k, v in forced.items() if k != "CHUNKS"}, *args)
    if fused is None or path == "split":
        return split
    fused_wins = prefer_fused_backward(fused, split, fused.launches[0].programs, split.launches[0].programs)
    return fused if fused_wins else split


def _fused_plan(forced, n, c_in, c_out, hw, taps, kind, dtype_name, channels_last, flags) -> Plan | None:
    """The fused backward (None when C_in is too wide for it). Blocks from compiling every shape of the table
    for sm_80 / sm_90 (benchmarks/kernel_report.py): x and grad_x of all channels stay on chip, so the tile
    shrinks as C_in grows, and 4 warps keep two or more programs per SM. NCHW x loads are single-element gathers
    (a 64-bit address each), so their chunks are narrower; FMA dots hold their operands in registers whole along K
    (chunks of 32)."""
    if kind == "fma":
        max_chunk, max_mid_pixels = 32, 16
    elif kind == "tf32":
        max_chunk, max_mid_pixels = (64 if channels_last else 32), 16
    else:
        max_chunk, max_mid_pixels = (128 if channels_last else 64), 32
    chunks = forced.pop("CHUNKS", None) or _channel_chunks(c_in, max_chunk)
    if c_in > FUSED_MAX_CIN or chunks is None:
        return None
    if len(chunks) != 4 or sum(chunks) < c_in:
        raise ValueError(f"CHUNKS must be four widths that cover C_in = {c_in}, got {chunks}")
    if sum(chunks) <= 16:  # (at 32 channels, 64-pixel tiles spilled on sm_80)
        max_mid_pixels *= 2
    n_pix = n * hw
    acc_bytes = 8 if dtype_name == "fp64" else 4
    # the largest tile up to max_mid_pixels that still gives every SM a program: partials per pixel shrink as it grows
    mid_pixels = forced.pop("MID_PIXELS", next(
        (t for t in (64, 32, 16) if t <= max_mid_pixels and triton.cdiv(n_pix, t) >= TARGET_SMS), 16))
    block_co = forced.pop("BLOCK_CO", 16)
    n_tiles = triton.cdiv(n_pix, mid_pixels)
    slot = acc_bytes * c_out * (c_in + taps + 2)  # one program's partials: grad_pw | grad_dw, both biases
    programs = max(1, min(n_tiles, forced.pop("TILE_PROGRAMS",
                                              min(PARTIALS_MAX_BYTES // slot, FUSED_MAX_PROGRAMS))))
    blk = dict(MID_PIXELS=mid_pixels, BLOCK_CO=block_co, **{f"CHUNK{i}": c for i, c in enumerate(chunks)},
               **_bwd_options(kind))
    blk.update(forced)
    slot = acc_bytes * c_out * (c_in * flags["NEED_PW"] + (taps + 2) * _channel_partials(flags))  # the slots used
    partial = programs * slot
    # per (tile, C_out block): the pointwise dot, then grad_x's and grad_pw's
    dots = flags["NEED_MID"] + flags["NEED_GX"] + flags["NEED_PW"]
    macs = dots * n_tiles * triton.cdiv(c_out, block_co) * mid_pixels * block_co * sum(chunks)
    runs = flags["NEED_MID"] or flags["NEED_DB"]
    launches = (Launch("bwd_fused_kernel", (programs,), macs, finest=triton.cdiv(n_pix, 16)),) if runs else ()
    return Plan(path="fused", blocks=blk,
                launches=launches + _reduce_launch(c_out, c_in, taps, flags),
                params=dict(tile_programs=programs, weight_slots=programs, flags=flags),
                # every tile reads and writes its program's slot; the reduction reads the slots once
                extra_traffic_bytes=2 * n_tiles * slot + partial, extra_hbm_bytes=dram_bytes(partial, 2),
                partial_bytes=partial)


def _split_plan(forced, n, c_in, c_out, hw, taps, kind, dtype_name, channels_last, flags) -> Plan:
    """The split backward: grad_pre kernel, grad_x and grad_pw GEMMs."""
    n_pix = n * hw
    itemsize = {"fp64": 8, "fp32": 4}.get(dtype_name, 2)
    acc_bytes = 8 if dtype_name == "fp64" else 4
    fma = kind == "fma"
    block_co = 16 if fma else _least_padding(c_out, (32, 16))
    c_slot = acc_bytes * c_out * (taps + 2)  # one program's grad_dw | grad_pw_bias | grad_dw_bias partials
    w_slot = acc_bytes * c_out * c_in  # one pixel split's grad_pw partials
    # the tile that pads the pixels least (7 % counts as none), then gives more SMs a grad_pre program, then is
    # larger
    tile_choices = (32, 16) if fma else (64, 32, 16)
    # the grad_pre kernel: 64-pixel tiles with BLOCK_CO = 32 spilled on sm_90
    gpre_tile_choices = (32, 16) if block_co == 32 else tile_choices
    mid_pixels = forced.pop("MID_PIXELS", min(
        gpre_tile_choices, key=lambda t: (max(_padded(n_pix, t) / n_pix, 1.07),
                                          -min(triton.cdiv(c_out, block_co) * triton.cdiv(n_pix, t), TARGET_SMS),
                                          -t)))
    n_tiles = triton.cdiv(n_pix, mid_pixels)
    # grad_pre programs: one per (tile, C_out block) as far as the channel partials allow; BLOCK_CO = 16 where 32
    # would leave SMs without one (and pads C_out no more)
    programs = max(1, min(n_tiles, forced.pop("TILE_PROGRAMS", (PARTIALS_MAX_BYTES // 2) // c_slot)))
    if block_co == 32 and triton.cdiv(c_out, 32) * programs < TARGET_SMS and _padded(c_out, 16) <= _padded(c_out, 32):
        block_co = 16
    block_co = forced.pop("BLOCK_CO", block_co)
    n_co = triton.cdiv(c_out, block_co)
    # BLOCK_CI: the K step of the grad_pre dot (least padding; NCHW: at most 32, as in the forward). grad_x's blocks
    # (pixels x C_in): least padding, then enough programs for every SM, then larger
    block_ci_choices = (32, 16) if fma or not channels_last else (64, 32, 16)
    block_ci = forced.pop("BLOCK_CI", None)
    gx_mid_pixels, gx_block_ci = (mid_pixels, block_ci) if block_ci else min(
        itertools.product(tile_choices, block_ci_choices),
        key=lambda tb: (_padded(n_pix, tb[0]) * _padded(c_in, tb[1]),
                        -min(triton.cdiv(n_pix, tb[0]) * triton.cdiv(c_in, tb[1]), TARGET_SMS), -tb[0] * tb[1]))
    block_ci = block_ci or _least_padding(c_in, block_ci_choices)
    n_ci = triton.cdiv(c_in, block_ci)
    # grad_pw GEMM: split the pixels until CTA_SLOTS programs run, as far as its partials allow
    splits = max(1, min(n_tiles, forced.pop("PIXEL_SPLITS", min(triton.cdiv(CTA_SLOTS, n_co * n_ci),
                                                                (PARTIALS_MAX_BYTES // 2) // w_slot))))
    pix_per_split = triton.cdiv(n_tiles, splits) * mid_pixels
    splits = triton.cdiv(n_pix, pix_per_split)  # every split non-empty
    # grad_pre kernel: 1 pipeline stage (3 and 2 left a value or two spilled on sm_90), and 2 warps for 16 x 16
    # tiles (4 warps spilled); the GEMMs: 4 warps, 2 stages (3 spilled in an NCHW grad_pw GEMM), FMA dots 1
    blk = dict(MID_PIXELS=mid_pixels, BLOCK_CO=block_co, BLOCK_CI=block_ci, GX_MID_PIXELS=gx_mid_pixels,
               GX_BLOCK_CI=gx_block_ci, num_warps=2 if mid_pixels * block_co <= 256 else 4,
               num_stages=1, GEMM_WARPS=4, GEMM_STAGES=1 if fma else 2)
    blk.update(forced)
    n_gx, gx_tiles = triton.cdiv(c_in, gx_block_ci), triton.cdiv(n_pix, gx_mid_pixels)
    # the mask drops the GEMMs not wanted, grad_pre's buffer when neither runs, and the partials not written
    gemms = flags["NEED_GX"] + flags["NEED_PW"]
    scratch = n_pix * c_out * itemsize if gemms else 0
    x_bytes = n_pix * c_in * itemsize * flags["NEED_PW"]
    c_slot *= _channel_partials(flags)
    w_slot *= flags["NEED_PW"]
    partial = programs * c_slot + splits * w_slot
    finest = triton.cdiv(n_pix, 16)
    launches = (
        Launch("bwd_gpre_kernel", (n_co, programs),
               n_tiles * n_co * mid_pixels * block_co * _padded(c_in, block_ci) * flags["NEED_MID"],
               finest=finest * triton.cdiv(c_out, 16)),
        Launch("bwd_gx_kernel", (n_gx, gx_tiles),
               gx_tiles * n_gx * gx_mid_pixels * gx_block_ci * _padded(c_out, block_co),
               finest=finest * triton.cdiv(c_in, 16)),
        # its channel blocks stay GEMM-sized: it splits along the pixels only
        Launch("bwd_gw_kernel", (n_co, n_ci, splits), n_co * n_ci * block_co * block_ci * n_tiles * mid_pixels,
               finest=n_co * n_ci * n_tiles),
    )
    wanted = (flags["NEED_MID"] or flags["NEED_DB"], flags["NEED_GX"], flags["NEED_PW"])
    return Plan(path="split", blocks=blk,
                launches=tuple(launch for launch, run in zip(launches, wanted) if run)
                + _reduce_launch(c_out, c_in, taps, flags),
                params=dict(tile_programs=programs, weight_slots=splits, pix_per_split=pix_per_split, flags=flags),
                # grad_pre: written, read by each GEMM; x: read again by the grad_pw GEMM; channel partials:
                # read-modified-written per tile; grad_pw partials: written once; all read by the reduction
                extra_traffic_bytes=(1 + gemms) * scratch + x_bytes + 2 * n_tiles * c_slot + 2 * splits * w_slot,
                extra_hbm_bytes=dram_bytes(scratch, 1 + gemms) + dram_bytes(x_bytes, 1) + dram_bytes(partial, 2),
                partial_bytes=partial, scratch_bytes=scratch)


def _bwd_options(kind: str) -> dict:
    """Launch options of the fused backward kernel: 4 warps (two or more programs per SM); FMA dots: 1 pipeline stage
    (3 or 2 stages spilled on sm_90); TF32: 2 stages (fp32 operands are twice the bytes of bf16, and 3 stages of them
    ran out of registers on sm_80 and spilled)."""
    return dict(num_warps=4, num_stages=1 if kind == "fma" else 2)


_REDUCE_BLOCK = 256


def _channel_partials(flags: dict) -> bool:
    """Whether the channel partials (grad_dw_weight | grad_pw_bias | grad_dw_bias) are written."""
    return flags["NEED_PB"] or flags["NEED_DW"] or flags["NEED_DB"]


def _reduce_parts(flags: dict) -> tuple[int, ...]:
    """The parts of :func:`_reduce_kernel` to run: 0, the grad_pw partials; 1, the channel partials."""
    return tuple(part for part, run in enumerate((flags["NEED_PW"], _channel_partials(flags))) if run)


def _reduce_launch(c_out, c_in, taps, flags: dict) -> tuple[Launch, ...]:
    """The reduction's launch, or none when no weight gradient is wanted."""
    parts = _reduce_parts(flags)
    if not parts:
        return ()
    width = max(c_in if 0 in parts else 0, taps + 2 if 1 in parts else 0)
    return (Launch("reduce_kernel", (triton.cdiv(c_out * width, _REDUCE_BLOCK), len(parts)), 0),)


def unsupported_reason(x: torch.Tensor, kernel_size, dilation) -> str | None:
    """None when these kernels run this call, else why not (what an explicit ``backend="triton"`` raises with)."""
    kh, kw = kernel_size
    footprint = halo_extent(1, 1, kh, dilation[0]) * halo_extent(1, 1, kw, dilation[1])  # a 1 x 1 tile's
    if _pow2(footprint) > FWD_MAX_MID_ROWS:
        return (f"the dilated kernel covers {footprint} pixels; the Triton forward keeps at most {FWD_MAX_MID_ROWS} "
                f"on chip")
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and device_capability(x.device.index) < (8, 0):
        return "bfloat16 tensor-core dots need compute capability >= 8.0"
    return None


def _plan_ints(values) -> tuple[int, ...]:
    """``values`` (sizes, strides, convolution arguments) as the plain ints a launch plan is computed from. Where
    torch traces a launcher with symbolic sizes (``triton_op`` under aot_autograd, as ``torch.compile(dynamic=True)``
    does), ``int()`` specializes each SymInt to its value and installs a guard: blocks, grids, vector widths and index
    widths depend on the exact sizes, so the traced graph holds for these sizes only (others trace again)."""
    return tuple(int(v) for v in values)


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(_plan_ints(t.shape), _plan_ints(t.stride())) if s > 0) + 1


def _needs_int64(*tensors: torch.Tensor) -> bool:
    return any(_max_offset(t) >= 2**31 - 1 for t in tensors)


def _vector_width(t: torch.Tensor) -> int:
    """Elements of ``t`` per aligned access along its channels (up to 16 bytes): the largest power of two that
    divides C and every pixel stride, when the channels are contiguous (1 otherwise). The kernels promise Triton
    these multiples (``tl.multiple_of``), so that C = 24 channels_last loads 16-byte vectors, not single elements."""
    (_, c, _, _), (stride_n, stride_c, stride_h, stride_w) = _plan_ints(t.shape), _plan_ints(t.stride())
    if stride_c != 1:
        return 1
    v = 16 // t.element_size()
    while v > 1 and any(d % v for d in (c, stride_n, stride_h, stride_w)):
        v //= 2
    return v


def _dot_settings(dtype: torch.dtype, device: torch.device) -> tuple[str, bool, bool]:
    """(input_precision, fp64 accumulation, upcast bf16 before tl.dot)."""
    prec = "tf32" if dtype == torch.float32 and fp32_uses_tf32() else "ieee"
    return prec, dtype == torch.float64, dtype == torch.bfloat16 and device.type == "cpu"


def _check(x, op: str):
    if x.dtype not in reference.SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: unsupported dtype {x.dtype}")
    reference.check_input(x, op)


# torch.compiler.is_compiling exists in every torch this package supports (>= 2.6); feature-tested all the same
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _launch_device(x: torch.Tensor):
    """The context every launch runs in: x's CUDA device current, since Triton launches on the current device (a
    tensor on cuda:1 while cuda:0 is current would fail). Nothing for CPU tensors (the interpreter) and nothing while
    torch.compile traces the launcher, where Inductor emits its own device guard around the kernels it calls."""
    if x.device.type != "cuda" or _is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def _contiguous_params(pw_weight, pw_bias, dw_weight, dw_bias):
    """The parameters as the kernels index them: dense, row-major (the kernels take no parameter strides, so a
    strided view, e.g. a bias sliced from a larger tensor, is copied here)."""
    c_out = dw_weight.shape[0]
    return tuple(None if t is None else t.contiguous()
                 for t in (pw_weight.reshape(c_out, -1), pw_bias, dw_weight, dw_bias))


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launchable(kernel):
    """``kernel`` as the launchers call it: through ``torch.library.wrap_triton``, so that ``triton_op`` traces it;
    under Triton's interpreter (where ``triton.jit`` makes an ``InterpretedFunction``) the kernel itself, which runs
    eagerly and which nothing traces. torch >= 2.14's ``wrap_triton`` returns an interpreted kernel unchanged too;
    older torch (2.11 and earlier) raises on it."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def forward(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation, *,
            depthwise: str | None = None):
    """y of the block. depthwise: the depthwise stage, "gather" (tl.gather of the shifted mid rows held in
    registers) or "shifted" (mid staged per program in a global scratch slot, L1/L2-resident, taps read back as
    plain shifted loads); None: :data:`DEPTHWISE_STAGE`."""
    _check(x, "bsconv_cuda::triton_forward")
    depthwise = DEPTHWISE_STAGE if depthwise is None else depthwise
    if depthwise not in DEPTHWISE_STAGES:
        raise ValueError(f"depthwise must be one of {DEPTHWISE_STAGES}, got {depthwise!r}")
    pw, pw_bias, dw, dw_bias = _contiguous_params(pw_weight, pw_bias, dw_weight, dw_bias)
    n, c_in, h, w = _plan_ints(x.shape)
    c_out, _, kh, kw = _plan_ints(dw.shape)
    stride, padding, dilation = (_plan_ints(v) for v in (stride, padding, dilation))
    h_out, w_out = reference.output_size(h, w, (kh, kw), stride, padding, dilation)
    y = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                    memory_format=reference.output_memory_format(x))
    if y.numel() == 0:
        return y

    prec, acc64, upcast = _dot_settings(x.dtype, x.device)
    plan = forward_plan(n, c_in, c_out, h, w, h_out, w_out, (kh, kw), stride, padding, dilation, x.dtype, prec,
                        depthwise, channels_last=_plan_ints(x.stride())[1] == 1)
    blk, prm = plan.blocks, plan.params
    grid = plan.launches[0].grid
    mid = (torch.empty((grid[0], blk["MID_ROWS"], blk["BLOCK_CO"]), dtype=torch.float64 if acc64 else torch.float32,
                       device=x.device) if depthwise == "shifted" else y)  # y: a placeholder, never accessed
    pb = pw_bias if pw_bias is not None else pw
    db = dw_bias if dw_bias is not None else dw
    with _launch_device(x):
        _launchable(_fwd_kernel)[grid](
            x, pw, pb, dw, db, y, mid,
            c_in, c_out, h, w, h_out, w_out,
            *x.stride(), *y.stride(),
            prm["tiles_w"], prm["tiles_per_img"], prm["n_co"], prm["n_work"], padding[0], padding[2],
            KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], DILATION_H=dilation[0], DILATION_W=dilation[1],
            **blk, SHIFTED=depthwise == "shifted", ACT=_act_code(activation), HAS_PB=pw_bias is not None,
            HAS_DB=dw_bias is not None, PREC=prec, ACC64=acc64, UPCAST_DOT=upcast, X_VEC=_vector_width(x),
            IDX64=(_FORCED["forward"] or {}).get("IDX64", _needs_int64(x, y)),
        )
    return y


def backward(grad_y, x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation,
             output_mask=reference.ALL_GRADIENTS):
    """The gradients of :func:`reference.backward`, those that ``output_mask`` asks for (the others: empty tensors);
    :func:`backward_plan` says what runs."""
    _check(x, "bsconv_cuda::triton_backward")
    pw, pw_bias, dw, dw_bias = _contiguous_params(pw_weight, pw_bias, dw_weight, dw_bias)
    n, c_in, h, w = _plan_ints(x.shape)
    c_out, _, kh, kw = _plan_ints(dw.shape)
    h_out, w_out = _plan_ints(grad_y.shape[2:])
    stride, padding, dilation = (_plan_ints(v) for v in (stride, padding, dilation))
    taps = kh * kw
    dev, dt = x.device, x.dtype
    need_gx, need_pw, need_pb, need_dw, need_db = output_mask
    grad_x = (torch.empty(x.shape, dtype=dt, device=dev, memory_format=reference.output_memory_format(x))
              if need_gx else reference.skipped_gradient(x))
    grad_pw = torch.empty((c_out, c_in), dtype=dt, device=dev) if need_pw else reference.skipped_gradient(x)
    grad_pb = torch.empty((c_out,), dtype=dt, device=dev) if need_pb else reference.skipped_gradient(x)
    grad_dw = torch.empty((c_out, 1, kh, kw), dtype=dt, device=dev) if need_dw else reference.skipped_gradient(x)
    grad_db = torch.empty((c_out,), dtype=dt, device=dev) if need_db else reference.skipped_gradient(x)
    if x.numel() == 0 or grad_y.numel() == 0:
        if need_db:
            grad_db.copy_(grad_y.sum((0, 2, 3)))
        return (grad_x.zero_(), grad_pw.zero_(), grad_pb.zero_(), grad_dw.zero_(), grad_db)

    prec, acc64, upcast = _dot_settings(dt, dev)
    plan = backward_plan(n, c_in, c_out, h, w, h_out, w_out, (kh, kw), dt, prec,
                         channels_last=_plan_ints(x.stride())[1] == 1,
                         output_mask=output_mask)
    blk, prm = plan.blocks, plan.params
    flags = prm["flags"]
    launches = {launch.kernel: launch for launch in plan.launches}
    acc_dt = torch.float64 if acc64 else torch.float32
    # Tile programs (or pixel splits) each own one slot of partials; their count depends on the shape only (never on
    # the device), so the fixed-order reduction reproduces results bit for bit. Buffers nothing writes are not
    # allocated: the kernels get a placeholder (pw) for them, which they never touch (their flags drop the accesses).
    wpart = torch.empty((prm["weight_slots"], c_out, c_in), dtype=acc_dt, device=dev) if need_pw else pw
    cpart = (torch.empty((prm["tile_programs"], c_out, taps + 2), dtype=acc_dt, device=dev)
             if _channel_partials(flags) else pw)
    gpre = torch.empty((n * h * w, c_out), dtype=dt, device=dev) if plan.scratch_bytes else None
    idx64 = (_FORCED["backward"] or {}).get(
        "IDX64", _needs_int64(x, grad_y, grad_x) or (gpre is not None and _needs_int64(gpre)))
    pb = pw_bias if pw_bias is not None else pw
    gx = grad_x if need_gx else x
    conv = dict(KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], DILATION_H=dilation[0],
                DILATION_W=dilation[1])
    dots = dict(PREC=prec, ACC64=acc64, IDX64=idx64, UPCAST_DOT=upcast, X_VEC=min(_vector_width(x),
                                                                               _vector_width(gx)))
    with _launch_device(x):
        if "bwd_fused_kernel" in launches:
            _launchable(_bwd_fused_kernel)[launches["bwd_fused_kernel"].grid](
                grad_y, x, pw, pb, dw, gx, wpart, cpart,
                n, c_in, c_out, h, w, h_out, w_out,
                *x.stride(), *grad_y.stride(), *gx.stride(),
                padding[0], padding[2], prm["tile_programs"],
                **conv, **blk, ACT=_act_code(activation), HAS_PB=pw_bias is not None, **dots, **flags,
            )
        # the split path's blocks (the fused one has no BLOCK_CI)
        gemm = dict(MID_PIXELS=blk["MID_PIXELS"], BLOCK_CO=blk["BLOCK_CO"], BLOCK_CI=blk.get("BLOCK_CI"))
        if "bwd_gpre_kernel" in launches:
            _launchable(_bwd_gpre_kernel)[launches["bwd_gpre_kernel"].grid](
                grad_y, x, pw, pb, dw, gpre if gpre is not None else pw, cpart,
                n, c_in, c_out, h, w, h_out, w_out,
                *x.stride(), *grad_y.stride(),
                padding[0], padding[2], prm["tile_programs"],
                **conv, **gemm, num_warps=blk["num_warps"], num_stages=blk["num_stages"], ACT=_act_code(activation),
                HAS_PB=pw_bias is not None, **dots, STORE_GPRE=gpre is not None,
                **{k: v for k, v in flags.items() if k not in ("NEED_GX", "NEED_PW")},
            )
        if "bwd_gx_kernel" in launches:
            _launchable(_bwd_gx_kernel)[launches["bwd_gx_kernel"].grid](
                gpre, pw, grad_x, n, c_in, c_out, h, w, *grad_x.stride(),
                **dict(gemm, MID_PIXELS=blk["GX_MID_PIXELS"], BLOCK_CI=blk["GX_BLOCK_CI"]),
                num_warps=blk["GEMM_WARPS"], num_stages=blk["GEMM_STAGES"], **dots,
            )
        if "bwd_gw_kernel" in launches:
            _launchable(_bwd_gw_kernel)[launches["bwd_gw_kernel"].grid](
                gpre, x, wpart, n, c_in, c_out, h, w, *x.stride(), prm["pix_per_split"], **gemm,
                num_warps=blk["GEMM_WARPS"], num_stages=blk["GEMM_STAGES"], **dots,
            )
        if "reduce_kernel" in launches:
            _launchable(_reduce_kernel)[launches["reduce_kernel"].grid](
                wpart, cpart, grad_pw if need_pw else pw, grad_dw if need_dw else dw, grad_pb if need_pb else pw,
                grad_db if need_db else pw, prm["weight_slots"], prm["tile_programs"], c_out, c_in,
                TAPS=taps, BLOCK=_REDUCE_BLOCK, ACC64=acc64, FIRST_PART=_reduce_parts(flags)[0], NEED_PB=need_pb,
                NEED_DW=need_dw, NEED_DB=need_db,
            )
    return grad_x, grad_pw, grad_pb, grad_dw, grad_db
