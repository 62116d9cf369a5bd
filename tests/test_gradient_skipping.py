"""Gradients nobody asked for are skipped: for every subset of {x, pw_weight, pw_bias, dw_weight, dw_bias} that
requires grad, each backend gives the gradients of computing everything (bit for bit where the same kernels run:
float64 in Triton's interpreter, the cuda backend; within rounding of another compilation or summation order
otherwise); what is skipped is not launched (Triton: the launches recorded against the plan; reference: the aten convolutions dispatched); the
operators with an output mask pass opcheck; a frozen-weight block compiles.

On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors, so the shapes are tiny.
"""

import contextlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bsconv_cuda
from bsconv_cuda import bsconv_u_batch_norm, reference
from bsconv_cuda.ops import OPS

from fused_checks import assert_close, poisoned_outputs, skip_unless_available, tf32_convolutions

PARAMS = ("x", "pw_weight", "pw_bias", "dw_weight", "dw_bias")  # the order of reference.GRADIENTS
SUBSETS = [s for r in range(1, len(PARAMS) + 1) for s in itertools.combinations(PARAMS, r)]
CONV = dict(stride=1, padding=1, mid_activation="silu")
CONV_ARGS = ([1, 1], [1, 1, 1, 1], [1, 1], "silu")  # CONV, normalized, as the operators take it


def _subset_id(subset) -> str:
    return "+".join(subset)


