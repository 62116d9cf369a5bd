"""One forward + backward of the fused block on one backend and backward path: the program that
``scripts/gpu_check.sh`` hands compute-sanitizer (memcheck, racecheck) and Nsight Compute, and with ``--profile``
the per-kernel times of the CUDA backward's paths (its ``kernels`` stage).

    python scripts/gpu_step.py cuda --path fused --shape 2,40,72,19,23 --k 5 --dtype bfloat16
    python scripts/gpu_step.py cuda --path split --shape 64,512,512,14,14 --profile 20
"""

from __future__ import annotations

import argparse
import re

import torch

import bsconv_cuda
from bsconv_cuda import cuda_backend


def kernel_name(name: str) -> str:
    """A profiler event's name without return type, namespaces and argument list: ``void bsconv::(anonymous
    namespace)::gemm_kernel<__nv_bfloat16, false>(bsconv::GemmArgs)`` -> ``gemm_kernel<__nv_bfloat16, false>``."""
    name = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
    depth = 0
    for i, ch in enumerate(name):  # the argument list starts at the first "(" outside the template arguments
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return re.sub(r"^(?:\w+::)+", "", name).strip()


def per_step_times(events, steps: int, on_gpu: bool) -> list[tuple[str, int, float]]:
    """(kernel, calls per step, microseconds per step) from ``profile.key_averages()``, most time first: device
    time of the GPU's kernels, or self CPU time of the operators on CPU."""
    rows = []
    for e in events:
        if on_gpu and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if us > 0:
            rows.append((kernel_name(e.key), e.count // steps, us / steps))
    return sorted(rows, key=lambda row: -row[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=["triton", "cuda"])
    p.add_argument("--path", default="auto", choices=cuda_backend.BACKWARD_PATHS,
                   help="the CUDA backward's path (cuda backend only)")
    p.add_argument("--shape", default="2,40,72,19,23", help="N,C_in,C_out,H,W")
    p.add_argument("--k", type=int, default=3, help="depthwise kernel size")
    p.add_argument("--stride", type=int, default=1, help="depthwise stride")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-tf32", action="store_true",
                   help="fp32 in IEEE precision (the CUDA backend's FMA kernels), not TF32 as torch allows by default")
    p.add_argument("--repeat", type=int, default=1, help="forward + backward this many times")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the steps above, profile this many more and print each kernel's time per step")
    p.add_argument("--device", default="cuda",
                   help="cuda; cpu runs the plumbing only (the Triton kernels under TRITON_INTERPRET=1)")
    args = p.parse_args()
    n, c_in, c_out, h, w = (int(v) for v in args.shape.split(","))
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False  # the switch the fused backends follow, as cuDNN's convolutions do
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    on_gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = rand(n, c_in, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    pw = rand(c_out, c_in, scale=c_in ** -0.5).requires_grad_()
    dw = rand(c_out, 1, args.k, args.k, scale=1.0 / args.k).requires_grad_()
    pw_bias, dw_bias = rand(c_out).requires_grad_(), rand(c_out).requires_grad_()

    def step():
        for t in (x, pw, dw, pw_bias, dw_bias):
            t.grad = None
        y = bsconv_cuda.bsconv_u(x, pw, dw, dw_bias, stride=args.stride, padding=args.k // 2, pw_bias=pw_bias,
                                 mid_activation="relu6", backend=args.backend)
        y.backward(torch.ones_like(y))
        return y

    with cuda_backend.force_backward_path(args.path):
        for _ in range(args.repeat):
            y = step()
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.profile):
                    y = step()
                if on_gpu:
                    torch.cuda.synchronize()
    if on_gpu:
        torch.cuda.synchronize()
    finite = all(bool(t.grad.isfinite().all()) for t in (x, pw, dw, pw_bias, dw_bias))
    print(f"{args.backend} {args.path} {tuple(x.shape)} -> {tuple(y.shape)} k{args.k} s{args.stride} {args.dtype}: "
          f"gradients finite: {finite}")
    if args.profile:
        rows = per_step_times(prof.key_averages(), args.profile, on_gpu)
        print(f"{'us/step':>10} {'calls':>5}  {'kernel' if on_gpu else 'operator (self CPU time)'}")
        for name, calls, us in rows:
            print(f"{us:10.1f} {calls:5d}  {name}")
        print(f"{sum(us for _, _, us in rows):10.1f}        total per step, {args.profile} steps")


if __name__ == "__main__":
    main()
