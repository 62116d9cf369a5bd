"""The one benchmark harness: what is run, how it is timed, and how a speed-up is computed.

Every benchmark front end is a thin layer over this module: ``python -m bsconv_cuda.bench`` (the layer table),
``python -m bsconv_cuda.bench_models`` (whole models) and the pytest-benchmark suite in ``benchmarks/`` (layers, the
training-mode BatchNorm block, models). They choose which jobs to run and how to show the results; the case builders
(inputs, and the block of every contender), the timed runners (latency, peak memory) and the speed-up formula live
here only, so the command line and the suite measure the same things the same way.

Contenders of the layer benchmark (:data:`CONTENDERS`): the unfused ``reference`` (two cuDNN convolutions, what a
user runs today), the same block ``composed`` into one dense KxK convolution, ``compile`` (``torch.compile`` of the
reference), and the fused backends ``triton`` and ``cuda``. The training-mode BatchNorm block (pw -> BatchNorm with
batch statistics -> act -> dw, one forward + backward) has :data:`TRAIN_CONTENDERS`: the standard layers ``eager`` and
compiled, and the fused training path.

Timing: on a CUDA GPU from CUDA events (``triton.testing.do_bench`` when Triton imports: warm-up excluded, L2 flushed
before every repetition), never from a wall clock; on CPU the wall clock, which says nothing about the GPU kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_backend
from .backends import fp32_uses_tf32
from .functional import bsconv_u
from .modules import fused_block_forward
from .reference import activate
from .shapes import Shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd", "fwdbwd")
LAYOUTS = ("nchw", "cl")  # cl = channels_last
BASELINES = ("reference", "composed", "compile")  # non-fused contenders
FUSED = ("triton", "cuda")
CONTENDERS = BASELINES + FUSED
TRAIN_CONTENDERS = ("eager", "compile") + FUSED  # the training-mode BatchNorm block's
BLOCKS = ("layer", "train_bn")  # what a Job times: the BSConv-U op, or the training-mode BatchNorm block
GLOBAL_WARMUP_S = 1.0  # Session.warm_up before the first measurement of a run


# --------------------------------------------------------------------------------------------------- the contenders
def reference_block(x, pw_weight, pw_bias, dw_weight, dw_bias, stride: int, padding: int, activation: str):
    """What a user runs today: 1x1 conv (cuDNN), activation, depthwise conv (cuDNN). ``pw_weight`` is 4-D."""
    mid = activate(F.conv2d(x, pw_weight, pw_bias), activation)
    return F.conv2d(mid, dw_weight, dw_bias, stride, padding, 1, dw_weight.shape[0])


def composed_block(x, pw_weight, pw_bias, dw_weight, dw_bias, stride: int, padding: int, activation: str):
    """The block as ONE dense KxK conv with weight[o, i] = dw[o] * pw[o, i] (the dense weight is rebuilt every call,
    as a training user would). Exact only without a mid activation and without a pointwise bias."""
    if activation != "none" or pw_bias is not None:
        raise ValueError("the composed dense conv equals BSConv-U only without mid activation and pw_bias")
    return F.conv2d(x, dw_weight * pw_weight.reshape(pw_weight.shape[0], -1, 1, 1), dw_bias, stride, padding)


def composed_supported(shape: Shape) -> bool:
    return shape.activation == "none" and not shape.pw_bias


def _fused_block(backend: str):
    def run(x, pw_weight, pw_bias, dw_weight, dw_bias, stride, padding, activation):
        return bsconv_u(x, pw_weight, dw_weight, dw_bias, stride, padding, pw_bias=pw_bias,
                        mid_activation=None if activation == "none" else activation, backend=backend)

    return run


_COMPILED: dict = {}


def _compiled_reference(key) -> Callable:
    """One ``torch.compile`` (static shapes) of the reference per shape/dtype/layout; compiled lazily on first use."""
    if key not in _COMPILED:
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 4096))
        _COMPILED[key] = torch.compile(reference_block, dynamic=False)
    return _COMPILED[key]


def unavailable_reason(contender: str, device: torch.device, shape: Shape | None = None) -> str | None:
    """None when ``contender`` (of either block) is timed on ``device`` (for ``shape``), else why not."""
    device = torch.device(device)
    if contender in ("reference", "eager"):
        return None
    if contender == "composed":
        if shape is not None and not composed_supported(shape):
            return "composed dense conv is not equivalent with a mid activation / pointwise bias"
        return None
    if contender == "compile":
        return None if device.type == "cuda" else "torch.compile is timed on GPU only"
    if contender not in FUSED:
        raise ValueError(f"unknown contender {contender!r}; one of {CONTENDERS + TRAIN_CONTENDERS}")
    if device.type != "cuda":
        # On CPU the Triton kernels run only in Triton's interpreter, whose times mean nothing (the command line's
        # --triton-interpret checks their results there instead).
        return "the fused kernels are timed on GPU only"
    try:
        from bsconv_cuda import backends

        return backends.unavailable_reason(contender, device)
    except Exception as error:  # noqa: BLE001 - a broken backend is a skipped contender, not a crashed benchmark
        return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """Inputs of one shape/dtype/layout on one device; leaves require grad."""

    shape: Shape
    dtype: torch.dtype
    layout: str
    device: torch.device
    x: torch.Tensor
    pw_weight: torch.Tensor  # (C_out, C_in, 1, 1)
    pw_bias: torch.Tensor | None
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor | None
    grad_y: torch.Tensor = field(repr=False, default=None)

    def args(self, contender: str):
        pw = self.pw_weight if contender in BASELINES else self.pw_weight.flatten(1)
        return (self.x, pw, self.pw_bias, self.dw_weight, self.dw_bias, self.shape.stride, self.shape.padding,
                self.shape.activation)

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.pw_weight, self.pw_bias, self.dw_weight, self.dw_bias) if t is not None]


def make_case(shape: Shape, dtype: torch.dtype, layout: str, device, seed: int = 0) -> Case:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = rand(shape.batch, shape.c_in, shape.hw, shape.hw).contiguous(memory_format=fmt).requires_grad_()
    pw = rand(shape.c_out, shape.c_in, 1, 1, scale=shape.c_in ** -0.5).requires_grad_()
    dw = rand(shape.c_out, 1, shape.k, shape.k, scale=1.0 / shape.k).requires_grad_()
    pwb = rand(shape.c_out, scale=0.1).requires_grad_() if shape.pw_bias else None
    dwb = rand(shape.c_out, scale=0.1).requires_grad_() if shape.dw_bias else None
    grad_y = rand(shape.batch, shape.c_out, shape.hw_out, shape.hw_out).contiguous(memory_format=fmt)
    return Case(shape, dtype, layout, device, x, pw, pwb, dw, dwb, grad_y)


def block_fn(contender: str, case: Case) -> Callable:
    if contender == "reference":
        return reference_block
    if contender == "composed":
        return composed_block
    if contender == "compile":
        return _compiled_reference((case.shape, case.dtype, case.layout, case.device.type))
    if contender in FUSED:
        return _fused_block(contender)
    raise ValueError(f"unknown contender {contender!r}; one of {CONTENDERS}")


def make_runner(contender: str, case: Case, pass_: str) -> Callable[[], object]:
    """A zero-argument callable doing one ``pass_`` (fwd = inference forward under no_grad; bwd = the backward of a
    graph built once, gradients of x and every weight via ``torch.autograd.grad`` so nothing accumulates; fwdbwd =
    forward with autograd + that backward)."""
    fn = block_fn(contender, case)
    args = case.args(contender)
    leaves = case.leaves()
    grad_y = case.grad_y
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    if pass_ == "bwd":
        y = fn(*args)

        def run():
            return torch.autograd.grad(y, leaves, grad_y, retain_graph=True)
        return run
    if pass_ == "fwdbwd":
        def run():
            return torch.autograd.grad(fn(*args), leaves, grad_y)
        return run
    raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


class TrainingBlock(nn.Module):
    """pw -> bn -> act -> dw through :func:`fused_block_forward`: ``backend="reference"`` is the standard layers
    (what ``bsconv.pytorch.BSConvU(with_bn=True)`` runs), a fused backend the fused training path."""

    def __init__(self, shape: Shape, backend: str):
        super().__init__()
        self.pw = nn.Conv2d(shape.c_in, shape.c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(shape.c_out)
        self.dw = nn.Conv2d(shape.c_out, shape.c_out, shape.k, shape.stride, shape.padding, groups=shape.c_out,
                            bias=shape.dw_bias)
        self.activation = None if shape.activation == "none" else shape.activation
        self.backend = backend

    def forward(self, x):
        return fused_block_forward(x, self.pw, self.bn, self.dw, mid_activation=self.activation, backend=self.backend)


def training_block(contender: str, case: Case) -> nn.Module:
    """``contender``'s training-mode BatchNorm block with ``case``'s weights (every contender the same parameters),
    in training mode: each call normalizes with batch statistics and updates the running ones."""
    if contender not in TRAIN_CONTENDERS:
        raise ValueError(f"unknown contender {contender!r}; one of {TRAIN_CONTENDERS}")
    block = TrainingBlock(case.shape, contender if contender in FUSED else "reference")
    block = block.to(device=case.device, dtype=case.dtype).train()
    with torch.no_grad():
        block.pw.weight.copy_(case.pw_weight)
        block.dw.weight.copy_(case.dw_weight)
        if block.dw.bias is not None:
            block.dw.bias.copy_(case.dw_bias)
    return torch.compile(block, dynamic=False) if contender == "compile" else block


def make_training_runner(contender: str, case: Case) -> Callable[[], object]:
    """One forward + backward of ``contender``'s training-mode BatchNorm block on ``case.x`` (gradients of x and every
    parameter via ``torch.autograd.grad``, so nothing accumulates)."""
    block = training_block(contender, case)
    leaves = [case.x, *block.parameters()]

    def run():
        return torch.autograd.grad(block(case.x), leaves, case.grad_y)

    return run


# --------------------------------------------------------------------------------------------------------- accuracy
def _relative_norm_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def relative_error(contender: str, case: Case, pass_: str = "fwd") -> float:
    """The error of what ``pass_`` computes, against the reference computed in float32 from the same inputs: the
    largest ``||out - ref|| / ||ref||`` over y (fwd), over the gradients of x and every weight (bwd), or over both
    (fwdbwd)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    leaves = case.leaves()
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_by_id = {id(t): r for t, r in zip(leaves, ref_leaves)}
    ref_args = [ref_by_id.get(id(a), a) for a in case.args("reference")]
    with torch.enable_grad():
        y = block_fn(contender, case)(*case.args(contender))
        y_ref = reference_block(*ref_args)
        outs, refs = [], []
        if pass_ in ("fwd", "fwdbwd"):
            outs.append(y.detach())
            refs.append(y_ref.detach())
        if pass_ in ("bwd", "fwdbwd"):
            outs += torch.autograd.grad(y, leaves, case.grad_y)
            refs += torch.autograd.grad(y_ref, ref_leaves, case.grad_y.float())
    return max(_relative_norm_error(o, r) for o, r in zip(outs, refs))


