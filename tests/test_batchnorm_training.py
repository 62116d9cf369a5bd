"""BatchNorm with batch statistics inside the fused block (``bsconv_u_batch_norm``, ``FusedBSConvU(with_bn=True)`` in
training): against ``bsconv.pytorch.BSConvU`` (torch's own layers) computed in float64 on the same rounded inputs and
parameters, for the outputs, the gradients of x and of every parameter, and every buffer; nothing of the
intermediate's size is saved for backward; SyncBatchNorm over two gloo processes equals one process with the whole
batch.

On a machine without a GPU the fused kernels run in Triton's interpreter on CPU tensors, so the shapes are tiny.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import bsconv_cuda
from bsconv_cuda import FusedBSConvU, bsconv_u_batch_norm, reference
from bsconv_cuda.batchnorm import batch_norm_call
from bsconv_cuda.functional import prepare_call
from bsconv_cuda.modules import fused_block_forward

from fused_checks import assert_close, poisoned_outputs, skip_unless_available

bsconv_pytorch = pytest.importorskip("bsconv.pytorch", reason="the test dependency bsconv is not installed")

FUSED_BACKENDS = ["triton", "cuda"]
C_IN, C_OUT, SIZE = 4, 6, 6
BN_OPTIONS = {
    "default": {},
    "momentum=None": dict(momentum=None),  # the cumulative moving average
    "momentum=0.3,eps=1e-3": dict(momentum=0.3, eps=1e-3),
    "affine=False": dict(affine=False),
    "track_running_stats=False": dict(track_running_stats=False),  # batch statistics in eval too
}
ACTIVATIONS = [a for a in reference.ACTIVATIONS if a != "none"]
# float64: the closed form is exact up to rounding; float32: the strict bound of docs/DESIGN.md, section 8;
# bf16/fp16: the norm and element-wise bounds of fused_checks (measured: <= 8e-3 of max|ref|, torch's own layers in
# bf16 alike).
FP64_TOL = 1e-10


def assert_matches(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
        err = (out - ref).abs().max().item() if ref.numel() else 0.0
        tol = FP64_TOL * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}"
        return
    assert_close(name, out, ref, strict=dtype == torch.float32, precision=dtype)


def make_pair(bn_kwargs: dict, stride: int, dtype: torch.dtype, device: torch.device, backend: str,
              padding_mode: str = "zeros"):
    """(truth, fused): bsconv's BSConvU in float64 on CPU and a FusedBSConvU in ``dtype`` on ``device`` with the same
    (rounded) parameters and buffers, non-trivial BatchNorm affine parameters and running statistics."""
    torch.manual_seed(0)
    truth = bsconv_pytorch.BSConvU(C_IN, C_OUT, 3, stride=stride, padding=1, with_bn=True, bn_kwargs=bn_kwargs,
                                   padding_mode=padding_mode)
    with torch.no_grad():
        if truth.bn.affine:
            truth.bn.weight.uniform_(0.5, 1.5)
            truth.bn.bias.uniform_(-0.5, 0.5)
        if truth.bn.track_running_stats:
            truth.bn.running_mean.uniform_(-0.5, 0.5)
            truth.bn.running_var.uniform_(0.5, 2.0)
    fused = FusedBSConvU.from_bsconvu(copy.deepcopy(truth), backend=backend).to(device=device, dtype=dtype)
    truth.load_state_dict({k: v.detach().cpu().double() if v.is_floating_point() else v.cpu()
                           for k, v in fused.state_dict().items()})
    return truth.double().train(), fused.train()


def block(module, x, activation):
    """The module's block with a mid activation: FusedBSConvU through fused_block_forward (the path of every fused
    block), BSConvU through its own layers."""
    if activation is None:
        return module(x)
    if isinstance(module, FusedBSConvU):
        return fused_block_forward(x, module.pw, module.bn, module.dw, mid_activation=activation,
                                   backend=module.backend)
    return module.dw(reference.activate(module.bn(module.pw(x)), activation))


# The standard deviation of make_step's inputs; their mean is its offset.
SPREAD = 2.0


def make_step(step: int, n: int, dtype, offset: float = 0.0, layout: str = "nchw", stride: int = 1):
    gen = torch.Generator().manual_seed(100 + step)
    width = SIZE * (2 if layout == "sliced" else 1)
    x = (torch.randn(n, C_IN, SIZE, width, generator=gen, dtype=torch.float64) * SPREAD + offset).to(dtype)
    if layout == "sliced":
        x = x[..., ::2]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = (SIZE - 1) // stride + 1
    grad_y = torch.randn(n, C_OUT, out, out, generator=gen, dtype=torch.float64).to(dtype)
    return x, grad_y


def check_training(truth, fused, device, dtype, *, steps=2, activation=None, offset=0.0, layout="nchw", stride=1,
                   n=2):
    """``steps`` training steps of both modules on the same batches: outputs, the gradients of x and of every
    parameter at every step, every buffer after the last one."""
    for step in range(steps):
        x, grad_y = make_step(step, n, dtype, offset, layout, stride)
        x_fused = x.to(device).detach().requires_grad_()  # "sliced": a strided view of a larger tensor
        assert x_fused.is_contiguous() == (layout == "nchw")
        x_truth = x.detach().double().requires_grad_()
        with poisoned_outputs(device):
            y = block(fused, x_fused, activation)
        with poisoned_outputs(device):
            y.backward(grad_y.to(device))
        y_ref = block(truth, x_truth, activation)
        y_ref.backward(grad_y.double())
        assert y.dtype == dtype and x_fused.grad.dtype == dtype
        expected_format = reference.output_memory_format(x)
        assert y.is_contiguous(memory_format=expected_format), f"step {step}: y has the wrong memory format"
        assert_matches(f"step {step} y", y, y_ref, dtype)
        assert_matches(f"step {step} grad_x", x_fused.grad, x_truth.grad, dtype)
        for (name, p_fused), (_, p_truth) in zip(fused.named_parameters(), truth.named_parameters()):
            assert p_fused.grad is not None, f"step {step}: no gradient for {name}"
            assert p_fused.grad.dtype == p_fused.dtype
            assert_matches(f"step {step} grad {name}", p_fused.grad, p_truth.grad, dtype)
        fused.zero_grad()
        truth.zero_grad()
    for (name, b_fused), (_, b_truth) in zip(fused.named_buffers(), truth.named_buffers()):
        if b_fused.is_floating_point():
            assert_matches(f"buffer {name}", b_fused, b_truth, dtype)
        else:
            assert torch.equal(b_fused.cpu(), b_truth), f"buffer {name}: {b_fused} != {b_truth}"


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 checks use the strict bound: the fused kernels must not use TF32 (they follow torch's flag)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def skip_float64_on_gpu(dtype, device):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 goes to the reference on GPU")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("option", list(BN_OPTIONS))
def test_training_matches_bsconvu(option, stride, backend, device):
    skip_unless_available(backend, device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair(BN_OPTIONS[option], stride, dtype, device, backend)
    check_training(truth, fused, device, dtype, stride=stride)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_mid_activation(activation, backend, device):
    skip_unless_available(backend, device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    stride = 1 + ACTIVATIONS.index(activation) % 2
    truth, fused = make_pair({}, stride, dtype, device, backend)
    check_training(truth, fused, device, dtype, activation=activation, stride=stride)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype,offset", [
    (torch.float64, 3 * SPREAD), (torch.float32, 0.0), (torch.float32, 3 * SPREAD), (torch.float32, 1e3 * SPREAD),
    (torch.float32, 1e4 * SPREAD), (torch.bfloat16, 0.0), (torch.bfloat16, 3 * SPREAD),
], ids=["fp64-offset3sd", "fp32", "fp32-offset3sd", "fp32-offset1e3sd", "fp32-offset1e4sd", "bf16", "bf16-offset3sd"])
def test_precision_and_mean_offset(dtype, offset, backend, device):
    """A channel mean of 3 standard deviations must not cost precision, nor one of 1e3 or 1e4 in float32, which an
    uncentered computation fails (measured by swapping each in): statistics as E[x²] − E[x]² in float32 fail from
    1e3 (y 0.19 off, the bound 1.6e-4); the kernels run on x with the mean folded into their bias,
    W'x + (β − s ⊙ μ_m), fail at 1e4 (y 6e-4 off; 6e-5 at 1e3, within the bound). 3 standard deviations tell neither
    apart from the centered form. (E[x²] − E[x]² in the float64 statistics would pass all of these.)

    bf16 runs a smooth activation: with ReLU/ReLU6 the bf16-rounded normalized intermediate lands on the other side of
    a kink for a few pixels, and those carry the whole gradient jump (measured: 5% relative L2 error of grad_x, the
    same for torch's own layers in bf16), which says nothing about the statistics."""
    skip_unless_available(backend, device)
    skip_float64_on_gpu(dtype, device)
    truth, fused = make_pair({}, 1, dtype, device, backend)
    activation = "silu" if dtype == torch.bfloat16 else "relu6"
    check_training(truth, fused, device, dtype, steps=1, activation=activation, offset=offset)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_modes(padding_mode, stride, device):
    """A non-zero padding mode pads x before the fused kernels; the batch statistics are still those of the
    unpadded intermediate (the border copies count once, as pixels of the image)."""
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair({}, stride, dtype, device, "triton", padding_mode=padding_mode)
    check_training(truth, fused, device, dtype, activation="relu6", offset=1.0, stride=stride)


def _correlated_channels_step(device, backend, delta):
    """One step of the functional on x = [z + δu, z, r] with a pointwise row 0.7·[1, −1, 0] that nearly cancels the two
    correlated channels (its intermediate's variance is δ² of theirs) and a generic row; fp32, against float64 on the
    same rounded inputs. Returns [(name, result, truth)], the batch's unbiased variance included (momentum 1)."""
    gen = torch.Generator().manual_seed(11)
    z, u, r = (torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    inputs = dict(x=torch.cat([z + delta * u, z, r], 1), pw=torch.tensor([[0.7, -0.7, 0.0], [0.3, 0.5, -0.2]]),
                  dw=torch.randn(2, 1, 3, 3, generator=gen), gamma=torch.tensor([1.2, 0.8]))
    inputs = {k: v.float().double() for k, v in inputs.items()}  # the truth sees the rounded values
    grad_y = torch.randn(4, 2, 8, 8, generator=gen).double()
    results = []
    for dtype, run_on, run_backend in ((torch.float32, device, backend), (torch.float64, torch.device("cpu"), None)):
        leaves = {k: v.to(run_on, dtype).requires_grad_() for k, v in inputs.items()}
        running_mean, running_var = torch.zeros(2, device=run_on, dtype=dtype), torch.ones(2, device=run_on,
                                                                                            dtype=dtype)
        if run_backend is None:
            y = _standard_functional(leaves["x"], leaves["pw"], leaves["dw"], None, running_mean, running_var,
                                     leaves["gamma"], None, True, 1.0, 1e-5, "none", 1)
        else:
            y = bsconv_u_batch_norm(leaves["x"], leaves["pw"], leaves["dw"], None, 1, 1, running_mean=running_mean,
                                    running_var=running_var, bn_weight=leaves["gamma"], momentum=1.0,
                                    backend=run_backend)
        y.backward(grad_y.to(run_on, dtype))
        results.append([("y", y), ("running_var", running_var)] + [(f"grad {k}", v.grad) for k, v in leaves.items()])
    return [(name, out, ref) for (name, out), (_, ref) in zip(*results)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("matmul_tf32", [False, pytest.param(True, marks=pytest.mark.cuda)])
def test_correlated_channels(matmul_tf32, backend, device):
    """var_m = wᵀ S w amplifies the rounding of S by 1/δ² for a row w that nearly cancels correlated channels: with
    δ = 1e-3, float32 statistics were 6e-2 off in that channel's variance and 1.5e-3 (of max|ref|) in y and grad_x.
    Every result is held to the strict fp32 bound and the variance per channel to 1e-4 relative (torch's own fp32
    layers: 7e-7), also with torch's matmul precision at TF32 (GPU), which the statistics must not follow. grad gamma
    is the exception the module docstring states: it comes from the kernels' fp32 Σ_p g_z x_cᵀ, whose rounding
    (u √M relative) the cancelling row amplifies by 1/δ; held to u √M / δ of max|ref| (measured: 1.3e-4, torch's
    own layers 1.9e-5, the bound 9.5e-4)."""
    skip_unless_available(backend, device)
    delta, pixels = 1e-3, 4 * 8 * 8
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if matmul_tf32 else "highest")
    try:
        checks = _correlated_channels_step(device, backend, delta)
    finally:
        torch.set_float32_matmul_precision(saved)
    for name, out, ref in checks:
        if name != "grad gamma":
            assert_close(name, out, ref, strict=True)
    _, grad_gamma, truth = checks[-1]
    err = (grad_gamma.cpu().double() - truth).abs().max().item()
    tol = 2.0**-24 * math.sqrt(pixels) / delta * truth.abs().max().item()
    assert err <= tol, f"grad gamma: max abs err {err:.3g} > u √M / δ · max|ref| = {tol:.3g}"
    running_var, truth = checks[1][1].cpu().double(), checks[1][2]
    relative = ((running_var - truth).abs() / truth).max().item()
    assert relative <= 1e-4, f"batch variance: relative error {relative:.3g} > 1e-4"


def test_statistics_gemms_are_float64():
    """Every matrix product outside the fused kernels (statistics, corrections) runs in float64 for a float32 input:
    none can turn TF32 (or bf16) under torch's matmul precision settings."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.baddbmm.default, torch.ops.aten.mv.default, torch.ops.aten.dot.default}

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                self.seen.append((func.__name__, args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    skip_unless_available("triton", torch.device("cpu"))
    fused = FusedBSConvU(C_IN, C_OUT, 3, padding=1, with_bn=True, backend="triton").train()
    x = torch.randn(2, C_IN, SIZE, SIZE, requires_grad=True)
    with ProductDtypes() as mode:
        fused(x).square().sum().backward()
    assert mode.seen, "no matrix product recorded"
    assert all(a == b == torch.float64 for _, a, b in mode.seen), mode.seen


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(layout, device):
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair({}, 2, dtype, device, "triton")
    check_training(truth, fused, device, dtype, steps=1, layout=layout, stride=2)


def _saved_tensors(fn):
    """Every tensor autograd saves while ``fn`` builds its graph."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


def test_saves_nothing_of_the_intermediates_size(device):
    skip_unless_available("triton", device)
    torch.manual_seed(0)
    fused = FusedBSConvU(C_IN, C_OUT, 3, padding=1, with_bn=True, backend="triton").to(device).train()
    standard = FusedBSConvU(C_IN, C_OUT, 3, padding=1, with_bn=True, backend="reference").to(device).train()
    x = torch.randn(2, C_IN, SIZE, SIZE, device=device, requires_grad=True)
    intermediate = 2 * C_OUT * SIZE * SIZE
    y, saved = _saved_tensors(lambda: fused(x))
    parameters = {p.data_ptr() for p in fused.parameters()}
    large = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert not large, f"the fused path saves tensors of x's size or more besides x: {[tuple(t.shape) for t in large]}"
    extra = sum(t.numel() for t in saved if t.data_ptr() not in parameters and t.data_ptr() != x.data_ptr())
    assert extra <= C_IN * C_IN + 2 * C_IN + 3 * C_OUT + 1, f"{extra} elements saved besides x and the parameters"
    y.sum().backward()  # the saved tensors suffice
    # the standard layers save the intermediate (and its normalized, padded copies): what the fused path avoids
    _, saved_standard = _saved_tensors(lambda: standard(x))
    assert sum(t.numel() >= intermediate for t in saved_standard) >= 2


@pytest.mark.parametrize("option", ["default", "track_running_stats=False"])
def test_eval_after_training(option, device):
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair(BN_OPTIONS[option], 1, dtype, device, "triton")
    check_training(truth, fused, device, dtype)
    truth.eval()
    fused.eval()
    x, _ = make_step(7, 2, dtype, offset=1.0)
    with torch.no_grad():
        assert_matches("eval y", fused(x.to(device)), truth(x.double()), dtype)


def test_unbatched_input(device):
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair({}, 1, dtype, device, "triton")
    x, _ = make_step(0, 1, dtype)
    y = fused(x[0].to(device))
    assert y.shape == (C_OUT, SIZE, SIZE)
    assert_matches("y", y, truth(x.double())[0], dtype)
    assert_matches("running_var", fused.bn.running_var, truth.bn.running_var, dtype)


@pytest.mark.parametrize("option", [None, "default", "track_running_stats=False"])
def test_explicit_backend_that_cannot_run_raises_in_train_and_eval(option):
    """An explicit backend that cannot run the call says so, the same way in every mode; auto runs the reference."""
    with_bn = option is not None
    bn_kwargs = BN_OPTIONS[option] if with_bn else None
    x = torch.randn(2, C_IN, SIZE, SIZE)
    messages = []
    for training in (True, False):
        module = FusedBSConvU(C_IN, C_OUT, 3, padding=1, with_bn=with_bn, bn_kwargs=bn_kwargs,
                              backend="cuda").train(training)
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call") as error:
            module(x)
        messages.append(str(error.value))
        if with_bn and module.bn.track_running_stats:  # a refused call changes nothing
            assert module.bn.num_batches_tracked.item() == 0
    assert messages[0] == messages[1]
    torch.manual_seed(0)
    truth = bsconv_pytorch.BSConvU(C_IN, C_OUT, 3, padding=1, with_bn=with_bn, bn_kwargs=bn_kwargs)
    fused = FusedBSConvU.from_bsconvu(copy.deepcopy(truth), backend="auto")
    for training in (True, False):
        truth.train(training)
        fused.train(training)
        torch.testing.assert_close(fused(x), truth(x), rtol=1e-5, atol=1e-5)


def _standard_functional(x, pw, dw, dw_bias, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                         activation, stride):
    mid = F.batch_norm(F.conv2d(x, pw[:, :, None, None]), running_mean, running_var, bn_weight, bn_bias, training,
                       momentum, eps)
    return F.conv2d(reference.activate(mid, activation), dw, dw_bias, stride, 1, 1, dw.shape[0])


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_f_batch_norm(affine, training, device):
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    tensors = dict(x=make(3, C_IN, 5, 5) + 1, pw=make(C_OUT, C_IN), dw=make(C_OUT, 1, 3, 3), dw_bias=make(C_OUT),
                   bn_weight=make(C_OUT).abs() + 0.5 if affine == "weight" else None,
                   bn_bias=make(C_OUT) if affine == "bias" else None)
    stats = dict(running_mean=make(C_OUT) * 0.1, running_var=make(C_OUT).abs() + 0.5)
    leaves = {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in tensors.items()}
    leaves_ref = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in tensors.items()}
    stats_fused = {k: v.to(device, dtype) for k, v in stats.items()}
    stats_ref = {k: v.clone() for k, v in stats.items()}
    args = dict(training=training, momentum=0.2, eps=1e-4)
    with poisoned_outputs(device):
        y = bsconv_u_batch_norm(leaves["x"], leaves["pw"], leaves["dw"], leaves["dw_bias"], 2, 1,
                                bn_weight=leaves["bn_weight"], bn_bias=leaves["bn_bias"], **stats_fused, **args,
                                mid_activation="hardswish", backend="triton")
    y_ref = _standard_functional(*(leaves_ref[k] for k in ("x", "pw", "dw", "dw_bias")), stats_ref["running_mean"],
                                 stats_ref["running_var"], leaves_ref["bn_weight"], leaves_ref["bn_bias"],
                                 activation="hardswish", stride=2, **args)
    grad_y = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    with poisoned_outputs(device):
        y.backward(grad_y.to(device, dtype))
    y_ref.backward(grad_y)
    assert_matches("y", y, y_ref, dtype)
    for name, leaf in leaves.items():
        if leaf is not None:
            assert_matches(f"grad {name}", leaf.grad, leaves_ref[name].grad, dtype)
    for name in stats:
        assert_matches(name, stats_fused[name], stats_ref[name], dtype)


def test_functional_without_running_statistics(device):
    """running_mean=running_var=None: batch statistics, nothing to update (F.batch_norm's track_running_stats=False)."""
    skip_unless_available("triton", device)
    x, pw, dw = torch.randn(2, 3, 5, 5), torch.randn(4, 3), torch.randn(4, 1, 3, 3)
    y = bsconv_u_batch_norm(x.to(device), pw.to(device), dw.to(device), padding=1, running_mean=None,
                            running_var=None, backend="triton")
    y_ref = F.conv2d(F.batch_norm(F.conv2d(x, pw[:, :, None, None]), None, None, training=True), dw, None, 1, 1, 1, 4)
    assert_close("y", y, y_ref, strict=True)


BAD_BATCH_NORM_ARGS = [
    (dict(running_var=None), ValueError, "running_mean and running_var must both be tensors or both be None"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "required with training=False"),
    (dict(running_mean=torch.zeros(5)), ValueError, r"running_mean must have shape \(4,\)"),
    (dict(bn_weight=torch.ones(4, dtype=torch.int64)), TypeError, "bn_weight must be a floating-point tensor"),
    (dict(bn_bias=[0.0] * 4), TypeError, "bn_bias must be a torch.Tensor or None"),
    (dict(bn_bias=torch.zeros(4, device="meta")), RuntimeError, "bn_bias is on meta but x is on cpu"),
    (dict(training=1), TypeError, "training must be a bool"),
    (dict(momentum="0.1"), TypeError, "momentum must be a real number"),
    (dict(eps=None), TypeError, "eps must be a real number"),
    (dict(x=torch.randn(1, 3, 1, 1), padding=1), ValueError, "Expected more than 1 value per channel when training"),
    (dict(x=torch.randn(3, 5, 5), pw_weight=torch.randn(4, 5)), ValueError, "x has 3 channels but pw_weight expects"),
    (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run this call"),
]


@pytest.mark.parametrize("overrides,error,match", BAD_BATCH_NORM_ARGS, ids=[m for _, _, m in BAD_BATCH_NORM_ARGS])
def test_functional_rejects_bad_arguments(overrides, error, match):
    args = dict(x=torch.randn(2, 3, 5, 5), pw_weight=torch.randn(4, 3), dw_weight=torch.randn(4, 1, 3, 3), padding=1,
                running_mean=torch.zeros(4), running_var=torch.ones(4), backend="reference")
    args.update(overrides)
    with pytest.raises(error, match=match):
        bsconv_u_batch_norm(**args)


def test_empty_batch_leaves_running_statistics_alone():
    """As torch's BatchNorm: an empty batch gives an empty output and zero gradients and updates nothing."""
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    pw, dw = torch.randn(4, 3, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    gamma = torch.ones(4, requires_grad=True)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    y = bsconv_u_batch_norm(x, pw, dw, padding=1, running_mean=running_mean, running_var=running_var,
                            bn_weight=gamma)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))
    assert torch.equal(gamma.grad, torch.zeros(4)) and torch.equal(pw.grad, torch.zeros(4, 3))


def test_autocast_keeps_batch_norm_in_float32(device):
    """Under autocast the block runs in the autocast dtype like torch's layers; the BatchNorm's parameter gradients
    stay float32, and its running statistics follow torch's. Both sides are bf16 computations here."""
    skip_unless_available("triton", device)
    torch.manual_seed(0)
    truth = bsconv_pytorch.BSConvU(C_IN, C_OUT, 3, padding=1, with_bn=True).to(device).train()
    fused = FusedBSConvU.from_bsconvu(copy.deepcopy(truth), backend="triton")
    x = torch.randn(2, C_IN, SIZE, SIZE, device=device)
    grad_y = torch.randn(2, C_OUT, SIZE, SIZE, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = fused(x)
        y_ref = truth(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, strict=False)
    # float32 results computed from bf16 products: held to bf16's bounds
    for name in ("running_mean", "running_var"):
        assert_close(name, getattr(fused.bn, name), getattr(truth.bn, name), strict=False, precision=torch.bfloat16)
    y.backward(grad_y.to(y.dtype))
    y_ref.backward(grad_y.to(y.dtype))
    for (name, p_fused), (_, p_truth) in zip(fused.named_parameters(), truth.named_parameters()):
        assert p_fused.grad.dtype == torch.float32, name
        assert_close(f"grad {name}", p_fused.grad, p_truth.grad, strict=False, precision=torch.bfloat16)


def test_functional_reference_is_the_standard_computation():
    """backend="reference" means torch's standard layers in the functional as in FusedBSConvU: F.conv2d, F.batch_norm,
    the activation, the depthwise F.conv2d, which save the intermediate for backward (the fused path saves nothing of
    its size); the same values as the module's reference, running statistics included."""
    torch.manual_seed(0)
    module = FusedBSConvU(C_IN, C_OUT, 3, stride=2, padding=1, with_bn=True, backend="reference").double().train()
    running_mean, running_var = module.bn.running_mean.clone(), module.bn.running_var.clone()
    x = torch.randn(2, C_IN, SIZE, SIZE, dtype=torch.float64) + 1
    intermediate = 2 * C_OUT * SIZE * SIZE
    y, saved = _saved_tensors(lambda: bsconv_u_batch_norm(
        x, module.pw.weight, module.dw.weight, module.dw.bias, 2, 1, running_mean=running_mean,
        running_var=running_var, bn_weight=module.bn.weight, bn_bias=module.bn.bias, backend="reference"))
    assert sum(t.numel() >= intermediate for t in saved) >= 2, "backend='reference' did not run the standard layers"
    y_module = module(x)
    assert_matches("y", y, y_module, torch.float64)
    assert_matches("running_mean", running_mean, module.bn.running_mean, torch.float64)
    assert_matches("running_var", running_var, module.bn.running_var, torch.float64)


def test_functional_reference_with_a_process_group_raises(monkeypatch):
    """torch's standard layers synchronize only as nn.SyncBatchNorm modules: the functional says so for
    backend="reference" with a process group of several ranks (before any collective), and takes the fused path
    for the other backends."""
    group = object()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    args = dict(x=torch.randn(2, 3, 5, 5), pw_weight=torch.randn(4, 3), dw_weight=torch.randn(4, 1, 3, 3), padding=1,
                running_mean=None, running_var=None, process_group=group)
    with pytest.raises(ValueError, match="backend='reference' runs torch's standard layers"):
        bsconv_u_batch_norm(**args, backend="reference")


def test_compile_fullgraph_functional():
    """torch.compile(fullgraph=True) of the functional's training computation, forward and backward: on CPU its
    reference backend is torch's layers, so this compiles those; the fused statistics path on CPU below."""

    def step(x, pw, dw, gamma, beta, running_mean, running_var):
        return bsconv_u_batch_norm(x, pw, dw, None, 1, 1, running_mean=running_mean, running_var=running_var,
                                   bn_weight=gamma, bn_bias=beta, mid_activation="relu6", backend="reference")

    _compile_check(step)


def test_compile_fullgraph_statistics_path_on_cpu():
    """torch.compile(fullgraph=True) of the fused statistics path (batch_norm_call: the statistics, the autograd
    function with its closed-form backward, the running statistics update) on CPU, through the reference kernels:
    the only kernels torch.compile runs on CPU (Triton's interpreter cannot be compiled; the fused backends on GPU
    below). No entry point takes this path on CPU, so the test calls it directly."""

    def step(x, pw, dw, gamma, beta, running_mean, running_var):
        call = prepare_call(x, pw, dw, None, 1, 1, 1, None, "relu6", "reference")
        return batch_norm_call(call, running_mean, running_var, gamma, beta, 0.1, 1e-5)

    _compile_check(step)


def _compile_check(step):
    """``step`` eager and under torch.compile(fullgraph=True): the same outputs, input gradients and running
    statistics."""
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 3, 6, 6, generator=gen) + 2, torch.randn(5, 3, generator=gen),
              torch.randn(5, 1, 3, 3, generator=gen), torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    eager_stats, compiled_stats = [torch.zeros(5), torch.ones(5)], [torch.zeros(5), torch.ones(5)]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    expected = step(*eager_leaves, *eager_stats)
    actual = compiled(*compiled_leaves, *compiled_stats)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=gen)
    expected.backward(grad)
    actual.backward(grad)
    for index, (a, e) in enumerate(zip(compiled_leaves, eager_leaves)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4, msg=f"input {index}")
    for a, e in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(a, e)


