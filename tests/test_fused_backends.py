"""The shared correctness grid of the fused backends ("triton", "cuda") against the float64 reference.

Every case runs the public API ``bsconv_cuda.bsconv_u(..., backend=...)`` forward and backward, with outputs
poisoned (NaN) before the kernels run, and compares y and all five gradients with ``bsconv_cuda.reference`` run in
float64 on the same inputs, with DESIGN.md's tolerances:
fp32 without TF32: max abs err <= 1e-4 * max(1, max|ref|); fp16 / bf16 / TF32: ||out - ref|| / ||ref|| <= 1e-2.

On CPU the triton backend runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
are tiny; tiling edges are tested with forced small blocks in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_checks import Case, check_case

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
