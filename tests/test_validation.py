"""Bad input raises a clear error naming the argument; never a crash or a silently wrong result."""

import pytest
import torch

import bsconv_cuda
from bsconv_cuda.ops import OPS


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
    (dict(x=torch.randn(6, 6)), ValueError, r"x must be 3-D \(C_in, H, W\) or 4-D"),
    (dict(x=torch.randn(2, 3, 0, 6), padding=2), ValueError, r"x: input of spatial size \(0, 6\) is empty"),
    (dict(x=torch.randn(0, 3, 6, 0), padding=2), ValueError, r"x: input of spatial size \(6, 0\) is empty"),
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("spatial", [(0, 5), (5, 0)])
def test_operators_reject_an_empty_spatial_size_like_conv2d(spatial, backend):
    """Direct operator calls (below bsconv_u's checks) on an input with H or W = 0 whose padding makes the output
    non-empty: torch's convolutions refuse such an input, and so do the operators (the cuda one: test_cuda_extension)."""
    if backend not in bsconv_cuda.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available on CPU here")
    x = torch.randn(1, 3, *spatial)
    pw, pb, dw, db = torch.randn(4, 3), torch.randn(4), torch.randn(4, 1, 3, 3), torch.randn(4)
    with pytest.raises(RuntimeError):
        torch.nn.functional.conv2d(x, pw[:, :, None, None], padding=2)
    conv = ([1, 1], [2, 2, 2, 2], [1, 1], "none")
    forward_op, backward_op = OPS[backend]
    with pytest.raises(RuntimeError, match=rf"bsconv_cuda::{backend}_forward: x: input of spatial size"):
        forward_op(x, pw, pb, dw, db, *conv)
    grad_y = torch.randn(1, 4, *(s + 2 for s in spatial))
    with pytest.raises(RuntimeError, match=rf"bsconv_cuda::{backend}_backward: x: input of spatial size"):
        backward_op(grad_y, x, pw, pb, dw, db, *conv, [True] * 5)


def test_sizes_may_be_any_integer_type():
    # what operator.index takes (numpy integers, ...), as torch's convolutions accept; bool is still no size
    class Index:
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    args = _args()
    expected = bsconv_cuda.bsconv_u(**args, stride=(2, 1), padding=1, dilation=(1, 2))
    actual = bsconv_cuda.bsconv_u(**args, stride=(Index(2), Index(1)), padding=Index(1), dilation=[1, Index(2)])
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    numpy = pytest.importorskip("numpy", reason="numpy is not installed")
    actual = bsconv_cuda.bsconv_u(**args, stride=numpy.array([2, 1]), padding=numpy.int64(1),
                                  dilation=(numpy.int32(1), numpy.int16(2)))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        bsconv_cuda.bsconv_u(**args, stride=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unbatched_input_is_a_batch_of_one(backend):
    if backend not in bsconv_cuda.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available on CPU here")
    args = _args()
    x = args.pop("x")[0]
    pw_bias = torch.randn(4)
    leaves = [t.clone().requires_grad_() for t in (x, args["pw_weight"], args["dw_weight"], args["dw_bias"], pw_bias)]
    batched = [t.detach().clone().requires_grad_() for t in (x[None], *leaves[1:])]
    kwargs = dict(stride=(1, 2), padding=1, mid_activation="relu6", backend=backend)
    y = bsconv_cuda.bsconv_u(leaves[0], leaves[1], leaves[2], leaves[3], pw_bias=leaves[4], **kwargs)
    y_batched = bsconv_cuda.bsconv_u(batched[0], batched[1], batched[2], batched[3], pw_bias=batched[4], **kwargs)
    assert y.shape == y_batched.shape[1:] == (4, 6, 3)
    torch.testing.assert_close(y, y_batched[0], rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_batched.backward(grad[None])
    torch.testing.assert_close(leaves[0].grad, batched[0].grad[0], rtol=0, atol=0)
    for a, b in zip(leaves[1:], batched[1:]):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
