"""Bad input raises a clear error naming the argument; never a crash or a silently wrong result."""

import pytest
import torch

import bsconv_cuda


def _args(c_in=3, c_out=4, k=3, dtype=torch.float32):
    return dict(
        x=torch.randn(2, c_in, 6, 6, dtype=dtype),
        pw_weight=torch.randn(c_out, c_in, dtype=dtype),
        dw_weight=torch.randn(c_out, 1, k, k, dtype=dtype),
        dw_bias=torch.randn(c_out, dtype=dtype),
    )


def _call(**overrides):
    args = _args()
    args.update(overrides)
    return bsconv_cuda.bsconv_u(**args)


BAD_INPUTS = [
    (dict(x=torch.randn(3, 6, 6)), ValueError, "x must be 4-D"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(pw_weight=torch.randn(4, 3, 3, 3)), ValueError, "pw_weight must be"),
    (dict(pw_weight=torch.randn(4, 5)), ValueError, "x has 3 channels but pw_weight expects C_in=5"),
    (dict(dw_weight=torch.randn(5, 1, 3, 3)), ValueError, "dw_weight must be .C_out, 1, kh, kw. with C_out=4"),
    (dict(dw_weight=torch.randn(4, 2, 3, 3)), ValueError, "dw_weight must be"),
    (dict(dw_weight=torch.randn(4, 1, 0, 3)), ValueError, "dw_weight must have a kernel of at least 1x1"),
    (dict(pw_weight=torch.randn(0, 3), dw_weight=torch.randn(0, 1, 3, 3)), ValueError, "at least one output"),
    (dict(dw_bias=torch.randn(5)), ValueError, r"dw_bias must have shape \(4,\)"),
    (dict(pw_bias=torch.randn(3)), ValueError, r"pw_bias must have shape \(4,\)"),
    (dict(x=torch.randint(0, 3, (2, 3, 6, 6))), TypeError, "x has unsupported dtype torch.int64"),
    (dict(pw_weight=torch.randn(4, 3, dtype=torch.float64)), TypeError, "pw_weight has dtype torch.float64 but x has"),
    (dict(dw_bias=torch.randn(4, device="meta")), RuntimeError, "dw_bias is on meta but x is on cpu"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (dict(stride=1.5), TypeError, "stride must be an int or a pair"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding="full"), ValueError, "padding must be an int, a pair, 'valid' or 'same'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(dw_weight=torch.randn(4, 1, 9, 9)), ValueError, "too small for a \\(9, 9\\) kernel"),
    (dict(mid_activation="gelu"), ValueError, "mid_activation must be None or one of"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run this call: the CUDA kernels need CUDA tensors"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_named_error(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call: .*TRITON_INTERPRET=1"):
        _call(backend="triton")


def test_pw_weight_4d_and_2d_agree():
    args = _args()
    y2 = bsconv_cuda.bsconv_u(**args)
    args["pw_weight"] = args["pw_weight"][:, :, None, None]
    torch.testing.assert_close(bsconv_cuda.bsconv_u(**args), y2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_empty_batch_gives_empty_output(backend):
    y = _call(x=torch.randn(0, 3, 6, 6), padding=1, backend=backend)
    assert y.shape == (0, 4, 6, 6)


def test_triton_refuses_a_halo_it_cannot_keep_on_chip():
    if "triton" not in bsconv_cuda.available_backends("cpu"):
        pytest.skip("the triton backend is not available here")
    x = torch.randn(1, 3, 80, 80)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call: the dilated kernel covers 3721"):
        bsconv_cuda.bsconv_u(x, torch.randn(4, 3), torch.randn(4, 1, 7, 7), dilation=10, backend="triton")
