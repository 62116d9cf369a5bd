"""One forward + backward of the fused block on one backend and backward path: the program that
``scripts/gpu_check.sh`` hands compute-sanitizer (memcheck, racecheck) and Nsight Compute.

    python scripts/gpu_step.py cuda --path fused --shape 2,40,72,19,23 --k 5 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

import bsconv_cuda
from bsconv_cuda import cuda_backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=["triton", "cuda"])
    p.add_argument("--path", default="auto", choices=cuda_backend.BACKWARD_PATHS,
                   help="the CUDA backward's path (cuda backend only)")
    p.add_argument("--shape", default="2,40,72,19,23", help="N,C_in,C_out,H,W")
    p.add_argument("--k", type=int, default=3, help="depthwise kernel size")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeat", type=int, default=1, help="forward + backward this many times")
    args = p.parse_args()
    n, c_in, c_out, h, w = (int(v) for v in args.shape.split(","))
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = rand(n, c_in, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    pw = rand(c_out, c_in, scale=c_in ** -0.5).requires_grad_()
    dw = rand(c_out, 1, args.k, args.k, scale=1.0 / args.k).requires_grad_()
    pw_bias, dw_bias = rand(c_out).requires_grad_(), rand(c_out).requires_grad_()
    with cuda_backend.force_backward_path(args.path):
        for _ in range(args.repeat):
            y = bsconv_cuda.bsconv_u(x, pw, dw, dw_bias, padding=args.k // 2, pw_bias=pw_bias,
                                     mid_activation="relu6", backend=args.backend)
            y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    finite = all(bool(t.grad.isfinite().all()) for t in (x, pw, dw, pw_bias, dw_bias))
    print(f"{args.backend} {args.path} {tuple(y.shape)} {args.dtype}: gradients finite: {finite}")


if __name__ == "__main__":
    main()
