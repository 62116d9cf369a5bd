"""convert() on whole MobileNetV2/V3 and EfficientNet models (torchvision, timm, bsconv): the expand half of every
inverted residual is fused, and the converted model is the same model: module tree, parameter objects, state_dict
keys, outputs, every gradient and every BatchNorm buffer, in training and in eval mode, with less activation memory
saved for backward.

Whole models run in float64 through the ``reference`` backend (the fused op's autograd function, which saves the
input instead of the intermediate); one block of each model runs through the fused Triton kernels (Triton's
interpreter on CPU), which are too slow there for whole models.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends
from model_checks import assert_same_step, converted_twin, run_step, saved_activation_bytes

# Test dependencies (pip install -e ".[test]"); a GPU machine without internet may lack them (scripts/gpu_check.sh):
# then these tests skip and the rest of the suite still runs.
torchvision = pytest.importorskip("torchvision", reason="the test dependency torchvision is not installed")
timm = pytest.importorskip("timm", reason="the test dependency timm is not installed")
bsconv_pytorch = pytest.importorskip("bsconv.pytorch", reason="the test dependency bsconv is not installed")

TORCHVISION_V2 = "torchvision MobileNetV2 InvertedResidual"
TORCHVISION_V3 = "torchvision MobileNetV3 InvertedResidual"
TIMM = "timm InvertedResidual"
BSCONV = "bsconv LinearBottleneck"

# name -> (builder, kind, fused blocks, blocks without an expand conv); tiny models, 32x32 inputs, 10 classes
MODELS = {
    "torchvision_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10),
                                 TORCHVISION_V2, 16, 1),
    "torchvision_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(width_mult=0.5, num_classes=10),
                                       TORCHVISION_V3, 10, 1),
    "timm_mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), TIMM, 10, 0),
    # timm's efficientnet_b0 takes no width multiplier; at 32x32 it is still small
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), TIMM, 15, 0),
    "bsconv_cifar_mobilenetv3_large_w7d20": (
        lambda: bsconv_pytorch.get_model("cifar_mobilenetv3_large_w7d20", num_classes=10), BSCONV, 15, 0),
    "bsconv_cifar_mobilenetv3_large_w7d20_bsconvs_p1d6": (
        lambda: bsconv_pytorch.get_model("cifar_mobilenetv3_large_w7d20_bsconvs_p1d6", num_classes=10), BSCONV, 15, 0),
    "bsconv_cifar_mobilenetv2_w1d4": (
        lambda: bsconv_pytorch.get_model("cifar_mobilenetv2_w1d4", num_classes=10), BSCONV, 17, 0),
}
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# Triton's interpreter on CPU; the reference on a machine with a GPU (these tests run on CPU tensors there)
FUSED_BACKEND = "triton" if backends.triton_interpreter_enabled() else "reference"


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    _randomize_batchnorm(model)
    return model


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm affine parameters and running statistics away from their 1/0 initial values, so that a wrong
    folding or a swapped statistic shows."""
    gen = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen, dtype=torch.double) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=torch.double) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, dtype=torch.double))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen, dtype=torch.double) + 0.5)


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, dtype=torch.double, generator=torch.Generator().manual_seed(3))


def _reg_loss(model):
    """bsconv's BSConv-S regularization where the model has it (its gradient must match too)."""
    return model.reg_loss(alpha=0.1) if hasattr(model, "reg_loss") else None


