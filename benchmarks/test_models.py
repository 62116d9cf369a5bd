"""Model-level benchmarks: one training step (forward + backward + SGD) and one inference pass of whole models, as
built vs after ``bsconv_cuda.convert``, channels_last, with peak memory.

- torchvision ``mobilenet_v2`` and timm ``efficientnet_b0`` (1000 classes, 224x224, batch 64): convert fuses the
  expand half of their inverted residuals; bsconv's ImageNet ``mobilenetv1_w1_bsconvu`` (batch 64) and CIFAR
  ``cifar_mobilenetv1_w1_bsconvu`` (10 classes, 32x32, batch 128): convert swaps their BSConvU blocks; the paper's
  ``cifar_mobilenetv3_large_w1_bsconvs_p1d6`` (100 classes, 32x32, batch 128, with its BSConv-S regularization).
  fp32 and bf16 autocast. The models and the step are ``bsconv_cuda.bench_models``'s (also
  ``python -m bsconv_cuda.bench_models``). The quick set (``BSCONV_BENCH_SET=quick``) times the first two and the
  paper's MobileNetV3 only.
- Cases (``bench_models.model_runner``) and timing (``bench_harness.measure``, the runner of every front end) are
  those of ``python -m bsconv_cuda.bench_models``. GPU: time from CUDA events (do_bench, warm-up excluded) in
  ``extra_info["time_ms"]``; pytest-benchmark's own numbers are synchronized wall-clock (sanity only), as in
  test_bsconv_u.py. Peak memory: ``torch.cuda.max_memory_allocated`` during one step above what was live before it.
- CPU: batch 2, fp32, converted ones with the reference (the only backend on CPU): a smoke test, not a measurement.
"""

from __future__ import annotations

import pytest
import torch

from bsconv_cuda import bench_harness, bench_models

from _suite import bench_set, on_gpu, record


# BSCONV_BENCH_SET=quick (the GPU check's default): the inverted-residual models and the paper's MobileNetV3
QUICK_MODELS = ("torchvision_mobilenet_v2", "timm_efficientnet_b0", "cifar_mobilenetv3_large_w1_bsconvs_p1d6")


def _params(which: str):
    out = []
    precisions = bench_models.PRECISIONS if on_gpu() else ("fp32",)
    for model in QUICK_MODELS if which == "quick" else bench_models.MODELS:
        for mode in bench_models.MODES:
            for precision in precisions:
                for variant in bench_models.VARIANTS:
                    out.append(pytest.param(model, mode, precision, variant,
                                            id=f"{model}-{mode}-{precision}-{variant}"))
    return out


def pytest_generate_tests(metafunc):
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name,mode,precision,variant", _params(bench_set(metafunc.config)))


def test_model(benchmark, device, model_name, mode, precision, variant):
    missing = bench_models.library_missing_reason(model_name)
    if missing is not None:
        pytest.skip(missing)
    benchmark.group = f"model {model_name} {mode} {precision}"
    run, batch, fused_blocks = bench_models.model_runner(model_name, mode, precision, variant, device)
    if variant == "converted":
        assert fused_blocks > 0, "convert() fused no block"

    info = benchmark.extra_info
    info.update(model=model_name, mode=mode, precision=precision, variant=variant, batch=batch,
                memory_format="channels_last", device=device.type, fused_blocks=fused_blocks)
    if variant == "converted":
        info["backend"] = bench_models.converted_backend(device)
    measured = bench_harness.measure(run, device, **bench_models.GPU_TIMING)
    info["images_per_s"] = bench_models.images_per_s(batch, measured.ms)
    record(benchmark, run, device, measured)