def _dtype(device) -> torch.dtype:
    """float64 in Triton's interpreter; float32 on a GPU, where the fused kernels take no float64."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _assert_same(name: str, got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    """got == want bit for bit where the same kernels sum in the same order: the fused backends on CPU (float64,
    interpreter) and the cuda backend (skipping only drops launches). Elsewhere within rounding: the reference sums
    grad_y itself for grad_dw_bias alone (in another order than aten's convolution_backward), and on a GPU each set
    of Triton flags is its own compilation."""
    if backend == "cuda" or (backend == "triton" and got.device.type == "cpu"):
        assert torch.equal(got, want), f"{name} differs"
    else:
        tol = 1e-13 if got.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()), msg=name)


def _tensors(device, c_in=5, c_out=6):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, dtype=_dtype(device), device=device)  # noqa: E731
    return dict(x=make(2, c_in, 5, 6), pw_weight=make(c_out, c_in), pw_bias=make(c_out), dw_weight=make(c_out, 1, 3, 3),
                dw_bias=make(c_out))


def _gradients(tensors, wanted, backend, grad_y=None):
    """The gradients of ``wanted`` (None for the others) of bsconv_u on ``backend``, and grad_y."""
    leaves = {name: t.detach().clone().requires_grad_(name in wanted) for name, t in tensors.items()}
    y = bsconv_cuda.bsconv_u(leaves["x"], leaves["pw_weight"], leaves["dw_weight"], leaves["dw_bias"],
                             pw_bias=leaves["pw_bias"], backend=backend, **CONV)
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    y.backward(grad_y)
    return {name: leaf.grad for name, leaf in leaves.items()}, grad_y


def _backend_paths():
    """(backend, forced backward path) for every backend and backward path."""
    return [("reference", None), ("triton", "fused"), ("triton", "split"), ("cuda", "fused"), ("cuda", "split")]


@pytest.mark.parametrize("backend,path", _backend_paths(), ids=lambda v: str(v))
def test_every_subset_gives_the_gradients_of_computing_everything(backend, path, device):
    if backend == "cuda" and device.type != "cuda":
        pytest.skip("the cuda backend runs on a GPU only")
    skip_unless_available(backend, device)
    tensors = _tensors(device)
    forced = contextlib.nullcontext()
    if backend == "triton":
        from bsconv_cuda.kernels import bsconv_u as triton_kernels

        forced = triton_kernels.force_blocks(backward=dict(PATH=path))
    elif backend == "cuda":
        from bsconv_cuda import cuda_backend

        forced = cuda_backend.force_backward_path(path)
    with forced, tf32_convolutions(False):
        everything, grad_y = _gradients(tensors, PARAMS, backend)
        for subset in SUBSETS:
            with poisoned_outputs(device):
                got, _ = _gradients(tensors, subset, backend, grad_y)
            for name in PARAMS:
                if name in subset:
                    _assert_same(f"{_subset_id(subset)}: grad of {name}", got[name], everything[name], backend)
                else:
                    assert got[name] is None, f"{_subset_id(subset)}: {name} got a gradient it did not ask for"
    if backend != "reference":  # and computing everything is right
        truth, _ = _gradients({k: v.cpu().double() for k, v in tensors.items()}, PARAMS, "reference",
                              grad_y.cpu().double())
        for name in PARAMS:
            if everything[name].dtype == torch.float64:
                torch.testing.assert_close(everything[name], truth[name], rtol=1e-10, atol=1e-10)
            else:
                assert_close(f"grad of {name}", everything[name], truth[name], strict=True)


# ------------------------------------------------------------------------------------------- what is launched
def _triton_launches(monkeypatch):
    """The names of the Triton kernels the launchers launch from now on, in order."""
    from bsconv_cuda.kernels import bsconv_u as triton_kernels

    launched = []
    launchable = triton_kernels._launchable

    def recording(kernel):
        launched.append(getattr(kernel, "fn", kernel).__name__.lstrip("_"))
        return launchable(kernel)

    monkeypatch.setattr(triton_kernels, "_launchable", recording)
    return launched


MASKS = {
    "all": (True, True, True, True, True),
    "frozen weights (grad_x only)": (True, False, False, False, False),
    "first layer (weights only)": (False, True, True, True, True),
    "biases only (BitFit)": (False, False, True, False, True),
    "pointwise weight only": (False, True, False, False, False),
    "depthwise only": (False, False, False, True, True),
    "dw_bias only": (False, False, False, False, True),
}
# what each path launches for a mask: one home for the expectations of the test below
EXPECTED_LAUNCHES = {
    "fused": {
        "all": ["bwd_fused_kernel", "reduce_kernel"],
        "frozen weights (grad_x only)": ["bwd_fused_kernel"],
        "first layer (weights only)": ["bwd_fused_kernel", "reduce_kernel"],
        "biases only (BitFit)": ["bwd_fused_kernel", "reduce_kernel"],
        "pointwise weight only": ["bwd_fused_kernel", "reduce_kernel"],
        "depthwise only": ["bwd_fused_kernel", "reduce_kernel"],
        "dw_bias only": ["bwd_fused_kernel", "reduce_kernel"],
    },
    "split": {
        "all": ["bwd_gpre_kernel", "bwd_gx_kernel", "bwd_gw_kernel", "reduce_kernel"],
        "frozen weights (grad_x only)": ["bwd_gpre_kernel", "bwd_gx_kernel"],
        "first layer (weights only)": ["bwd_gpre_kernel", "bwd_gw_kernel", "reduce_kernel"],
        "biases only (BitFit)": ["bwd_gpre_kernel", "reduce_kernel"],
        "pointwise weight only": ["bwd_gpre_kernel", "bwd_gw_kernel", "reduce_kernel"],
        "depthwise only": ["bwd_gpre_kernel", "reduce_kernel"],
        "dw_bias only": ["bwd_gpre_kernel", "reduce_kernel"],
    },
}
# the fused kernel's dots per (tile, C_out block), of the three when all are wanted: pointwise, grad_x, grad_pw
FUSED_DOTS = {"all": 3, "frozen weights (grad_x only)": 2, "first layer (weights only)": 2,
              "biases only (BitFit)": 1, "pointwise weight only": 2, "depthwise only": 1, "dw_bias only": 0}


@pytest.mark.parametrize("path", ["fused", "split"])
def test_triton_launches_only_what_the_mask_asks_for(path, monkeypatch):
    skip_unless_available("triton", torch.device("cpu"))
    from bsconv_cuda.kernels import bsconv_u as triton_kernels

    t = _tensors("cpu")
    args = (t["x"], t["pw_weight"], t["pw_bias"], t["dw_weight"], t["dw_bias"], *CONV_ARGS)
    grad_y = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    launched = _triton_launches(monkeypatch)
    plan_args = (2, 5, 6, 5, 6, 5, 6, (3, 3), torch.float64, "ieee")
    with triton_kernels.force_blocks(backward=dict(PATH=path)):
        full = triton_kernels.backward_plan(*plan_args, channels_last=False)
        for case, mask in MASKS.items():
            launched.clear()
            triton_kernels.backward(grad_y, *args, list(mask))
            plan = triton_kernels.backward_plan(*plan_args, channels_last=False, output_mask=mask)
            assert launched == [launch.kernel for launch in plan.launches], case
            assert launched == EXPECTED_LAUNCHES[path][case], case
            if path == "fused":
                assert plan.dot_macs * 3 == full.dot_macs * FUSED_DOTS[case], case
        launched.clear()
        triton_kernels.backward(grad_y, *args, [False] * 5)
        assert launched == []


def test_triton_plan_keeps_the_path_and_blocks_of_computing_everything():
    skip_unless_available("triton", torch.device("cpu"))
    from bsconv_cuda.kernels import bsconv_u as triton_kernels

    for shape in [(32, 64, 128, 56, 56, 56, 56), (8, 256, 256, 14, 14, 14, 14)]:
        full = triton_kernels.backward_plan(*shape, (3, 3), torch.bfloat16)
        for mask in MASKS.values():
            plan = triton_kernels.backward_plan(*shape, (3, 3), torch.bfloat16, output_mask=mask)
            assert (plan.path, plan.blocks) == (full.path, full.blocks)
            for key in ("tile_programs", "weight_slots"):
                assert plan.params[key] == full.params[key]
            assert plan.dot_macs <= full.dot_macs and plan.partial_bytes <= full.partial_bytes
            assert plan.extra_traffic_bytes <= full.extra_traffic_bytes


class _CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            mask = tuple(args[-1]) if func is torch.ops.aten.convolution_backward.default else None
            self.calls.append((func.__name__.split(".")[0], mask))
        return func(*args, **(kwargs or {}))


# (convolutions, convolution_backward output masks: depthwise stage, then pointwise stage)
REFERENCE_CALLS = {
    "all": (1, [(True, True, True), (True, True, True)]),
    "frozen weights (grad_x only)": (1, [(True, False, False), (True, False, False)]),
    "first layer (weights only)": (1, [(True, True, True), (False, True, True)]),
    "biases only (BitFit)": (1, [(True, False, True), (False, False, True)]),
    "pointwise weight only": (1, [(True, False, False), (False, True, False)]),
    "depthwise only": (1, [(False, True, True)]),
    "dw_bias only": (0, []),
}


def test_reference_dispatches_only_what_the_mask_asks_for():
    t = _tensors("cpu")
    args = (t["x"], t["pw_weight"], t["pw_bias"], t["dw_weight"], t["dw_bias"], *CONV_ARGS)
    grad_y = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    for case, mask in MASKS.items():
        with _CountConvolutions() as counted:
            reference.backward(grad_y, *args, list(mask))
        convolutions, backward_masks = REFERENCE_CALLS[case]
        assert [m for f, m in counted.calls if f == "convolution_backward"] == backward_masks, case
        assert sum(f == "convolution" for f, _ in counted.calls) == convolutions, case


# ------------------------------------------------------------------------------------------ operators, compile
def _op_samples():
    t = _tensors("cpu", c_in=3, c_out=4)
    t = {k: v.float() for k, v in t.items()}
    args = (t["x"], t["pw_weight"], t["pw_bias"], t["dw_weight"], t["dw_bias"], *CONV_ARGS)
    return args, torch.randn(2, 4, 5, 6)


@pytest.mark.parametrize("mask", [MASKS[c] for c in ("frozen weights (grad_x only)", "biases only (BitFit)",
                                                      "dw_bias only")], ids=str)
def test_masked_backward_opcheck(mask):
    args, grad_y = _op_samples()
    _, backward_op = OPS["reference"]
    torch.library.opcheck(backward_op, (grad_y, *args, list(mask)))
    if "triton" in bsconv_cuda.available_backends("cpu"):
        _, backward_op = OPS["triton"]
        # under the interpreter: the test_utils that can run (see test_ops.test_triton_opcheck_under_interpreter)
        torch.library.opcheck(backward_op, (grad_y, *args, list(mask)),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mask", [MASKS[c] for c in ("frozen weights (grad_x only)", "biases only (BitFit)",
                                                      "dw_bias only")], ids=str)
def test_masked_backward_opcheck_on_gpu(backend, mask):
    skip_unless_available(backend, torch.device("cuda"))
    args, grad_y = _op_samples()
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    _, backward_op = OPS[backend]
    torch.library.opcheck(backward_op, (grad_y.cuda(), *args, list(mask)))


def test_compile_frozen_weights_reference():
    torch.manual_seed(0)
    block = bsconv_cuda.FusedBSConvU(3, 8, 3, padding=1, backend="reference").requires_grad_(False)  # fine-tuning
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = block(x_eager), compiled(x_compiled)
    torch.testing.assert_close(actual, expected)
    expected.sum().backward()
    actual.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    assert all(p.grad is None for p in block.parameters())


# ----------------------------------------------------------------------------------------------- BatchNorm
BN_PARAMS = ("x", "pw_weight", "dw_weight", "dw_bias", "bn_weight", "bn_bias")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("subset", [("x",), ("pw_weight",), ("bn_weight", "bn_bias"), ("dw_weight", "dw_bias"),
                                    ("bn_bias",), ("x", "dw_bias")], ids=_subset_id)
def test_batch_norm_subsets_give_the_gradients_of_computing_everything(backend, subset, device):
    skip_unless_available(backend, device)
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, dtype=_dtype(device), device=device)  # noqa: E731
    tensors = dict(x=make(2, 4, 5, 5), pw_weight=make(6, 4), dw_weight=make(6, 1, 3, 3), dw_bias=make(6),
                   bn_weight=make(6), bn_bias=make(6))
    grad_y = make(2, 6, 5, 5)

    def gradients(wanted):
        leaves = {name: t.clone().requires_grad_(name in wanted) for name, t in tensors.items()}
        y = bsconv_u_batch_norm(leaves["x"], leaves["pw_weight"], leaves["dw_weight"], leaves["dw_bias"], 1, 1,
                                running_mean=None, running_var=None, bn_weight=leaves["bn_weight"],
                                bn_bias=leaves["bn_bias"], mid_activation="relu", backend=backend)
        y.backward(grad_y)
        return {name: leaf.grad for name, leaf in leaves.items()}

    with tf32_convolutions(False):
        everything = gradients(BN_PARAMS)
        got = gradients(subset)
    for name in BN_PARAMS:
        if name in subset:
            _assert_same(f"grad of {name}", got[name], everything[name], backend)
        else:
            assert got[name] is None