@pytest.mark.parametrize("name", MODELS)
def test_convert_fuses_every_expand_half_and_keeps_the_model(name):
    model = _model(name)
    parameters = dict(model.named_parameters())
    keys = list(model.state_dict())
    modules = [name for name, _ in model.named_modules()]
    _, kind, fused_blocks, without_expand = MODELS[name]

    converted, summary = bsconv_cuda.convert(model, backend="reference", return_summary=True)

    assert converted is model
    assert summary.fused_counts() == {kind: fused_blocks}
    assert not summary.skipped
    reasons = [reason for _, _, reason in summary.not_applicable]
    assert reasons == ["no expand conv (expansion ratio 1)"] * without_expand
    assert [name for name, _ in model.named_modules()] == modules
    assert list(model.state_dict()) == keys
    assert all(p is parameters[n] for n, p in model.named_parameters())
    fused = [m for m in model.modules() if type(m).__name__.startswith("Fused")]
    assert len(fused) == fused_blocks
    assert all(isinstance(m, type(m)._unfused_class) for m in fused)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_equals_the_original(name, mode):
    original, converted, _ = converted_twin(lambda: _model(name), backend="reference")
    original.train(mode == "train")
    converted.train(mode == "train")
    x = _input()
    for step in range(2):  # the second step sees the running statistics the first one updated
        expected = run_step(original, x, seed=step, extra_loss=_reg_loss)
        actual = run_step(converted, x, seed=step, extra_loss=_reg_loss)
        assert_same_step(expected, actual)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_saves_less_activation_memory(name, mode):
    """With the fused kernels (the reference backend runs a training-mode block as the standard layers), counted on
    shapes only: the interpreter would take minutes per model."""
    original = _model(name).train(mode == "train")
    converted = bsconv_cuda.convert(_model(name), backend=FUSED_BACKEND).train(mode == "train")
    before = saved_activation_bytes(original, _input(), shapes_only=True)
    after = saved_activation_bytes(converted, _input(), shapes_only=True)
    # each fused block drops its expanded intermediate (pre- and post-BatchNorm): 31-51% of the whole model's here
    assert after < before * 0.75, f"saved activations: {before} bytes unconverted, {after} bytes converted"


TINY_BLOCKS = ("torchvision_v2_relu6_residual", "torchvision_v3_hardswish_se_k5_s2", "timm_silu_se_residual",
               "timm_relu_k5_s2", "bsconv_hswish_se_k5_s2", "bsconv_relu6_residual")


def _tiny_blocks():
    """One small block of every kind (and activation), with the input it takes: fast enough for the interpreter."""
    from functools import partial

    from torchvision.models import mobilenetv2, mobilenetv3
    from timm.models import _efficientnet_blocks as timm_blocks

    v3_config = mobilenetv3.InvertedResidualConfig(4, 5, 12, 6, True, "HS", 2, 1, 1.0)  # -> 8, 16, 8 channels
    return {
        "torchvision_v2_relu6_residual": (lambda: mobilenetv2.InvertedResidual(4, 4, stride=1, expand_ratio=3),
                                          (4, 6, 6)),
        "torchvision_v3_hardswish_se_k5_s2": (
            lambda: mobilenetv3.InvertedResidual(v3_config, partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.01)),
            (8, 7, 7)),
        "timm_silu_se_residual": (
            lambda: timm_blocks.InvertedResidual(4, 4, exp_ratio=3.0, act_layer=torch.nn.SiLU,
                                                 se_layer=timm_blocks.SqueezeExcite),
            (4, 6, 6)),
        "timm_relu_k5_s2": (
            lambda: timm_blocks.InvertedResidual(4, 6, dw_kernel_size=5, stride=2, exp_ratio=2.0),
            (4, 7, 7)),
        "bsconv_hswish_se_k5_s2": (
            lambda: bsconv_pytorch.mobilenet.LinearBottleneck(4, 12, 6, stride=2, activation="hswish", kernel_size=5,
                                                              use_se=True),
            (4, 7, 7)),
        "bsconv_relu6_residual": (
            lambda: bsconv_pytorch.mobilenet.LinearBottleneck(4, 12, 4, stride=1), (4, 6, 6)),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("block_name", TINY_BLOCKS)