def _compile_training_module_check(backend: str, device: str) -> None:
    torch.manual_seed(0)
    eager = FusedBSConvU(16, 32, 3, stride=2, padding=1, with_bn=True, backend=backend).to(device).train()
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16, 16, 16, device=device)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = eager(x_eager), compiled(x_compiled)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-3, atol=1e-3)
    for (name, a), (_, e) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-3, atol=1e-3, msg=name)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)
    assert model.bn.num_batches_tracked.item() == eager.bn.num_batches_tracked.item() == 1


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph_training_module_on_gpu(backend):
    if backend != "reference" and backend not in bsconv_cuda.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on cuda")
    _compile_training_module_check(backend, "cuda")


def test_sync_batch_norm_without_a_process_group_is_batch_norm(device):
    """Outside torch.distributed (or with world size 1) an nn.SyncBatchNorm behaves as nn.BatchNorm2d, as torch's."""
    skip_unless_available("triton", device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair({}, 1, dtype, device, "triton")
    fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert isinstance(fused.bn, torch.nn.SyncBatchNorm) and isinstance(fused, FusedBSConvU)
    check_training(truth, fused, device, dtype)
    converted = bsconv_cuda.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(truth)))
    assert isinstance(converted, FusedBSConvU) and isinstance(converted.bn, torch.nn.SyncBatchNorm)


