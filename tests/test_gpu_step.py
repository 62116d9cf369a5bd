"""``scripts/gpu_step.py``, the program of gpu_check's sanitize, ncu and kernels stages: its kernel-time table from
the profiler's events (GPU events faked here), and one profiled step on CPU through the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from fused_checks import skip_unless_available

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_step  # noqa: E402


def test_kernel_name_drops_return_type_namespaces_and_arguments():
    assert gpu_step.kernel_name("void bsconv::(anonymous namespace)::gemm_kernel<__nv_bfloat16, false>"
                                "(bsconv::GemmArgs, bool)") == "gemm_kernel<__nv_bfloat16, false>"
    assert gpu_step.kernel_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                                "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>)") == (
        "vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >")
    assert gpu_step.kernel_name("_bwd_fused_kernel") == "_bwd_fused_kernel"


def test_per_step_times_keep_the_gpu_kernels_most_time_first():
    def event(key, device, us, count):
        return types.SimpleNamespace(key=key, device_type=device, self_device_time_total=us, count=count,
                                     self_cpu_time_total=7.0)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event("void bsconv::(anonymous namespace)::colsum_kernel<float>(int)", cuda, 40.0, 20),
              event("aten::empty", cpu, 0.0, 100),
              event("void bsconv::(anonymous namespace)::bwd_tile_kernel<float, 3>(int)", cuda, 400.0, 20),
              event("Memset (Device)", cuda, 0.0, 20)]
    assert gpu_step.per_step_times(events, 20, on_gpu=True) == [("bwd_tile_kernel<float, 3>", 1, 20.0),
                                                                ("colsum_kernel<float>", 1, 2.0)]
    assert [name for name, _, _ in gpu_step.per_step_times(events, 20, on_gpu=False)] == [
        "colsum_kernel<float>", "empty", "bwd_tile_kernel<float, 3>", "Memset"]


def test_one_profiled_step_on_cpu():
    """The plumbing on CPU (operators' CPU time, not kernels): a strided, biased step through the interpreter."""
    skip_unless_available("triton", torch.device("cpu"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_step.py"), "triton", "--device", "cpu",
                           "--shape", "1,8,16,6,6", "--stride", "2", "--dtype", "float32", "--no-tf32",
                           "--profile", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr
    assert "(1, 8, 6, 6) -> (1, 16, 3, 3) k3 s2 float32: gradients finite: True" in proc.stdout
    table = proc.stdout.split("operator (self CPU time)\n", 1)[1]
    assert "triton_forward" in table and "triton_backward" in table and "total per step, 1 steps" in table