def test_fused_kernel_in_a_converted_block(block_name, mode):
    """The fused kernels (Triton's interpreter on CPU) inside each kind of converted block, float64, against the
    block as built: output, every gradient, BatchNorm buffers, over two steps."""
    build, shape = _tiny_blocks()[block_name]

    def block():
        torch.manual_seed(0)
        module = build().double()
        _randomize_batchnorm(module)
        return module.train(mode == "train")

    original, converted, summary = converted_twin(block, backend=FUSED_BACKEND)
    assert len(summary.fused) == 1
    x = torch.randn(2, *shape, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    for step in range(2):
        assert_same_step(run_step(original, x, seed=step), run_step(converted, x, seed=step))


def test_shapes_only_count_of_saved_activations_equals_a_real_run():
    build, shape = _tiny_blocks()["torchvision_v3_hardswish_se_k5_s2"]
    torch.manual_seed(0)
    block = bsconv_cuda.convert(build().double(), backend=FUSED_BACKEND)
    x = torch.randn(2, *shape, dtype=torch.double)
    for mode in (True, False):
        block.train(mode)
        real = saved_activation_bytes(block, x)
        assert real > 0 and saved_activation_bytes(block, x, shapes_only=True) == real


@pytest.mark.parametrize("name", ["torchvision_mobilenet_v2", "timm_efficientnet_b0", "bsconv_cifar_mobilenetv2_w1d4"])
def test_checkpoints_load_both_ways_and_whole_models_pickle(name):
    x = _input()
    original, converted, _ = converted_twin(lambda: _model(name), backend="reference")
    for model in (original, converted):
        model.train()
        run_step(model, x)  # update the running statistics so that the checkpoints differ from a fresh model
    fresh, fresh_converted = _model(name), bsconv_cuda.convert(_model(name), backend="reference")
    fresh.load_state_dict(converted.state_dict())  # converted checkpoint -> unconverted model
    fresh_converted.load_state_dict(original.state_dict())  # unconverted checkpoint -> converted model
    for a, b in ((fresh, converted), (fresh_converted, original)):
        assert_same_step(run_step(b.eval(), x), run_step(a.eval(), x))

    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(converted)
    expected = run_step(converted, x)
    for other in (loaded, copied):
        assert [type(m) for m in other.modules()] == [type(m) for m in converted.modules()]
        assert_same_step(expected, run_step(other, x))


def test_optimizer_created_before_convert_keeps_training_the_converted_model():
    model = _model("torchvision_mobilenet_v2").train()
    reference_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    bsconv_cuda.convert(model, backend="reference")
    x = _input()
    for step in range(2):
        for m, opt in ((model, optimizer), (reference_model, reference_optimizer)):
            run_step(m, x, seed=step)
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)


# --- blocks that must not be fused are left alone, and the summary says why ------------------------------------------


def _convert_expecting_skips(model, backend="reference"):
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="skipped"):
        converted, summary = bsconv_cuda.convert(model, backend=backend, return_summary=True)
    return original, converted, summary


def _assert_same_model(original, converted, modes=("train", "eval")):
    for mode in modes:
        original.train(mode == "train")
        converted.train(mode == "train")
        assert_same_step(run_step(original, _input()), run_step(converted, _input()))


def test_block_with_a_hook_on_a_bypassed_layer_is_left_alone():
    model = _model("torchvision_mobilenet_v2")
    calls = []
    model.features[2].conv[0][1].register_forward_hook(lambda *args: calls.append(1))
    original, converted, summary = _convert_expecting_skips(model)
    assert summary.skipped == [("features.2", TORCHVISION_V2, "conv[0][1] has forward hooks, which the fused path "
                                                               "would not run")]
    assert type(converted.features[2]) is torchvision.models.mobilenetv2.InvertedResidual
    assert summary.fused_counts() == {TORCHVISION_V2: 15}
    calls.clear()
    _assert_same_model(original, converted)
    assert len(calls) == 4  # the hook ran in every forward (2 per step: the unconverted model's copy has it too)


def test_block_with_an_unsupported_activation_or_a_per_instance_forward_is_left_alone():
    model = _model("torchvision_mobilenet_v3_small")
    model.features[4].block[0][2] = torch.nn.GELU()
    model.features[5].block[1][0].forward = model.features[5].block[1][0].forward  # e.g. a monkeypatch
    model.features[6].forward = model.features[6].forward
    original, converted, summary = _convert_expecting_skips(model)
    reasons = {path: reason for path, _, reason in summary.skipped}
    assert reasons.keys() == {"features.4", "features.5", "features.6"}
    assert reasons["features.6"] == "the block has a per-instance forward"
    assert reasons["features.4"].startswith("activation GELU is not one the fused kernels have")
    assert reasons["features.5"] == "block[1][0] has a per-instance forward"
    _assert_same_model(original, converted)


