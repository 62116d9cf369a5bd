"""The shared correctness grid of the fused backends ("triton", "cuda") against the float64 reference.

Every case runs the public API ``bsconv_cuda.bsconv_u(..., backend=...)`` forward and backward, with outputs
poisoned (NaN) before the kernels run, and compares y and all five gradients with ``bsconv_cuda.reference`` run in
float64 on the same inputs, with the tolerances of tests/fused_checks.py:
fp32 without TF32: max abs err <= 1e-4 * max(1, max|ref|); fp16 / bf16 / TF32: ||out - ref|| / ||ref|| <= 1e-2 and
max abs err <= 8 u * max|ref| (u: the format's unit roundoff, bf16 2^-8, fp16 / TF32 2^-11).

On CPU the triton backend runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
are tiny; tiling edges are tested with forced small blocks in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bsconv_cuda
from bsconv_cuda import reference
from bsconv_cuda.ops import OPS
from fused_checks import (
    Case, assert_close, assert_close_with_nan, check_case, make_inputs, poisoned_outputs, skip_unless_available,
    strided_view, tf32_convolutions,
)

FUSED_BACKENDS = ["triton", "cuda"]


GRID = [
    Case(),
    Case(c_in=1),
    Case(c_out=1),
    Case(c_in=1, c_out=1, h=5, w=6),
    Case(k=(1, 1), padding=0),
    Case(k=(5, 5), padding=2, act="relu"),
    Case(n=1, k=(7, 7), padding=3),
    Case(n=1, k=(7, 7), padding=0, h=10, w=9),
    Case(k=(3, 5), padding=(1, 2)),
    Case(stride=2, h=9, w=7),
    Case(stride=(2, 1), k=(3, 5), padding=(0, 2), h=11, w=8),
    Case(dilation=2, padding=2),
    Case(dilation=(2, 1), k=(3, 5), padding="same"),
    Case(padding=0),
    Case(padding="same"),
    Case(k=(4, 2), padding="same"),
    Case(pw_bias=True, dw_bias=False, padding=2),
    Case(pw_bias=False, dw_bias=False),
    Case(act="relu"),
    Case(act="relu6"),
    Case(act="hardswish"),
    Case(act="silu"),
    Case(act="silu", stride=2, padding=0, h=8, w=9),
    Case(channels_last=True),
    Case(channels_last=True, act="hardswish", stride=2),
    Case(sliced=True),
    Case(dtype=torch.bfloat16),
    Case(dtype=torch.bfloat16, channels_last=True, act="relu6", k=(5, 5), padding=2),
    Case(dtype=torch.float16),
    Case(dtype=torch.float16, act="silu", stride=2, dilation=2, padding=2),
    Case(tf32=True),
    Case(dtype=torch.float64, act="hardswish"),
    Case(n=1, c_in=70, c_out=40, h=5, w=6),  # more than one channel block with the default block sizes
    Case(n=1, c_in=130, c_out=20, h=4, w=5),  # wide C_in: the Triton backward takes its split path
    Case(n=1, c_in=24, c_out=20, channels_last=True),  # C_in a multiple of 8: vector loads of x (Triton)
    Case(n=1, c_in=36, c_out=20, h=24, w=35),  # CUDA: 4 backward tiles of 12 x 18, 64-wide GEMM blocks
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=str)
def test_against_reference(case: Case, backend: str, device: torch.device) -> None:
    check_case(case, backend, device)


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2 if kh <= 4 else 1)), draw(st.integers(1, 2 if kw <= 4 else 1)))
    same = draw(st.booleans()) and stride == (1, 1)
    padding = "same" if same else (draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1)))
    pads = (0, 0) if same else padding
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * pads[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * pads[1])
    h, w = draw(st.integers(min_h, max(min_h, 9))), draw(st.integers(min_w, max(min_w, 9)))
    return Case(
        n=draw(st.integers(1, 2)), c_in=draw(st.integers(1, 9)), c_out=draw(st.integers(1, 9)), h=h, w=w,
        k=(kh, kw), stride=stride, padding=padding, dilation=dilation, pw_bias=draw(st.booleans()),
        dw_bias=draw(st.booleans()), act=draw(st.sampled_from([None, "relu", "relu6", "hardswish", "silu"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        channels_last=draw(st.booleans()),
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), seed=st.integers(0, 1000))
def test_random_configurations(case: Case, seed: int, backend: str, device: torch.device) -> None:
    check_case(case, backend, device, seed)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_operators_take_strided_views_of_every_tensor(backend, device):
    """The operators themselves (what a direct torch.ops call reaches, below bsconv_u's own copies) on strided views
    of x, both weights, both biases and grad_y: the kernel honours the strides or the launcher copies."""
    skip_unless_available(backend, device)
    dense = Case(n=2, c_in=6, c_out=12, h=7, w=9, act="relu6")
    x, pw, dw, pw_bias, dw_bias = make_inputs(dense, device)
    conv = ((1, 2), (1, 1, 0, 2), (1, 1), "relu6")
    forward_op, backward_op = OPS[backend]
    grad_y = torch.randn(forward_op(x, pw, pw_bias, dw, dw_bias, *conv).shape, dtype=x.dtype).to(device)
    views = [strided_view(t) for t in (grad_y, x, pw, pw_bias, dw, dw_bias)]
    assert not any(v.is_contiguous() for v in views)
    with tf32_convolutions(False), poisoned_outputs(x.device):
        y = forward_op(*views[1:], *conv)
        grads = backward_op(*views, *conv, list(reference.ALL_GRADIENTS))
    d64 = [t.cpu().double() for t in (x, pw, pw_bias, dw, dw_bias)]
    assert_close("y", y, reference.forward(*d64, *conv), strict=True)
    names = ["grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    for name, g, r in zip(names, grads, reference.backward(grad_y.cpu().double(), *d64, *conv)):
        assert_close(name, g, r, strict=True)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("nan_in", ["pw_bias", "x"])
@pytest.mark.parametrize("act", [None, "relu", "relu6", "hardswish", "silu"])
def test_nan_propagates_like_torch(act, nan_in, backend, device):
    """A NaN in the intermediate stays NaN through every activation (torch's relu / relu6 propagate it), and the
    backward passes the gradient through at NaN like torch's threshold_backward / hardtanh_backward. A NaN pw_bias
    entry makes one whole channel of the intermediate NaN: y is NaN in that channel and the gradients of x, pw_weight
    and pw_bias stay finite, but differ from those of a kernel that turns NaN into 0. A NaN pixel of x makes every
    channel NaN at that pixel: y is NaN around it."""
    skip_unless_available(backend, device)
    case = Case(act=act)
    x, pw, dw, pw_bias, dw_bias = make_inputs(case, device)
    if nan_in == "pw_bias":
        pw_bias[3] = float("nan")
    else:
        x[1, :, 4, 5] = float("nan")
    leaves = [t.detach().requires_grad_() for t in (x, pw, pw_bias, dw, dw_bias)]
    grad_y = torch.randn(case.n, case.c_out, case.h, case.w, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with tf32_convolutions(False):
        with poisoned_outputs(device):
            y = bsconv_cuda.bsconv_u(leaves[0], leaves[1], leaves[3], leaves[4], padding=1, pw_bias=leaves[2],
                                     mid_activation=act, backend=backend)
        with poisoned_outputs(device):
            y.backward(grad_y.to(case.dtype).to(device))

    d64 = [t.detach().cpu().double() for t in (x, pw, pw_bias, dw, dw_bias)]
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), act or "none")
    y_ref = reference.forward(*d64, *conv)
    assert y_ref.isnan().any() and not y_ref.isnan().all()
    assert_close_with_nan("y", y, y_ref, strict=True)
    names = ["grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    grads_ref = reference.backward(grad_y.double(), *d64, *conv)
    for name, leaf, ref in zip(names, leaves, grads_ref):
        assert_close_with_nan(name, leaf.grad, ref, strict=True)


# pre values at each activation's kinks, where torch's gradient conventions decide (all exact in every dtype)
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0)}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("act", sorted(KINKS))
def test_gradients_at_the_activation_kinks_follow_torch(act, backend, device):
    """The intermediate exactly at the activation's kinks (x through an identity pointwise weight: exact in every
    MMA), and the gradients against torch autograd of the unfused layers in float64. hardswish's at -3 and 3 changed
    between torch 2.7 (-0.5 and 1.5: the linear band closed) and torch 2.11 (0 and 1): the kernels must follow the
    installed torch (reference.kernel_activation)."""
    skip_unless_available(backend, device)
    gen = torch.Generator().manual_seed(0)
    channels = 4
    values = torch.tensor(KINKS[act] + (-1.5, 2.5))
    x = values[torch.randint(len(values), (2, channels, 6, 7), generator=gen)]
    pw, dw = torch.eye(channels), torch.randn(channels, 1, 3, 3, generator=gen)
    dw_bias, grad_y = torch.randn(channels, generator=gen), torch.randn(2, channels, 6, 7, generator=gen)
    expected = [t.double().requires_grad_() for t in (x, pw, dw, dw_bias)]
    mid = getattr(torch.nn.functional, act)(torch.nn.functional.conv2d(expected[0], expected[1][:, :, None, None]))
    torch.nn.functional.conv2d(mid, expected[2], expected[3], padding=1, groups=channels).backward(grad_y.double())
    leaves = [t.to(device).requires_grad_() for t in (x, pw, dw, dw_bias)]
    with tf32_convolutions(False):
        with poisoned_outputs(device):
            y = bsconv_cuda.bsconv_u(*leaves, padding=1, mid_activation=act, backend=backend)
        with poisoned_outputs(device):
            y.backward(grad_y.to(device))
    for name, leaf, ref in zip(("grad_x", "grad_pw_weight", "grad_dw_weight", "grad_dw_bias"), leaves, expected):
        assert_close(name, leaf.grad, ref.grad, strict=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_tensors_on_a_gpu_that_is_not_the_current_one(backend):
    """Triton launches on the current device: every launch must run under the tensors' device instead (the cuda
    backend's DeviceGuard, the triton launchers' device context)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    with torch.cuda.device(0):
        check_case(Case(act="relu6", dtype=torch.bfloat16, channels_last=True), backend, torch.device("cuda:1"))
        check_case(Case(act="silu", sliced=True), backend, torch.device("cuda:1"))
