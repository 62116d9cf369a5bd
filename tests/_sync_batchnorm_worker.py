"""One rank of the two-process SyncBatchNorm test (tests/test_batchnorm_training.py), in its own module so that a
spawned process can turn on Triton's interpreter before anything imports triton (importing the test module would
import bsconv_cuda, and so triton, first)."""

import os


def run_rank(rank: int, world_size: int, workdir: str) -> None:
    """Trains this rank's share of the batch (``batch_sizes[rank]`` images, possibly none) through a FusedBSConvU with nn.SyncBatchNorm on the Triton backend and
    saves what it saw (outputs, input gradients, this rank's and the all-reduced parameter gradients, buffers) to
    ``rank{rank}.pt``."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors through the Triton kernels, on any machine
    import torch
    import torch.distributed as dist

    import bsconv_cuda

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        data = torch.load(f"{workdir}/inputs.pt")
        fused = bsconv_cuda.FusedBSConvU(**data["config"], backend="triton").double()
        fused.load_state_dict(data["state"])
        fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused).train()
        assert isinstance(fused.bn, torch.nn.SyncBatchNorm)
        steps = []
        for x_full, grad_full in data["steps"]:
            x = x_full.split(data["batch_sizes"])[rank].clone().requires_grad_()
            y = fused(x)
            y.backward(grad_full.split(data["batch_sizes"])[rank])
            local_grads, grads = {}, {}
            for name, param in fused.named_parameters():
                local_grads[name] = param.grad.clone()
                grads[name] = param.grad.clone()
                dist.all_reduce(grads[name])  # what DDP does (summed: the loss is the sum over all ranks)
            steps.append(dict(y=y.detach(), grad_x=x.grad, local_grads=local_grads, grads=grads))
            fused.zero_grad()
        buffers = {name: buffer.clone() for name, buffer in fused.named_buffers()}
        torch.save(dict(steps=steps, buffers=buffers), f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