def test_timm_tf_same_padding_and_drop_layers_are_left_alone():
    torch.manual_seed(0)
    # TF-"same" padding: timm's Conv2dSame pads each input asymmetrically at run time (stride 2 convs)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=10).double()
    model.blocks[2][1].bn1.drop = torch.nn.Dropout(0.5)
    original, converted, summary = _convert_expecting_skips(model)
    reasons = {path: reason for path, _, reason in summary.skipped}
    inverted_residual = timm.models._efficientnet_blocks.InvertedResidual
    blocks = {path: m for path, m in model.named_modules() if type(m) is inverted_residual}
    same = [path for path, m in blocks.items() if type(m.conv_dw).__name__ == "Conv2dSame"]
    assert same and set(same) < reasons.keys()
    assert all("TF-'same' dynamic padding" in reasons[path] for path in same)
    assert reasons["blocks.2.1"] == "bn1 has a drop layer (Dropout) between BatchNorm and activation"
    assert summary.fused_counts() == {TIMM: 10 - len(reasons)}
    _assert_same_model(original, converted)


def test_subclass_of_a_known_block_is_left_alone():
    class MyInvertedResidual(timm.models._efficientnet_blocks.InvertedResidual):
        def forward(self, x):
            return super().forward(x) * 2

    block = MyInvertedResidual(8, 8, exp_ratio=4.0)
    with pytest.warns(UserWarning, match="MyInvertedResidual subclasses InvertedResidual: its forward may differ"):
        _, summary = bsconv_cuda.convert(torch.nn.Sequential(block), return_summary=True)
    assert [kind for _, kind, _ in summary.skipped] == [TIMM] and type(block) is MyInvertedResidual


def test_global_module_hooks_leave_every_block_alone():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks are registered"):
            _, summary = bsconv_cuda.convert(_model("bsconv_cifar_mobilenetv2_w1d4"), return_summary=True)
    finally:
        handle.remove()
    assert not summary.fused and len(summary.skipped) == 17


def test_converting_twice_reports_the_blocks_as_already_fused():
    model = bsconv_cuda.convert(_model("timm_mobilenetv3_small_050"), backend="reference")
    _, summary = bsconv_cuda.convert(model, backend="triton", return_summary=True)
    assert not summary.fused and len(summary.already_fused) == 10
    assert {m._bsconv_cuda_backend for m in model.modules() if hasattr(m, "_bsconv_cuda_backend")} == {"reference"}


def test_sync_batchnorm_models_are_fused():
    """After torch's / timm's SyncBatchNorm conversion (outside torch.distributed it normalizes like BatchNorm2d)."""
    def torchvision_sync():
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model("torchvision_mobilenet_v2"))

    def timm_sync():
        return timm.layers.convert_sync_batchnorm(_model("timm_mobilenetv3_small_050"))

    for build, kind, fused_blocks in ((torchvision_sync, TORCHVISION_V2, 16), (timm_sync, TIMM, 10)):
        original, converted, summary = converted_twin(build, backend="reference")
        assert summary.fused_counts() == {kind: fused_blocks}
        assert any(type(m).__name__.startswith("SyncBatchNorm") for m in converted.modules())
        _assert_same_model(original, converted)


def test_converted_block_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the fused block class (reference backend on CPU), train and eval."""
    build, shape = _tiny_blocks()["torchvision_v2_relu6_residual"]
    def seeded_block():
        torch.manual_seed(0)
        return build()

    original, converted, _ = converted_twin(seeded_block, backend="reference")
    compiled = torch.compile(converted, fullgraph=True)
    x = torch.randn(2, *shape)
    for mode in (True, False):
        original.train(mode)
        converted.train(mode)
        torch.testing.assert_close(compiled(x), original(x))
