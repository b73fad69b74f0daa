"""RigL under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # gloo on CPU, NCCL when CUDA is present

Each rank trains on its own shard of a synthetic classification task (a fixed random teacher network, so the
script needs no dataset download). Nothing RigL-specific is needed for DDP beyond passing the wrapped model:
rigl_fast hooks the underlying parameters, adopts rank 0's initial masks, and at each topology update sums the
accumulated dense gradients over ranks (one all-reduce), so every rank computes the same new masks itself.
At the end the ranks compare a digest of their masks.
"""
import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rigl_fast import RigLScheduler


def make_model():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def shard(step, rank, world, per_rank, device):
    """The global batch of `step` (same on every rank for a given step), and this rank's slice of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_rank * world, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = TEACHER(x).argmax(1)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[sl].to(device), y[sl].to(device)


def masks_digest(pruner):
    h = hashlib.sha256()
    for m in pruner.backward_masks:
        if m is not None:
            h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-per-rank", type=int, default=32)
    ap.add_argument("--dense-allocation", type=float, default=0.2)
    ap.add_argument("--delta", type=int, default=25)
    ap.add_argument("--t-end", type=int, default=None, help="default: 75%% of --steps")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; the seed keeps runs reproducible
    global TEACHER
    TEACHER = make_model().eval()
    model = DDP(make_model().to(device), device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    t_end = args.t_end if args.t_end is not None else int(0.75 * args.steps)
    pruner = RigLScheduler(model, optimizer, dense_allocation=args.dense_allocation, T_end=t_end,
                           delta=args.delta, ignore_linear_layers=True)

    for step in range(args.steps):
        x, y = shard(step, rank, world, args.batch_per_rank, device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if pruner():  # False on a topology-update step: skip that optimizer step, as rigl-torch does
            optimizer.step()
        if rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  rigl updates {pruner.rigl_steps}", flush=True)

    if rank == 0:
        print(pruner, flush=True)
    print(f"masks-digest rank {rank} {masks_digest(pruner)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


TEACHER = None

if __name__ == "__main__":
    main()
