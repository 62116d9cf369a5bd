"""Fused BSConv-U (pointwise -> [activation] -> zero-padded depthwise) in Triton, forward and backward.

Launchers :func:`forward` and :func:`backward` follow the backend contract of :mod:`bsconv_cuda.reference` and launch
every kernel through ``torch.library.wrap_triton`` (so ``torch.library.triton_op`` can trace them).

Forward, ONE launch (``_fwd_kernel``). A program owns an output tile: image ``n``, ``TH x TW`` output pixels, ``BCO``
channels. It computes ``mid`` for the tile plus its halo (``HH x WW`` input pixels, flattened and padded to ``P``, a
power of two) with a ``tl.dot`` chain over ``C_in`` (fp32 accumulation), adds ``pw_bias``, applies the activation,
zeroes the positions that lie in the padding, and keeps the result on chip. The depthwise stage then picks, per tap,
the shifted rows of ``mid`` with ``tl.gather`` (the gather variant; docs/DESIGN.md, section 5) and accumulates
``mid * D[tap]``.
``mid`` never exists in global memory.

Backward, TWO launches:
1. ``_bwd_kernel``: a program owns a set of flat tiles of ``TP`` mid pixels (= input pixels; tiles are strided over
   the grid, ``tile = g, g + G, g + 2G, ...``) and one block of input channels (``BCI``, for ``grad_x`` and
   ``grad_pw``). For every tile and every block of ``BCO`` output channels it recomputes ``pre = x . P^T + b_p`` (no
   halo is needed: backward tiles are in mid space), ``mid = act(pre)``, reads per tap the ``grad_y`` pixel that this
   mid pixel feeds (a masked load: the depthwise transpose needs no on-chip shifting), and forms
   ``grad_mid = sum_tap grad_y * D[tap]``, ``grad_pre = grad_mid * act'(pre)``, ``grad_x += grad_pre . P`` (tl.dot,
   so ``grad_x`` is finished in registers and written once), and per-program partial sums of the weight gradients
   (``grad_pre^T . x`` by tl.dot, ``sum grad_pre``, ``sum grad_y * mid`` per tap, ``sum grad_y``) into this program's
   own slot of a partials buffer, always in the same order. Nothing of mid's size is written anywhere.
2. ``_reduce_kernel``: sums the ``G`` partial slots in fixed order ``g = 0..G-1`` and writes the four weight/bias
   gradients in the input dtype. This launch exists because a deterministic cross-program reduction needs a second
   pass (atomics would be nondeterministic); it also does the final dtype casts, so no torch op runs on the way out.
When ``C_in > BCI`` the ci-blocks are a second grid axis and ``pre`` is recomputed once per ci-block (the price of
finishing ``grad_x`` on chip without writing ``grad_pre``); weight partials of the channel-only gradients are then
written by ci-block 0 only.

sm_90 code (compiled without a GPU, triton 3.8, as ``benchmarks/kernel_report.py`` does, plus ``tt.divisibility=16``
attrs on pointers, channel counts and n/h strides, as Triton's launcher specializes multiples of 16), regs / spills:
- forward, 4 warps, halo P <= 128, BCO = 32: bf16 80-168 regs, no spills (stack 0) for 3x3, 5x5 stride 2 and 7x7
  layers, NCHW and NHWC; the pointwise tl.dot lowers to HGMMA (wgmma) in bf16 and TF32. NHWC: x through 16-byte
  cp.async (LDGSTS.128), y stored with 16-byte STG.128; NCHW: mostly narrow loads (the flattened halo is contiguous
  only within a row) - a tuning gap.
- backward, 8 warps, TP = 64, BCI = 32 (bf16/fp16/TF32): 200-237 regs (sm_80 up to 255), no spills; fp32 without
  TF32 (FMA dots): TP = 32, BCO = 16, 1 stage, 80-209 regs, no spills. BCI = 64 spilled (fp32: 255 regs, 256-376 B
  stack); see :func:`_bwd_blocks`.

Interpreter notes: under ``TRITON_INTERPRET=1`` (CPU tensors) the kernels run through NumPy; float64 works there
(``_dot``: tl.dot in fp64 from triton 3.5 on, summed broadcast products before), which lets ``gradcheck``
exercise the backward. Triton 3.8's interpreter computes bf16 ``tl.dot`` wrongly, so on CPU tensors bf16 operands
are upcast to fp32 before the dot (exact: bf16 products fit in fp32); on a GPU the dot runs natively on bf16 (tensor
cores).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import reference
from ..backends import fp32_uses_tf32, major_minor
from ..cuda_backend import device_capability

_ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "hardswish": 3, "silu": 4}

# Test hook: block sizes forced by :func:`force_blocks` (None: chosen by shape).
_FORCED: dict[str, dict | None] = {"forward": None, "backward": None}


@contextlib.contextmanager
def force_blocks(forward: dict | None = None, backward: dict | None = None):
    """Forces block sizes (for tests of tiling edges with tiny shapes).

    forward: any of TH, TW (output tile), BCO, BCI, num_warps, IDX64 (64-bit offsets even for small tensors).
    backward: any of TP, BCO, BCI, G, num_warps, IDX64.
    """
    saved = dict(_FORCED)
    _FORCED["forward"], _FORCED["backward"] = forward, backward
    try:
        yield
    finally:
        _FORCED.update(saved)


# ----------------------------------------------------------------------------------------------------------------
# Activation and its derivative (torch autograd's formulas: relu'(0) = 0, relu6' = 1 only on (0, 6),
# hardswish' = 0 below -3, x/3 + 1/2 on [-3, 3], 1 above; silu' = s (1 + x (1 - s)))
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _act(v, ACT: tl.constexpr):
    # Comparisons written so that NaN is false in every one and passes through, as in torch's relu / relu6
    # (tl.maximum(NaN, 0) may return 0 on a GPU).
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3:
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
def _pointwise(
    x_ptr, x_row, row_ok, pw_ptr, pb_ptr, co, co_ok, C_in, sxc,
    ROWS: tl.constexpr, BCO: tl.constexpr, BCI: tl.constexpr, HAS_PB: tl.constexpr, PREC: tl.constexpr,
    ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The pointwise stage of both passes: pre[ROWS, BCO] = x[rows, :] . P[co, :]^T + b_p[co], a tl.dot chain over
    C_in blocks. ``x_row`` holds each row's pixel offset; rows with ``row_ok`` False read zeros."""
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pre = tl.zeros((ROWS, BCO), dtype=acc_dt)
    for ci0 in range(0, C_in, BCI):
        ci = ci0 + tl.arange(0, BCI)
        ci_ok = ci < C_in
        ci_x = ci.to(tl.int64) if IDX64 else ci
        xt = tl.load(x_ptr + (x_row[:, None] + ci_x[None, :] * sxc), mask=row_ok[:, None] & ci_ok[None, :],
                     other=0.0)
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
@triton.jit
def _fwd_kernel(
    x_ptr, pw_ptr, pb_ptr, dw_ptr, db_ptr, y_ptr,
    C_in, C_out, H, W, H_out, W_out,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    tiles_w, tiles_per_img, n_co_blk, PT, PL,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr, TP: tl.constexpr, P: tl.constexpr,
    BCO: tl.constexpr, BCI: tl.constexpr, ACT: tl.constexpr, HAS_PB: tl.constexpr, HAS_DB: tl.constexpr,
    PREC: tl.constexpr, ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid = tl.program_id(0)
    cb = pid % n_co_blk  # channel blocks of one tile are neighbours in launch order: they share the x halo in L2
    t = pid // n_co_blk
    n = t // tiles_per_img
    r = t % tiles_per_img
    oh0 = (r // tiles_w) * TH
    ow0 = (r % tiles_w) * TW

    co = cb * BCO + tl.arange(0, BCO)
    co_ok = co < C_out

    # --- pointwise stage for tile + halo: acc[P, BCO] = x[halo pixels, :] . P^T ---
    q = tl.arange(0, P)
    ih = oh0 * SH - PT + q // WW
    iw = ow0 * SW - PL + q % WW
    q_ok = (q < HH * WW) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    if IDX64:
        n = n.to(tl.int64)
        ih = ih.to(tl.int64)
        iw = iw.to(tl.int64)
    x_row = n * sxn + ih * sxh + iw * sxw
    acc = _pointwise(x_ptr, x_row, q_ok, pw_ptr, pb_ptr, co, co_ok, C_in, sxc, P, BCO, BCI, HAS_PB, PREC, ACC64,
                     IDX64, UPCAST_DOT)
    # zero padding belongs to mid: padded (and power-of-two filler) rows are 0 after the activation
    mid = tl.where(q_ok[:, None], _act(acc, ACT), 0.0)

    # --- depthwise stage: per tap, gather the shifted halo rows ---
    tt = tl.arange(0, TP)
    lh = tt // TW
    lw = tt % TW
    t_ok = tt < TH * TW
    out = tl.zeros((TP, BCO), dtype=acc_dt)
    # a runtime loop over taps (not static_range): unrolled, the per-tap weights and gather indices of all taps were
    # hoisted and spilled for 5x5 / 7x7 on sm_90
    for tap in tl.range(0, KH * KW):
        i = tap // KW
        j = tap % KW
        idx = tl.where(t_ok, (lh * SH + i * DH) * WW + lw * SW + j * DW, 0)
        g = tl.gather(mid, tl.broadcast_to(idx[:, None], (TP, BCO)), 0)
        wd = tl.load(dw_ptr + co * (KH * KW) + tap, mask=co_ok, other=0.0).to(acc_dt)
        out += g * wd[None, :]
    if HAS_DB:
        out += tl.load(db_ptr + co, mask=co_ok, other=0.0).to(acc_dt)[None, :]

    oh = oh0 + lh
    ow = ow0 + lw
    y_ok = t_ok & (oh < H_out) & (ow < W_out)
    if IDX64:
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        co = co.to(tl.int64)
    y_off = n * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=y_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(
    gy_ptr, x_ptr, pw_ptr, pb_ptr, dw_ptr, gx_ptr, part_ptr,
    N, C_in, C_out, H, W, H_out, W_out,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sxgn, sxgc, sxgh, sxgw,
    PT, PL, G, K_PART,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TP: tl.constexpr, BCO: tl.constexpr, BCI: tl.constexpr, ACT: tl.constexpr, HAS_PB: tl.constexpr,
    PREC: tl.constexpr, ACC64: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    T: tl.constexpr = KH * KW
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    lead = pid_c == 0  # ci-block 0 also owns the channel-only partials (grad_dw, grad_pw_bias, grad_dw_bias)
    # with IDX64 the pixel index and everything derived from it (n, h, w, the offsets) is computed in int64
    HW = tl.cast(H, tl.int64) * W if IDX64 else H * W  # tl.cast: H may be specialized to a constexpr 1
    n_pix = N * HW
    n_tiles = tl.cdiv(n_pix, TP)
    part_g = part_ptr + pid_g * (C_out * K_PART)  # this program's partials slot [C_out, K_PART]

    cx = pid_c * BCI + tl.arange(0, BCI)  # this program's input channels (grad_x, grad_pw columns)
    cx_ok = cx < C_in
    cx_l = cx.to(tl.int64) if IDX64 else cx

    for tile in range(pid_g, n_tiles, G):
        # The partial slots are read back and rewritten every tile, possibly by other threads than wrote them:
        # order the previous tile's stores before this tile's loads.
        tl.debug_barrier()
        again = tile != pid_g  # later tiles accumulate into the slot, the first one initializes it
        p = tile * TP + tl.arange(0, TP)
        p_ok = p < n_pix
        n = p // HW
        rr = p % HW
        h = rr // W
        w = rr % W
        x_row = n * sxn + h * sxh + w * sxw
        x_own = tl.load(x_ptr + (x_row[:, None] + cx_l[None, :] * sxc), mask=p_ok[:, None] & cx_ok[None, :],
                        other=0.0)
        if UPCAST_DOT:
            x_own = x_own.to(tl.float32)
        gx = tl.zeros((TP, BCI), dtype=acc_dt)
        for co0 in range(0, C_out, BCO):
            co = co0 + tl.arange(0, BCO)
            co_ok = co < C_out
            # recompute pre for this tile (mid pixels only, no halo)
            pre = _pointwise(x_ptr, x_row, p_ok, pw_ptr, pb_ptr, co, co_ok, C_in, sxc, TP, BCO, BCI, HAS_PB, PREC,
                             ACC64, IDX64, UPCAST_DOT)
            mid = _act(pre, ACT)
            co_g = co.to(tl.int64) if IDX64 else co

            # depthwise transpose: mid pixel (h, w) feeds output (oh, ow) through tap (i, j) when
            # oh*SH + i*DH - PT == h (and the same for w)
            gmid = tl.zeros((TP, BCO), dtype=acc_dt)
            for tap in tl.range(0, T):  # runtime loop: see the forward kernel
                i = tap // KW
                j = tap % KW
                ohn = h + PT - i * DH
                own = w + PL - j * DW
                oh = ohn // SH
                ow = own // SW
                ok = p_ok & (ohn >= 0) & (ohn % SH == 0) & (oh < H_out) & (own >= 0) & (own % SW == 0) & (ow < W_out)
                g_row = n * sgn + oh * sgh + ow * sgw
                gyt = tl.load(gy_ptr + (g_row[:, None] + co_g[None, :] * sgc), mask=ok[:, None] & co_ok[None, :],
                              other=0.0).to(acc_dt)
                wd = tl.load(dw_ptr + co * T + tap, mask=co_ok, other=0.0).to(acc_dt)
                gmid += gyt * wd[None, :]
                if lead:
                    d_ptr = part_g + co * K_PART + (C_in + tap)
                    prev = tl.load(d_ptr, mask=co_ok & again, other=0.0)
                    tl.store(d_ptr, prev + tl.sum(gyt * mid, axis=0), mask=co_ok)
            gpre = _act_grad(gmid, pre, ACT)
            if lead:
                b_ptr = part_g + co * K_PART + (C_in + T)
                prev = tl.load(b_ptr, mask=co_ok & again, other=0.0)
                tl.store(b_ptr, prev + tl.sum(gpre, axis=0), mask=co_ok)
            gpre_in = gpre.to(x_own.dtype)
            # grad_x += grad_pre . P[co, cx]
            wx = tl.load(pw_ptr + (co[:, None] * C_in + cx[None, :]), mask=co_ok[:, None] & cx_ok[None, :], other=0.0)
            if UPCAST_DOT:
                wx = wx.to(tl.float32)
            gx = _dot(gpre_in, wx, gx, PREC, ACC64)
            # grad_pw[co, cx] partial += grad_pre^T . x
            gw = _dot(tl.trans(gpre_in), x_own, tl.zeros((BCO, BCI), dtype=acc_dt), PREC, ACC64)
            w_ptr = part_g + (co[:, None] * K_PART + cx[None, :])
            w_ok = co_ok[:, None] & cx_ok[None, :]
            prev = tl.load(w_ptr, mask=w_ok & again, other=0.0)
            tl.store(w_ptr, prev + gw, mask=w_ok)
        gx_row = n * sxgn + h * sxgh + w * sxgw
        tl.store(gx_ptr + (gx_row[:, None] + cx_l[None, :] * sxgc), gx.to(gx_ptr.dtype.element_ty),
                 mask=p_ok[:, None] & cx_ok[None, :])

    # grad_dw_bias partial: sum of grad_y over this program's output tiles (same tile striding, flat output pixels)
    if lead:
        HWo = tl.cast(H_out, tl.int64) * W_out if IDX64 else H_out * W_out
        n_opix = N * HWo
        for co0 in range(0, C_out, BCO):
            co = co0 + tl.arange(0, BCO)
            co_ok = co < C_out
            co_g = co.to(tl.int64) if IDX64 else co
            s = tl.zeros((BCO,), dtype=acc_dt)
            for tile in range(pid_g, tl.cdiv(n_opix, TP), G):
                o = tile * TP + tl.arange(0, TP)
                o_ok = o < n_opix
                no = o // HWo
                ro = o % HWo
                g_row = no * sgn + (ro // W_out) * sgh + (ro % W_out) * sgw
                gyt = tl.load(gy_ptr + (g_row[:, None] + co_g[None, :] * sgc), mask=o_ok[:, None] & co_ok[None, :],
                              other=0.0)
                s += tl.sum(gyt.to(acc_dt), axis=0)
            tl.store(part_g + co * K_PART + (C_in + T + 1), s, mask=co_ok)


@triton.jit
def _reduce_kernel(part_ptr, gpw_ptr, gdw_ptr, gpb_ptr, gdb_ptr, G, C_in, M, K_PART, T: tl.constexpr,
                   BLOCK: tl.constexpr, ACC64: tl.constexpr):
    acc_dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = m < M
    s = tl.zeros((BLOCK,), dtype=acc_dt)
    for g in range(0, G):  # fixed order: bitwise reproducible
        s += tl.load(part_ptr + g * M + m, mask=ok, other=0.0)
    co = m // K_PART
    k = m % K_PART
    tl.store(gpw_ptr + co * C_in + k, s.to(gpw_ptr.dtype.element_ty), mask=ok & (k < C_in))
    tl.store(gdw_ptr + co * T + (k - C_in), s.to(gdw_ptr.dtype.element_ty), mask=ok & (k >= C_in) & (k < C_in + T))
    tl.store(gpb_ptr + co, s.to(gpb_ptr.dtype.element_ty), mask=ok & (k == C_in + T))
    tl.store(gdb_ptr + co, s.to(gdb_ptr.dtype.element_ty), mask=ok & (k == C_in + T + 1))


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------
def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


# The forward keeps mid for one output tile plus its halo on chip: [P, BCO] with the halo padded to P pixels. At
# P = 256 it already takes 8 warps; larger dilated kernels go to the reference.
MAX_HALO = 256


def unsupported_reason(x: torch.Tensor, kernel_size, dilation) -> str | None:
    """None when these kernels run this call, else why not (``auto`` then moves on to the reference)."""
    kh, kw = kernel_size
    footprint = ((kh - 1) * dilation[0] + 1) * ((kw - 1) * dilation[1] + 1)
    if _pow2(footprint) > MAX_HALO:
        return f"the dilated kernel covers {footprint} pixels; the Triton forward keeps at most {MAX_HALO} on chip"
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and device_capability(x.device.index) < (8, 0):
        return "bfloat16 tensor-core dots need compute capability >= 8.0"
    return None


@functools.lru_cache(maxsize=256)
def _fwd_tile(h_out: int, w_out: int, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int) -> tuple[int, int]:
    """Output tile (TH, TW) with the least padded work per output pixel: (P + TP) / (TH * TW), where the halo
    (flattened) is padded to P <= 128 (up to MAX_HALO only when nothing else fits: large dilated kernels) and the
    tile to TP <= 128. P = 128 keeps mid [P, BCO=32] plus the output accumulator within registers at 4 warps on sm_90
    (P = 256 spilled on sm_90)."""
    best = None
    for p_max in (128, MAX_HALO):
        for th in range(1, min(h_out, 64) + 1):
            hh = (th - 1) * sh + (kh - 1) * dh + 1
            for tw in range(1, min(w_out, 128) + 1):
                ww = (tw - 1) * sw + (kw - 1) * dw + 1
                p, tp = _pow2(hh * ww), _pow2(th * tw)
                if p > p_max or tp > 128:
                    break
                cost = ((p + tp) / (th * tw), -tw)
                if best is None or cost < best[0]:
                    best = (cost, th, tw)
        if best is not None:
            return best[1], best[2]
    raise ValueError(f"no output tile keeps the halo within {MAX_HALO} pixels (see unsupported_reason)")


def _fma_dots(dtype, prec) -> bool:
    """True when tl.dot runs on FMA units (fp32 without TF32, fp64): its operands are then held in registers whole
    along K, so the blocks must be smaller. dtype: a torch dtype or "bf16"/"fp16"/"fp32"/"fp64" (None: a
    tensor-core dtype); prec: the launcher's input precision (None: "tf32" for fp32)."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "bf16"
    if name in ("fp64", "float64"):
        return True
    return name in ("fp32", "float32") and (prec or "tf32") != "tf32"


def _fwd_blocks(c_in, c_out, h_out, w_out, kh, kw, sh, sw, dh, dw, dtype=None, prec: str | None = None) -> dict:
    """Forward block sizes and launch options (the kernel's tile constexprs + num_warps), by shape and dtype
    (see :func:`_fma_dots`): FMA dots (fp32 without TF32) take BCI = 16 (BCI = 32/64 spilled up to 4.9 KB on
    sm_80)."""
    forced = dict(_FORCED["forward"] or {})
    forced.pop("IDX64", None)
    th, tw = _fwd_tile(h_out, w_out, kh, kw, sh, sw, dh, dw)
    th, tw = forced.pop("TH", th), forced.pop("TW", tw)
    hh, ww = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    p = max(16, _pow2(hh * ww))  # tl.dot needs M >= 16
    blk = dict(TH=th, TW=tw, HH=hh, WW=ww, TP=_pow2(th * tw), P=p, BCO=max(16, min(32, _pow2(c_out))),
               BCI=max(16, min(16 if _fma_dots(dtype, prec) else 64, _pow2(c_in))))
    blk["num_warps"] = 8 if p * blk["BCO"] > 4096 else 4
    if _fma_dots(dtype, prec):
        # 3 pipeline stages (the default) left a few live values spilled at low register counts (8-16 B stack,
        # sm_80 and sm_90), and 2 stages still spilled 8 B on sm_90 (3x3 NCHW, 32 -> 32 channels, 128 regs); with
        # 1 stage none spill. The FMA dot is compute-bound, so the lost prefetch costs little.
        blk["num_stages"] = 1
    blk.update(forced)
    return blk


def _bwd_blocks(c_in, c_out, dtype=None, prec: str | None = None) -> dict:
    """Backward block sizes and launch options, by shape and dtype (G, the number of tile programs, is chosen by the
    launcher).

    dtype: a torch dtype or "bf16"/"fp16"/"fp32"/"fp64" (None: a tensor-core dtype); prec: the tl.dot input
    precision the launcher picks ("tf32"/"ieee"; None: "tf32" for fp32). Register pressure, compiled without a GPU
    (triton 3.8, 8 warps, worst case 7x7 + silu + pw_bias, with and without divisibility-16 hints):
    - tensor-core dots (bf16/fp16, fp32 as TF32): TP = 64, BCI = 32: sm_80 220-255 regs, sm_90 200-237 regs, no
      spills. BCI = 64 spilled on sm_80 (bf16 24-192 B stack, TF32 470-660 B) and on sm_90 TF32 (330-380 B), and on
      sm_90 bf16/fp16 without the divisibility hints (16-32 B).
    - fp32 without TF32 (and fp64): the dots run on FMA units with their operands in registers: TP = 32, BCO = 16,
      BCI = 32, 1 pipeline stage: sm_80 80-206 regs, sm_90 80-209 regs, no spills (TP = 64 spilled even at
      BCI = 16; BCO = 32 spilled 112 B on sm_90 with relu6 + pw_bias).
    8 warps: at 4 the [TP, BCI] grad_x accumulator + pre/mid/grad_mid tiles spilled.
    """
    forced = {k: v for k, v in (_FORCED["backward"] or {}).items() if k not in ("IDX64", "G")}
    fma = _fma_dots(dtype, prec)
    blk = dict(TP=32 if fma else 64, BCO=max(16, min(16 if fma else 32, _pow2(c_out))),
               BCI=max(16, min(32, _pow2(c_in))), num_warps=8)
    if fma:
        blk["num_stages"] = 1  # 3 or 2 stages: 8-16 B spilled on sm_90 at 80-255 regs; 1 stage: none
    elif str(dtype).replace("torch.", "") in ("fp32", "float32"):
        # TF32: fp32 operands are twice the bytes of bf16, and 3 stages of them reached 255 regs on sm_80 and spilled
        # 32 B (5x5 + relu + pw_bias, channels_last); 2 stages keep the same blocks (and tensor cores) spill-free
        blk["num_stages"] = 2
    blk.update(forced)
    return blk


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) + 1


def _needs_int64(*tensors: torch.Tensor) -> bool:
    return any(_max_offset(t) >= 2**31 - 1 for t in tensors)


def _dot_settings(dtype: torch.dtype, device: torch.device) -> tuple[str, bool, bool]:
    """(input_precision, fp64 accumulation, upcast bf16 before tl.dot)."""
    prec = "tf32" if dtype == torch.float32 and fp32_uses_tf32() else "ieee"
    return prec, dtype == torch.float64, dtype == torch.bfloat16 and device.type == "cpu"


def _check(x, op: str, dtype_ok=(torch.float16, torch.bfloat16, torch.float32, torch.float64)):
    if x.dtype not in dtype_ok:
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


def forward(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation):
    _check(x, "bsconv_cuda::triton_forward")
    pw, pw_bias, dw, dw_bias = _contiguous_params(pw_weight, pw_bias, dw_weight, dw_bias)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = dw.shape
    sh, sw = stride
    pt, _, pl, _ = padding
    dh, dwl = dilation
    h_out, w_out = reference.output_size(h, w, (kh, kw), stride, padding, dilation)
    y = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                    memory_format=reference.output_memory_format(x))
    if y.numel() == 0:
        return y

    prec, acc64, upcast = _dot_settings(x.dtype, x.device)
    blk = _fwd_blocks(c_in, c_out, h_out, w_out, kh, kw, sh, sw, dh, dwl, x.dtype, prec)
    th, tw, bco = blk["TH"], blk["TW"], blk["BCO"]
    tiles_h, tiles_w = triton.cdiv(h_out, th), triton.cdiv(w_out, tw)
    n_co = triton.cdiv(c_out, bco)
    grid = (n * tiles_h * tiles_w * n_co,)
    pb = pw_bias if pw_bias is not None else pw
    db = dw_bias if dw_bias is not None else dw
    with _launch_device(x):
        _launchable(_fwd_kernel)[grid](
            x, pw, pb, dw, db, y,
            c_in, c_out, h, w, h_out, w_out,
            *x.stride(), *y.stride(),
            tiles_w, tiles_h * tiles_w, n_co, pt, pl,
            KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dwl, **blk, ACT=_ACT_CODES[activation],
            HAS_PB=pw_bias is not None, HAS_DB=dw_bias is not None, PREC=prec, ACC64=acc64, UPCAST_DOT=upcast,
            IDX64=(_FORCED["forward"] or {}).get("IDX64", _needs_int64(x, y)),
        )
    return y


def backward(grad_y, x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, dilation, activation):
    _check(x, "bsconv_cuda::triton_backward")
    pw, pw_bias, dw, dw_bias = _contiguous_params(pw_weight, pw_bias, dw_weight, dw_bias)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = dw.shape
    h_out, w_out = grad_y.shape[2:]
    sh, sw = stride
    pt, _, pl, _ = padding
    dh, dwl = dilation
    taps = kh * kw
    dev, dt = x.device, x.dtype
    grad_x = torch.empty(x.shape, dtype=dt, device=dev, memory_format=reference.output_memory_format(x))
    grad_pw = torch.empty((c_out, c_in), dtype=dt, device=dev)
    grad_dw = torch.empty((c_out, 1, kh, kw), dtype=dt, device=dev)
    grad_pb = torch.empty((c_out,), dtype=dt, device=dev)
    grad_db = torch.empty((c_out,), dtype=dt, device=dev)
    if x.numel() == 0 or grad_y.numel() == 0:
        return (grad_x.zero_(), grad_pw.zero_(), grad_pb.zero_(), grad_dw.zero_(),
                grad_db.copy_(grad_y.sum((0, 2, 3))))

    prec, acc64, upcast = _dot_settings(dt, dev)
    blk = _bwd_blocks(c_in, c_out, dt, prec)
    forced = _FORCED["backward"] or {}
    tp, bci = blk["TP"], blk["BCI"]
    n_ci = triton.cdiv(c_in, bci)
    k_part = c_in + taps + 2  # partial slot columns: grad_pw (C_in) | grad_dw (taps) | grad_pw_bias | grad_dw_bias
    n_tiles = triton.cdiv(n * h * w, tp)  # every program must own >= 1 mid tile: it initializes its slot
    # G: programs along the tile axis; by shape only (never by device), so results are reproducible bit for bit.
    # Bounded so that the partials buffer stays small (<= 2^24 elements).
    g = max(1, min(n_tiles, forced.get("G", max(1, 1024 // n_ci)), (1 << 24) // (c_out * k_part)))
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32
    part = torch.empty((g, c_out, k_part), dtype=acc_dt, device=dev)
    m = c_out * k_part
    block = 256
    with _launch_device(x):
        _launchable(_bwd_kernel)[(g, n_ci)](
            grad_y, x, pw, pw_bias if pw_bias is not None else pw, dw, grad_x, part,
            n, c_in, c_out, h, w, h_out, w_out,
            *x.stride(), *grad_y.stride(), *grad_x.stride(),
            pt, pl, g, k_part,
            KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dwl, **blk, ACT=_ACT_CODES[activation],
            HAS_PB=pw_bias is not None, PREC=prec, ACC64=acc64, UPCAST_DOT=upcast,
            IDX64=forced.get("IDX64", _needs_int64(x, grad_y, grad_x)),
        )
        _launchable(_reduce_kernel)[(triton.cdiv(m, block),)](
            part, grad_pw, grad_dw, grad_pb, grad_db, g, c_in, m, k_part, T=taps, BLOCK=block, ACC64=acc64,
        )
    return grad_x, grad_pw, grad_pb, grad_dw, grad_db
