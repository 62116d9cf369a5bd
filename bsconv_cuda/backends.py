"""Which backends exist on this machine, and why the others do not.

Nothing here raises at import: a missing Triton or a compiled extension that does not load (built for another
torch, another CUDA, or not built at all) only removes that backend, with the reason kept for ``info`` and for the
error a user gets when asking for it explicitly.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto", *BACKENDS)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except Exception as error:  # noqa: BLE001 - a broken Triton install must not break import bsconv_cuda
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


@functools.cache
def extension_load_error() -> str | None:
    """Loads ``bsconv_cuda._C`` once; None when it loaded, else why not (warned once when it exists but fails)."""
    try:
        importlib.import_module("bsconv_cuda._C")
    except ModuleNotFoundError as error:
        if error.name != "bsconv_cuda._C":
            return _warn_extension_failure(error)
        return "the compiled extension bsconv_cuda._C was not built (install with a CUDA toolchain to build it)"
    except Exception as error:  # noqa: BLE001 - any load failure (ABI, CUDA, symbols) falls back to other backends
        return _warn_extension_failure(error)
    return None


def _warn_extension_failure(error: BaseException) -> str:
    from .cuda_backend import load_failure_hint

    reason = f"bsconv_cuda._C failed to load ({type(error).__name__}: {error})"
    hint = load_failure_hint(error)
    if hint is not None:
        reason = f"{reason}. {hint}"
    warnings.warn(f"{reason}; the 'cuda' backend is disabled, falling back to triton/reference", stacklevel=3)
    return reason


def unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (default: the current CUDA device, else CPU), or None if it can."""
    device = _resolve_device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if (error := triton_import_error()) is not None:
            return error
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return "Triton runs on CPU tensors only under Triton's interpreter (set TRITON_INTERPRET=1)"
        return f"Triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got a {device.type} device"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return extension_load_error()
    raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device``, e.g. ``["reference", "triton", "cuda"]``."""
    return [backend for backend in BACKENDS if unavailable_reason(backend, device) is None]


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
