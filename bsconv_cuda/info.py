"""``python -m bsconv_cuda.info``: versions, the GPU, and which backends are usable here (and why not)."""

from __future__ import annotations

import platform

import torch

import bsconv_cuda

from . import backends


def report() -> str:
    lines = [
        f"bsconv_cuda {bsconv_cuda.__version__}",
        f"python      {platform.python_version()}",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton      {backends.installed_version('triton') or 'not installed'}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"gpu {index}       {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        lines.append("gpu         none (CUDA is not available)")
    lines.append(f"_C          {_extension_summary()}")
    lines.append("backends:")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in backends.BACKENDS:
            reason = backends.unavailable_reason(backend, device)
            lines.append(f"  {device:4} {backend:9} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _extension_summary() -> str:
    error = backends.extension_load_error()
    if error is not None:
        return error
    from . import cuda_backend

    return cuda_backend.build_summary()


if __name__ == "__main__":
    print(report())
