"""Prebuilt wheels (scripts/build_wheel.sh, scripts/check_wheel.sh): the version label, the load-failure hints, and —
only when asked with BSCONV_CUDA_TEST_WHEEL=1 — the whole build + install check (several minutes: a 4-architecture
compile and two fresh virtual environments with torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsconv_cuda import cuda_backend

REPO = Path(__file__).resolve().parent.parent


def _setup_version(label: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BSCONV_CUDA_BUILD": "0"}  # no extension: nothing is written under build/
    env.pop("BSCONV_CUDA_LOCAL_VERSION", None)
    if label is not None:
        env["BSCONV_CUDA_LOCAL_VERSION"] = label
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _base_version() -> str:
    import re

    return re.search(r'^__version__ = "([^"]+)"', (REPO / "bsconv_cuda" / "__init__.py").read_text(), re.M).group(1)


def test_version_is_the_package_version_without_a_label():
    res = _setup_version(None)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == _base_version()


def test_local_version_label_goes_into_the_version():
    res = _setup_version("cu130torch2.10")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"{_base_version()}+cu130torch2.10"


def test_invalid_local_version_label_is_refused():
    res = _setup_version("cu13 torch-2.10")
    assert res.returncode != 0
    assert "not a PEP 440 local version label" in res.stderr


def test_load_failure_hint_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    hint = cuda_backend.load_failure_hint()
    assert "CPU-only build" in hint and "Triton and reference" in hint


def test_load_failure_hint_old_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    hint = cuda_backend.load_failure_hint("undefined symbol: torch_call_dispatcher")
    assert "stable ABI" in hint and "2.10" in hint and "2.9.1" in hint


def test_load_failure_hint_other_cuda_major(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu128")
    monkeypatch.setattr(cuda_backend, "_installed_label", lambda: "cu130torch2.10")
    hint = cuda_backend.load_failure_hint("libcudart.so.13: cannot open shared object file")
    assert "CUDA 13.x" in hint and "CUDA 12.8" in hint


def test_load_failure_hint_none_when_nothing_explains_it(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(cuda_backend, "_installed_label", lambda: None)
    assert cuda_backend.load_failure_hint("some other error") is None


@pytest.mark.skipif(os.environ.get("BSCONV_CUDA_TEST_WHEEL") != "1",
                    reason="builds and installs the wheel (minutes, needs nvcc and a CUDA torch >= 2.10); "
                           "set BSCONV_CUDA_TEST_WHEEL=1 to run it")
def test_build_and_check_wheel(tmp_path):
    env = {**os.environ, "DIST": str(tmp_path)}
    build = subprocess.run(["bash", str(REPO / "scripts" / "build_wheel.sh")], env=env, capture_output=True,
                           text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    wheels = list(tmp_path.glob("bsconv_cuda-*.whl"))
    assert len(wheels) == 1, wheels
    check = subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh"), str(wheels[0])], env=env,
                           capture_output=True, text=True, timeout=3600)
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-4000:]
