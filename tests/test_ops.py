"""The registered operators: opcheck over sample inputs, torch.compile without graph breaks, backend listing."""

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends, info
from bsconv_cuda.ops import OPS
from bsconv_cuda.reference import ALL_GRADIENTS


def _sample_inputs(dtype=torch.float32, device="cpu"):
    """(args, kwargs-free) samples covering biases, activations, asymmetric padding, stride, dilation, layouts."""
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    samples = []
    for pw_bias, dw_bias, kernel, stride, padding, dilation, activation, channels_last in [
        (True, True, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "none", False),
        (False, True, (3, 5), [2, 1], [0, 1, 2, 2], [1, 1], "relu6", True),
        (True, False, (2, 2), [1, 1], [1, 0, 1, 0], [2, 1], "silu", False),
        (False, False, (1, 1), [1, 2], [0, 0, 0, 0], [1, 1], "hardswish", True),
    ]:
        x = make(2, 3, 7, 6)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        args = (x, make(4, 3), make(4) if pw_bias else None, make(4, 1, *kernel), make(4) if dw_bias else None,
                stride, padding, dilation, activation)
        samples.append(args)
    return samples


def test_reference_opcheck():
    forward_op, backward_op = OPS["reference"]
    for args in _sample_inputs():
        torch.library.opcheck(forward_op, args)
        grad_y = torch.randn_like(forward_op(*args))
        torch.library.opcheck(backward_op, (grad_y, *args, list(ALL_GRADIENTS)))


def test_triton_opcheck_under_interpreter():
    if "triton" not in bsconv_cuda.available_backends("cpu"):
        pytest.skip(backends.unavailable_reason("triton", "cpu"))
    forward_op, backward_op = OPS["triton"]
    # Under the interpreter the kernels cannot run on the FunctionalTensors that aot_dispatch tests trace with
    # (a triton_op limitation; the launchers' planning under them: test_triton_launchers_plan_symbolic_sizes); on a
    # GPU the full opcheck runs in test_fused_opcheck_on_gpu.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in _sample_inputs()[:2]:
        torch.library.opcheck(forward_op, args, test_utils=utils)
        grad_y = torch.randn_like(forward_op(*args))
        torch.library.opcheck(backward_op, (grad_y, *args, list(ALL_GRADIENTS)), test_utils=utils)


def _plain(value):
    """A launch argument as a comparable value: a tensor by dtype and shape, a SymInt by its value."""
    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype, tuple(int(size) for size in value.shape)
    return int(value) if isinstance(value, torch.SymInt) else value


def test_triton_launchers_plan_symbolic_sizes(monkeypatch, device):
    # triton_op traces the launchers themselves under aot_autograd with dynamic shapes (opcheck's
    # test_aot_dispatch_dynamic, torch.compile(dynamic=True)), so sizes and strides reach the launch plan as SymInts.
    # The kernels are recorded rather than run (under the interpreter they cannot run on the FunctionalTensors traced
    # there), and every trace must launch what eager does: the same kernels, grids, blocks and arguments.
    if "triton" not in bsconv_cuda.available_backends(device.type):
        pytest.skip(backends.unavailable_reason("triton", device.type))
    from functorch.compile import compiled_function, nop

    from bsconv_cuda.kernels import bsconv_u as triton_kernels

    launches = []

    class RecordedKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.__name__, tuple(map(_plain, grid)), tuple(map(_plain, args)),
                                 {k: _plain(v) for k, v in kwargs.items()}))
            return launch

    monkeypatch.setattr(triton_kernels, "_launchable", RecordedKernel)
    forward_op, backward_op = OPS["triton"]
    samples = _sample_inputs(device=device)
    # x as a strided view: strides that are symbols of their own, not products of the sizes
    samples.append((torch.randn(2, 5, 7, 6, device=device).contiguous(memory_format=torch.channels_last)[:, 1:4],
                    *samples[0][1:]))
    for args in samples:
        grad_y = torch.randn(forward_op(*args).shape, device=device)
        calls = [(forward_op, args)] + [(backward_op, (grad_y, *args, mask))
                                        for mask in (list(ALL_GRADIENTS), [False, False, True, False, True])]
        for op, op_args in calls:
            tensors = [i for i, a in enumerate(op_args) if isinstance(a, torch.Tensor)]

            def call(*tensor_args, op=op, op_args=op_args, tensors=tensors):
                full = list(op_args)
                for i, t in zip(tensors, tensor_args):
                    full[i] = t
                return op(*full)

            launches.clear()
            call(*(op_args[i] for i in tensors))
            eager = list(launches)
            assert eager, op
            launches.clear()
            compiled_function(call, nop, nop, dynamic=True)(*(op_args[i] for i in tensors))
            # aot_autograd traces more than once (metadata, then the graph): each trace launches what eager does
            traces = len(launches) // len(eager)
            assert traces and launches == eager * traces, (op, [a for a in op_args if not isinstance(a, torch.Tensor)])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_opcheck_on_gpu(backend):
    if backend not in bsconv_cuda.available_backends("cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    forward_op, backward_op = OPS[backend]
    for args in _sample_inputs(device="cuda"):
        torch.library.opcheck(forward_op, args)
        grad_y = torch.randn_like(forward_op(*args))
        torch.library.opcheck(backward_op, (grad_y, *args, list(ALL_GRADIENTS)))


def _compile_check(model, x):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    expected = model(x_eager)
    actual = compiled(x_compiled)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    actual.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_reference_model():
    model = torch.nn.Sequential(
        bsconv_cuda.FusedBSConvU(3, 8, 3, padding=1, backend="reference"),
        torch.nn.ReLU(),
        bsconv_cuda.FusedBSConvU(8, 8, 3, stride=2, padding=1, with_bn=True, backend="reference").eval(),
    )
    _compile_check(model, torch.randn(2, 3, 8, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph_fused_model_on_gpu(backend):
    if backend != "reference" and backend not in bsconv_cuda.available_backends("cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    model = torch.nn.Sequential(
        bsconv_cuda.FusedBSConvU(16, 32, 3, padding=1, backend=backend),
        torch.nn.ReLU(),
        bsconv_cuda.FusedBSConvU(32, 32, 3, stride=2, padding=1, with_bn=True, backend=backend).eval(),
    ).cuda()
    _compile_check(model, torch.randn(2, 16, 16, 16, device="cuda"))


def test_available_backends_on_cpu():
    available = bsconv_cuda.available_backends("cpu")
    assert available[0] == "reference"
    assert "cuda" not in available
    assert "CUDA tensors" in backends.unavailable_reason("cuda", "cpu")


def test_info_reports_every_backend():
    text = info.report()
    assert f"torch       {torch.__version__}" in text
    for backend in backends.BACKENDS:
        assert f"cpu  {backend}" in text


def test_backend_selection_traces_without_graph_breaks(monkeypatch):
    # Everything select_backend consults on a GPU (the probes done at import, the extension's architectures, the
    # device's capability) must be plain Python over constants for torch.compile(fullgraph=True).
    from bsconv_cuda import cuda_backend
    from bsconv_cuda.functional import select_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    candidates = ["auto", "reference"] + [b for b in ["triton"] if b in bsconv_cuda.available_backends("cpu")]

    def choose(x):
        names = [select_backend(b, x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)) for b in candidates]
        archs = cuda_backend.compiled_archs()
        major, _ = cuda_backend.device_capability(0)
        return x + len("".join(names)) + len(archs) + major

    torch._dynamo.reset()
    x = torch.zeros(1, 3, 5, 5)
    torch.testing.assert_close(torch.compile(choose, fullgraph=True)(x), choose(x))
