"""python -m bsconv_cuda.train: two steps on fake data, a checkpoint, and a resumed run from it; with the reference
backend and with the fused kernels (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from bsconv_cuda import backends, train

pytest.importorskip("torchvision", reason="the test dependency torchvision is not installed")
pytest.importorskip("bsconv.pytorch", reason="the test dependency bsconv is not installed")

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The smallest bsconv MobileNetV3 with BSConv-S (reg_loss) and hardswish blocks; two steps of two images per epoch
SMOKE = ["--architecture", "cifar_mobilenetv3_small_w7d20_bsconvs_p1d6", "--dataset", "cifar10", "--fake-data",
         "--batch-size", "2", "--limit-batches", "2", "--workers", "0", "--device", "cpu", "--no-progress"]


def _run(capsys, *args) -> str:
    assert train.main([*SMOKE, *args]) == 0
    return capsys.readouterr().out


def _tiny_bsconv_mobilenetv3(architecture: str, num_classes: int) -> torch.nn.Module:
    """A two-block MobileNetV3-BSConv-S from bsconv's own classes, narrower than any of its named architectures:
    Triton's interpreter takes minutes per training step of even the smallest of those."""
    from bsconv.pytorch import mobilenet

    model = mobilenet.MobileNetV3(
        num_classes=num_classes, init_conv_channels=4, init_conv_stride=2, final_conv_channels=[16],
        final_conv_se=False, channels=[[4], [8]], mid_channels=[[8], [16]], strides=[1, 2], se_units=[[1], [0]],
        kernel_sizes=[3, 5], activations=["relu", "hswish"], in_size=(32, 32),
    )
    return mobilenet.transform_mobilenetv2(model)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_steps_checkpoint_and_resume(tmp_path, capsys, monkeypatch, backend):
    fused_blocks = 11
    if backend == "triton":
        monkeypatch.setattr(train, "build_model", _tiny_bsconv_mobilenetv3)
        fused_blocks = 2
        if not backends.triton_interpreter_enabled():
            backend = "auto"  # a GPU machine runs these CPU tests without Triton: the fused path is the reference
    out = _run(capsys, "--epochs", "1", "--backend", backend, "--checkpoint-dir", str(tmp_path), "--channels-last",
               "--schedule", "1")
    assert f"fused {fused_blocks} block(s) ({fused_blocks} bsconv LinearBottleneck)" in out
    assert "epoch 1/1: lr 0.1, train loss" in out
    assert out.strip().splitlines()[-1].startswith("best val acc ")
    assert "s/epoch (training), peak GPU memory n/a (not on a GPU)" in out
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["fused"]
    assert (tmp_path / "best.pt").is_file()

    # the unfused model resumes the fused run's checkpoint: converting keeps the state_dict keys
    out = _run(capsys, "--epochs", "2", "--unfused", "--resume", str(tmp_path / "last.pt"),
               "--checkpoint-dir", str(tmp_path))
    assert "resumed from" in out and "after epoch 1" in out
    assert "epoch 2/2: lr 0.01, train loss" in out  # the checkpoint's schedule: x0.1 after epoch 1
    assert "epoch 1/" not in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == 2


def test_fused_and_unfused_runs_take_the_same_steps(tmp_path, capsys):
    """Same seed, same data: after two SGD steps the fused model's weights and statistics equal the unfused model's
    (reference backend, fp32)."""
    states = []
    for variant in ("fused", "unfused"):
        _run(capsys, "--epochs", "1", "--backend", "reference", "--checkpoint-dir", str(tmp_path / variant),
             *(["--unfused"] if variant == "unfused" else []))
        states.append(torch.load(tmp_path / variant / "last.pt", weights_only=True)["model"])
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=1e-4, atol=1e-5, msg=key)


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(SystemExit, match=r"cifar-100-python/.*does not download.*cifar-100-python.tar.gz"):
        train.main(["--dataset", "cifar100", "--data-root", str(tmp_path), "--device", "cpu"])


def test_data_source_is_required(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "cifar10"])
    assert "give --data-root DIR (CIFAR on disk) or --fake-data" in capsys.readouterr().err
