"""Triton-specific tests: tiling edges with forced small blocks, 64-bit indexing path, determinism of the weight
gradients, gradcheck in float64 (interpreter), that nothing of mid's size is saved for backward, and that every launch
runs on the tensors' device."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends, reference
from fused_checks import Case, assert_close, check_case, poisoned_outputs

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


# (shape, conv args, forced forward blocks, forced backward blocks); every case runs both depthwise stages of the
# forward and both backward paths
EDGE_CASES = [
    # channels cross block edges (C_in 20 = 16 + 4, C_out 18 = 16 + 2), non-power-of-two output tile 2x3; fused
    # backward: two channel chunks; split: two ci-blocks, two pixel splits of the grad_pw GEMM; 3 tile programs
    # striding over 3 tiles each; shifted forward: 2 programs looping over the work items
    dict(shape=(1, 20, 18, 7, 5), k=(3, 3), conv=((2, 2), (1, 1, 1, 1), (1, 1), "relu6"),
         fwd=dict(TH=2, TW=3, BLOCK_CO=16, BLOCK_CI=16, SLOTS=2),
         bwd=dict(MID_PIXELS=16, BLOCK_CO=16, BLOCK_CI=16, CHUNKS=(16, 16, 0, 0), TILE_PROGRAMS=3,
                  PIXEL_SPLITS=2)),
    # 1x1 output tiles (MID_ROWS padded up to 16), non-square kernel with dilation, asymmetric padding
    dict(shape=(2, 3, 5, 5, 6), k=(3, 5), conv=((1, 1), (1, 2, 0, 4), (1, 2), "silu"),
         fwd=dict(TH=1, TW=1), bwd=dict(MID_PIXELS=16, TILE_PROGRAMS=1)),
    # stride (2, 1), tile 3x5 not dividing the output, 64-bit offsets forced on, channels_last; four channel
    # chunks in the fused backward (C_in 50: the last chunk holds 2 channels)
    dict(shape=(2, 50, 5, 9, 7), k=(5, 3), conv=((2, 1), (2, 2, 1, 1), (1, 1), "hardswish"),
         fwd=dict(TH=3, TW=5, BLOCK_CO=16, BLOCK_CI=16, IDX64=True, SLOTS=3),
         bwd=dict(MID_PIXELS=32, BLOCK_CI=16, CHUNKS=(16, 16, 16, 16), TILE_PROGRAMS=2, PIXEL_SPLITS=3,
                  IDX64=True), channels_last=True),
    # 7x7 kernel, tile larger than the output (the clipped halo is the whole image), one program per tile
    dict(shape=(1, 4, 3, 8, 8), k=(7, 7), conv=((1, 1), (3, 3, 3, 3), (1, 1), "relu"),
         fwd=dict(TH=16, TW=16), bwd=dict(MID_PIXELS=16, TILE_PROGRAMS=1000, PIXEL_SPLITS=1000)),
    # padding larger than the kernel's reach: output tiles whose clipped halo is empty
    dict(shape=(1, 6, 5, 3, 4), k=(3, 3), conv=((2, 2), (4, 4, 4, 4), (1, 1), "none"),
         fwd=dict(TH=2, TW=2), bwd=dict(MID_PIXELS=16, TILE_PROGRAMS=2, PIXEL_SPLITS=2)),
]


@pytest.mark.parametrize(("depthwise", "path"), [("gather", "fused"), ("shifted", "split")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"{c['shape']}-k{c['k']}-{c['fwd']}")
def test_forced_block_edges(case, dtype, depthwise, path, device):
    kernels = _kernels()
    n, c_in, c_out, h, w = case["shape"]
    x, pw, pb, dw, db = _inputs(device, n, c_in, c_out, h, w, case["k"], dtype,
                                channels_last=case.get("channels_last", False))
    conv = case["conv"]
    saved_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with kernels.force_blocks(case["fwd"], dict(case["bwd"], PATH=path)), poisoned_outputs(x.device):
            y = kernels.forward(x, pw, pb, dw, db, *conv, depthwise=depthwise)
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


# The grid of tests/test_fused_backends.py runs the default forward stage ("gather") and mostly the fused backward;
# the other stage and path run here through the public API in every dtype and both layouts.
OTHER_STAGE_CASES = [
    Case(dtype=dtype, channels_last=cl, act=act, stride=stride)
    for (dtype, act, stride), cl in itertools.product(
        [(torch.float32, "relu6", 1), (torch.float64, "hardswish", 2), (torch.bfloat16, "silu", 1),
         (torch.float16, None, 2)], [False, True])
] + [Case(tf32=True, act="relu")]


@pytest.mark.parametrize("case", OTHER_STAGE_CASES, ids=str)
def test_shifted_forward_and_split_backward(case, device, monkeypatch):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "DEPTHWISE_STAGE", "shifted")
    with kernels.force_blocks(dict(SLOTS=5), dict(PATH="split")):
        check_case(case, "triton", device)


def test_depthwise_stage_argument_is_checked(device):
    x, pw, pb, dw, db = _inputs(device, 1, 2, 3, 4, 4, (3, 3))
    with pytest.raises(ValueError, match="depthwise must be one of"):
        _kernels().forward(x, pw, pb, dw, db, (1, 1), (1, 1, 1, 1), (1, 1), "none", depthwise="unrolled")


def test_force_blocks_names_an_unknown_key():
    # a key the launch plans do not take (here an old name of MID_PIXELS / BLOCK_CO) would otherwise reach the kernel
    # launch as a stray keyword, or be ignored
    kernels = _kernels()
    with pytest.raises(ValueError, match=r"backward takes .*unknown \['TP'\]"):
        with kernels.force_blocks(backward=dict(PATH="fused", TP=16)):
            pass
    with pytest.raises(ValueError, match=r"forward takes .*unknown \['BCO'\]"):
        with kernels.force_blocks(forward=dict(BCO=16)):
            pass
    assert kernels._FORCED == {"forward": None, "backward": None}


@pytest.mark.parametrize("path", ["fused", "split"])
def test_weight_gradients_are_bitwise_deterministic(path, device):
    kernels = _kernels()
    x, pw, pb, dw, db = _inputs(device, 2, 9, 20, 7, 6, (3, 3))
    grad_y = torch.randn(2, 20, 7, 6, generator=torch.Generator().manual_seed(3)).to(device)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), "silu")
    runs = []
    for _ in range(2):
        with kernels.force_blocks(None, dict(PATH=path, MID_PIXELS=16, BLOCK_CO=16, TILE_PROGRAMS=2,
                                             PIXEL_SPLITS=3)):
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
    with _kernels().force_blocks(dict(TH=2, TW=2, BLOCK_CO=16, BLOCK_CI=16),
                                 dict(MID_PIXELS=16, BLOCK_CO=16, BLOCK_CI=16, TILE_PROGRAMS=2)):
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
    pad = (k - 1) * dilation // 2
    for batch, h in [(1, 1), (1, 7), (2, 14), (64, 56), (1, 112), (3, 200)]:
        h_out, w_out = reference.output_size(h, h, (k, k), (stride, stride), (pad,) * 4, (dilation, dilation))
        plan = kernels.forward_plan(batch, 24, 40, h, h, h_out, w_out, (k, k), (stride, stride), (pad,) * 4,
                                    (dilation, dilation))
        blk = plan.blocks
        assert 1 <= blk["TH"] <= h_out and 1 <= blk["TW"] <= w_out
        clipped = min(blk["MID_H"], h) * min(blk["MID_W"], h)
        assert clipped <= blk["MID_ROWS"] <= kernels.FWD_MAX_MID_ROWS
        assert blk["TH"] * blk["TW"] <= blk["OUT_PIXELS"] <= kernels.FWD_MAX_OUT_PIXELS


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


# the launches of forward + backward, by backward path
_LAUNCHES = {
    "fused": ["_fwd_kernel", "_bwd_fused_kernel", "_reduce_kernel"],
    "split": ["_fwd_kernel", "_bwd_gpre_kernel", "_bwd_gx_kernel", "_bwd_gw_kernel", "_reduce_kernel"],
}


@pytest.mark.parametrize("path", sorted(_LAUNCHES))
def test_every_launch_runs_on_the_tensors_device(monkeypatch, path):
    # Triton launches on the current device: with cuda:0 current, tensors on cuda:1 need cuda:1 made current
    launches = _record_launches(monkeypatch)
    with _kernels().force_blocks(backward=dict(PATH=path)):
        _fake_cuda_call("cuda:1")
    assert launches == [(name, "cuda:1") for name in _LAUNCHES[path]]


@pytest.mark.parametrize("path", sorted(_LAUNCHES))
def test_no_device_switch_while_torch_compile_traces(monkeypatch, path):
    # under torch.compile, Inductor's generated code guards the device itself; the launchers must not
    launches = _record_launches(monkeypatch)
    monkeypatch.setattr(_kernels(), "_is_compiling", lambda: True)
    with _kernels().force_blocks(backward=dict(PATH=path)):
        _fake_cuda_call("cuda:1")
    assert launches == [(name, "cuda:0") for name in _LAUNCHES[path]]


def test_channel_chunks_cover_the_channels():
    kernels = _kernels()
    for c_in in range(1, 129):
        for max_chunk in (32, 128):
            chunks = kernels._channel_chunks(c_in, max_chunk)
            assert chunks is not None and len(chunks) == 4
            assert sum(chunks) == -(-c_in // 16) * 16, (c_in, chunks)  # no padding beyond a multiple of 16
            assert all(c == 0 or (16 <= c <= max_chunk and c & (c - 1) == 0) for c in chunks)
    assert kernels._channel_chunks(160, 32) is None
