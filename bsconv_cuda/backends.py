"""Which backends exist on this machine, and why the others do not.

Nothing here raises at import: a missing Triton or a compiled extension that does not load (built for another
torch, another CUDA, or not built at all) only removes that backend, with the reason kept for ``info`` and for the
error a user gets when asking for it explicitly. Both are probed once, at import, so that choosing a backend later
is plain Python over constants, which ``torch.compile(fullgraph=True)`` traces without a graph break.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto", *BACKENDS)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton() -> str | None:
    try:
        triton = importlib.import_module("triton")
    except Exception as error:  # noqa: BLE001 - a broken Triton install must not break import bsconv_cuda
        return f"triton is not importable ({type(error).__name__}: {error})"
    if not hasattr(triton.language, "gather"):  # the forward kernel's depthwise stage shifts rows with tl.gather
        return f"triton {triton.__version__} has no tl.gather, which the Triton kernels use (triton >= 3.3 has it)"
    return None


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``"3.6.0"`` or ``"2.11.0+cu130"``."""
    return tuple(int(v) for v in re.findall(r"\d+", version)[:2])  # type: ignore[return-value]


def interpreter_numpy_conflict(triton_version: str | None, numpy_version: str | None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None. Triton < 3.7's interpreter
    turns a one-element array into a loop bound with ``int()``, which numpy >= 2.4 refuses (TypeError in every
    kernel whose loop bounds are runtime arguments, i.e. all of them)."""
    if triton_version is None or numpy_version is None:
        return None
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter does not work with numpy {numpy_version} (numpy >= 2.4 "
                f"refuses int() of a one-element array, which Triton < 3.7 uses for loop bounds); install "
                f"numpy<2.4 or triton>=3.7")
    return None


def _load_extension() -> str | None:
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
    warnings.warn(f"{reason}; the 'cuda' backend is disabled, falling back to triton/reference", stacklevel=4)
    return reason


_TRITON_IMPORT_ERROR = _import_triton()
_EXTENSION_LOAD_ERROR = _load_extension()
_INTERPRETER_ERROR = None if _TRITON_IMPORT_ERROR else interpreter_numpy_conflict(
    importlib.import_module("triton").__version__, installed_version("numpy"))


def triton_import_error() -> str | None:
    """None when Triton imports and has what the kernels use (``tl.gather``, triton >= 3.3), else why not."""
    return _TRITON_IMPORT_ERROR


def extension_load_error() -> str | None:
    """None when ``bsconv_cuda._C`` loaded, else why not (warned once, at import, when it exists but fails)."""
    return _EXTENSION_LOAD_ERROR


def fp32_uses_tf32() -> bool:
    """Whether fp32 convolutions may use TF32, as cuDNN's do. Reads the per-operator ``fp32_precision`` flags where
    torch has them (>= 2.9: conv, then cuDNN, then global; "none" defers to the next), and the legacy
    ``torch.backends.cudnn.allow_tf32`` only when all defer: reading the legacy flag raises once the new API has
    given conv and RNN different settings."""
    cudnn = torch.backends.cudnn
    for owner in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(owner, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    return cudnn.allow_tf32


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
                return _INTERPRETER_ERROR
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
