"""Model-level benchmarks: one training step (forward + backward + SGD) and one inference pass of bsconv's
MobileNetV1-BSConvU, as built vs after ``bsconv_cuda.convert``, channels_last, with peak memory.

- ImageNet ``mobilenetv1_w1_bsconvu`` (1000 classes, 224x224, batch 64) and CIFAR ``cifar_mobilenetv1_w1_bsconvu``
  (10 classes, 32x32, batch 128); fp32 and bf16 autocast.
- GPU: time from CUDA events (``bench.gpu_time_ms``: do_bench, warm-up excluded) in ``extra_info["time_ms"]``;
  pytest-benchmark's own numbers are synchronized wall-clock (sanity only), as in test_bsconv_u.py. Peak memory:
  ``torch.cuda.max_memory_allocated`` during one step above what was live before it.
- CPU: batch 2, fp32, as built and converted with ``backend="reference"`` (exercises convert; no fused kernel
  runs on CPU): a smoke test, not a measurement.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from bsconv_cuda import bench

from _suite import on_gpu

MODELS = {  # name in bsconv.pytorch.get_model -> (num_classes, input size, GPU batch)
    "mobilenetv1_w1_bsconvu": (1000, 224, 64),
    "cifar_mobilenetv1_w1_bsconvu": (10, 32, 128),
}
CPU_BATCH = 2


def _params():
    out = []
    precisions = ("fp32", "bf16") if on_gpu() else ("fp32",)
    for model in MODELS:
        for mode in ("train", "infer"):
            for precision in precisions:
                for variant in ("built", "converted"):
                    out.append(pytest.param(model, mode, precision, variant,
                                            id=f"{model}-{mode}-{precision}-{variant}"))
    return out


_BASE: dict = {}


def _build(name: str, variant: str, device: torch.device):
    bsconv_pytorch = pytest.importorskip("bsconv.pytorch")
    import bsconv_cuda

    num_classes = MODELS[name][0]
    if name not in _BASE:
        torch.manual_seed(0)
        _BASE.clear()
        _BASE[name] = bsconv_pytorch.get_model(name, num_classes=num_classes)
    model = copy.deepcopy(_BASE[name])
    if variant == "converted":
        model = bsconv_cuda.convert(model, backend="auto" if device.type == "cuda" else "reference")
    return model.to(device=device, memory_format=torch.channels_last)


@pytest.mark.parametrize("model_name,mode,precision,variant", _params())
def test_model(benchmark, device, model_name, mode, precision, variant):
    num_classes, size, gpu_batch = MODELS[model_name]
    batch = gpu_batch if device.type == "cuda" else CPU_BATCH
    benchmark.group = f"model {model_name} {mode} {precision}"
    model = _build(model_name, variant, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            return loss
    else:
        model.eval()

        def run():
            with torch.no_grad(), autocast:
                return model(x)

    info = benchmark.extra_info
    info.update(model=model_name, mode=mode, precision=precision, variant=variant, batch=batch,
                memory_format="channels_last", device=device.type)
    if variant == "converted":
        import bsconv_cuda

        fused = [m for m in model.modules() if isinstance(m, bsconv_cuda.FusedBSConvU)]
        assert fused, "convert() replaced no BSConvU block"
        info["fused_blocks"] = len(fused)
        from bsconv_cuda.functional import select_backend

        probe = torch.empty(1, 1, 8, 8, device=device)
        info["auto_backend"] = select_backend("auto", probe, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    if device.type != "cuda":
        benchmark.pedantic(run, rounds=2, warmup_rounds=1, iterations=1)
        info["time_ms"] = benchmark.stats.stats.min * 1e3
        info["timer"] = "wall-clock, CPU (pytest-benchmark), min of rounds"
        return

    run()  # warm-up (kernel compilation, cudnn autotuning, allocator)
    info["peak_mem_bytes"] = bench.peak_memory_bytes(run, device)
    t = bench.gpu_time_ms(run, warmup_ms=50, rep_ms=400)
    info.update(time_ms=t["ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], timer=t["timer"],
                images_per_s=batch / (t["ms"] * 1e-3))

    def synced():
        run()
        torch.cuda.synchronize(device)

    benchmark.pedantic(synced, rounds=3, warmup_rounds=1, iterations=1)
