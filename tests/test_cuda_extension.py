"""The compiled ``cuda`` backend (``bsconv_cuda._C`` from csrc/): it builds and loads, registers its ops with the
schema of CONTRACT.md, reports what it was built for, and (on a GPU) matches the float64 reference on shapes big
enough to exercise every kernel path: tensor cores and FMA, 16-byte and scalar loads, several channel blocks,
several C_in chunks, several tiles, split-K weight gradients, the 1/3/5/7 specialisations and the any-kh,kw path.

The shared small-shape grid for all fused backends is tests/test_fused_backends.py.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import random
import threading

import pytest
import torch

import bsconv_cuda
from bsconv_cuda import backends, cuda_backend, plan, reference
from bsconv_cuda.functional import MAX_FUSED_KERNEL_SIZE, select_backend
from fused_checks import assert_close, poisoned_outputs

PKG_DIR = os.path.dirname(bsconv_cuda.__file__)
BUILT = bool(glob.glob(os.path.join(PKG_DIR, "_C*.so")) or glob.glob(os.path.join(PKG_DIR, "_C*.pyd")))
REQUIRED = os.environ.get("BSCONV_CUDA_BUILD") == "1"
# bsconv_cuda._C is built on torch's stable ABI: an older torch cannot load it (and the package falls back)
TORCH_PREDATES_STABLE_ABI = torch.__version__ < cuda_backend.MIN_TORCH

FORWARD_SCHEMA = (
    "bsconv_cuda::cuda_forward(Tensor x, Tensor pw_weight, Tensor? pw_bias, Tensor dw_weight, Tensor? dw_bias, "
    "int[] stride, int[] padding, int[] dilation, str activation, bool allow_tf32=False) -> Tensor"
)
BACKWARD_SCHEMA = (
    "bsconv_cuda::cuda_backward(Tensor grad_y, Tensor x, Tensor pw_weight, Tensor? pw_bias, Tensor dw_weight, "
    "Tensor? dw_bias, int[] stride, int[] padding, int[] dilation, str activation, "
    "bool[] output_mask=[True, True, True, True, True], bool allow_tf32=False, str backward_path=\"auto\") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@pytest.fixture(scope="module")
def ext():
    if not BUILT and not REQUIRED:
        pytest.skip("bsconv_cuda._C is not built here (pure-Python install); BSCONV_CUDA_BUILD=1 makes this a failure")
    if TORCH_PREDATES_STABLE_ABI:
        pytest.skip(f"torch {torch.__version__} predates the stable ABI that bsconv_cuda._C is built on, so it cannot "
                    f"load here (test_older_torch_falls_back_without_the_extension checks the fallback)")
    error = backends.extension_load_error()
    assert error is None, error
    import bsconv_cuda._C as module

    return module


# ------------------------------------------------------------------------------------------- build and load
@pytest.mark.skipif(not TORCH_PREDATES_STABLE_ABI, reason=f"torch {torch.__version__} can load bsconv_cuda._C")
def test_older_torch_falls_back_without_the_extension():
    if not BUILT:
        pytest.skip("bsconv_cuda._C is not installed here, so there is nothing to refuse")
    from bsconv_cuda.ops import OPS

    error = backends.extension_load_error()
    assert error is not None and "stable ABI, which starts at torch 2.10" in error, error
    assert "cuda" not in OPS
    assert "cuda" not in bsconv_cuda.available_backends("cuda" if torch.cuda.is_available() else "cpu")


def test_extension_loads(ext):
    assert ext.__name__ == "bsconv_cuda._C"
    assert ".abi3." in os.path.basename(ext.__file__), "expected a limited-API (abi3) build"


def test_ops_registered_with_contract_schema(ext):
    assert str(torch.ops.bsconv_cuda.cuda_forward.default._schema) == FORWARD_SCHEMA
    assert str(torch.ops.bsconv_cuda.cuda_backward.default._schema) == BACKWARD_SCHEMA


def test_build_info(ext):
    archs = cuda_backend.compiled_archs()
    assert archs and all(a[0].isdigit() for a in archs), archs
    assert cuda_backend.built_torch_version()
    assert cuda_backend.built_cuda_version()
    summary = cuda_backend.build_summary()
    assert "compiled for" in summary and archs[0] in summary
    from bsconv_cuda import info

    assert summary in info.report()


def test_cpu_tensors_have_no_kernel(ext):
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(NotImplementedError):
        torch.ops.bsconv_cuda.cuda_forward(x, torch.randn(8, 4), None, torch.randn(8, 1, 3, 3), None,
                                           [1, 1], [1, 1, 1, 1], [1, 1], "none")


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_implementations(ext, channels_last):
    """Shapes / memory formats of the fakes registered by bsconv_cuda.ops (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 9, 10, device="cuda")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pw, dw = torch.empty(8, 4, device="cuda"), torch.empty(8, 1, 3, 5, device="cuda")
        args = ([2, 1], [1, 1, 2, 2], [1, 1], "relu")
        y = torch.ops.bsconv_cuda.cuda_forward(x, pw, None, dw, None, *args)
        assert y.shape == (2, 8, 5, 10)
        assert y.is_contiguous(memory_format=reference.output_memory_format(x))
        grads = torch.ops.bsconv_cuda.cuda_backward(y, x, pw, None, dw, None, *args)
        assert [tuple(g.shape) for g in grads] == [(2, 4, 9, 10), (8, 4), (8,), (8, 1, 3, 5), (8,)]
        assert grads[0].is_contiguous(memory_format=reference.output_memory_format(x))


