"""FusedBSConvU is a drop-in for bsconv.pytorch.BSConvU: same arguments, parameters, state_dict and outputs."""

import pytest
import torch

from bsconv_cuda import FusedBSConvU

# A test dependency (pip install -e ".[test]"); a GPU machine without internet may lack it (scripts/gpu_check.sh
# installs it from a carried wheelhouse/): then these tests skip and the rest of the suite still runs.
bsconv_pytorch = pytest.importorskip("bsconv.pytorch", reason="the test dependency bsconv is not installed")

CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, with_bn=True),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, with_bn=True, bn_kwargs=dict(momentum=0.3, eps=1e-3)),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 5), padding=(1, 2)),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2, padding_mode="circular", with_bn=True),
    dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="replicate"),
]


def _pair(config):
    torch.manual_seed(0)
    original = bsconv_pytorch.BSConvU(**config)
    torch.manual_seed(0)
    fused = FusedBSConvU(**config)
    if "bn" in dict(original.named_children()):
        with torch.no_grad():  # non-trivial running statistics and affine parameters, identical in both
            for module in (original.bn, fused.bn):
                module.running_mean.copy_(torch.linspace(-0.5, 0.5, module.num_features))
                module.running_var.copy_(torch.linspace(0.5, 2.0, module.num_features))
                module.weight.copy_(torch.linspace(0.8, 1.2, module.num_features))
                module.bias.copy_(torch.linspace(-0.1, 0.1, module.num_features))
    return original, fused


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_parameters_and_state_dict(config):
    original, fused = _pair(config)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert list(fused.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=0, atol=0)
    # Both ways: a checkpoint of either loads strictly into the other.
    fused.load_state_dict(original.state_dict())
    original.load_state_dict(fused.state_dict())


def _assert_same_outputs_and_gradients(fused, original, x):
    """fused(x) and original(x), and the gradients of x and of every parameter, agree; returns fused(x)."""
    x_fused = x.clone().requires_grad_()
    x_original = x.clone().requires_grad_()
    expected = original(x_original)
    actual = fused(x_fused)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_original.grad, rtol=1e-5, atol=1e-5)
    for (name, p_fused), (_, p_original) in zip(fused.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_original.grad, rtol=1e-4, atol=1e-4, msg=name)
    return actual


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_outputs_and_gradients(config, mode):
    original, fused = _pair(config)
    original.train(mode == "train")
    fused.train(mode == "train")
    _assert_same_outputs_and_gradients(fused, original, torch.randn(2, config["in_channels"], 9, 8))
    if mode == "train" and "bn" in dict(original.named_children()):
        torch.testing.assert_close(fused.bn.running_mean, original.bn.running_mean)


def test_from_bsconvu_shares_layers_and_mode():
    original = bsconv_pytorch.BSConvU(3, 4, 3, padding=1, with_bn=True).eval()
    fused = FusedBSConvU.from_bsconvu(original)
    assert not fused.training
    assert fused.pw.weight is original.pw.weight and fused.bn is original.bn
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


def test_from_bsconvu_rejects_other_structures():
    with pytest.raises(TypeError, match="not BSConvU-shaped"):
        FusedBSConvU.from_bsconvu(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_extra_repr_names_backend():
    assert "backend='reference'" in repr(FusedBSConvU(3, 4, 3, backend="reference"))


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedBSConvU(3, 4, 3, backend="fast")


@pytest.mark.parametrize("with_bn", [False, True])
def test_autocast_runs_in_the_autocast_dtype_like_torch_layers(with_bn):
    original, fused = _pair(dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, with_bn=with_bn))
    original.eval()
    fused.eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = original(x)
        actual = fused(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


def test_is_a_sequential_like_bsconvu():
    fused = FusedBSConvU(3, 4, 3, with_bn=True)
    assert isinstance(fused, torch.nn.Sequential) and isinstance(bsconv_pytorch.BSConvU(3, 4, 3), torch.nn.Sequential)
    assert list(fused) == [fused.pw, fused.bn, fused.dw] and fused[0] is fused.pw and len(fused) == 3


class _Index:
    """An integer that is not an int, as numpy's integers are: what ``operator.index`` accepts."""

    def __init__(self, value: int):
        self.value = value

    def __index__(self) -> int:
        return self.value


def _integer_type(name: str):
    if name == "__index__":
        return _Index
    numpy = pytest.importorskip("numpy", reason="numpy is not installed")
    return getattr(numpy, name)


@pytest.mark.parametrize("integer", ["int64", "int32", "__index__"])
def test_sizes_of_any_integer_type_like_bsconvu(integer):
    make = _integer_type(integer)
    config = dict(in_channels=4, out_channels=6, kernel_size=make(3), stride=make(2), padding=make(1),
                  dilation=make(1))
    original, fused = _pair(config)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    as_ints = FusedBSConvU(4, 6, 3, stride=2, padding=1)
    as_ints.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(x), as_ints(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.get("with_bn")],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_unbatched_input_like_bsconvu(config, mode):
    # (C, H, W) as torch's conv modules take it (BatchNorm2d itself needs 4-D input, so only blocks without bn)
    original, fused = _pair(config)
    original.train(mode == "train")
    fused.train(mode == "train")
    actual = _assert_same_outputs_and_gradients(fused, original, torch.randn(config["in_channels"], 9, 8))
    assert actual.dim() == 3
