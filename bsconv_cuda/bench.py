"""``python -m bsconv_cuda.bench``: time the BSConv-U backends on this machine's device.

On a CUDA GPU it compares every available backend (``cuda``, ``triton``) with the unfused reference (two cuDNN
convolutions, NCHW and channels_last), the same block composed into one dense KxK convolution, and (``--compile``)
``torch.compile`` of the reference, on a few representative layer shapes, and prints a table with speed-ups.
GPU times come from CUDA events (``triton.testing.do_bench`` when Triton is installed: warm-up excluded, L2 cache
flushed before every repetition), never from a wall clock.

On CPU it compares the reference in NCHW and channels_last at a small batch (CPU timings are CPU timings: they say
nothing about the fused GPU kernels). ``--triton-interpret`` additionally runs the Triton kernels through Triton's
interpreter on tiny crops of the shapes: that is a correctness smoke test, NOT a speed measurement.

This module is also the timing/contender library of the pytest-benchmark suite in ``benchmarks/``, so the command
line and the suite measure the same things the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .backends import fp32_uses_tf32
from .functional import bsconv_u
from .reference import activate
from .shapes import SHAPES, Shape, select

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd", "fwdbwd")
GLOBAL_WARMUP_S = 1.0  # default of --warmup: untimed runs of the whole plan before the first measurement
LAYOUTS = ("nchw", "cl")  # cl = channels_last
BASELINES = ("reference", "composed", "compile")  # non-fused contenders
FUSED = ("triton", "cuda")
CONTENDERS = BASELINES + FUSED


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


def backend_unavailable_reason(contender: str, device: torch.device, shape: Shape | None = None) -> str | None:
    """None when ``contender`` can run here (for ``shape``), else why not."""
    if contender == "reference":
        return None
    if contender == "composed":
        if shape is not None and not composed_supported(shape):
            return "composed dense conv is not equivalent with a mid activation / pointwise bias"
        return None
    if contender == "compile":
        return None if device.type == "cuda" else "torch.compile is timed on GPU only"
    try:
        from bsconv_cuda import backends
    except Exception as error:  # noqa: BLE001
        return f"bsconv_cuda.backends not importable ({type(error).__name__}: {error})"
    try:
        return backends.unavailable_reason(contender, device)
    except Exception as error:  # noqa: BLE001
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
        pw = self.pw_weight if contender in ("reference", "composed", "compile") else self.pw_weight.flatten(1)
        return (self.x, pw, self.pw_bias, self.dw_weight, self.dw_bias, self.shape.stride, self.shape.padding,
                self.shape.activation)

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.pw_weight, self.pw_bias, self.dw_weight, self.dw_bias) if t is not None]


def make_case(shape: Shape, dtype: torch.dtype, layout: str, device, seed: int = 0) -> Case:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        t = (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)
        return t

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


# ---------------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "timer": "cuda events"}


def cpu_time_ms(fn: Callable, min_reps: int = 3, max_reps: int = 20, budget_s: float = 0.3) -> dict:
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "timer": "time.perf_counter (CPU)"}


def time_ms(fn: Callable, device: torch.device, **kwargs) -> dict:
    device = torch.device(device)
    return gpu_time_ms(fn, **kwargs) if device.type == "cuda" else cpu_time_ms(fn, **kwargs)


@functools.cache
def copy_bandwidth_gbs(device_index: int = 0) -> float:
    """The card's measured device-to-device copy bandwidth in GB/s (read + write bytes / time), 1 GiB copy."""
    n = 1 << 30
    bufs = [torch.empty(n, dtype=torch.uint8, device=f"cuda:{device_index}") for _ in range(2)]
    t = gpu_time_ms(lambda: bufs[1].copy_(bufs[0]), warmup_ms=20, rep_ms=100)["ms"]
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * n / (t * 1e-3) / 1e9


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
    return max(
        float(torch.linalg.vector_norm(o.float() - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
        for o, r in zip(outs, refs)
    )


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------ command line tool
@dataclass
class Result:
    shape: str
    describe: str
    dtype: str
    pass_: str
    contender: str
    layout: str
    ms: float | None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbs: float | None = None
    floor_fraction_of_copy_bw: float | None = None
    rel_err: float | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.contender}-{self.layout}"


class Progress:
    """A plain progress bar on ``stream`` (default stderr; no dependency). Drawn only when enabled and ``stream`` is
    a terminal: redirected to a file or a pipe, its carriage-return lines would fill a log."""

    def __init__(self, total: int, enabled: bool = True, width: int = 28, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done, self.width = total, 0, width
        self.enabled = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        line = f"\r[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.1f}s {what[:48]:<48}"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _plan(args, device: torch.device) -> list[tuple[str, str]]:
    """(contender, layout) pairs to time, in table order."""
    if device.type != "cuda":
        return [("reference", "nchw"), ("reference", "cl")]
    layouts = [args.layout] if args.layout != "both" else list(LAYOUTS)
    plan = [("reference", "nchw"), ("reference", "cl")]
    if args.composed:
        plan += [("composed", lay) for lay in layouts]
    if args.compile:
        plan += [("compile", lay) for lay in layouts]
    plan += [(b, lay) for b in FUSED for lay in layouts]
    return plan


def warm_up(jobs: list[tuple], dtype: torch.dtype, device: torch.device, seconds: float) -> None:
    """Runs every (contender, layout, pass) of the plan on the first shape, round-robin, for ``seconds`` and at least
    once each, untimed. Each measurement has its own warm-up, but that does not cover what the process pays once:
    library initialisation, the allocator growing, clocks ramping up. Without this, on CPU the first shape timed
    read cl/nchw 8.7x, and 1.75x when timed second. Failures are left to the measurement, which reports them."""
    first = jobs[0][0] if jobs else None
    runners = []
    cases: dict = {}
    for shape, contender, layout, pass_ in jobs:
        if shape != first:
            continue
        if layout not in cases:
            cases[layout] = make_case(shape, dtype, layout, device)
        try:
            runners.append(make_runner(contender, cases[layout], pass_))
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
        _sync(device)
        rounds += 1


def interpreter_crops(shapes: Sequence[Shape], count: int) -> list[Shape]:
    """The tiny crops (batch 1, at most 8x8, at most 32 channels) that ``--triton-interpret`` runs: those of the
    first ``count`` shapes whose crops differ (several shapes crop to the same case, e.g. the first two quick ones)."""
    crops: list[Shape] = []
    for shape in shapes:
        crop = dataclasses.replace(shape, batch=1, hw=min(shape.hw, 8), c_in=min(shape.c_in, 32),
                                   c_out=min(shape.c_out, 32))
        if all(dataclasses.replace(crop, name=c.name, family=c.family, quick=c.quick) != c for c in crops):
            crops.append(crop)
        if len(crops) == count:
            break
    return crops


def run_benchmarks(args) -> tuple[list[Result], dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    try:
        shapes = select(args.shapes)
    except KeyError as error:
        raise SystemExit(f"--shapes: {error.args[0]}") from None
    if device.type != "cuda":
        shapes = [s.with_batch(min(s.batch, args.batch or 2)) for s in shapes]
    elif args.batch:
        shapes = [s.with_batch(args.batch) for s in shapes]
    passes = [p.strip() for p in args.passes.split(",")]
    for p in passes:
        if p not in PASSES:
            raise SystemExit(f"--passes: unknown pass {p!r} (one of {', '.join(PASSES)})")
    plan = _plan(args, device)
    meta = {
        "device": device_name(device), "device_type": device.type, "dtype": args.dtype, "torch": torch.__version__,
        "python": platform.python_version(), "fp32_uses_tf32": fp32_uses_tf32(),
    }
    try:
        import triton

        from .kernels import bsconv_u as triton_kernels

        meta["triton"] = triton.__version__
        meta["triton_depthwise"] = triton_kernels.DEPTHWISE_STAGE
    except Exception:  # noqa: BLE001
        meta["triton"] = None
    if device.type == "cuda":
        meta["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device.index or 0)
    skipped: dict[str, str] = {}
    jobs = []
    for shape in shapes:
        for contender, layout in plan:
            reason = backend_unavailable_reason(contender, device, shape)
            if reason is not None:
                skipped.setdefault(contender, reason)
                continue
            jobs += [(shape, contender, layout, p) for p in passes]
    interp_jobs = []
    if args.triton_interpret:
        interp_jobs = [(s, p) for s in interpreter_crops(shapes, args.interpret_shapes) for p in passes]
    progress = Progress(len(jobs) + len(interp_jobs), enabled=not args.no_progress)
    warm_up(jobs, dtype, device, args.warmup)
    results: list[Result] = []
    cases: dict = {}
    for shape, contender, layout, pass_ in jobs:
        progress.step(f"{shape.name} {contender}-{layout} {pass_}")
        key = (shape, layout)
        if key not in cases:
            cases.clear()
            cases[key] = make_case(shape, dtype, layout, device)
        case = cases[key]
        res = Result(shape.name, shape.describe(), args.dtype, pass_, contender, layout, None)
        try:
            if contender in FUSED:
                res.rel_err = relative_error(contender, case, pass_)
            t = time_ms(make_runner(contender, case, pass_), device)
            res.ms, res.p20_ms, res.p80_ms = t["ms"], t["p20_ms"], t["p80_ms"]
            if device.type == "cuda":
                floor = shape.byte_floor(pass_, torch.finfo(dtype).bits // 8)
                res.gbs = floor / (res.ms * 1e-3) / 1e9
                res.floor_fraction_of_copy_bw = res.gbs / meta["copy_bandwidth_gbs"]
        except Exception as error:  # noqa: BLE001 - one failing contender must not kill the table
            res.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        results.append(res)
    cases.clear()
    for shape, pass_ in interp_jobs:
        progress.step(f"{shape.name} triton-interpreter {pass_}")
        results.append(_interpreter_check(shape, pass_))
    progress.close()
    meta["skipped"] = skipped
    return results, meta


def _interpreter_check(tiny: Shape, pass_: str) -> Result:
    """Triton interpreter on ``tiny`` (an :func:`interpreter_crops` crop), in fp32: the error of ``pass_``;
    correctness only."""
    res = Result(tiny.name, tiny.describe() + " (tiny crop)", "fp32", pass_, "triton", "interpreter", None,
                 note="Triton interpreter: NOT a speed measurement")
    try:
        case = make_case(tiny, torch.float32, "nchw", "cpu")
        res.rel_err = relative_error("triton", case, pass_)
        t = cpu_time_ms(make_runner("triton", case, pass_), min_reps=1, max_reps=1, budget_s=0.0)
        res.ms = t["ms"]
    except Exception as error:  # noqa: BLE001
        res.note = f"failed: {type(error).__name__}: {error}"[:200]
    return res


def format_table(results: list[Result], meta: dict) -> str:
    """One row per (shape, pass), one column per contender (ms), then the speed-up of the fastest fused contender
    over the fastest non-fused one (on CPU: channels_last reference over NCHW reference)."""
    timed = [r for r in results if r.layout != "interpreter"]
    labels: list[str] = []
    for r in timed:
        if r.label not in labels:
            labels.append(r.label)
    rows: dict = {}
    for r in timed:
        rows.setdefault((r.shape, r.describe, r.pass_), {})[r.label] = r
    lines = [f"# bsconv_cuda.bench on {meta['device']} ({meta['dtype']}, torch {meta['torch']}); times in ms"]
    if meta.get("device_type") != "cuda":
        lines.append("# CPU timings of the reference only: they say nothing about the fused GPU kernels.")
    else:
        lines.append(f"# measured device-to-device copy bandwidth: {meta['copy_bandwidth_gbs']:.0f} GB/s; GB/s = "
                     f"fused byte floor (x + y + weights, each once) / time")
    has_fused = any(r.contender in FUSED for r in timed)
    speed_col = "fused/best-ref" if has_fused else "cl/nchw"
    header = ["shape", "pass", *labels, speed_col]
    if has_fused:
        header.append("best GB/s (%copy)")
    table = [header]
    for (name, desc, pass_), by_label in rows.items():
        row = [f"{name} [{desc}]", pass_]
        for lab in labels:
            r = by_label.get(lab)
            row.append("-" if r is None else (f"{r.ms:.3f}" if r.ms is not None else "FAIL"))
        base = [r.ms for r in by_label.values() if r.contender in BASELINES and r.ms is not None]
        fused = [r for r in by_label.values() if r.contender in FUSED and r.ms is not None]
        if has_fused:
            best = min(fused, key=lambda r: r.ms) if fused else None
            row.append(f"{min(base) / best.ms:.2f}x ({best.label})" if best and base else "-")
            row.append(f"{best.gbs:.0f} ({100 * best.floor_fraction_of_copy_bw:.0f}%)" if best and best.gbs else "-")
        else:
            a, b = by_label.get("reference-nchw"), by_label.get("reference-cl")
            row.append(f"{a.ms / b.ms:.2f}x" if a and b and a.ms and b.ms else "-")
        table.append(row)
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    failures = [r for r in timed if r.note]
    for r in failures:
        lines.append(f"! {r.shape} {r.label} {r.pass_}: {r.note}")
    for contender, reason in meta.get("skipped", {}).items():
        lines.append(f"- {contender} not timed: {reason}")
    interp = [r for r in results if r.layout == "interpreter"]
    if interp:
        lines.append("")
        lines.append("# Triton interpreter on tiny crops (CPU): correctness smoke test, NOT a speed measurement")
        for r in interp:
            err = f"rel err {r.rel_err:.1e}" if r.rel_err is not None else "-"
            lines.append(f"  {r.shape} [{r.describe}] {r.pass_}: {err} {r.note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(
        prog="python -m bsconv_cuda.bench",
        description="Time the BSConv-U backends on this machine's device: on GPU the fused backends against the "
                    "unfused reference (CUDA-event timing); on CPU the reference in NCHW vs channels_last.")
    p.add_argument("--shapes", default="quick",
                   help="comma-separated shape names or families (mbv1, mbv2, mbv3, cifar_mbv1, cifar_resnet), "
                        "'quick' (default), 'latency' or 'all'; see --list")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--passes", default="fwd,bwd,fwdbwd", help="comma-separated subset of fwd,bwd,fwdbwd")
    p.add_argument("--layout", default="cl", choices=["cl", "nchw", "both"],
                   help="layout of the fused (and composed/compile) contenders on GPU; the reference is always "
                        "timed in both (default: cl = channels_last)")
    p.add_argument("--batch", type=int, default=None, help="override the batch (CPU default: 2)")
    p.add_argument("--composed", action="store_true", help="GPU: also time the dense composed KxK conv")
    p.add_argument("--compile", action="store_true", help="GPU: also time torch.compile of the reference")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default 1: steady on a shared machine; these CPU numbers only compare "
                        "layouts of the reference)")
    p.add_argument("--triton-interpret", action="store_true",
                   help="CPU: also run the Triton kernels in Triton's interpreter on tiny crops of the first "
                        "shapes (correctness smoke test, NOT a speed measurement)")
    p.add_argument("--interpret-shapes", type=int, default=2, help="how many shapes --triton-interpret runs")
    p.add_argument("--triton-depthwise", default=None, choices=["gather", "shifted"],
                   help="the Triton forward's depthwise stage (default: the kernels' DEPTHWISE_STAGE); run once "
                        "with each to measure both")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results as JSON")
    p.add_argument("--warmup", type=float, default=GLOBAL_WARMUP_S, metavar="SECONDS",
                   help=f"untimed runs of the first shape's whole plan before any timing (default "
                        f"{GLOBAL_WARMUP_S:g}; each measurement also warms up on its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only when stderr is a terminal)")
    p.add_argument("--list", action="store_true", help="list the shapes and exit")
    return p.parse_args(argv)


def _device(spec: str | None) -> torch.device:
    """``--device`` checked: a clear message, instead of a traceback from deep inside the first CUDA call."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise SystemExit(f"--device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {spec}: no CUDA GPU is usable here (torch.cuda.is_available() is False; "
                             f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not compiled in'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise SystemExit(f"--device {spec}: only cpu and cuda devices are benchmarked")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
        return status
    except BrokenPipeError:
        # the reader went away (``--list | head``): stop quietly. stdout goes to devnull so that Python's own flush at
        # exit does not raise again (the recipe of Python's signal module documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SHAPES:
            print(f"{s.name:28s} {s.describe()}{'  (quick)' if s.quick else ''}")
        return 0
    device = _device(args.device)
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is first imported, possibly already by ``import bsconv_cuda``:
        # start again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "bsconv_cuda.bench", *argv], env)
    args.device = str(device)
    on_gpu = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if on_gpu else "fp32"
    if args.triton_interpret and on_gpu:
        raise SystemExit("--triton-interpret is for CPU-only machines")
    if not on_gpu:
        torch.set_num_threads(args.threads or 1)
    if args.triton_depthwise is not None:
        from .kernels import bsconv_u as triton_kernels

        triton_kernels.DEPTHWISE_STAGE = args.triton_depthwise
    results, meta = run_benchmarks(args)
    print(format_table(results, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [dict(asdict(r), label=r.label) for r in results]}, f, indent=1,
                      default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