def test_unsupported_reason_on_cpu(ext):
    reason = cuda_backend.unsupported_reason(torch.randn(1, 3, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert reason is not None and "CUDA" in reason


def test_forward_tile_choice():
    """choose_fwd_tile, as cuda_backend restates it: the halo limit, the least MMA work per image when the batch
    fills the GPU, and smaller tiles (more blocks, within 3 pointwise stages of work) when it does not."""
    bf16 = torch.bfloat16
    # 7x7 with dilation 3 on a 10x10 map padded by 9: footprint 19x19 = 361 <= 384; only the 1x1, 1x2 and 2x1 tiles
    # fit, and the tie between the last two goes to the wider; 8 output channels take the 16-channel block (half the
    # padding of 32)
    assert cuda_backend._fwd_tile(1, 4, 8, 10, 10, 10, 10, 7, 7, [1, 1], [3, 3], bf16) == (1, 2, 19, 20, 50, 16)
    # dilation 4: 25x25 > 384, nothing fits
    assert cuda_backend._fwd_tile(1, 4, 8, 10, 10, 10, 10, 7, 7, [1, 1], [4, 4], bf16) is None

    def mma_rows_per_pixel(tile):
        th, tw, ih, iw, tiles = tile[:5]
        return -(-ih * iw // 16) * 16 * tiles / (56 * 56)

    # 128 -> 128 @ 56: 4 channel blocks per tile
    candidates = list(cuda_backend._fwd_tiles(56, 56, 3, 3, [1, 1], [1, 1]))
    full = cuda_backend._fwd_tile(64, 128, 128, 56, 56, 56, 56, 3, 3, [1, 1], [1, 1], bf16)
    assert mma_rows_per_pixel(full) == min(mma_rows_per_pixel(t) for t in candidates)  # 14 x 19 tiles: 1.29
    assert full[5] == 32
    # one image: 7 x 14 tiles of 16 channels, 32 x 8 = 256 blocks at 1.47 (32 channels would halve the blocks)
    single = cuda_backend._fwd_tile(1, 128, 128, 56, 56, 56, 56, 3, 3, [1, 1], [1, 1], bf16)
    assert single[5] == 16 and 128 // 16 * single[4] >= 132 and mma_rows_per_pixel(single) <= 3.0


def test_forward_tile_choice_gives_equal_time_to_the_tile_on_more_sms(ext):
    """16 -> 16 @ 32, TF32, N = 1: 3 x 4 tiles (88 blocks) and 2 x 6 tiles (96) have the same modeled time (one wave,
    the same MMA rows per block); the one that occupies more SMs wins although it pads a little more, in the compiled
    choice and its Python restatement alike."""
    conv = (1, 16, 16, 32, 32)
    assert cuda_backend._fwd_tile(*conv, 32, 32, 3, 3, [1, 1], [1, 1], torch.float32, True) == (2, 6, 4, 8, 96, 16)
    tiles = ext.tile_plan(*conv, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "float32", True)
    assert (tiles["fwd_tile"][:2], tiles["fwd_tiles"], tiles["fwd_cb"]) == ((2, 6), 96, 16)


def test_python_copies_of_the_limits_are_the_compiled_ones(ext):
    """csrc/bsconv_params.h is the home of the kernels' limits; the Python copies (needed under torch.compile and
    where _C cannot load) must say the same."""
    assert ext.MAX_KERNEL_SIZE == MAX_FUSED_KERNEL_SIZE and ext.MAX_KERNEL_SIZE ** 2 == cuda_backend._MAX_TAPS
    assert ext.MAX_TILE_PIXELS == cuda_backend.MAX_TILE_PIXELS
    assert ext.MAX_STRIDE_OR_DILATION == cuda_backend.MAX_STRIDE_OR_DILATION
    assert ext.MAX_PADDING == cuda_backend.MAX_PADDING
    assert ext.MAX_GRID_YZ == cuda_backend.MAX_GRID_YZ
    assert ext.MAX_SPATIAL_SIZE == cuda_backend.MAX_SPATIAL_SIZE
    assert ext.SUPPORTED_DTYPES == tuple(str(d).removeprefix("torch.") for d in cuda_backend.SUPPORTED_DTYPES)
    # the forward tile choice's model (bsconv_cuda.plan, shared with the Triton backend)
    assert (ext.TARGET_SMS, ext.BLOCKS_PER_SM, ext.FWD_MAX_MMA_RATIO) == (plan.TARGET_SMS, plan.BLOCKS_PER_SM,
                                                                          plan.FWD_MAX_DOT_RATIO)
    assert (ext.DEPTHWISE_COST_HALF, ext.DEPTHWISE_COST_TF32, ext.DEPTHWISE_COST_FMA) == tuple(
        plan.DEPTHWISE_COST[kind] for kind in ("tc", "tf32", "fma"))
    # the fused backward's limits
    assert (ext.FUSED_MAX_CIN, ext.FUSED_MAX_SMEM_BYTES, ext.L2_RESIDENT_BYTES) == (
        cuda_backend.FUSED_MAX_CIN, cuda_backend.FUSED_MAX_SMEM_BYTES, plan.L2_RESIDENT_BYTES)
    assert (ext.LAUNCH_L2_BYTES, ext.SPLIT_EXTRA_LAUNCHES) == (plan.LAUNCH_L2_BYTES, plan.SPLIT_EXTRA_LAUNCHES)


def test_the_fused_slot_of_a_layer_far_too_wide_stays_in_global_memory(ext):
    """The slot's shared-memory test counts in 64 bits: forced onto the fused path, 128 -> 2^22 channels needs a 2 GiB
    slot of grad_pw_weight partials, which wrapped negative in 32 bits and claimed to fit in shared memory (the launch
    would have asked for a negative size). The automatic path never picks fused there (one block)."""
    c_out = 1 << 22
    forced = ext.tile_plan(1, 128, c_out, 1, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "bfloat16", False, "fused")
    _, fused = cuda_backend.work_plan(1, 128, c_out, 1, 1, 1, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), torch.bfloat16,
                                      False, backward_path="fused")
    assert forced["fused_slot_in_smem"] is False and fused.blocks["slot_in_smem"] is False


def test_fused_backward_shared_memory_fits_every_targeted_gpu():
    """The fused backward's shared memory, worked out from FusedSmem in csrc (x and W tiles, grad_pre, pre, the grad_x
    accumulator, warp sums, pixel coordinates, 7 x 7 taps; each array on a 128-byte boundary), and the tiles it
    allows: fp32 at more than 112 input channels does not fit 64-pixel tiles in the 99 KB of sm_86 / sm_89."""
    # fp32, 128 channels, 64 rows: x 64 x 132 x 4, W 32 x 132 x 4, grad_pre 64 x 36 x 4, pre 64 x 36 x 4,
    # grad_x 64 x 132 x 4, warp sums 1024, pixels 3 x 64 x 4, taps 50 x 32 x 4
    assert cuda_backend._fused_smem_bytes(128, 64, 4) == 33792 + 16896 + 9216 + 9216 + 33792 + 1024 + 768 + 6400
    assert cuda_backend._fused_smem_bytes(128, 64, 2) == 82432 <= cuda_backend.FUSED_MAX_SMEM_BYTES
    assert cuda_backend._fused_smem_bytes(112, 64, 4) <= cuda_backend.FUSED_MAX_SMEM_BYTES
    for c_in, itemsize, rows in ((128, 4, 32), (113, 4, 32), (112, 4, 64), (128, 2, 64)):
        assert cuda_backend._fused_tiles(4, c_in, 64, 56, 56, 9, itemsize)[0] == rows, (c_in, itemsize)
    # The grad_pw_weight slot in shared memory as well, C_out padded to 32 rows of ld_gx = C_in + 4 floats: bf16
    # 64 -> 128 at 64 rows fits (52.5 KB + 34 KB), 128 -> 128 only at 16 rows (32 KB + 66 KB = 98 KB)
    assert (cuda_backend._fused_smem_bytes(64, 64, 2, c_out_slot=128)
            == cuda_backend._fused_smem_bytes(64, 64, 2) + 128 * 68 * 4)
    assert cuda_backend._fused_tiles(4, 64, 128, 56, 56, 9, 2)[::5] == (64, True)
    assert cuda_backend._fused_tiles(4, 128, 128, 56, 56, 9, 2)[::5] == (64, False)
    assert cuda_backend._fused_tiles(1, 128, 128, 16, 16, 9, 2)[::5] == (16, True)
    # Rounds of 16 output channels (bf16, C_in 32, 64 rows): x 64 x 40 x 2, W 16 x 40 x 2, grad_pre 64 x 24 x 2,
    # pre 64 x 16 x 4, grad_x 64 x 36 x 4, sums 1024, pixels 768, taps 50 x 16 x 4
    assert cuda_backend._fused_smem_bytes(32, 64, 2, cb=16) == 5120 + 1280 + 3072 + 4096 + 9216 + 1024 + 768 + 3200
    # 16 where it pads C_out less than 32: 24 -> 144 runs 9 rounds of 16, not 5 of 32
    assert cuda_backend._fused_tiles(64, 24, 144, 56, 56, 9, 2)[2::4] == (144, 16)
    assert [cuda_backend._fused_channel_block(c) for c in (1, 16, 17, 32, 48, 64, 144)] == [16, 16, 32, 32, 16, 32, 16]


# (n, c_in, h, w, (kh, kw), stride, padding, dilation): inside every limit, on each limit and one past it
_FEASIBILITY_CASES = [
    (2, 16, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 3, 7, 9, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 4, 64, 64, (7, 7), (1, 1), (9, 9, 9, 9), (3, 3)),  # footprint 19 x 19 = 361 fits
    (1, 4, 64, 64, (7, 7), (1, 1), (12, 12, 12, 12), (4, 4)),  # 25 x 25 does not
    (1, 4, 64, 64, (5, 3), (2, 3), (1, 2, 0, 3), (4, 9)),  # 17 x 19 = 323
    (1, 4, 64, 64, (5, 3), (2, 3), (1, 2, 0, 3), (5, 9)),  # 21 x 19 = 399
    (1, 4, 640, 640, (1, 7), (1, 1), (0, 0, 3, 3), (1, 64)),  # 1 x 385
    (1, 4, 640, 8, (3, 1), (1, 1), (0, 0, 0, 0), (64, 1)),  # 129 x 1, H_out = 512
    (1, 4, 64, 64, (3, 3), (64, 64), (1, 1, 1, 1), (1, 1)),
    (1, 4, 64, 64, (3, 3), (65, 1), (1, 1, 1, 1), (1, 1)),
    (1, 4, 64, 64, (3, 3), (1, 1), (1, 1, 1, 1), (65, 1)),
    (1, 4, 8, 8, (3, 3), (1, 1), (4096, 0, 0, 4096), (1, 1)),
    (1, 4, 8, 8, (3, 3), (1, 1), (0, 4097, 0, 0), (1, 1)),
    (1, 4, 8, 8, (3, 3), (1, 1), (0, 0, 0, 4097), (1, 1)),
    (1, 4, 5, 5, (7, 7), (1, 1), (0, 0, 0, 0), (1, 1)),  # output empty
    (65535, 4, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (65536, 4, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 4, 1 << 24, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # backward tiles: 2^24 / 64 > 65535
    (1, 4, 1, 1 << 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 4, 1, (1 << 24) + 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 4, 4096, 4096, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 256 x 128 forward tiles
    (1, 4, 1000, 1000, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 64 * 65535, 2, 2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 64 * 65535 + 1, 2, 2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # grad_x GEMM grid
    (0, 4, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
]


# Layers whose tile choice the batch, the channel counts and TF32 move (the shapes of the benchmark table and a few
# odd ones)
_TILE_CHOICE_CASES = [
    (1, 128, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (64, 128, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 1024, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 16, 112, 112, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 40, 28, 28, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),
    (3, 24, 13, 29, (7, 3), (2, 1), (3, 2, 1, 0), (1, 2)),
    (1, 16, 4, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 32, 28, 28, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1)),  # fp32: TF32 or not changes the tile
    (1, 120, 112, 112, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # fused backward: fp32 tiles of 32 pixels, 16-bit 64
    (2, 8, 56, 56, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 1024, 4, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 16 pixels: the grad_x GEMM runs transposed
    (2, 64, 3, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 30 pixels: so does this one
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_python_feasibility_check_agrees_with_the_compiled_one(ext, dtype):
    """cuda_backend.shape_reason restates supported_reason of csrc (Python must decide while torch.compile traces);
    the compiled check, exported as _C.unsupported_reason, is the truth it is compared with."""
    name = str(dtype).removeprefix("torch.")
    for n, c_in, h, w, kernel_size, stride, padding, dilation in _FEASIBILITY_CASES:
        compiled = ext.unsupported_reason(n, c_in, 8, h, w, *kernel_size, stride, padding, dilation, name)
        python = cuda_backend.shape_reason(n, c_in, h, w, kernel_size, stride, padding, dilation, dtype)
        case = (n, c_in, h, w, kernel_size, stride, padding, dilation, name)
        assert (python is None) == (compiled is None), (case, python, compiled)
    assert ext.unsupported_reason(1, 4, 8, 8, 8, 8, 8, (1, 1), (0, 0, 0, 0), (1, 1), "float16") is not None
    with pytest.raises(TypeError):
        ext.unsupported_reason(1, 4, 8, 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), "float16")  # padding needs 4 entries


def test_work_plan_model_matches_the_compiled_tile_plan(ext):
    """cuda_backend.work_plan models the tile plan of csrc (kernel_report accounts work where _C cannot load);
    _C.tile_plan is what the launches use. The backward's path as the model chooses it and both forced paths."""
    checked, transposed, paths = 0, 0, {"fused": 0, "split": 0}
    for n, c_in, h, w, kernel_size, stride, padding, dilation in _FEASIBILITY_CASES + _TILE_CHOICE_CASES:
        for c_out, dtype, tf32 in ((8, torch.float16, False), (64, torch.float32, True),
                                   (64, torch.float32, False), (1000, torch.bfloat16, False)):
            name = str(dtype).removeprefix("torch.")
            args = (n, c_in, c_out, h, w, *kernel_size, stride, padding, dilation, name)
            if ext.unsupported_reason(*args) is not None or n * c_in * h * w > 1 << 26:
                continue
            tiles = ext.tile_plan(*args, tf32)
            h_out, w_out = reference.output_size(h, w, kernel_size, stride, padding, dilation)
            conv = (n, c_in, c_out, h, w, h_out, w_out, kernel_size, stride, padding, dilation, dtype, tf32)
            fwd, bwd = cuda_backend.work_plan(*conv)
            _, split = cuda_backend.work_plan(*conv, backward_path="split")
            launches = {launch.kernel: launch for launch in fwd.launches + split.launches}
            fwd_blocks = (fwd.blocks["TH"], fwd.blocks["TW"], fwd.blocks["CB"])
            assert fwd_blocks == (*tiles["fwd_tile"][:2], tiles["fwd_cb"]), (args, tf32)
            assert launches["fwd_kernel"].grid[1] == tiles["fwd_tiles"], args
            assert (split.blocks["TH"], split.blocks["TW"]) == tiles["bwd_tile"], args
            assert launches["bwd_tile_kernel"].grid[1] == tiles["bwd_tiles"], args
            assert (split.params["splits"], split.params["kchunk"]) == (tiles["splits"], tiles["kchunk"]), args
            assert split.blocks["GEMM_N"] == tiles["gemm_block_n"], args
            assert split.blocks["grad_x_transposed"] == tiles["grad_x_transposed"], args
            transposed += tiles["grad_x_transposed"]
            assert launches["colsum_kernel"].grid[1] == tiles["col_blocks"], args
            assert bwd.path == tiles["bwd_path"], args
            paths[bwd.path] += 1
            if c_in <= cuda_backend.FUSED_MAX_CIN:
                _, fused = cuda_backend.work_plan(*conv, backward_path="fused")
                forced = ext.tile_plan(*args, tf32, "fused")
                assert forced["bwd_path"] == "fused" and ext.tile_plan(*args, tf32, "split")["bwd_path"] == "split"
                assert ((fused.blocks["rows"], fused.params["tiles"], fused.params["blocks"],
                         fused.blocks["slot_in_smem"], fused.blocks["CB"])
                        == (forced["fused_rows"], forced["fused_tiles"], forced["fused_blocks"],
                            forced["fused_slot_in_smem"], forced["fused_cb"])), args
                assert fused.launches[0].grid == (forced["fused_blocks"],)
            else:
                with pytest.raises(ValueError, match="FUSED_MAX_CIN"):
                    ext.tile_plan(*args, tf32, "fused")
            checked += 1
    assert checked >= 60  # the supported cases of both grids (68), in four dtype / TF32 settings and widths
    assert min(paths.values()) >= 10, paths  # the model takes both paths on these layers
    assert transposed >= 4  # and both orientations of the grad_x GEMM
    with pytest.raises(ValueError, match="footprint|shared memory"):
        ext.tile_plan(1, 4, 8, 64, 64, 7, 7, (1, 1), (12, 12, 12, 12), (4, 4), "float16")
    with pytest.raises(ValueError, match="backward_path"):
        ext.tile_plan(1, 4, 8, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "float16", False, "fast")


def test_python_restatement_agrees_on_random_calls(ext):
    """A seeded sweep over batch, channel counts, map sizes, kernels, strides, dilations, paddings, dtypes and TF32
    (the regimes the grids above miss: many waves, more than 65535 tiles, maps of 2^20): cuda_backend's verdict and
    tile plan equal the compiled ones."""
    rng = random.Random(1)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    supported = fused_paths = 0
    channel_blocks = {16: 0, 32: 0}
    fused_channel_blocks = {16: 0, 32: 0}
    slots_in_smem = 0
    for _ in range(4000):
        n = rng.choice([1, 1, 2, 3, 8, 32, 64, 128, 1000, 65535])
        c_in = rng.choice([1, 3, 16, 31, 32, 33, 64, 100, 112, 113, 128, 129, 1024])
        c_out = rng.choice([1, 8, 32, 33, 64, 200, 1000, 4096])
        h, w = (rng.choice([1, 2, 4, 7, 13, 28, 31, 33, 37, 56, 112, 224, 1000, 5000, 70000, 1 << 20])
                for _ in range(2))
        kernel_size = (rng.randint(1, 7), rng.randint(1, 7))
        stride = (rng.choice([1, 1, 2, 3, 64]), rng.choice([1, 1, 2, 5]))
        dilation = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 4]))
        padding = tuple(rng.choice([0, 1, 2, 3, 9]) for _ in range(4))
        dtype, tf32 = rng.choice(dtypes), rng.random() < 0.5
        args = (n, c_in, c_out, h, w, *kernel_size, stride, padding, dilation, str(dtype).removeprefix("torch."))
        compiled = ext.unsupported_reason(*args)
        python = cuda_backend.shape_reason(n, c_in, h, w, kernel_size, stride, padding, dilation, dtype)
        assert (python is None) == (compiled is None), (args, python, compiled)
        if compiled is not None:
            continue
        tiles = ext.tile_plan(*args, tf32)
        h_out, w_out = reference.output_size(h, w, kernel_size, stride, padding, dilation)
        fwd = cuda_backend._fwd_tile(n, c_in, c_out, h, w, h_out, w_out, *kernel_size, stride, dilation, dtype, tf32)
        assert fwd == (*tiles["fwd_tile"], tiles["fwd_tiles"], tiles["fwd_cb"]), (args, tf32)
        channel_blocks[tiles["fwd_cb"]] += 1
        assert cuda_backend._bwd_tile(h, w) == (*tiles["bwd_tile"], tiles["bwd_tiles"]), args
        assert cuda_backend._gemm_block_n(c_in) == tiles["gemm_block_n"], args
        assert cuda_backend._grad_x_transposed(n * h * w, c_in) == tiles["grad_x_transposed"], args
        fused = cuda_backend._fused_tiles(n, c_in, c_out, h, w, kernel_size[0] * kernel_size[1], dtype.itemsize)
        if fused is not None:
            compiled_fused = (tiles["fused_rows"], tiles["fused_tiles"], tiles["fused_blocks"],
                              tiles["fused_slot_in_smem"], tiles["fused_cb"])
            assert (fused[0], *fused[3:]) == compiled_fused, args
            slots_in_smem += fused[5]
            fused_channel_blocks[fused[6]] += 1
        supported += 1
        if max(h, w) <= 5000:  # (work_plan's halo count walks the tile rows and columns)
            _, bwd = cuda_backend.work_plan(n, c_in, c_out, h, w, h_out, w_out, kernel_size, stride, padding,
                                            dilation, dtype, tf32)
            assert bwd.path == tiles["bwd_path"], (args, tf32)
            fused_paths += bwd.path == "fused"
    assert (supported >= 1500 and fused_paths >= 100 and min(channel_blocks.values()) >= 100 and slots_in_smem >= 100
            and min(fused_channel_blocks.values()) >= 100), (
        supported, fused_paths, channel_blocks, slots_in_smem, fused_channel_blocks)


# ------------------------------------------------------------------------------------------------ GPU checks
def _inputs(n, c_in, c_out, h, w, k, dtype, pw_bias, dw_bias, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = rand(n, c_in, h, w)
    pw = rand(c_out, c_in, scale=3.0 / math.sqrt(c_in))
    dw = rand(c_out, 1, *k, scale=1.0 / math.sqrt(k[0] * k[1]))
    pb = rand(c_out) if pw_bias else None
    db = rand(c_out) if dw_bias else None
    x = x.cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, pw.cuda(), pb if pb is None else pb.cuda(), dw.cuda(), db if db is None else db.cuda()


# (n, c_in, c_out, h, w, k, stride, padding [t, b, l, r], dilation, act, dtype, channels_last, pw_bias, dw_bias)
GPU_CASES = [
    (2, 32, 64, 56, 56, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "relu6", torch.bfloat16, True, True, True),
    (2, 24, 144, 28, 28, (3, 3), [2, 2], [1, 1, 1, 1], [1, 1], "hardswish", torch.float16, False, True, True),
    (2, 16, 40, 20, 20, (5, 5), [1, 1], [2, 2, 2, 2], [1, 1], "silu", torch.float32, True, False, True),
    (1, 3, 32, 33, 31, (7, 7), [2, 2], [3, 3, 3, 3], [1, 1], "none", torch.float32, False, True, False),
    (2, 70, 33, 19, 23, (3, 5), [1, 1], [1, 2, 0, 3], [2, 1], "relu", torch.bfloat16, True, True, True),
    (4, 64, 64, 17, 19, (1, 1), [1, 1], [0, 0, 0, 0], [1, 1], "none", torch.float16, True, True, True),
    (1, 8, 16, 40, 40, (7, 7), [1, 1], [9, 9, 9, 9], [3, 3], "relu", torch.bfloat16, True, False, False),
    (2, 130, 96, 15, 15, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "hardswish", torch.float32, False, True, True),
    (8, 32, 64, 64, 64, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "none", torch.bfloat16, True, True, True),
    (3, 12, 20, 7, 7, (4, 2), [1, 2], [1, 2, 0, 1], [1, 1], "silu", torch.float16, False, True, True),
    (2, 40, 72, 9, 130, (5, 5), [2, 1], [2, 2, 2, 2], [1, 2], "relu6", torch.float32, True, True, False),
    # fused backward: 89 blocks (the L2 budget of 276 KB slots) over 128 tiles of 16 pixels, so that blocks add
    # later tiles into their slots; C_in = 128, its largest
    (2, 128, 512, 32, 32, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "silu", torch.bfloat16, True, True, True),
    # 144 tiles of 64 pixels; C_in = 100: padded to 112, x staged element by element (not a multiple of 8)
    (4, 100, 24, 48, 48, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "relu", torch.bfloat16, False, True, True),
    # fp32 (FMA) at 128 channels: tiles of 32 pixels (64 exceed sm_86's shared memory), 384 tiles on 264 blocks
    (3, 128, 64, 64, 64, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "hardswish", torch.float32, True, True, True),
    # 16 and 30 pixels: the split path's grad_x GEMM runs transposed (tensor cores; FMA, NCHW)
    (1, 256, 72, 4, 4, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "relu", torch.bfloat16, True, True, True),
    (2, 96, 40, 3, 5, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "silu", torch.float32, False, True, True),
    # a forward on tensor cores with 32-channel blocks (the small batches above take 16)
    (4, 32, 256, 56, 56, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], "relu6", torch.bfloat16, True, True, True),
]
# The backward's paths each case runs (the fused one takes at most FUSED_MAX_CIN input channels)
GPU_PATH_CASES = [(case, path) for case in GPU_CASES for path in ("fused", "split")
                  if path == "split" or case[1] <= cuda_backend.FUSED_MAX_CIN]


def test_gpu_cases_run_every_kernel_variant():
    """The GPU cases (checked against the reference on a GPU) run each variant the tile plans choose between: the
    forward's 16- and 32-channel blocks on tensor cores and 32 on FMA, the grad_x GEMM of the split path in both
    orientations, the fused path's grad_pw_weight slot in shared and in global memory, on tensor cores and FMA, and
    its rounds of 16 and 32 output channels on tensor cores and FMA."""
    seen = set()
    for n, c_in, c_out, h, w, k, stride, padding, dilation, act, dtype, cl, pb, db in GPU_CASES:
        h_out, w_out = reference.output_size(h, w, k, stride, padding, dilation)
        conv = (n, c_in, c_out, h, w, h_out, w_out, k, stride, padding, dilation, dtype, False)  # fp32: no TF32
        fwd, split = cuda_backend.work_plan(*conv, backward_path="split")
        tensor_cores = dtype != torch.float32
        seen |= {("forward", tensor_cores, fwd.blocks["CB"]), ("grad_x", split.blocks["grad_x_transposed"])}
        if c_in <= cuda_backend.FUSED_MAX_CIN:
            fused = cuda_backend.work_plan(*conv, backward_path="fused")[1]
            seen |= {("slot in smem", tensor_cores, fused.blocks["slot_in_smem"]),
                     ("fused rounds", tensor_cores, fused.blocks["CB"])}
    assert seen >= {("forward", True, 16), ("forward", True, 32), ("forward", False, 32), ("grad_x", False),
                    ("grad_x", True), *(("slot in smem", tc, smem) for tc in (True, False) for smem in (True, False)),
                    *(("fused rounds", tc, cb) for tc in (True, False) for cb in (16, 32))}, seen
    # the TF32 test's layer takes the 16-channel block on TF32
    fwd, _ = cuda_backend.work_plan(2, 64, 96, 20, 20, 20, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), torch.float32,
                                    True)
    assert fwd.blocks["CB"] == 16


def _case_id(case):
    n, ci, co, h, w, k, s, p, d, act, dt, cl, pb, db = case
    return f"{n}x{ci}x{h}x{w}-co{co}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-d{d[0]}{d[1]}-{act}-{str(dt)[6:]}-{'cl' if cl else 'nchw'}"


@pytest.mark.cuda
@pytest.mark.parametrize("case,path", GPU_PATH_CASES, ids=[f"{_case_id(c)}-{p}" for c, p in GPU_PATH_CASES])
def test_gpu_matches_reference(ext, case, path):
    n, c_in, c_out, h, w, k, stride, padding, dilation, act, dtype, cl, pb, db = case
    x, pw, pwb, dw, dwb = _inputs(n, c_in, c_out, h, w, k, dtype, pb, db, cl)
    assert cuda_backend.unsupported_reason(x, dw.shape[2:], stride, padding, dilation) is None
    args = (stride, padding, dilation, act)
    with poisoned_outputs(x.device):
        y = torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, *args)
    torch.cuda.synchronize()
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    with poisoned_outputs(x.device):
        grads = torch.ops.bsconv_cuda.cuda_backward(grad_y.cuda(), x, pw, pwb, dw, dwb, *args, backward_path=path)
    torch.cuda.synchronize()

    d64 = [None if t is None else t.detach().cpu().double() for t in (x, pw, pwb, dw, dwb)]
    y_ref = reference.forward(*d64, *args)
    g_ref = reference.backward(grad_y.double(), *d64, *args)
    strict = dtype == torch.float32
    fmt = reference.output_memory_format(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert_close("y", y, y_ref, strict)
    names = ["grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    assert grads[0].is_contiguous(memory_format=fmt)
    for name, g, r in zip(names, grads, g_ref):
        assert g.dtype == dtype, name
        assert_close(name, g, r, strict)


# TF32 layers that run the variants the bf16 / fp16 cases run on tensor cores, in TF32: 16 pixels (the transposed
# grad_x GEMM) and a 3 x 2 kernel (the run-time kernel size) on 16-channel forward blocks; both run the fused
# backward in rounds of 16 output channels (40 = 48 - 8). SiLU, no kink: TF32's
# operand rounding would move relu's kinks (tests/fused_checks.py)
TF32_CASES = [(1, 64, 40, 4, 4, (3, 3), [1, 1, 1, 1]), (2, 24, 40, 9, 11, (3, 2), [1, 1, 1, 0])]


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("case", TF32_CASES)
def test_gpu_tf32_kernel_variants_match_reference(ext, case, path):
    n, c_in, c_out, h, w, k, padding = case
    x, pw, pwb, dw, dwb = _inputs(n, c_in, c_out, h, w, k, torch.float32, True, True, True)
    args = ([1, 1], padding, [1, 1], "silu")
    with poisoned_outputs(x.device):
        y = torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, *args, True)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with poisoned_outputs(x.device):
        grads = torch.ops.bsconv_cuda.cuda_backward(grad_y.float().cuda(), x, pw, pwb, dw, dwb, *args,
                                                    allow_tf32=True, backward_path=path)
    torch.cuda.synchronize()
    d64 = [t.detach().cpu().double() for t in (x, pw, pwb, dw, dwb)]
    refs = [reference.forward(*d64, *args), *reference.backward(grad_y, *d64, *args)]
    names = ["y", "grad_x", "grad_pw_weight", "grad_pw_bias", "grad_dw_weight", "grad_dw_bias"]
    for name, out, ref in zip(names, [y, *grads], refs):
        assert_close(name, out, ref, strict=False)  # TF32's bounds (float32 results of TF32 dots)


def test_tf32_cases_run_the_tf32_variants():
    """The layers of test_gpu_tf32_kernel_variants_match_reference take the variants it names."""
    plans = []
    for n, c_in, c_out, h, w, k, padding in TF32_CASES:
        h_out, w_out = reference.output_size(h, w, k, (1, 1), padding, (1, 1))
        plans.append(cuda_backend.work_plan(n, c_in, c_out, h, w, h_out, w_out, k, (1, 1), padding, (1, 1),
                                            torch.float32, True, backward_path="split"))
        fused = cuda_backend.work_plan(n, c_in, c_out, h, w, h_out, w_out, k, (1, 1), padding, (1, 1),
                                       torch.float32, True, backward_path="fused")[1]
        assert fused.blocks["CB"] == 16, fused.blocks
    assert plans[0][1].blocks["grad_x_transposed"]
    assert plans[1][0].blocks["CB"] == 16 and TF32_CASES[1][5][0] != TF32_CASES[1][5][1]  # K = 0: run-time size


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "split"])
def test_gpu_fp32_follows_the_tf32_switch(ext, path):
    """fp32 runs on TF32 tensor cores exactly when asked (allow_tf32), and bsconv_u asks exactly when torch allows
    TF32 for fp32 convolutions, as the Triton backend and cuDNN do."""
    x, pw, pwb, dw, dwb = _inputs(2, 64, 96, 20, 20, (3, 3), torch.float32, True, True, True)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "none")
    grad_y = torch.randn(2, 96, 20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d64 = [t.detach().cpu().double() for t in (x, pw, pwb, dw, dwb)]
    refs = [reference.forward(*d64, *args), *reference.backward(grad_y, *d64, *args)[:2]]  # y, grad_x, grad_pw

    def run(allow_tf32):
        y = torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, *args, allow_tf32)
        grads = torch.ops.bsconv_cuda.cuda_backward(grad_y.float().cuda(), x, pw, pwb, dw, dwb, *args,
                                                    allow_tf32=allow_tf32, backward_path=path)
        return [y, *grads[:2]]

    def rel_errors(outs):
        return [((o.cpu().double() - r).norm() / r.norm()).item() for o, r in zip(outs, refs)]

    exact, tf32 = run(False), run(True)
    assert max(rel_errors(exact)) < 1e-5, rel_errors(exact)
    # TF32 keeps 10 mantissa bits: about 1e-4 relative error on these K = 64 / 96 / 800 dots
    assert all(2e-5 < e < 1e-2 for e in rel_errors(tf32)), rel_errors(tf32)
    saved = torch.backends.cudnn.allow_tf32
    try:
        for allow, expected in ((True, tf32), (False, exact)):
            torch.backends.cudnn.allow_tf32 = allow
            assert backends.fp32_uses_tf32() == allow
            y = bsconv_cuda.bsconv_u(x, pw, dw, dwb, padding=1, pw_bias=pwb, backend="cuda")
            assert torch.equal(y, expected[0])
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_is_bitwise_deterministic(ext, dtype, path):
    # fused: 512 tiles of 64 pixels on 264 blocks, so that slots add later tiles
    x, pw, pwb, dw, dwb = _inputs(8, 32, 48, 64, 64, (3, 3), dtype, True, True, True)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "silu")
    grad_y = torch.randn(8, 48, 64, 64, device="cuda").to(dtype)
    first = torch.ops.bsconv_cuda.cuda_backward(grad_y, x, pw, pwb, dw, dwb, *args, backward_path=path)
    for _ in range(3):
        again = torch.ops.bsconv_cuda.cuda_backward(grad_y, x, pw, pwb, dw, dwb, *args, backward_path=path)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_gpu_noncontiguous_inputs_and_side_stream(ext):
    x, pw, pwb, dw, dwb = _inputs(2, 16, 32, 24, 24, (3, 3), torch.float32, True, True, False)
    x_view = torch.cat([x, x], dim=3)[..., ::2]  # any strides
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "relu")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        y = torch.ops.bsconv_cuda.cuda_forward(x_view, pw, pwb, dw, dwb, *args)
        grad_y = torch.randn(y.shape[0], y.shape[2], y.shape[3], y.shape[1], device="cuda").permute(0, 3, 1, 2)
        grads = torch.ops.bsconv_cuda.cuda_backward(grad_y, x_view, pw, pwb, dw, dwb, *args)
    stream.synchronize()
    d64 = [None if t is None else t.detach().cpu().double() for t in (x_view, pw, pwb, dw, dwb)]
    assert_close("y", y, reference.forward(*d64, *args), True)
    for g, r in zip(grads, reference.backward(grad_y.double().cpu(), *d64, *args)):
        assert_close("grad", g, r, True)


@pytest.mark.cuda
def test_gpu_unsupported_shape_is_reported_and_raises(ext):
    x, pw, pwb, dw, dwb = _inputs(1, 4, 8, 64, 64, (7, 7), torch.float16, False, False, False)
    args = ([1, 1], [12, 12, 12, 12], [4, 4], "none")  # footprint 25 x 25 > 384
    reason = cuda_backend.unsupported_reason(x, dw.shape[2:], *args[:3])
    assert reason is not None and "dilated kernel covers" in reason
    with pytest.raises(RuntimeError, match="dilated kernel covers"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, *args)


@pytest.mark.cuda
def test_gpu_op_takes_both_hardswish_conventions(ext):
    """The op's hardswish is torch 2.11's at -3 and 3 (gradients 0 and 1), hardswish_closed_band torch 2.7's (-0.5
    and 1.5); reference.kernel_activation passes the installed torch's. x = pre through an identity 1 x 1 weight
    and a 1 x 1 depthwise weight of 1: grad_x is the activation's derivative."""
    pre_at_kinks = torch.tensor([-3.0, 3.0], device="cuda").view(1, 2, 1, 1)
    identity, ones = torch.eye(2, device="cuda"), torch.ones(2, 1, 1, 1, device="cuda")
    grads = [torch.ops.bsconv_cuda.cuda_backward(torch.ones_like(pre_at_kinks), pre_at_kinks, identity, None, ones,
                                                 None, [1, 1], [0, 0, 0, 0], [1, 1], act)[0].flatten().tolist()
             for act in ("hardswish", "hardswish_closed_band")]
    assert grads == [[0.0, 1.0], [-0.5, 1.5]]


@pytest.mark.cuda
def test_gpu_bad_arguments_raise_clear_errors(ext):
    x, pw, pwb, dw, dwb = _inputs(1, 4, 8, 8, 8, (3, 3), torch.float32, True, True, False)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "none")
    with pytest.raises(RuntimeError, match="pw_weight"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw[:, :3].contiguous(), pwb, dw, dwb, *args)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw.half(), pwb, dw, dwb, *args)
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, *args[:3], "gelu")
    with pytest.raises(RuntimeError, match="stride"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw, pwb, dw, dwb, [0, 1], *args[1:])
    grad_y = torch.ones(1, 8, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="backward_path must be one of auto, fused, split; got 'fast'"):
        torch.ops.bsconv_cuda.cuda_backward(grad_y, x, pw, pwb, dw, dwb, *args, backward_path="fast")
    wide = _inputs(1, cuda_backend.FUSED_MAX_CIN + 1, 8, 8, 8, (3, 3), torch.float32, True, True, False)
    with pytest.raises(RuntimeError, match=r"backward_path='fused'.*FUSED_MAX_CIN = 128 \(got C_in = 129\)"):
        torch.ops.bsconv_cuda.cuda_backward(grad_y, *wide, *args, backward_path="fused")
    with cuda_backend.force_backward_path("fused"), pytest.raises(RuntimeError, match="FUSED_MAX_CIN"):
        bsconv_cuda.bsconv_u(wide[0].requires_grad_(), *wide[1:2], *wide[3:], padding=1, pw_bias=wide[2],
                             backend="cuda").sum().backward()


