"""``python -m bsconv_cuda.bench``: the global warm-up, the progress bar only on a terminal, the interpreter rows
(their own pass's error, distinct crops), and clear messages instead of tracebacks."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsconv_cuda import bench, bench_harness
from bsconv_cuda.shapes import get_shape, select

REPO = Path(__file__).resolve().parent.parent
SMALL_SHAPE = "cifar_resnet_16x16_32"


def _run_cli(*args: str, close_stdout: bool = False) -> tuple[int, str, str]:
    """The command in a fresh interpreter from the repository root (the package under test, not an install)."""
    proc = subprocess.Popen([sys.executable, "-m", "bsconv_cuda.bench", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ))
    if close_stdout:  # a reader that went away before anything was written (`... | head`, head long gone)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return proc.wait(timeout=300), "", err
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out.decode(), err.decode()


def test_every_timed_runner_is_warmed_up_before_the_first_measurement(monkeypatch):
    runs: dict = {}
    first_measurement: list = []

    def make_runner(contender, case, pass_):
        key = (case.shape.name, contender, case.layout, pass_)

        def run():
            runs[key] = runs.get(key, 0) + 1
        return run

    def time_ms(fn, device, **kwargs):
        if not first_measurement:
            first_measurement.append(dict(runs))
        fn()
        return {"ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "timer": "test"}

    monkeypatch.setattr(bench_harness, "make_runner", make_runner)
    monkeypatch.setattr(bench_harness, "time_ms", time_ms)
    args = bench.parse_args(["--shapes", f"{SMALL_SHAPE},cifar_resnet_32x32_16", "--passes", "fwd,bwd",
                             "--device", "cpu", "--warmup", "0", "--no-progress"])
    args.dtype = "fp32"
    results, _ = bench.run_benchmarks(args)
    planned = {(SMALL_SHAPE, r.contender, r.layout, r.pass_) for r in results}
    assert len(planned) == 4  # reference in nchw and cl, fwd and bwd
    assert all(first_measurement[0].get(key, 0) >= 1 for key in planned), first_measurement[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    for stream, drawn in ((io.StringIO(), False), (_Terminal(), True)):
        progress = bench.Progress(2, stream=stream)
        progress.step("a")
        progress.step("b")
        progress.close()
        assert ("\r[" in stream.getvalue()) == drawn, stream.getvalue()
    quiet = _Terminal()
    bench.Progress(1, enabled=False, stream=quiet).step("a")
    assert quiet.getvalue() == ""


def test_command_writes_no_progress_lines_into_a_log():
    status, out, err = _run_cli("--shapes", SMALL_SHAPE, "--passes", "fwd", "--device", "cpu", "--warmup", "0")
    assert status == 0, err
    assert SMALL_SHAPE in out and "reference-nchw" in out
    assert "\r" not in err and "\r" not in out


class _WrongBackward(torch.autograd.Function):
    """The reference block's output with a backward 10% too large."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.1


def test_each_pass_reports_its_own_error(monkeypatch):
    def wrong_backward_block(x, pw_weight, *rest):  # a fused contender's arguments: pw_weight is (C_out, C_in)
        return _WrongBackward.apply(bench_harness.reference_block(x, pw_weight[:, :, None, None], *rest))

    original = bench_harness.block_fn
    monkeypatch.setattr(bench_harness, "block_fn",
                        lambda c, case: wrong_backward_block if c == "triton" else original(c, case))
    case = bench_harness.make_case(get_shape(SMALL_SHAPE).with_batch(1), torch.float32, "nchw", "cpu")
    assert bench_harness.relative_error("triton", case, "fwd") < 1e-6
    assert bench_harness.relative_error("triton", case, "bwd") == pytest.approx(0.1, rel=1e-3)
    assert bench_harness.relative_error("triton", case, "fwdbwd") == pytest.approx(0.1, rel=1e-3)
    tiny = bench.interpreter_crops([get_shape(SMALL_SHAPE)], 1)[0]
    rows = {p: bench._interpreter_check(tiny, p) for p in ("fwd", "bwd")}
    assert rows["fwd"].rel_err < 1e-6 and rows["bwd"].rel_err == pytest.approx(0.1, rel=1e-3)


def test_interpreter_crops_are_distinct_cases():
    crops = bench.interpreter_crops(select("quick"), 2)  # the defaults: --shapes quick --interpret-shapes 2
    assert len(crops) == 2 and crops[0].describe() != crops[1].describe()
    assert all(c.batch == 1 and c.hw <= 8 and c.c_in <= 32 and c.c_out <= 32 for c in crops)
    every = bench.interpreter_crops(select("all"), 100)
    assert len({c.describe() for c in every}) == len(every)


def test_cuda_device_without_a_gpu_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device cuda: no CUDA GPU is usable here"):
        bench.main(["--device", "cuda", "--shapes", SMALL_SHAPE])
    with pytest.raises(SystemExit, match=r"--device: .*"):
        bench.main(["--device", "gpu0"])
    with pytest.raises(SystemExit, match=r"--device meta: only cpu and cuda"):
        bench.main(["--device", "meta"])


def test_cuda_device_index_beyond_the_machine_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"--device cuda:3: this machine has 1 CUDA device"):
        bench.main(["--device", "cuda:3"])


def test_list_into_a_closed_pipe_ends_quietly():
    status, _, err = _run_cli("--list", close_stdout=True)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert status == 1


def test_cuda_backward_path_is_forced_for_the_run_and_recorded(monkeypatch, tmp_path):
    """--cuda-backward forces the CUDA backward's path while the benchmarks run (and only then), and the JSON
    records it with the environment."""
    import json

    from bsconv_cuda import cuda_backend

    seen = []

    def run_benchmarks(args):
        seen.append(cuda_backend.forced_backward_path())
        return [], {"env": bench_harness.environment("cpu")}

    monkeypatch.setattr(bench, "run_benchmarks", run_benchmarks)
    monkeypatch.setattr(bench, "format_table", lambda results, meta: "")
    out = tmp_path / "results.json"
    assert bench.main(["--device", "cpu", "--cuda-backward", "split", "--json", str(out)]) == 0
    assert seen == ["split"] and cuda_backend.forced_backward_path() == "auto"
    assert json.loads(out.read_text())["meta"]["env"]["cuda_backward"] == "split"
    with pytest.raises(SystemExit):
        bench.parse_args(["--cuda-backward", "fastest"])


def test_json_holds_every_measurement_made_before_the_run_is_stopped(monkeypatch, tmp_path):
    """--json is rewritten after every measurement, so a run killed at a time limit (a GPU machine's call limit)
    keeps what it measured: here the run stops at its third timing, and the file holds the two before it."""
    import json

    timings = []

    def time_ms(fn, device, **kwargs):
        if len(timings) == 2:
            raise KeyboardInterrupt  # the kill
        timings.append(fn)
        return {"ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "timer": "test"}

    monkeypatch.setattr(bench_harness, "make_runner", lambda contender, case, pass_: lambda: None)
    monkeypatch.setattr(bench_harness, "time_ms", time_ms)
    out = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shapes", SMALL_SHAPE, "--passes", "fwd,bwd", "--device", "cpu", "--warmup", "0",
                    "--no-progress", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 2 and all(r["ms"] == 1.0 for r in saved["results"])
    assert saved["meta"]["jobs_done"] == 2 and saved["meta"]["jobs_planned"] == 4 and "skipped" in saved["meta"]
    assert not out.with_name(out.name + ".part").exists()
