"""``python -m bsconv_cuda.bench``: time the BSConv-U backends on this machine's device.

On a CUDA GPU it compares every available backend (``cuda``, ``triton``) with the unfused reference (two cuDNN
convolutions, NCHW and channels_last), the same block composed into one dense KxK convolution, and (``--compile``)
``torch.compile`` of the reference, on a few representative layer shapes, and prints a table with speed-ups.
GPU times come from CUDA events (``triton.testing.do_bench`` when Triton is installed: warm-up excluded, L2 cache
flushed before every repetition), never from a wall clock.

On CPU it compares the reference in NCHW and channels_last (and ``--composed``, the dense conv) at a small batch
(CPU timings are CPU timings: they say nothing about the fused GPU kernels, which are timed on GPU only).
``--triton-interpret`` additionally runs the Triton kernels through Triton's interpreter on tiny crops of the shapes:
that is a correctness smoke test, NOT a speed measurement.

It is one front end of :mod:`bsconv_cuda.bench_harness`, which builds the cases, times them and computes the
speed-ups for the pytest-benchmark suite in ``benchmarks/`` as well: this module only chooses the jobs from the
command line and prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import bench_harness as harness, cuda_backend
from .bench_harness import FUSED
from .shapes import SHAPES, Shape, select


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
    peak_mem_bytes: int | None = None
    rel_err: float | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return harness.label(self.contender, self.layout)


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
        if p not in harness.PASSES:
            raise SystemExit(f"--passes: unknown pass {p!r} (one of {', '.join(harness.PASSES)})")
    layouts = harness.LAYOUTS if args.layout == "both" else (args.layout,)
    contenders = harness.layer_contenders(layouts, composed=args.composed, compile=args.compile)
    meta = dict(harness.environment(device), dtype=args.dtype)
    skipped: dict[str, str] = {}
    meta["skipped"] = skipped  # filled below, before any measurement
    jobs = []
    for job in harness.layer_jobs(shapes, [args.dtype], passes, contenders):
        reason = harness.unavailable_reason(job.contender, device, job.shape)
        if reason is None:
            jobs.append(job)
        else:
            skipped.setdefault(job.contender, reason)
    meta.update(jobs_planned=len(jobs), jobs_done=0)
    interp_jobs = []
    if args.triton_interpret:
        interp_jobs = [(s, p) for s in interpreter_crops(shapes, args.interpret_shapes) for p in passes]
    progress = Progress(len(jobs) + len(interp_jobs), enabled=not args.no_progress)
    session = harness.Session(device)
    session.warm_up(jobs, args.warmup)
    results: list[Result] = []
    for job in jobs:
        progress.step(f"{job.shape.name} {job.label} {job.pass_}")
        res = Result(job.shape.name, job.shape.describe(), job.dtype, job.pass_, job.contender, job.layout, None)
        try:
            if job.contender in FUSED:
                res.rel_err = session.relative_error(job)
            measured = session.measure(job)
            res.ms, res.p20_ms, res.p80_ms = measured.ms, measured.p20_ms, measured.p80_ms
            res.peak_mem_bytes = measured.peak_mem_bytes
            rates = harness.throughput(job.shape, job.pass_, job.dtype, measured.ms, device)
            res.gbs, res.floor_fraction_of_copy_bw = rates.get("gbs"), rates.get("frac_copy_bw")
        except Exception as error:  # noqa: BLE001 - one failing contender must not kill the table
            res.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        results.append(res)
        meta["jobs_done"] = len(results)
        if args.json:  # after every job, so that a run stopped at a time limit keeps what it measured
            write_results(args.json, meta, results, quiet=True)
    for shape, pass_ in interp_jobs:
        progress.step(f"{shape.name} triton-interpreter {pass_}")
        results.append(_interpreter_check(shape, pass_))
    progress.close()
    return results, meta


def _interpreter_check(tiny: Shape, pass_: str) -> Result:
    """Triton interpreter on ``tiny`` (an :func:`interpreter_crops` crop), in fp32: the error of ``pass_``;
    correctness only."""
    res = Result(tiny.name, tiny.describe() + " (tiny crop)", "fp32", pass_, "triton", "interpreter", None,
                 note="Triton interpreter: NOT a speed measurement")
    try:
        case = harness.make_case(tiny, torch.float32, "nchw", "cpu")
        res.rel_err = harness.relative_error("triton", case, pass_)
        t = harness.cpu_time_ms(harness.make_runner("triton", case, pass_), min_reps=1, max_reps=1, budget_s=0.0)
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
        lines.append("# CPU timings of the unfused contenders only: they say nothing about the fused GPU kernels.")
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
        times = {lab: r.ms for lab, r in by_label.items() if r.ms is not None}
        baseline, speedup = harness.layer_speedups(times, over_baselines=has_fused)
        if has_fused:
            best = by_label.get(harness.fastest(times, [lab for lab in times if harness.contender_of(lab) in FUSED]))
            row.append(f"{speedup[best.label]:.2f}x ({best.label})" if best and baseline else "-")
            row.append(f"{best.gbs:.0f} ({100 * best.floor_fraction_of_copy_bw:.0f}%)" if best and best.gbs else "-")
        else:
            cl = harness.label("reference", "cl")
            row.append(f"{speedup[cl]:.2f}x" if cl in speedup else "-")
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
    p.add_argument("--dtype", default=None, choices=sorted(harness.DTYPES),
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--passes", default="fwd,bwd,fwdbwd", help="comma-separated subset of fwd,bwd,fwdbwd")
    p.add_argument("--layout", default="cl", choices=["cl", "nchw", "both"],
                   help="layout of the fused (and composed/compile) contenders; the reference is always "
                        "timed in both (default: cl = channels_last)")
    p.add_argument("--batch", type=int, default=None, help="override the batch (CPU default: 2)")
    p.add_argument("--composed", action="store_true", help="also time the dense composed KxK conv")
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
    p.add_argument("--cuda-backward", default="auto", choices=cuda_backend.BACKWARD_PATHS,
                   help="the CUDA backward's path (default: the kernels' traffic model chooses); run once with fused "
                        "and once with split to measure both (layers wider than FUSED_MAX_CIN input channels have no "
                        "fused path: their rows say so)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results as JSON")
    p.add_argument("--warmup", type=float, default=harness.GLOBAL_WARMUP_S, metavar="SECONDS",
                   help=f"untimed runs of the first shape's whole plan before any timing (default "
                        f"{harness.GLOBAL_WARMUP_S:g}; each measurement also warms up on its own)")
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
    with cuda_backend.force_backward_path(args.cuda_backward):
        results, meta = run_benchmarks(args)
    print(format_table(results, meta))
    if args.json:
        write_results(args.json, meta, results)
    return 0


def write_results(path: str, meta: dict, results: list[Result], quiet: bool = False) -> None:
    """``--json PATH``: the run's metadata and one object per result."""
    harness.write_json(path, {"meta": meta, "results": [dict(asdict(r), label=r.label) for r in results]}, quiet)


if __name__ == "__main__":
    sys.exit(main())