@pytest.mark.cuda
def test_gpu_opcheck(ext):

    x, pw, pwb, dw, dwb = _inputs(2, 8, 16, 10, 12, (3, 3), torch.float32, True, True, True)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "hardswish")
    torch.library.opcheck(torch.ops.bsconv_cuda.cuda_forward.default, (x, pw, pwb, dw, dwb, *args))
    grad_y = torch.randn(2, 16, 10, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.bsconv_cuda.cuda_backward.default, (grad_y, x, pw, pwb, dw, dwb, *args))


@pytest.mark.cuda
def test_gpu_autograd_works_through_bsconv_u(ext):
    x, pw, pwb, dw, dwb = _inputs(2, 16, 32, 14, 14, (3, 3), torch.bfloat16, True, True, True)
    leaves = [t.requires_grad_() for t in (x, pw, dw, pwb, dwb)]
    assert select_backend("cuda", x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)) == "cuda"
    y = bsconv_cuda.bsconv_u(leaves[0], leaves[1], leaves[2], leaves[4], stride=1, padding=1,
                             pw_bias=leaves[3], mid_activation="relu", backend="cuda")
    y.float().square().sum().backward()
    assert all(t.grad is not None and not t.grad.isnan().any() for t in leaves)
    assert "cuda" in bsconv_cuda.available_backends("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(0, 5), (5, 0)])
def test_gpu_empty_spatial_size_is_rejected_like_conv2d(ext, spatial):
    # padding 2 makes y non-empty; the op used to return uninitialised memory as y and 0 as grad_dw_bias
    x = torch.randn(1, 3, *spatial, device="cuda")
    pw, pb, dw, db = (torch.randn(*s, device="cuda") for s in ((4, 3), (4,), (4, 1, 3, 3), (4,)))
    with pytest.raises(RuntimeError):
        torch.nn.functional.conv2d(x, pw[:, :, None, None], padding=2)
    args = ([1, 1], [2, 2, 2, 2], [1, 1], "none")
    with pytest.raises(RuntimeError, match=r"bsconv_cuda::cuda_forward: x: input of spatial size .* is empty"):
        torch.ops.bsconv_cuda.cuda_forward(x, pw, pb, dw, db, *args)
    grad_y = torch.randn(1, 4, *(s + 2 for s in spatial), device="cuda")
    with pytest.raises(RuntimeError, match=r"bsconv_cuda::cuda_backward: x: input of spatial size .* is empty"):
        torch.ops.bsconv_cuda.cuda_backward(grad_y, x, pw, pb, dw, db, *args)


@pytest.mark.cuda
def test_gpu_threads_with_different_shared_memory_sizes(ext):
    """Two host threads run the same forward kernel (3x3, bf16) with tiles that need different dynamic shared memory,
    both above the 48 KB default: 32 x 8 x 256 outputs take 8x32 tiles (52096 B), 16 x 64 x 64 outputs 16x16 tiles
    (49792 B) (batches that fill the GPU get the largest tiles). When the limit was set per launch, one thread could
    lower it between the other's raise and launch, which then failed. A race: this can only catch it by chance, in
    many rounds (the ops release the GIL)."""
    shapes = [(32, 32, 8, 256), (16, 32, 64, 64)]
    tiles = [ext.tile_plan(n, c_in, 64, h, w, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "bfloat16")["fwd_tile"][:2]
             for n, c_in, h, w in shapes]
    assert tiles == [(8, 32), (16, 16)]
    calls = []
    for n, c_in, h, w in shapes:
        x, pw, pwb, dw, dwb = _inputs(n, c_in, 64, h, w, (3, 3), torch.bfloat16, True, True, True)
        calls.append((x, pw, pwb, dw, dwb, [1, 1], [1, 1, 1, 1], [1, 1], "relu"))
    expected = [torch.ops.bsconv_cuda.cuda_forward(*args) for args in calls]
    errors = []

    def run(args, want):
        try:
            for _ in range(300):
                assert torch.equal(torch.ops.bsconv_cuda.cuda_forward(*args), want)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(calls, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors


def _cudart():
    """The CUDA runtime library loaded in this process (the one bsconv_cuda._C calls)."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    if len(paths) != 1:
        pytest.skip(f"expected one CUDA runtime library loaded in this process, found {paths}")
    return ctypes.CDLL(paths[0])


@pytest.mark.cuda
def test_gpu_error_left_by_earlier_work_is_not_reported_as_this_ops(ext):
    x, pw, pwb, dw, dwb = _inputs(2, 16, 32, 12, 12, (3, 3), torch.float32, True, True, True)
    args = (x, pw, pwb, dw, dwb, [1, 1], [1, 1, 1, 1], [1, 1], "relu")
    grad_y = torch.randn(2, 32, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    y_expected = torch.ops.bsconv_cuda.cuda_forward(*args)
    grads_expected = torch.ops.bsconv_cuda.cuda_backward(grad_y, *args)
    torch.cuda.synchronize()
    cudart = _cudart()

    def leave_pending_error() -> None:
        # a failed runtime call that nobody checks stays the thread's last error: here, an attribute of no device
        value = ctypes.c_int()
        code = cudart.cudaDeviceGetAttribute(ctypes.byref(value), 1, 1 << 20)
        assert code != 0 and cudart.cudaPeekAtLastError() == code, "could not leave a pending CUDA error"

    pending = r"already pending before this op launched anything .*not raised by this op.*: invalid device ordinal"
    leave_pending_error()
    with pytest.raises(RuntimeError, match=rf"bsconv_cuda::cuda_forward: a CUDA error was {pending}"):
        torch.ops.bsconv_cuda.cuda_forward(*args)
    assert torch.equal(torch.ops.bsconv_cuda.cuda_forward(*args), y_expected)  # reported once, then cleared
    leave_pending_error()
    with pytest.raises(RuntimeError, match=rf"bsconv_cuda::cuda_backward: a CUDA error was {pending}"):
        torch.ops.bsconv_cuda.cuda_backward(grad_y, *args)
    for got, want in zip(torch.ops.bsconv_cuda.cuda_backward(grad_y, *args), grads_expected):
        assert torch.equal(got, want)
