"""The low-precision bounds of tests/fused_checks.py::assert_close: what a correct bf16 / fp16 / TF32 kernel produces
passes them, and one wrong pixel in a large tensor fails them (the relative L2 bound alone lets it through)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsconv_cuda import reference
from fused_checks import ELEMENT_ROUNDOFFS, UNIT_ROUNDOFF, assert_close

LOW_PRECISION = [torch.bfloat16, torch.float16, torch.float32]  # float32 with strict=False: TF32


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 11 significant bits (round to nearest, ties away: cvt.rna.tf32.f32)."""
    bits = t.float().view(torch.int32)
    return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)


def _correctly_rounded(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _round_to_tf32(ref) if dtype == torch.float32 else ref.to(dtype)


def _low_precision_kernel_model(dtype: torch.dtype, activation: str):
    """A correct fused kernel's rounding, emulated with torch on a layer of realistic size: inputs in ``dtype``,
    fp32 accumulation, TF32 operands in every dot (float32), grad_pre rounded to ``dtype`` before the backward dots
    (both backends do), every output rounded to ``dtype``. Returns the six results and the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    n, c_in, c_out, hw, k = 8, 64, 96, 24, 3
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), activation)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x, pw, pb = rand(n, c_in, hw, hw), rand(c_out, c_in, scale=3 / math.sqrt(c_in)), rand(c_out)
    dw, db = rand(c_out, 1, k, k, scale=1 / k), rand(c_out)
    grad_y = rand(n, c_out, hw, hw)
    d64 = [t.double() for t in (x, pw, pb, dw, db)]
    expected = [reference.forward(*d64, *conv), *reference.backward(grad_y.double(), *d64, *conv)]

    dot = _round_to_tf32 if dtype == torch.float32 else (lambda t: t.float())  # products exact in fp32 otherwise
    x32, pw32, pb32, dw32, db32, gy32 = (t.float() for t in (x, pw, pb, dw, db, grad_y))
    pre = F.conv2d(dot(x32), dot(pw32)[:, :, None, None], pb32)
    mid = F.pad(reference.activate(pre, activation), (1, 1, 1, 1))
    y = F.conv2d(mid, dw32, db32, groups=c_out)
    grad_mid, grad_dw, grad_db = torch.ops.aten.convolution_backward(
        gy32, mid, dw32, [c_out], [1, 1], [0, 0], [1, 1], False, [0, 0], c_out, [True, True, True])
    grad_pre = reference.activation_backward(grad_mid[:, :, 1:-1, 1:-1], pre, activation).to(dtype).float()
    grad_x, grad_pw, grad_pb = torch.ops.aten.convolution_backward(
        dot(grad_pre), dot(x32), dot(pw32)[:, :, None, None], [c_out], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, True])
    got = [y, grad_x, grad_pw.reshape(c_out, c_in), grad_pb, grad_dw, grad_db]
    return [g.to(dtype) for g in got], expected


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16", "tf32"])
def test_bounds_accept_a_correct_low_precision_kernel(dtype):
    # TF32 with relu / relu6 / hardswish is not checkable this way: its rounded dot moves pre by ~2^-11 of its terms
    # and so flips the kink of the pixels near it (see fused_checks' docstring); silu has no kink.
    activation = "silu" if dtype == torch.float32 else "relu6"
    got, expected = _low_precision_kernel_model(dtype, activation)
    names = ["y", "grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    for name, g, r in zip(names, got, expected):
        assert_close(name, g, r, strict=False)
        # and with room: the model's error stays well inside the bound
        err = (g.double() - r).abs().max().item()
        assert err <= ELEMENT_ROUNDOFFS / 4 * UNIT_ROUNDOFF[dtype] * r.abs().max().item(), name


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16", "tf32"])
def test_bounds_catch_one_wrong_pixel_in_a_large_tensor(dtype):
    ref = torch.randn(16, 64, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = _correctly_rounded(ref, dtype)
    assert_close("correctly rounded", out, ref, strict=False)

    # typical kernel bugs hit one pixel: left unwritten as 0, or given a neighbour's value; a pixel of typical size
    n, c, h, w = (int(i) for i in torch.nonzero((ref[..., :-1].abs() - 1).abs() < 0.05)[0])
    for wrong in (0.0, ref[n, c, h, w + 1].item()):
        corrupted = out.clone()
        corrupted[n, c, h, w] = wrong
        rel = ((corrupted.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, "the relative L2 bound alone does not see one pixel of a large tensor"
        with pytest.raises(AssertionError, match=rf"max abs err .* at \({n}, {c}, {h}, {w}\)"):
            assert_close("one wrong pixel", corrupted, ref, strict=False)
