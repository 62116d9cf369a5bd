"""Launch plans: what the fused kernels launch for one call, and the work and memory traffic that implies.

Both backends describe their launches with these records (the Triton launchers run from them; for the CUDA
backend, :func:`bsconv_cuda.cuda_backend.work_plan` mirrors the tile choices of ``csrc/bsconv_kernels.cu``), so
``benchmarks/kernel_report.py`` can account the work of every shape without a GPU.
"""

from __future__ import annotations

import dataclasses
import math


# The GPU the plans are sized for and the forward tile choice's cost model, for both backends (the CUDA kernels
# keep the same constants in csrc/bsconv_params.h, exported by _C; tests/test_cuda_extension.py compares them).
# Constants, never read from the device: a call's plan is the same on every GPU.
TARGET_SMS = 132  # H100 / H200 SXM
BLOCKS_PER_SM = 2  # resident forward programs per SM that the model assumes
FWD_MAX_DOT_RATIO = 3.0  # forward dot multiply-adds over the pointwise stage's, where a tile allows it
# Tensor-core multiply-adds per depthwise FMA in the forward tile cost (H100 peak rates: bf16 / fp16 dense
# 495 T MAC/s, TF32 247 T, fp32 FMA 33.5 T; an FMA dot: 1), by dot kind. Model weights, not measurements.
DEPTHWISE_COST = {"tc": 16, "tf32": 8, "fma": 1}

# A transient buffer up to half of the 50 MB L2 of an H100 / H200 is modeled to stay in L2 (the other half holds
# the tensors streaming through); the Triton backward bounds its weight-gradient partials by it.
L2_RESIDENT_BYTES = 24 << 20

# What one more dependent kernel launch is modeled to cost, as bytes of L2 traffic: about 2 us between small
# dependent kernels at about 8 TB/s of L2 bandwidth. The backward's split path runs SPLIT_EXTRA_LAUNCHES more than its
# fused path (the grad_x and grad_pw GEMMs after the grad_pre kernel), which weighs most at batch 1 and 2, where the
# two paths' bytes differ by a few MB. A model weight, not a measurement: scripts/gpu_check.sh times both paths.
LAUNCH_L2_BYTES = 16 << 20
SPLIT_EXTRA_LAUNCHES = 2


def dram_bytes(buffer_bytes: int, passes: int) -> int:
    """DRAM traffic of a transient buffer moved ``passes`` times (written once, read back passes - 1 times)."""
    return buffer_bytes * passes if buffer_bytes > L2_RESIDENT_BYTES else 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid and the multiply-adds of every matrix (tl.dot / MMA / FMA-GEMM) step its programs
    run, M * N * K summed with the padding of the blocks included."""

    kernel: str
    grid: tuple[int, ...]
    dot_macs: int
    finest: int = 0  # programs at the kernel's smallest blocks for this call (0: no finer split exists)
    # CUDA: the compiled kernel instance, named as benchmarks/kernel_report names it ("fwd_kernel<bf16, 3, 32>"), and
    # the dynamic shared memory of this launch: with the instance's registers, the CTAs that fit on an SM
    image: str = ""
    smem_bytes: int = 0

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def max_programs(self) -> int:
        return max(self.finest, self.programs)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The launches of one pass (forward or backward) of one call.

    Memory traffic beyond ``Shape.byte_floor`` (every tensor once), modeled: ``extra_traffic_bytes`` counts every
    byte that goes through L2 or DRAM beyond the floor: the x halo that neighbouring tiles read twice (programs of
    the channel blocks of one tile run next to each other and share their x tile); weight-gradient partials
    (read-modified-written per tile by a program that owns a slot, written once by a GEMM split, and read back by
    the reduction); a grad_pre buffer written once and read by each GEMM that consumes it; x read again by a
    grad_pw GEMM; mid staged per work item and read back per tap. ``extra_hbm_bytes`` is the part of it that
    reaches DRAM: the halo re-reads, and the transient buffers larger than :data:`L2_RESIDENT_BYTES` (smaller ones
    are written and read back in L2).
    """

    path: str  # which variant runs, e.g. the Triton forward's depthwise stage or the backward's fused / split path
    blocks: dict  # block sizes and launch options of the main kernel
    launches: tuple[Launch, ...]
    params: dict  # runtime scalars a launcher passes (tile counts, program counts, ...)
    extra_traffic_bytes: int
    extra_hbm_bytes: int
    partial_bytes: int = 0  # fp32 weight-gradient partials
    scratch_bytes: int = 0  # transient buffers: a grad_pre of mid's size, staging slots of mid

    @property
    def dot_macs(self) -> int:
        return sum(launch.dot_macs for launch in self.launches)


def halo_extent(tile: int, stride: int, kernel: int, dilation: int) -> int:
    """Input rows (or columns) that ``tile`` output rows (columns) of a depthwise stage read: the tile and its halo
    (both backends' forward tiles; csrc/bsconv_kernels.cu has the same formula in choose_fwd_tile)."""
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def halo_read_factor(h, w, h_out, w_out, tile, stride, pad_top_left, halo) -> float:
    """Input pixels that the halos of all output tiles cover inside the image, over H * W (1 when no two tiles
    read the same pixel). tile: (TH, TW); stride; pad_top_left: (top, left); halo: the input rows and columns of
    one tile, (IH, IW)."""

    def covered(size, out_size, t, s, pad, extent):
        total = 0
        for t0 in range(0, out_size, t):
            lo = t0 * s - pad
            total += max(0, min(lo + extent, size) - max(lo, 0))
        return total

    return (covered(h, h_out, tile[0], stride[0], pad_top_left[0], halo[0]) *
            covered(w, w_out, tile[1], stride[1], pad_top_left[1], halo[1])) / (h * w)


def prefer_fused_backward(fused: Plan, split: Plan, fused_programs: int, split_programs: int) -> bool:
    """The backward's path rule, the same for both backends: fused where its programs give every SM work (or as many
    as the split path's first kernel has) and it moves no more bytes beyond the byte floor than the split path plus
    that path's extra launches (:data:`LAUNCH_L2_BYTES` each)."""
    fills = fused_programs >= min(TARGET_SMS, split_programs)
    return fills and (fused.extra_traffic_bytes
                      <= split.extra_traffic_bytes + SPLIT_EXTRA_LAUNCHES * LAUNCH_L2_BYTES)