def training_relative_error(contender: str, case: Case) -> float:
    """The error of ``contender``'s training-mode forward against the standard layers in the same dtype."""
    with torch.no_grad():
        return _relative_norm_error(training_block(contender, case)(case.x), training_block("eager", case)(case.x))


# ---------------------------------------------------------------------------------------------------------- timing
def gpu_time_ms(fn: Callable, warmup_ms: float = 10.0, rep_ms: float = 40.0) -> dict:
    """Median/p20/p80 in ms from CUDA events, warm-up excluded, L2 flushed before each repetition.

    Uses ``triton.testing.do_bench`` when Triton imports (it flushes L2 by zeroing a 256 MB buffer between
    repetitions, outside the timed region), else an equivalent CUDA-event loop here.
    """
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "timer": "triton.testing.do_bench"}
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / est)), max(3, int(rep_ms / est))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles(sorted(s.elapsed_time(e) for s, e in zip(starts, ends)), "cuda events")


def cpu_time_ms(fn: Callable, min_reps: int = 3, max_reps: int = 20, budget_s: float = 0.3) -> dict:
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(sorted(times), "time.perf_counter (CPU)")


def _quantiles(times: list[float], timer: str) -> dict:
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "timer": timer}


def time_ms(fn: Callable, device: torch.device, warmup_ms: float = 10.0, rep_ms: float = 40.0) -> dict:
    """:func:`gpu_time_ms` on a CUDA device (``warmup_ms``/``rep_ms`` are do_bench's budgets), else
    :func:`cpu_time_ms`."""
    if torch.device(device).type == "cuda":
        return gpu_time_ms(fn, warmup_ms, rep_ms)
    return cpu_time_ms(fn)


