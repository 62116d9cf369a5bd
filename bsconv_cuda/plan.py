"""Launch plans: what the fused kernels launch for one call, and the work and memory traffic that implies.

Both backends describe their launches with these records (the Triton launchers run from them; for the CUDA
backend, :func:`bsconv_cuda.cuda_backend.work_plan` mirrors the tile choices of ``csrc/bsconv_kernels.cu``), so
``benchmarks/kernel_report.py`` can account the work of every shape without a GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid and the multiply-adds of every matrix (tl.dot / MMA / FMA-GEMM) step its programs
    run, M * N * K summed with the padding of the blocks included."""

    kernel: str
    grid: tuple[int, ...]
    dot_macs: int

    @property
    def programs(self) -> int:
        out = 1
        for g in self.grid:
            out *= g
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The launches of one pass (forward or backward) of one call.

    ``extra_hbm_bytes`` models the DRAM bytes moved beyond ``Shape.byte_floor`` (every tensor once): the x halo
    that neighbouring tiles read twice (programs of the channel blocks of one tile run next to each other and share
    their x tile in L2); the weight-gradient partials, written once and read back by the reduction (their
    read-modify-writes per tile stay in L2); a grad_pre buffer written once and read by each GEMM that consumes it;
    x read again by a grad_pw GEMM.
    """

    path: str  # which variant runs, e.g. the Triton forward's depthwise stage or the backward's fused / split path
    blocks: dict  # block sizes and launch options of the main kernel
    launches: tuple[Launch, ...]
    params: dict  # runtime scalars a launcher passes (tile counts, program counts, ...)
    extra_hbm_bytes: int
    partial_bytes: int = 0  # fp32 weight-gradient partials
    scratch_bytes: int = 0  # transient buffers: a grad_pre of mid's size, staging slots of mid

    @property
    def dot_macs(self) -> int:
        return sum(launch.dot_macs for launch in self.launches)


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
