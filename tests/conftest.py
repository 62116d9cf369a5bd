"""Test configuration: Triton's interpreter on machines without a CUDA GPU, and the ``cuda`` marker."""

import os

import torch

# Must be set before triton is first imported (bsconv_cuda imports it): without a GPU the Triton kernels run on CPU
# tensors through Triton's interpreter; with one they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    # What is under test: CI runs this suite against several torch / triton pairs and against installed wheels.
    import bsconv_cuda
    from bsconv_cuda import backends

    versions = {name: backends.installed_version(name) or "not installed" for name in ("triton", "numpy")}
    return [
        f"bsconv_cuda {bsconv_cuda.__version__} from {os.path.dirname(bsconv_cuda.__file__)}",
        f"torch {torch.__version__}, triton {versions['triton']}, numpy {versions['numpy']}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}",
        f"bsconv_cuda._C: {backends.extension_load_error() or 'loaded'}",
        f"backends on cpu: {bsconv_cuda.available_backends('cpu')}"
        + (f", on cuda: {bsconv_cuda.available_backends('cuda')}" if torch.cuda.is_available() else ""),
    ]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs in scripts/gpu_check.sh")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where fused kernels run in tests: the GPU when there is one, else CPU tensors under Triton's interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_cpu_thread():
    """torch on one CPU thread for the test: whole-model tests on a shared machine otherwise spend most of their
    time in OpenMP threads spinning for each other (10x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