def peak_memory_bytes(fn: Callable, device: torch.device) -> int | None:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


@dataclass(frozen=True)
class Measurement:
    ms: float  # median
    p20_ms: float
    p80_ms: float
    timer: str
    peak_mem_bytes: int | None  # CUDA only

    def peak_memory_vs(self, baseline: "Measurement") -> float:
        """This peak memory over ``baseline``'s (CUDA only)."""
        return self.peak_mem_bytes / max(baseline.peak_mem_bytes, 1)


def measure(run: Callable[[], object], device: torch.device, warmup_ms: float = 10.0,
            rep_ms: float = 40.0) -> Measurement:
    """The timed runner of every front end: on a CUDA device one untimed call first (compilation, autotuning, the
    allocator), then the peak memory of one call, then :func:`time_ms`."""
    device = torch.device(device)
    if device.type == "cuda":
        run()
    peak = peak_memory_bytes(run, device)
    t = time_ms(run, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return Measurement(t["ms"], t["p20_ms"], t["p80_ms"], t["timer"], peak)


def synchronized(run: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``run`` followed by a device synchronization: what a wall clock around it measures is the work, not a launch."""
    device = torch.device(device)

    def run_and_sync():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run_and_sync


@functools.cache
def copy_bandwidth_gbs(device_index: int = 0) -> float:
    """The card's measured device-to-device copy bandwidth in GB/s (read + write bytes / time), 1 GiB copy."""
    n = 1 << 30
    bufs = [torch.empty(n, dtype=torch.uint8, device=f"cuda:{device_index}") for _ in range(2)]
    t = gpu_time_ms(lambda: bufs[1].copy_(bufs[0]), warmup_ms=20, rep_ms=100)["ms"]
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * n / (t * 1e-3) / 1e9


def throughput(shape: Shape, pass_: str, dtype: str, ms: float, device: torch.device) -> dict:
    """On a CUDA device: ``gbs`` (the fused byte floor of ``shape.byte_floor`` over ``ms``), ``frac_copy_bw`` (that
    over the measured copy bandwidth) and ``tflops``; empty elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    seconds = ms * 1e-3
    gbs = shape.byte_floor(pass_, torch.finfo(DTYPES[dtype]).bits // 8) / seconds / 1e9
    return {"gbs": gbs, "frac_copy_bw": gbs / copy_bandwidth_gbs(device.index or 0),
            "tflops": shape.flops(pass_) / seconds / 1e12}


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """What a result depends on besides the code: device, torch, triton, TF32, and on GPU the capability and the
    measured copy bandwidth."""
    device = torch.device(device)
    env = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "python": platform.python_version(), "fp32_uses_tf32": fp32_uses_tf32(),
           "cuda_backward": cuda_backend.forced_backward_path()}
    try:
        import triton

        from .kernels import bsconv_u as triton_kernels

        env["triton"] = triton.__version__
        env["triton_depthwise"] = triton_kernels.DEPTHWISE_STAGE
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device.type == "cuda":
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device.index or 0)
    return env


def write_json(path: str, results, quiet: bool = False) -> None:
    """The command lines' ``--json PATH``: ``results`` as JSON (values JSON lacks as their text). Written beside and
    then moved into place, so that a run killed while writing leaves the previous file whole."""
    part = f"{path}.part"
    with open(part, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(part, path)
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------- speed-up
def fastest(times_ms: Mapping[str, float], labels: Iterable[str]) -> str | None:
    """The label of ``labels`` with the smallest time in ``times_ms`` (labels not timed are passed over)."""
    timed = [name for name in labels if name in times_ms]
    return min(timed, key=times_ms.__getitem__) if timed else None


def speedups(times_ms: Mapping[str, float], baselines: Iterable[str]) -> tuple[str | None, dict[str, float]]:
    """The one speed-up of every front end: the fastest timed entry of ``baselines``, and every entry's speed-up
    over it (its time / the entry's time; > 1 is faster). ``(None, {})`` when no baseline was timed."""
    best = fastest(times_ms, baselines)
    if best is None:
        return None, {}
    return best, {name: times_ms[best] / ms for name, ms in times_ms.items()}


def layer_speedups(times_ms: Mapping[str, float], over_baselines: bool) -> tuple[str | None, dict[str, float]]:
    """:func:`speedups` of one (shape, dtype, pass) of the layer benchmark (``times_ms`` by :func:`label`): over the
    fastest non-fused contender when ``over_baselines`` (results that hold fused contenders), else over the NCHW
    reference (CPU results: the reference's channels_last speed-up)."""
    if over_baselines:
        return speedups(times_ms, [lab for lab in times_ms if contender_of(lab) in BASELINES])
    return speedups(times_ms, [label("reference", "nchw")])


# ------------------------------------------------------------------------------------------------------- the jobs
def label(contender: str, layout: str) -> str:
    """A layer contender's column name, e.g. ``triton-cl``."""
    return f"{contender}-{layout}"


def contender_of(name: str) -> str:
    """The contender of a :func:`label`."""
    return name.rsplit("-", 1)[0]


@dataclass(frozen=True)
class Job:
    """One timed thing: ``contender`` of ``block`` (see :data:`BLOCKS`) on ``shape`` in ``dtype`` (a :data:`DTYPES`
    name), ``pass_`` (the training block: always fwdbwd) and ``layout``."""

    shape: Shape
    dtype: str
    pass_: str
    contender: str
    layout: str = "cl"
    block: str = "layer"

    @property
    def label(self) -> str:
        return label(self.contender, self.layout)


def layer_contenders(layouts: Sequence[str] = ("cl",), composed: bool = False,
                     compile: bool = False) -> list[tuple[str, str]]:  # noqa: A002 - the contender's name
    """(contender, layout) pairs of the layer benchmark in table order: the reference in both layouts (a user runs
    either), then the composed dense conv and ``torch.compile`` when asked, then the fused backends, in ``layouts``."""
    pairs = [("reference", lay) for lay in LAYOUTS]
    pairs += [("composed", lay) for lay in layouts if composed]
    pairs += [("compile", lay) for lay in layouts if compile]
    return pairs + [(backend, lay) for backend in FUSED for lay in layouts]


def layer_jobs(shapes: Sequence[Shape], dtypes: Sequence[str], passes: Sequence[str],
               contenders: Sequence[tuple[str, str]]) -> list[Job]:
    """Every (shape, dtype, pass, contender) in run order: for each shape/dtype/pass the baselines come first."""
    return [Job(shape, dtype, pass_, contender, layout)
            for shape in shapes for dtype in dtypes for pass_ in passes for contender, layout in contenders]


def training_jobs(shapes: Sequence[Shape], dtypes: Sequence[str]) -> list[Job]:
    """Every (shape, dtype, contender) of the training-mode BatchNorm block: forward + backward, channels_last."""
    return [Job(shape, dtype, "fwdbwd", contender, "cl", "train_bn")
            for shape in shapes for dtype in dtypes for contender in TRAIN_CONTENDERS]


def same_group(job: Job, other: Job) -> bool:
    """Whether ``other`` is timed on the same work as ``job`` (and so is a speed-up baseline for it)."""
    return dataclasses.replace(other, contender=job.contender, layout=job.layout) == job


class Session:
    """Runs jobs on one device: builds their inputs (the most recent few cases are kept, ImageNet batch-64 tensors
    are big) and measures each job once, so a contender's speed-up finds its baselines measured. The runner of the
    job measured last is kept: timing it again (pytest-benchmark's own rounds) compiles nothing twice."""

    CASES_KEPT = 2

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cases: dict = {}
        self._measurements: dict[Job, Measurement] = {}
        self._last_runner: tuple[Job, Callable[[], object]] | None = None

    def case(self, shape: Shape, dtype: str, layout: str) -> Case:
        key = (shape, dtype, layout)
        if key not in self._cases:
            while len(self._cases) >= self.CASES_KEPT:
                self._cases.pop(next(iter(self._cases)))
            self._cases[key] = make_case(shape, DTYPES[dtype], layout, self.device)
        return self._cases[key]

    def runner(self, job: Job) -> Callable[[], object]:
        if self._last_runner is not None and self._last_runner[0] == job:
            return self._last_runner[1]
        case = self.case(job.shape, job.dtype, job.layout)
        if job.block == "train_bn":
            return make_training_runner(job.contender, case)
        return make_runner(job.contender, case, job.pass_)

    def measure(self, job: Job) -> Measurement:
        if job not in self._measurements:
            self._last_runner = None  # released before the next one is built: a bwd runner holds a graph
            run = self.runner(job)
            self._measurements[job] = measure(run, self.device)
            self._last_runner = (job, run)
        return self._measurements[job]

    def relative_error(self, job: Job) -> float:
        """Layer: against the reference in float32 (:func:`relative_error`); training block: the forward against the
        standard layers in the same dtype (:func:`training_relative_error`)."""
        case = self.case(job.shape, job.dtype, job.layout)
        if job.block == "train_bn":
            return training_relative_error(job.contender, case)
        return relative_error(job.contender, case, job.pass_)

    def warm_up(self, jobs: Sequence[Job], seconds: float) -> None:
        """Runs every job of the first shape round-robin, untimed, for ``seconds`` and at least once each. Each
        measurement has its own warm-up, but that does not cover what the process pays once: library
        initialisation, the allocator growing, clocks ramping up. Without this, on CPU the first shape timed read
        cl/nchw 8.7x, and 1.75x when timed second. Failures are left to the measurement, which reports them."""
        first = jobs[0].shape if jobs else None
        runners = []
        for job in jobs:
            if job.shape != first:
                continue
            try:
                runners.append(self.runner(job))
            except Exception:  # noqa: BLE001
                continue
        t_end = time.perf_counter() + seconds
        rounds = 0
        while runners and (rounds == 0 or time.perf_counter() < t_end):
            for run in list(runners):
                try:
                    run()
                except Exception:  # noqa: BLE001
                    runners.remove(run)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            rounds += 1