def test_sync_batch_norm_with_world_size_one_is_batch_norm(tmp_path, device):
    """A process group of one rank: nothing to synchronize (nn.SyncBatchNorm falls back to F.batch_norm)."""
    import torch.distributed as dist

    skip_unless_available("triton", device)
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group of its own")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    truth, fused = make_pair({}, 1, dtype, device, "triton")
    fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        check_training(truth, fused, device, dtype, steps=1)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # as F.batch_norm
            bsconv_u_batch_norm(torch.randn(1, 3, 1, 1), torch.randn(4, 3), torch.randn(4, 1, 1, 1),
                                running_mean=None, running_var=None, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _forward_backward_per_rank(truth, x, grad_y, batch_sizes):
    """One training step of the standard layers on the whole batch, and each rank's share of every parameter gradient
    (what nn.SyncBatchNorm and the convolutions leave on a rank before DDP reduces them): its own pixels' terms with
    the whole batch's statistics. ``batch_sizes``: the images of each rank."""
    mid = truth.pw(x)
    mid.retain_grad()
    normalized = truth.bn(mid)
    normalized.retain_grad()
    y = truth.dw(normalized)
    y.backward(grad_y)
    mean, var = mid.mean((0, 2, 3), keepdim=True), mid.var((0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (mid - mean) / torch.sqrt(var + truth.bn.eps)
    shares = []
    for part in torch.arange(x.shape[0]).split(batch_sizes):
        grad_mid, grad_normalized = mid.grad[part], normalized.grad[part]
        dw_weight, dw_bias = torch.autograd.grad(truth.dw(normalized[part].detach()), truth.dw.parameters(),
                                                 grad_y[part])
        shares.append({
            "pw.weight": torch.einsum("nohw,nihw->oi", grad_mid, x[part].detach())[:, :, None, None],
            "bn.weight": (grad_normalized * x_hat[part]).sum((0, 2, 3)),
            "bn.bias": grad_normalized.sum((0, 2, 3)),
            "dw.weight": dw_weight,
            "dw.bias": dw_bias,
        })
    return y, shares


# Two spawned processes under Triton's interpreter take ~30 s here; a collective that one rank never joins hangs
# forever, so the harness gives up after this long and fails instead.
SYNC_TIMEOUT_S = 300


def _run_ranks(tmp_path, batch_sizes):
    """Runs one _sync_batchnorm_worker process per entry of ``batch_sizes``, failing (not hanging) when they do not
    all finish within SYNC_TIMEOUT_S."""
    import time

    import torch.multiprocessing as mp

    import _sync_batchnorm_worker

    context = mp.start_processes(_sync_batchnorm_worker.run_rank, args=(len(batch_sizes), str(tmp_path)),
                                 nprocs=len(batch_sizes), join=False, start_method="spawn")
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {SYNC_TIMEOUT_S} s: a collective that not every rank "
                        f"joined (batch sizes {batch_sizes})")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(batch_sizes))]


