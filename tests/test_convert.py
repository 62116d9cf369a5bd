"""convert() swaps every BSConvU in a model for FusedBSConvU and leaves outputs unchanged, and says what it did
(test_convert_models.py: the inverted residuals of whole MobileNets)."""

import warnings

import pytest
import torch

import bsconv_cuda

# A test dependency (pip install -e ".[test]"); a GPU machine without internet may lack it (scripts/gpu_check.sh
# installs it from a carried wheelhouse/): then these tests skip and the rest of the suite still runs.
bsconv_pytorch = pytest.importorskip("bsconv.pytorch", reason="the test dependency bsconv is not installed")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_cifar_mobilenetv1(mode):
    torch.manual_seed(0)
    model = bsconv_pytorch.get_model("cifar_mobilenetv1_w1_bsconvu", num_classes=100).train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected = model(x)
    assert sum(isinstance(m, bsconv_pytorch.BSConvU) for m in model.modules()) == 13

    converted = bsconv_cuda.convert(model)

    assert sum(isinstance(m, bsconv_cuda.FusedBSConvU) for m in converted.modules()) == 13
    assert not any(isinstance(m, bsconv_pytorch.BSConvU) for m in converted.modules())
    torch.manual_seed(1)
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)


def test_convert_keeps_parameters_for_optimizers():
    model = torch.nn.Sequential(bsconv_pytorch.BSConvU(3, 4, 3, padding=1), torch.nn.ReLU())
    parameters = list(model.parameters())
    bsconv_cuda.convert(model)
    assert isinstance(model[0], bsconv_cuda.FusedBSConvU)
    assert all(a is b for a, b in zip(model.parameters(), parameters))


def test_convert_of_a_bsconvu_returns_a_new_module():
    fused = bsconv_cuda.convert(bsconv_pytorch.BSConvU(3, 4, 3), backend="reference")
    assert isinstance(fused, bsconv_cuda.FusedBSConvU) and fused.backend == "reference"


def test_convert_leaves_lookalikes_alone():
    class NotSequential(torch.nn.Module):  # has pw and dw, but its own forward
        def __init__(self):
            super().__init__()
            self.pw = torch.nn.Conv2d(3, 4, 1, bias=False)
            self.dw = torch.nn.Conv2d(4, 4, 3, groups=4)

        def forward(self, x):
            return self.dw(torch.relu(self.pw(x)))

    with_pw_bias = torch.nn.Sequential()
    with_pw_bias.add_module("pw", torch.nn.Conv2d(3, 4, 1, bias=True))
    with_pw_bias.add_module("dw", torch.nn.Conv2d(4, 4, 3, groups=4))
    model = torch.nn.Sequential(NotSequential(), with_pw_bias)
    expected = r"fused nothing in Sequential:\n  skipped: 1\n    1 \(BSConvU\): pw must be a bias-free 1x1"
    with pytest.warns(UserWarning, match=expected):
        _, summary = bsconv_cuda.convert(model, return_summary=True)
    assert not any(isinstance(m, bsconv_cuda.FusedBSConvU) for m in model.modules())
    reason = "pw must be a bias-free 1x1 nn.Conv2d with stride 1, no padding and groups 1"
    assert summary.skipped == [("1", "BSConvU", reason)]


def test_convert_returns_a_summary_and_is_silent_when_everything_fits():
    model = bsconv_pytorch.get_model("cifar_mobilenetv1_w1_bsconvu", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted, summary = bsconv_cuda.convert(model, return_summary=True)
    assert converted is model
    assert summary.fused_counts() == {"BSConvU": 13} and not summary.skipped
    assert str(summary).startswith("bsconv_cuda.convert: fused 13 block(s) (13 BSConvU)")
    assert summary.fused[0] == ("backbone.stage1.unit1.0", "BSConvU")

    _, again = bsconv_cuda.convert(model, return_summary=True)  # nothing new, nothing to warn about
    assert not again.fused and len(again.already_fused) == 13


def test_converting_nothing_is_not_silent():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    with pytest.warns(UserWarning, match="fused nothing in Sequential: it has no block of a kind convert knows"):
        _, summary = bsconv_cuda.convert(model, return_summary=True)
    assert not (summary.fused or summary.skipped or summary.already_fused or summary.not_applicable)


def test_convert_logs_its_summary(caplog):
    with caplog.at_level("INFO", logger="bsconv_cuda.convert"):
        bsconv_cuda.convert(torch.nn.Sequential(bsconv_pytorch.BSConvU(3, 4, 3)))
    assert "fused 1 block(s) (1 BSConvU)" in caplog.text


def test_convert_checks_its_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        bsconv_cuda.convert(torch.nn.Sequential(), backend="cudnn")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bsconv_cuda.convert(lambda x: x)
