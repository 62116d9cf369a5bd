"""Backends: `import bsconv_cuda` never fails because Triton or the compiled extension is missing, broken or too old
(the backend is then unavailable with the reason), and the fp32 TF32 switch follows torch's own flags."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends


def _run(prelude: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(prelude) + textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import bsconv_cuda
            from bsconv_cuda import backends, info
            backends.extension_load_error()
        print("WARNINGS", len([w for w in caught if "bsconv_cuda._C" in str(w.message)]))
        print("BACKENDS", bsconv_cuda.available_backends("cpu"))
        print(info.report())
        import torch
        y = bsconv_cuda.bsconv_u(torch.randn(1, 2, 5, 5), torch.randn(3, 2), torch.randn(3, 1, 3, 3), padding=1)
        print("OUTPUT", tuple(y.shape))
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("setup, reason", [
    ("import sys; sys.modules['triton'] = None\n", "triton is not importable"),
    # triton < 3.3 has no tl.gather
    ("import triton.language\ndel triton.language.gather\n",
     "has no tl.gather, which the Triton kernels use (triton >= 3.3 has it)"),
], ids=["no-triton", "triton-without-gather"])
def test_import_without_a_usable_triton(setup, reason):
    """The Triton backend is unavailable with the reason, the rest works."""
    result = _run(setup)
    assert result.returncode == 0, result.stderr
    assert "BACKENDS ['reference']" in result.stdout
    assert reason in result.stdout
    assert "OUTPUT (1, 3, 5, 5)" in result.stdout


def test_import_under_a_meta_default_device():
    """Import makes no tensors on the default device (torch's hardswish convention is asked on CPU). torch 2.7 cannot
    import its own torch._dynamo under a meta default device (a circular import), so there is nothing to check there."""
    meta = "import torch; torch.set_default_device('meta'); "
    probe = subprocess.run([sys.executable, "-c", meta + "import torch._dynamo"], capture_output=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"torch {torch.__version__} cannot import torch._dynamo under a meta default device")
    code = meta + "import bsconv_cuda; print('IMPORTED')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "IMPORTED" in result.stdout, result.stderr


def test_import_with_a_broken_extension_warns_once_and_falls_back():
    result = _run(
        """
        import importlib.abc, sys

        class BrokenExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bsconv_cuda._C":
                    raise ImportError("undefined symbol: _ZN3c104impl (built for another torch)")

        sys.meta_path.insert(0, BrokenExtension())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in result.stdout
    assert "bsconv_cuda._C failed to load (ImportError: undefined symbol" in result.stdout
    assert "OUTPUT (1, 3, 5, 5)" in result.stdout


def test_tf32_switch_follows_the_fp32_precision_api():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-operator fp32_precision API (the legacy flag is read)")
    saved = conv.fp32_precision
    try:
        conv.fp32_precision = "ieee"  # the legacy cudnn.allow_tf32 getter raises from here on (conv != rnn)
        assert not backends.fp32_uses_tf32()
        x, pw, dw = torch.randn(1, 3, 5, 5), torch.randn(4, 3), torch.randn(4, 1, 3, 3)
        for backend in bsconv_cuda.available_backends("cpu"):
            bsconv_cuda.bsconv_u(x, pw, dw, padding=1, backend=backend)
        conv.fp32_precision = "tf32"
        assert backends.fp32_uses_tf32()
    finally:
        conv.fp32_precision = saved


@pytest.mark.parametrize("triton_version, numpy_version, conflict", [
    ("3.2.0", "2.4.0", True), ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False),
    ("3.8.0", "2.4.6", False), ("3.6.0", None, False),
])
def test_interpreter_numpy_conflict(triton_version, numpy_version, conflict):
    reason = backends.interpreter_numpy_conflict(triton_version, numpy_version)
    assert (reason is not None) == conflict
    if conflict:
        assert f"Triton {triton_version}" in reason and "install numpy<2.4 or triton>=3.7" in reason


def test_interpreter_numpy_conflict_matches_this_interpreter():
    # The rule above against the triton and numpy installed here: a loop over a runtime bound, as every kernel of
    # the Triton backend has, fails under the interpreter exactly when the rule says it does.
    if backends.triton_import_error() is not None:
        pytest.skip(backends.triton_import_error())
    code = textwrap.dedent(
        """
        import torch, triton, triton.language as tl

        @triton.jit
        def count(out_ptr, n):
            total = 0
            for i in range(0, n, 2):
                total += 1
            tl.store(out_ptr, total)

        out = torch.zeros(1, dtype=torch.int32)
        try:
            count[(1,)](out, 5)
        except Exception as error:
            print("FAILED", type(error).__name__, error)
        else:
            print("COUNT", out.item())
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    conflict = backends.interpreter_numpy_conflict(backends.installed_version("triton"),
                                                   backends.installed_version("numpy"))
    if conflict is None:
        assert "COUNT 3" in result.stdout, result.stdout
    else:
        assert "FAILED" in result.stdout and "0-dimensional" in result.stdout, result.stdout


# Every GPU run's timings of the main job (python -m bsconv_cuda.bench --json), kept in the repository
GPU_RUNS = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs").glob("*/speed-*.json"))
# Differences under this fraction are within the run-to-run spread of one timing
TIMING_NOISE = 0.05


def test_auto_is_never_slower_than_a_measured_fused_backend(monkeypatch):
    """``auto`` on a CUDA tensor against every recorded GPU measurement: for inference (fwd) and training (fwdbwd) of
    each shape, the backend it picks was measured at most TIMING_NOISE slower than the fastest of the reference and
    the fused backends in the same layout. A fused backend measured slower than the reference is never picked, and
    one measured faster must be. Rows are compared within one layout only: a layout whose fused backends were not
    timed (NCHW in the first run) has no measurement for the rule to follow, and auto keeps the reference there."""
    from bsconv_cuda import functional
    from bsconv_cuda.shapes import SHAPES

    # as on the GPU that measured: every backend can run these calls (here x lives on the meta device)
    monkeypatch.setattr(functional, "_call_unsupported_reason", lambda *args: None)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    formats = {"cl": torch.channels_last, "nchw": torch.contiguous_format}

    assert GPU_RUNS, "no recorded GPU measurement (benchmarks/gpu-runs/*/speed-*.json)"
    shapes = {s.name: s for s in SHAPES}
    checked = 0
    for path in GPU_RUNS:
        times: dict = {}
        for row in json.loads(path.read_text())["results"]:
            if row["pass_"] in ("fwd", "fwdbwd") and row["contender"] in backends.BACKENDS and row["ms"] is not None:
                key = (row["shape"], row["dtype"], row["pass_"], row["layout"])
                times.setdefault(key, {})[row["contender"]] = row["ms"]
        for (name, dtype, pass_, layout), by_backend in times.items():
            if not {"triton", "cuda"} & by_backend.keys() or "reference" not in by_backend:
                continue
            shape = shapes[name]
            x = torch.empty(shape.batch, shape.c_in, shape.hw, shape.hw, dtype=dtypes[dtype], device="meta")
            x = x.contiguous(memory_format=formats[layout])
            pick = functional.select_backend("auto", x, (shape.k, shape.k), (shape.stride,) * 2,
                                             (shape.padding,) * 4, (1, 1))
            fastest = min(by_backend.values())
            assert by_backend[pick] <= fastest * (1 + TIMING_NOISE), (path.parent.name, name, pass_, layout, by_backend)
            checked += 1
    assert checked > 0
