"""Triton-specific tests: tiling edges with forced small blocks, 64-bit indexing path, determinism of the weight
gradients, gradcheck in float64 (interpreter), that nothing of mid's size is saved for backward, and that every launch
runs on the tensors' device."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends, reference
from fused_checks import assert_close, poisoned_outputs

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {backends.unavailable_reason('triton')}",
)


def _kernels():
    from bsconv_cuda.kernels import bsconv_u

    return bsconv_u


def _inputs(device, n, c_in, c_out, h, w, k, dtype=torch.float32, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rand(n, c_in, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, rand(c_out, c_in, scale=3 / math.sqrt(c_in)), rand(c_out), rand(c_out, 1, *k, scale=0.3),
            rand(c_out))


# (shape, conv args, forced forward blocks, forced backward blocks)
EDGE_CASES = [
    # channels cross block edges (C_in 20 = 16 + 4, C_out 18 = 16 + 2), non-power-of-two output tile 2x3,
    # grad_x / grad_pw over two ci-blocks (pre recomputed per ci-block), G=3 programs striding over 3 tiles each
    dict(shape=(1, 20, 18, 7, 5), k=(3, 3), conv=((2, 2), (1, 1, 1, 1), (1, 1), "relu6"),
         fwd=dict(TH=2, TW=3, BCO=16, BCI=16), bwd=dict(TP=16, BCO=16, BCI=16, G=3)),
    # 1x1 output tiles (P padded up to 16), non-square kernel with dilation, asymmetric padding
    dict(shape=(2, 3, 5, 5, 6), k=(3, 5), conv=((1, 1), (1, 2, 0, 4), (1, 2), "silu"),
         fwd=dict(TH=1, TW=1), bwd=dict(TP=16, G=1)),
    # stride (2, 1), tile 3x5 not dividing the output, 64-bit offsets forced on, channels_last
    dict(shape=(2, 17, 5, 9, 7), k=(5, 3), conv=((2, 1), (2, 2, 1, 1), (1, 1), "hardswish"),
         fwd=dict(TH=3, TW=5, BCO=16, BCI=16, IDX64=True), bwd=dict(TP=32, BCI=16, G=2, IDX64=True),
         channels_last=True),
    # 7x7 kernel, tile larger than the output, one program per tile
    dict(shape=(1, 4, 3, 8, 8), k=(7, 7), conv=((1, 1), (3, 3, 3, 3), (1, 1), "relu"),
         fwd=dict(TH=16, TW=16), bwd=dict(TP=16, G=1000)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"{c['shape']}-k{c['k']}-{c['fwd']}")
def test_forced_block_edges(case, dtype, device):
    kernels = _kernels()
    n, c_in, c_out, h, w = case["shape"]
    x, pw, pb, dw, db = _inputs(device, n, c_in, c_out, h, w, case["k"], dtype,
                                channels_last=case.get("channels_last", False))
    conv = case["conv"]
    saved_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with kernels.force_blocks(case["fwd"], case["bwd"]), poisoned_outputs(x.device):
            y = kernels.forward(x, pw, pb, dw, db, *conv)
            grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
            grads = kernels.backward(grad_y, x, pw, pb, dw, db, *conv)
    finally:
        torch.backends.cudnn.allow_tf32 = saved_tf32
    d64 = [t.cpu().double() for t in (x, pw, pb, dw, db)]
    strict = dtype == torch.float32
    assert y.is_contiguous(memory_format=reference.output_memory_format(x))
    assert grads[0].is_contiguous(memory_format=reference.output_memory_format(x))
    assert_close("y", y, reference.forward(*d64, *conv), strict)
    names = ["grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    for name, g, r in zip(names, grads, reference.backward(grad_y.cpu().double(), *d64, *conv)):
        assert g.dtype == dtype, name
        assert name == "grad_x" or g.is_contiguous(), name
        assert_close(name, g, r, strict)


def test_weight_gradients_are_bitwise_deterministic(device):
    kernels = _kernels()
    x, pw, pb, dw, db = _inputs(device, 2, 9, 20, 7, 6, (3, 3))
    grad_y = torch.randn(2, 20, 7, 6, generator=torch.Generator().manual_seed(3)).to(device)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), "silu")
    runs = []
    for _ in range(2):
        with kernels.force_blocks(None, dict(TP=16, BCO=16, G=2)):
            runs.append(kernels.backward(grad_y, x, pw, pb, dw, db, *conv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_float64(device):
    if device.type == "cuda":
        pytest.skip("float64 goes to the reference on GPU; gradcheck of the Triton kernels runs in the interpreter")
    x, pw, pb, dw, db = (t.requires_grad_() for t in _inputs(device, 1, 2, 3, 3, 4, (3, 2), torch.float64))

    def fn(x, pw, pb, dw, db):
        return bsconv_cuda.bsconv_u(x, pw, dw, db, stride=(1, 2), padding=(1, 1), pw_bias=pb, mid_activation="silu",
                                    backend="triton")

    assert torch.autograd.gradcheck(fn, (x, pw, pb, dw, db))


def test_float64_without_a_float64_tl_dot(device, monkeypatch):
    # triton < 3.5 has no float64 tl.dot: _dot sums broadcast products instead. The interpreter reads the module's
    # FLOAT64_DOT at run time, so that path runs on every triton here (natively on the oldest supported one); two
    # blocks of C_in and of C_out, so every _dot accumulates.
    if device.type == "cuda":
        pytest.skip("float64 goes to the reference on GPU; the interpreter reads FLOAT64_DOT at run time, a GPU "
                    "compile would not")
    monkeypatch.setattr(_kernels(), "FLOAT64_DOT", _kernels().tl.constexpr(False))
    x, pw, pb, dw, db = (t.requires_grad_() for t in _inputs(device, 2, 20, 18, 5, 6, (3, 3), torch.float64))
    conv = dict(stride=(2, 1), padding=(1, 1), pw_bias=pb, mid_activation="silu")
    with _kernels().force_blocks(dict(TH=2, TW=2, BCO=16, BCI=16), dict(TP=16, BCO=16, BCI=16, G=2)):
        y = bsconv_cuda.bsconv_u(x, pw, dw, db, backend="triton", **conv)
        grads = torch.autograd.grad(y, (x, pw, pb, dw, db), torch.ones_like(y))
    y_ref = bsconv_cuda.bsconv_u(x, pw, dw, db, backend="reference", **conv)
    grads_ref = torch.autograd.grad(y_ref, (x, pw, pb, dw, db), torch.ones_like(y_ref))
    for name, got, want in zip(("y", "grad_x", "grad_pw", "grad_pw_bias", "grad_dw", "grad_dw_bias"),
                               (y, *grads), (y_ref, *grads_ref)):
        assert_close(name, got, want, strict=True)


def test_nothing_of_mid_size_is_saved(device):
    # C_out >> C_in: mid (N x C_out x H x W) is much larger than x and the weights
    x, pw, pb, dw, db = (t.requires_grad_() for t in _inputs(device, 1, 2, 24, 6, 6, (3, 3)))
    mid_numel = 1 * 24 * 6 * 6
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bsconv_cuda.bsconv_u(x, pw, dw, db, padding=1, pw_bias=pb, mid_activation="relu", backend="triton")
    assert saved, "expected x and the weights to be saved"
    assert max(saved) < mid_numel, f"saved tensors of sizes {saved}: one is as large as mid ({mid_numel})"
    y.sum().backward()
    assert x.grad is not None and pw.grad is not None and dw.grad is not None


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_tile_heuristic_bounds(k, stride, dilation):
    kernels = _kernels()
    for h_out, w_out in [(1, 1), (7, 7), (14, 14), (56, 56), (112, 112), (3, 200)]:
        th, tw = kernels._fwd_tile(h_out, w_out, k, k, stride, stride, dilation, dilation)
        assert 1 <= th <= h_out and 1 <= tw <= w_out
        halo = ((th - 1) * stride + (k - 1) * dilation + 1) * ((tw - 1) * stride + (k - 1) * dilation + 1)
        assert triton_next_pow2(halo) <= 256
        assert triton_next_pow2(th * tw) <= 128


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def _record_launches(monkeypatch):
    """Replaces the current-device switch and the kernel launches by recorders: returns the list of
    (kernel name, device current at its launch) that the launchers append to."""
    current = ["cuda:0"]
    launches = []

    @contextlib.contextmanager
    def device(d):
        previous, current[0] = current[0], str(torch.device(d))
        try:
            yield
        finally:
            current[0] = previous

    class Launch:
        def __init__(self, kernel):
            self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__  # a JITFunction or interpreted one

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, current[0]))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_kernels(), "_launchable", Launch)
    return launches


def _fake_cuda_call(device):
    """forward + backward of the launchers on fake tensors on ``device`` (no GPU needed: nothing is launched)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels = _kernels()
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), "relu")
    with FakeTensorMode():
        x = torch.empty(2, 4, 6, 6, device=device)
        args = (torch.empty(8, 4, device=device), torch.empty(8, device=device), torch.empty(8, 1, 3, 3, device=device),
                torch.empty(8, device=device))
        y = kernels.forward(x, *args, *conv)
        kernels.backward(torch.empty_like(y), x, *args, *conv)


def test_every_launch_runs_on_the_tensors_device(monkeypatch):
    # Triton launches on the current device: with cuda:0 current, tensors on cuda:1 need cuda:1 made current
    launches = _record_launches(monkeypatch)
    _fake_cuda_call("cuda:1")
    assert launches == [("_fwd_kernel", "cuda:1"), ("_bwd_kernel", "cuda:1"), ("_reduce_kernel", "cuda:1")]


def test_no_device_switch_while_torch_compile_traces(monkeypatch):
    # under torch.compile, Inductor's generated code guards the device itself; the launchers must not
    launches = _record_launches(monkeypatch)
    monkeypatch.setattr(_kernels(), "_is_compiling", lambda: True)
    _fake_cuda_call("cuda:1")
    assert [device for _, device in launches] == ["cuda:0"] * 3

