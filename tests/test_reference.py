"""The reference backend: the truth for every fused backend, so it is checked against torch's own layers and by
finite differences."""

import pytest
import torch
import torch.nn.functional as F

import bsconv_cuda
from bsconv_cuda import reference

CONFIGS = [
    # (c_in, c_out, kernel, stride, padding, dilation, activation)
    (3, 4, 3, 1, 1, 1, None),
    (2, 3, (3, 5), 2, (1, 2), 1, "relu6"),
    (3, 2, 2, 1, "same", 2, "hardswish"),
    (1, 1, 1, 1, 0, 1, "silu"),
    (2, 5, 3, (2, 1), 0, (1, 2), "relu"),
]


def _inputs(c_in, c_out, kernel, dtype=torch.float64, requires_grad=True, size=(2, 7, 6)):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    n, h, w = size
    return make(n, c_in, h, w), make(c_out, c_in), make(c_out, 1, kh, kw), make(c_out), make(c_out)


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, dilation, activation", CONFIGS)
def test_reference_gradcheck(c_in, c_out, kernel, stride, padding, dilation, activation):
    torch.manual_seed(0)
    x, pw_weight, dw_weight, dw_bias, pw_bias = _inputs(c_in, c_out, kernel)

    def fn(x, pw_weight, dw_weight, dw_bias, pw_bias):
        return bsconv_cuda.bsconv_u(
            x, pw_weight, dw_weight, dw_bias, stride, padding, dilation,
            pw_bias=pw_bias, mid_activation=activation, backend="reference",
        )

    # Random float64 inputs land on a kink of relu/relu6/hardswish with negligible probability.
    assert torch.autograd.gradcheck(fn, (x, pw_weight, dw_weight, dw_bias, pw_bias))


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, dilation, activation", CONFIGS)
def test_reference_matches_torch_layers(c_in, c_out, kernel, stride, padding, dilation, activation):
    torch.manual_seed(0)
    x, pw_weight, dw_weight, dw_bias, pw_bias = _inputs(c_in, c_out, kernel, requires_grad=False)
    mid = F.conv2d(x, pw_weight[:, :, None, None], pw_bias)
    mid = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}[activation](mid)
    expected = F.conv2d(mid, dw_weight, dw_bias, stride, padding, dilation, groups=c_out)
    actual = bsconv_cuda.bsconv_u(
        x, pw_weight, dw_weight, dw_bias, stride, padding, dilation,
        pw_bias=pw_bias, mid_activation=activation, backend="reference",
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_padding_applies_to_mid_not_x():
    # With a pointwise bias and relu6, zero-padding x would give act(bias) != 0 at the border; padding mid gives 0.
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    pw_weight = torch.ones(1, 1, dtype=torch.float64)
    dw_weight = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    pw_bias = torch.full((1,), 2.0, dtype=torch.float64)
    y = bsconv_cuda.bsconv_u(x, pw_weight, dw_weight, None, 1, 1, pw_bias=pw_bias, mid_activation="relu6")
    assert y.item() == 2.0


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activation_backward_matches_autograd_at_kinks(activation):
    pre = torch.tensor([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 7.0], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(reference.activate(pre, activation).sum(), pre)
    actual = reference.activation_backward(torch.ones_like(pre), pre.detach(), activation)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_the_kernels_take_hardswish_as_the_installed_torch_differentiates_it():
    """torch 2.7 keeps -3 and 3 in hardswish's linear band (gradients -0.5 and 1.5), torch 2.11 in its flat branches
    (0 and 1); the fused kernels are told which (kernel_activation) and tests/test_fused_backends.py checks them
    there."""
    pre = torch.tensor([-3.0, 3.0], requires_grad=True)
    F.hardswish(pre).sum().backward()
    assert pre.grad.tolist() == ([-0.5, 1.5] if reference.HARDSWISH_CLOSED_BAND else [0.0, 1.0])
    assert reference.kernel_activation("hardswish") == (
        "hardswish_closed_band" if reference.HARDSWISH_CLOSED_BAND else "hardswish")
    others = [a for a in reference.ACTIVATIONS if a != "hardswish"]
    assert [reference.kernel_activation(a) for a in others] == others


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activation_propagates_nan_like_torch_elementwise_kernels(activation, dtype):
    # 67 elements: vector lanes and a scalar tail on every CPU (torch's vectorized CPU kernels of hardtanh_backward
    # and hardswish_backward disagree with its scalar ones at NaN; the reference follows the scalar / CUDA kernels)
    pre = torch.full((67,), float("nan"), dtype=dtype)
    grad_mid = torch.linspace(-2.0, 2.0, 67, dtype=dtype)
    assert reference.activate(pre, activation).isnan().all()
    expected = torch.full_like(pre, float("nan")) if activation == "silu" else grad_mid
    actual = reference.activation_backward(grad_mid, pre, activation)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_reference_keeps_memory_format(memory_format):
    x, pw_weight, dw_weight, dw_bias, _ = _inputs(3, 4, 3, dtype=torch.float32, requires_grad=False)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    y = bsconv_cuda.bsconv_u(x, pw_weight, dw_weight, dw_bias, padding=1, backend="reference")
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=memory_format)
