"""What every fused-backend correctness test does: poison outputs, run forward and backward, compare y and all five
gradients with the reference computed in float64, with these tolerances (:func:`assert_close`):

- fp32 without TF32: max abs err <= 1e-4 * max(1, max|ref|);
- fp16 / bf16 / TF32: ||out - ref|| / ||ref|| <= 1e-2 AND max abs err <= 8 u * max|ref|, with u the unit roundoff
  of the format (:data:`UNIT_ROUNDOFF`: bf16 2^-8, fp16 and TF32 2^-11). The element-wise bound is what catches one
  wrong pixel that the norm bound averages away in a large tensor. Why 8 u is enough for a correct kernel: the
  reference runs on the same rounded inputs, the kernels accumulate in fp32, so the only low-precision roundings are
  the output's (<= u * |ref|), TF32's operand rounding and the rounding of grad_pre to the input dtype before the
  backward dots. Those enter each sum of L terms as independent relative errors <= u, so their total grows like
  u * sqrt(sum of squared terms), about u * |ref|, not like u * L: a torch emulation of both backends' rounding
  points measured at most 1.2 u * max|ref| with L up to 65536 (tests/test_fused_checks.py keeps the rounding
  model and the single-pixel cases).

What no bound here can check: TF32 with relu / relu6 / hardswish. TF32 rounds the fp32 operands of the pointwise dot,
which moves pre by about 2^-11 of its terms' magnitude, so pixels with pre that close to a kink fall on the other side
of it than in the reference, and their gradients differ by a whole grad_mid (the emulation, with fp32 inputs: up to
0.2 * max|ref| in grad_x and 1-2 % in norm). bf16 / fp16 inputs make the dot's products exact in fp32, so their
kinks move only by fp32 accumulation error, as in the strict fp32 checks. The grid's TF32 case has no activation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends, reference
from bsconv_cuda.functional import normalize_conv_args


@contextlib.contextmanager
def poisoned_outputs(device: torch.device):
    """Makes freshly allocated output memory NaN, so an element a kernel forgets to write fails the comparison.

    Python-side allocations (the triton launchers, the autograd layer) go through ``torch.empty``, which is
    patched to return NaN-filled tensors; on a GPU the caching allocator is also flooded with NaN blocks first, so
    allocations made in C++ (the cuda backend) get poisoned memory too.
    """
    original = torch.empty

    def nan_empty(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(math.nan)
        return out

    if device.type == "cuda":
        torch.cuda.empty_cache()
        flood = [torch.full((1 << 20,), math.nan, device=device) for _ in range(64)]  # 256 MiB of NaN blocks
        flood += [torch.full((1 << 12,), math.nan, device=device) for _ in range(256)]
        del flood
    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = original


@contextlib.contextmanager
def tf32_convolutions(enabled: bool):
    """cuDNN's TF32 switch for fp32 convolutions, which the triton backend follows (``backends.fp32_uses_tf32``): off
    for every check with the strict fp32 bound."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def skip_unless_available(backend: str, device: torch.device) -> None:
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")


@dataclasses.dataclass(frozen=True)
class Case:
    n: int = 2
    c_in: int = 5
    c_out: int = 7
    h: int = 9
    w: int = 11
    k: tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | str = 1
    dilation: int | tuple[int, int] = 1
    pw_bias: bool = True
    dw_bias: bool = True
    act: str | None = None
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    tf32: bool = False
    sliced: bool = False  # x, both weights, both biases and grad_y are non-contiguous views (any strides)

    def __str__(self) -> str:
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != f.default).replace("torch.", "") or "base"


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with ``t``'s values: every other element along the last dimension of a tensor twice
    as wide (a 1-D bias becomes a stride-2 slice, as when it is cut from a larger tensor)."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert t.numel() <= 1 or not view.is_contiguous()  # every dim of size > 1 has twice its dense stride
    return view


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype).to(device)
        return strided_view(t) if case.sliced else t

    x = rand(case.n, case.c_in, case.h, case.w)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # pre-activations of a few units: the activations' kinks (0, 6, +-3) are all visited
    pw = rand(case.c_out, case.c_in, scale=3.0 / math.sqrt(case.c_in))
    dw = rand(case.c_out, 1, *case.k, scale=1.0 / math.sqrt(case.k[0] * case.k[1]))
    pw_bias = rand(case.c_out) if case.pw_bias else None
    dw_bias = rand(case.c_out) if case.dw_bias else None
    return x, pw, dw, pw_bias, dw_bias


