"""``bsconv_cuda.bench_harness`` is the one harness: the command line (``python -m bsconv_cuda.bench``) and the
pytest-benchmark suite (``benchmarks/``) time the same jobs through the same runners, and every speed-up they (and
``benchmarks/report.py``) show comes from the one formula."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bsconv_cuda import bench, bench_harness, bench_models
from bsconv_cuda.shapes import get_shape

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SHAPE = "cifar_resnet_16x16_32"  # a quick shape without mid activation or pointwise bias: every contender runs
# Fake times by contender label: the fastest baseline is composed-cl, so the fused speed-up is 2.5 / 1.0.
FAKE_MS = {"reference-nchw": 4.0, "reference-cl": 3.0, "composed-cl": 2.5, "triton-cl": 1.0}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite(monkeypatch):
    """``benchmarks/test_bsconv_u.py`` as pytest imports it (its sibling ``_suite`` importable)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "_suite", raising=False)
    return _load(BENCHMARKS / "test_bsconv_u.py", "bsconv_bench_suite_layers")


class _Benchmark:
    """What the suite's test uses of pytest-benchmark's ``benchmark`` fixture."""

    def __init__(self):
        self.group, self.extra_info, self.rounds = None, {}, 0

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds + rounds * iterations):
            fn()
        self.rounds += rounds


@pytest.fixture
def instrumented(monkeypatch):
    """Every runner the harness builds and every time it takes is recorded (by job), times are :data:`FAKE_MS`, the
    Triton contender runs (on CPU) as the reference on a flattened pointwise weight, and every call of the one
    speed-up formula is counted."""
    calls = SimpleNamespace(timed=[], speedups=0)
    make_runner, speedups, unavailable = (bench_harness.make_runner, bench_harness.speedups,
                                          bench_harness.unavailable_reason)

    def recording_make_runner(contender, case, pass_):
        run = make_runner(contender, case, pass_)
        key = (case.shape, bench_harness.label(contender, case.layout), pass_)

        def runner():
            return run()

        runner.key = key
        return runner

    def fake_time_ms(fn, device, **kwargs):
        fn()
        calls.timed.append(fn.key)
        ms = FAKE_MS[fn.key[1]]
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms, "timer": "fake"}

    def counted_speedups(times_ms, baselines):
        calls.speedups += 1
        return speedups(times_ms, baselines)

    def fused_block_on_cpu(contender, case):
        if contender == "triton":
            return lambda x, pw, *rest: bench_harness.reference_block(x, pw[:, :, None, None], *rest)
        return original_block_fn(contender, case)

    original_block_fn = bench_harness.block_fn
    monkeypatch.setattr(bench_harness, "make_runner", recording_make_runner)
    monkeypatch.setattr(bench_harness, "time_ms", fake_time_ms)
    monkeypatch.setattr(bench_harness, "speedups", counted_speedups)
    monkeypatch.setattr(bench_harness, "block_fn", fused_block_on_cpu)
    monkeypatch.setattr(bench_harness, "unavailable_reason",
                        lambda c, device, shape=None: None if c == "triton" else unavailable(c, device, shape))
    return calls


def _cli_args(*extra: str):
    args = bench.parse_args(["--shapes", SHAPE, "--batch", "1", "--device", "cpu", "--warmup", "0", "--no-progress",
                             "--composed", "--compile", *extra])
    args.dtype = "fp32"
    return args


def _suite_jobs(suite, dtype: str, passes) -> list[bench_harness.Job]:
    return [job for job in suite.plan("default", False)
            if job.shape.name == SHAPE and job.dtype == dtype and job.pass_ in passes]


def _run_suite(suite, jobs, device=torch.device("cpu")) -> dict:
    """The suite's test function on ``jobs`` as pytest would call it (skips left out): extra_info by label/pass."""
    session = bench_harness.Session(device)
    request = SimpleNamespace(config=SimpleNamespace(getoption=lambda name, default=None: "default"))
    infos = {}
    for job in jobs:
        benchmark = _Benchmark()
        try:
            suite.test_bsconv_u(benchmark, request, device, session, job)
        except pytest.skip.Exception:
            continue
        assert benchmark.rounds > 0  # pytest-benchmark timed it too (its own sanity statistics)
        infos[(job.label, job.pass_)] = benchmark.extra_info
    return infos


