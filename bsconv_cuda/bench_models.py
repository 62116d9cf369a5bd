"""Model-level benchmark: a training step and an inference pass of whole models, as built vs after
:func:`bsconv_cuda.convert`, with peak memory.

``python -m bsconv_cuda.bench_models`` (``--models``, ``--modes``, ``--precisions``, ``--json``; ``--list`` shows the
models). On GPU: channels_last, CUDA-event timing and the peak memory of one step above what was allocated before it
(:func:`bsconv_cuda.bench_harness.measure`, the timed runner of every benchmark front end). On CPU every model runs
at batch 2 through the reference (no fused kernel exists on CPU): a smoke test of the harness, not a measurement. The models come from torchvision, timm and bsconv, test dependencies
of bsconv-cuda that this module imports only when a model of theirs is asked for; the same cases
(:func:`model_runner`) serve ``benchmarks/test_models.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import backends
from . import bench_harness as harness
from .convert import convert

MODES = ("train", "infer")
PRECISIONS = ("fp32", "bf16")
VARIANTS = ("built", "converted")
CPU_BATCH = 2
GPU_TIMING = {"warmup_ms": 50, "rep_ms": 400}  # do_bench budgets: a step takes tens of milliseconds


@dataclass(frozen=True)
class ModelSpec:
    name: str
    library: str  # the module that builds it
    build: Callable[[], torch.nn.Module]
    num_classes: int
    image_size: int
    gpu_batch: int


def _bsconv(architecture: str, num_classes: int) -> Callable[[], torch.nn.Module]:
    return lambda: _library("bsconv.pytorch").get_model(architecture, num_classes=num_classes)


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("torchvision_mobilenet_v2", "torchvision", lambda: _library("torchvision").models.mobilenet_v2(),
                  1000, 224, 64),
        ModelSpec("timm_efficientnet_b0", "timm", lambda: _library("timm").create_model("efficientnet_b0"),
                  1000, 224, 64),
        ModelSpec("mobilenetv1_w1_bsconvu", "bsconv.pytorch", _bsconv("mobilenetv1_w1_bsconvu", 1000), 1000, 224, 64),
        ModelSpec("cifar_mobilenetv1_w1_bsconvu", "bsconv.pytorch", _bsconv("cifar_mobilenetv1_w1_bsconvu", 10),
                  10, 32, 128),
        ModelSpec("cifar_mobilenetv3_large_w1_bsconvs_p1d6", "bsconv.pytorch",
                  _bsconv("cifar_mobilenetv3_large_w1_bsconvs_p1d6", 100), 100, 32, 128),
    )
}


def _library(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"this model needs {module.split('.')[0]} ({error}): pip install {module.split('.')[0]}"
        ) from error


def library_missing_reason(name: str) -> str | None:
    """None when the library that builds model ``name`` imports, else why not."""
    try:
        _library(MODELS[name].library)
    except ModuleNotFoundError as error:
        return str(error)
    return None


def converted_backend(device: torch.device) -> str:
    """The backend of the converted models: on a GPU the fused kernels (the CUDA backend where it loads, else Triton),
    whatever ``auto`` picks, since this benchmark measures what fusing does; on CPU the reference."""
    if device.type != "cuda":
        return "reference"
    available = backends.available_backends(device)
    return next((b for b in ("cuda", "triton") if b in available), "reference")


def build(name: str, variant: str, device: torch.device, seed: int = 0):
    """(model ``name`` as built or converted, channels_last on ``device``, number of blocks convert fused). Built
    afresh from ``seed`` each time, so every variant has the same weights (a deep copy would not do: bsconv's BSConv-S
    regularization closes over the modules of the model it was built for). Converted: onto
    :func:`converted_backend`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    model = MODELS[name].build()
    fused_blocks = 0
    if variant == "converted":
        model, summary = convert(model, backend=converted_backend(device), return_summary=True)
        fused_blocks = len(summary.fused)
    return model.to(device=device, memory_format=torch.channels_last), fused_blocks