# Unit roundoff of the low-precision formats (round to nearest): bf16 keeps 8 significant bits, fp16 and TF32 11.
# float32 results checked with strict=False are TF32 results.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}
# The low-precision element-wise bound, in units of roundoff times max|ref| (see the module docstring).
ELEMENT_ROUNDOFFS = 8


def assert_close(
    name: str, out: torch.Tensor, ref: torch.Tensor, strict: bool, precision: torch.dtype | None = None
) -> None:
    """``out`` (a kernel's result) against ``ref`` (float64) with the module docstring's bounds: strict = fp32
    without TF32; else the low-precision bounds of ``precision``, the dtype the result was computed in (default:
    ``out``'s dtype; e.g. bfloat16 for a float32 parameter gradient computed under bf16 autocast)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    dtype = out.dtype if precision is None else precision
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert not out.isnan().any(), f"{name}: NaN in output (unwritten element?)"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    if strict:
        tol = 1e-4 * max(1.0, ref_max)
        assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}"
    else:
        rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.3g} > 1e-2"
        tol = ELEMENT_ROUNDOFFS * UNIT_ROUNDOFF[dtype] * ref_max
        where = tuple(int(i) for i in torch.unravel_index((out - ref).abs().argmax(), out.shape)) if out.numel() else ()
        assert err <= tol, (
            f"{name}: max abs err {err:.3g} at {where} > {ELEMENT_ROUNDOFFS} u * max|ref| = {tol:.3g} ({dtype})"
        )


def assert_close_with_nan(name: str, out: torch.Tensor, ref: torch.Tensor, strict: bool) -> None:
    """:func:`assert_close` for results that may hold NaN: NaN exactly where ``ref`` has NaN (as torch propagates
    it), the other elements within the usual bounds. Only for tests that feed NaN in on purpose: elsewhere a NaN is
    an unwritten (poisoned) element."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out_nan, ref_nan = out.detach().cpu().isnan(), ref.detach().cpu().isnan()
    assert torch.equal(out_nan, ref_nan), (
        f"{name}: NaN at {out_nan.sum().item()} elements, the reference at {ref_nan.sum().item()} "
        f"({(out_nan & ~ref_nan).sum().item()} extra, {(ref_nan & ~out_nan).sum().item()} missing)"
    )
    keep = ~ref_nan
    assert_close(name, out.detach().cpu()[keep], ref.detach().cpu()[keep], strict)


def check_case(case: Case, backend: str, device: torch.device, seed: int = 0) -> None:
    skip_unless_available(backend, device)
    if case.dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 goes to the reference on GPU")
    x, pw, dw, pw_bias, dw_bias = make_inputs(case, device, seed)
    leaves = [t.detach().requires_grad_() for t in (x, pw, dw)]
    biases = [None if b is None else b.detach().requires_grad_() for b in (pw_bias, dw_bias)]
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, mid_activation=case.act)

    with tf32_convolutions(case.tf32):
        with poisoned_outputs(device):
            y = bsconv_cuda.bsconv_u(leaves[0], leaves[1], leaves[2], biases[1], pw_bias=biases[0], backend=backend,
                                     **kwargs)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        grad_y_in = grad_y.to(case.dtype).to(device)
        with poisoned_outputs(device):
            y.backward(strided_view(grad_y_in) if case.sliced else grad_y_in)

    # the truth: the reference in float64 on the same (rounded) inputs, through the backend's normalized arguments
    d64 = [None if t is None else t.detach().cpu().double() for t in (x, pw, pw_bias, dw, dw_bias)]
    conv = (*normalize_conv_args(case.k, case.stride, case.padding, case.dilation), case.act or "none")
    y_ref = reference.forward(*d64, *conv)
    grads_ref = reference.backward(grad_y.to(case.dtype).double(), *d64, *conv)

    strict = case.dtype in (torch.float32, torch.float64) and not case.tf32
    assert y.dtype == case.dtype
    assert y.is_contiguous(memory_format=reference.output_memory_format(x)), "y has the wrong memory format"
    assert_close("y", y, y_ref, strict)
    pb_grad, db_grad = (None if b is None else b.grad for b in biases)
    got = [leaves[0].grad, leaves[1].grad, pb_grad, leaves[2].grad, db_grad]
    names = ["grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    for name, g, r, wanted in zip(names, got, grads_ref, [True, True, case.pw_bias, True, case.dw_bias]):
        if not wanted:
            continue
        assert g is not None, f"{name}: no gradient"
        assert g.dtype == case.dtype, f"{name}: dtype {g.dtype}"
        assert_close(name, g, r, strict)