@pytest.mark.parametrize("batch_sizes", [(2, 2), (0, 4)], ids=["halves", "empty-rank"])
def test_sync_batch_norm_two_processes(batch_sizes, tmp_path):
    """Two gloo processes through the fused (Triton) path, each with its share of the batch: the same outputs, input
    gradients, all-reduced parameter gradients and running statistics as one process with the whole batch and a plain
    BSConvU; and each rank's own parameter gradients are its share of them. A rank with no images (whose own call
    resolves to another backend) takes part in the same collectives: zero gradients of its own, no hang."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    config = dict(in_channels=C_IN, out_channels=C_OUT, kernel_size=3, stride=2, padding=1, with_bn=True)
    truth, _ = make_pair({}, 2, torch.float64, torch.device("cpu"), "reference")
    steps = [make_step(step, sum(batch_sizes), torch.float64, offset=1.0, stride=2) for step in range(2)]
    torch.save(dict(config=config, state=truth.state_dict(), steps=steps, batch_sizes=batch_sizes),
               tmp_path / "inputs.pt")
    ranks = _run_ranks(tmp_path, batch_sizes)
    for step, (x, grad_y) in enumerate(steps):
        x = x.clone().requires_grad_()
        y, local_grads = _forward_backward_per_rank(truth, x, grad_y, batch_sizes)
        assert_matches(f"step {step} y", torch.cat([r["steps"][step]["y"] for r in ranks]), y, torch.float64)
        grad_x = torch.cat([r["steps"][step]["grad_x"] for r in ranks])
        assert_matches(f"step {step} grad_x", grad_x, x.grad, torch.float64)
        for name, param in truth.named_parameters():
            for rank, result in enumerate(ranks):
                assert_matches(f"step {step} rank {rank} all-reduced grad {name}", result["steps"][step]["grads"][name],
                               param.grad, torch.float64)
                assert_matches(f"step {step} rank {rank} local grad {name}", result["steps"][step]["local_grads"][name],
                               local_grads[rank][name], torch.float64)
        truth.zero_grad()
    for name, buffer in truth.named_buffers():
        for rank, result in enumerate(ranks):
            assert_matches(f"rank {rank} buffer {name}", result["buffers"][name].double(), buffer.double(),
                           torch.float64)
    assert math.isclose(ranks[0]["buffers"]["bn.num_batches_tracked"].item(), 2)