def step_fn(model: torch.nn.Module, spec: ModelSpec, mode: str, precision: str, batch: int, device: torch.device):
    """One training step (forward, cross-entropy (+ BSConv-S reg_loss), backward, SGD) or one inference pass."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), target)
            if hasattr(model, "reg_loss"):
                loss = loss + model.reg_loss(alpha=0.1)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


@dataclass
class ModelResult:
    model: str
    mode: str
    precision: str
    variant: str
    batch: int
    device: str
    fused_blocks: int
    ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    peak_mem_bytes: int | None

    @property
    def images_per_s(self) -> float:
        return images_per_s(self.batch, self.ms)


def images_per_s(batch: int, ms: float) -> float:
    """Throughput of a step over ``batch`` images that took ``ms``."""
    return batch / (ms * 1e-3)


def model_runner(name: str, mode: str, precision: str, variant: str, device: torch.device,
                 batch: int | None = None) -> tuple[Callable[[], object], int, int]:
    """(one step of model ``name`` as :func:`step_fn` makes it, the batch: ``batch`` or the model's GPU batch, or
    :data:`CPU_BATCH` on CPU, the number of blocks convert fused)."""
    spec = MODELS[name]
    batch = batch or (spec.gpu_batch if device.type == "cuda" else CPU_BATCH)
    model, fused_blocks = build(name, variant, device)
    return step_fn(model, spec, mode, precision, batch, device), batch, fused_blocks


def measure(name: str, mode: str, precision: str, variant: str, device: torch.device,
            batch: int | None = None) -> ModelResult:
    """Time one step of model ``name``."""
    run, batch, fused_blocks = model_runner(name, mode, precision, variant, device, batch)
    m = harness.measure(run, device, **GPU_TIMING)
    return ModelResult(name, mode, precision, variant, batch, device.type, fused_blocks, m.ms, m.p20_ms, m.p80_ms,
                       m.timer, m.peak_mem_bytes)


def speedup(times_ms: dict[str, float]) -> float | None:
    """The converted model's speed-up over the model as built, from their times by variant."""
    return harness.speedups(times_ms, ["built"])[1].get("converted")


def format_table(results: list[ModelResult]) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r.model, r.mode, r.precision, r.batch), {})[r.variant] = r
    header = (f"{'model':42s} {'mode':5s} {'prec':4s} {'batch':>5s} {'built ms':>9s} {'conv. ms':>9s} {'speed-up':>8s} "
              f"{'fused':>5s} {'built MiB':>9s} {'conv. MiB':>9s}")
    lines = [header, "-" * len(header)]

    def mib(r):
        return "-" if r is None or r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"

    for (model, mode, precision, batch), variants in rows.items():
        built, converted = variants.get("built"), variants.get("converted")
        gain = speedup({variant: r.ms for variant, r in variants.items()})
        gain = "-" if gain is None else f"{gain:.2f}x"
        lines.append(
            f"{model:42s} {mode:5s} {precision:4s} {batch:5d} {built.ms if built else float('nan'):9.2f} "
            f"{converted.ms if converted else float('nan'):9.2f} {gain:>8s} "
            f"{converted.fused_blocks if converted else 0:5d} {mib(built):>9s} {mib(converted):>9s}"
        )
    if results and results[0].device != "cuda":
        lines.append("CPU: reference only, batch 2 -- a smoke test of the harness, not a measurement")
    return "\n".join(lines)


def _choices(value: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"--{what}: unknown {unknown or value!r}; choose from {', '.join(allowed)}")
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bsconv_cuda.bench_models",
        description="Training step and inference of whole models, as built vs converted by bsconv_cuda.convert "
                    "(channels_last, peak memory).")
    p.add_argument("--models", default="torchvision_mobilenet_v2,timm_efficientnet_b0",
                   help=f"comma-separated, or 'all' ({', '.join(MODELS)})")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of train,infer")
    p.add_argument("--precisions", default=None, help="comma-separated subset of fp32,bf16 (default: both on GPU, "
                                                      "fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="override the batch (default: per model on GPU, 2 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for spec in MODELS.values():
            size = f"{spec.image_size}x{spec.image_size}"
            print(f"{spec.name:42s} {spec.library:15s} {spec.num_classes} classes, {size}, "
                  f"GPU batch {spec.gpu_batch}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        torch.set_num_threads(1)  # steady on a shared machine; CPU numbers are a smoke test anyway
    names = list(MODELS) if args.models == "all" else _choices(args.models, list(MODELS), "models")
    modes = _choices(args.modes, MODES, "modes")
    precisions = _choices(args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32"), PRECISIONS,
                          "precisions")
    results = []
    for name in names:
        reason = library_missing_reason(name)
        if reason is not None:
            print(f"{name}: skipped, {reason}", file=sys.stderr)
            continue
        for mode in modes:
            for precision in precisions:
                for variant in VARIANTS:
                    print(f"{name} {mode} {precision} {variant} ...", file=sys.stderr, flush=True)
                    results.append(measure(name, mode, precision, variant, device, args.batch))
    print(format_table(results))
    if args.json:
        harness.write_json(args.json, [dict(asdict(r), images_per_s=r.images_per_s) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