def test_both_front_ends_time_the_same_jobs_through_the_same_runners(suite, instrumented):
    assert suite.harness is bench.harness is bench_harness  # one module, not two copies of it
    results, meta = bench.run_benchmarks(_cli_args("--passes", "fwd,bwd"))
    cli_timed = list(instrumented.timed)
    instrumented.timed.clear()
    jobs = _suite_jobs(suite, "fp32", ("fwd", "bwd"))
    _run_suite(suite, jobs)
    suite_timed = list(instrumented.timed)

    # the same case list: the suite's default jobs of this shape and dtype are the command line's with
    # --composed --compile (the same Shape objects at batch 1, the same contenders, layouts and passes) ...
    cli_jobs = bench_harness.layer_jobs([jobs[0].shape], ["fp32"], ["fwd", "bwd"],
                                        bench_harness.layer_contenders(("cl",), composed=True, compile=True))
    assert cli_jobs == jobs
    # ... of which both time the same ones (compile and cuda are not timed on CPU, triton is faked here), each once,
    # through the harness's make_runner and timer
    assert sorted(cli_timed, key=repr) == sorted(suite_timed, key=repr)
    assert len(set(cli_timed)) == len(cli_timed) == 8  # {reference-nchw, reference-cl, composed-cl, triton-cl} x 2
    assert {(r.label, r.pass_) for r in results} == {(label, pass_) for _, label, pass_ in cli_timed}
    assert set(meta["skipped"]) == {"compile", "cuda"}


def test_a_speed_up_is_computed_once_for_every_front_end(suite, instrumented):
    report = _load(BENCHMARKS / "report.py", "bsconv_bench_report_harness")
    results, meta = bench.run_benchmarks(_cli_args("--passes", "fwd"))
    table = bench.format_table(results, meta)
    assert instrumented.speedups > 0
    row = next(line for line in table.splitlines() if line.startswith(SHAPE))
    assert "2.50x (triton-cl)" in row  # composed-cl (2.5 ms) is the fastest baseline, triton-cl takes 1.0 ms

    instrumented.speedups = 0
    infos = _run_suite(suite, _suite_jobs(suite, "fp32", ("fwd",)))
    assert instrumented.speedups > 0
    fused = infos[("triton-cl", "fwd")]
    assert fused["best_baseline"] == "composed-cl" and fused["speedup_vs_best_baseline"] == pytest.approx(2.5)
    assert fused["rel_err"] < 1e-6

    instrumented.speedups = 0
    assert report.speedups(list(infos.values()))[(SHAPE, "fp32", "fwd")]["triton-cl"] == pytest.approx(2.5)
    assert instrumented.speedups > 0

    instrumented.speedups = 0
    assert bench_models.speedup({"built": 3.0, "converted": 1.5}) == pytest.approx(2.0)
    assert instrumented.speedups == 1


def test_speedups_over_the_fastest_timed_baseline():
    best, speedup = bench_harness.speedups({"a": 4.0, "b": 2.0, "fused": 0.5}, ["a", "b", "missing"])
    assert best == "b" and speedup == {"a": 0.5, "b": 1.0, "fused": 4.0}
    assert bench_harness.speedups({"fused": 1.0}, ["a"]) == (None, {})
    # results without fused contenders (CPU): the channels_last reference over the NCHW one
    best, speedup = bench_harness.layer_speedups({"reference-nchw": 3.0, "reference-cl": 2.0}, over_baselines=False)
    assert best == "reference-nchw" and speedup["reference-cl"] == pytest.approx(1.5)
    best, speedup = bench_harness.layer_speedups({"reference-nchw": 3.0, "compile-cl": 2.0, "cuda-cl": 0.5},
                                                 over_baselines=True)
    assert best == "compile-cl" and speedup["cuda-cl"] == pytest.approx(4.0)


def test_training_block_contenders_share_the_case_and_its_weights():
    shape = get_shape(SHAPE).with_batch(1)
    case = bench_harness.make_case(shape, torch.float32, "cl", "cpu")
    eager = bench_harness.training_block("eager", case)
    assert torch.equal(eager.pw.weight, case.pw_weight) and torch.equal(eager.dw.weight, case.dw_weight)
    assert eager.training and eager.backend == "reference"
    grads = bench_harness.make_training_runner("eager", case)()
    assert len(grads) == 1 + len(list(eager.parameters()))  # x and every parameter
    with pytest.raises(ValueError, match="unknown contender 'reference'"):
        bench_harness.training_block("reference", case)
