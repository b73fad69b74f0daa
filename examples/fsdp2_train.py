"""RigL under FSDP2 (fully_shard), with the pruner checkpointed next to the model and optimizer.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py            # gloo on CPU, NCCL when CUDA is present
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --resume   # go on from the checkpoint of the run above

The checkpoint goes to --ckpt, by default `rigl_fast_fsdp2_ckpt` in the system's temporary folder (not the
working directory; the path is printed); on several nodes pass a folder every node sees.

A small MLP learns a fixed random teacher (synthetic data: nothing to download). Each Linear is sharded, then
the root; the scheduler is built after fully_shard, on every rank, and the loop is rigl-torch's two lines.
Masks and accumulators are DTensors sharded like the weights, so torch.distributed.checkpoint saves each
rank's part of the pruner's state with the model's and optimizer's. The first run saves at --save-at and
trains on; the resumed run loads that checkpoint and must end with the same masks digest.
"""
import argparse
import hashlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from rigl_fast import RigLScheduler

IN, HIDDEN, CLASSES = 32, 256, 10
BATCH_PER_RANK = 32
DENSE_ALLOCATION = 0.1  # 90% of each sparse layer's weights are zero


def make_mlp():
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def local_batch(step, teacher, rank, world, per_rank, device):
    """This rank's slice of the global batch of `step`: every rank derives the same global batch from the step,
    so a resumed run sees the data the uninterrupted one saw."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_rank * world, IN, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[sl].to(device), y[sl].to(device)


def build(args, mesh, device):
    """Model, optimizer and pruner, built the same way for a fresh run and a resumed one (DCP loads into them)."""
    torch.manual_seed(0)  # the same full model on every rank: fully_shard keeps each rank's rows of it
    model = make_mlp().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    # after fully_shard, on every rank: the scheduler hooks the sharded parameters
    pruner = RigLScheduler(model, optimizer, dense_allocation=DENSE_ALLOCATION, T_end=int(0.75 * args.steps),
                           delta=args.delta, ignore_linear_layers=False)
    return model, optimizer, pruner


def state(model, optimizer, pruner):
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
            "pruner": pruner.state_dict()}


def masks_digest(pruner):
    """A digest of this rank's mask shards, to compare two runs rank by rank (no layer is gathered)."""
    h = hashlib.sha256()
    for m in pruner.backward_masks:
        if m is not None:
            h.update(m.to_local().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "rigl_fast_fsdp2_ckpt"),
                    help="checkpoint folder (one file per rank, plus metadata); default: in the temporary folder")
    ap.add_argument("--save-at", type=int, default=None, help="step after which to save (default: half way)")
    ap.add_argument("--resume", action="store_true", help="load --ckpt and train on to --steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delta", type=int, default=25, help="steps between topology updates")
    args = ap.parse_args()
    save_at = args.steps // 2 if args.save_at is None else args.save_at

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(1)
    teacher = make_mlp().eval()

    model, optimizer, pruner = build(args, mesh, device)
    start = 0
    if args.resume:
        sd = state(model, optimizer, pruner)  # the fresh objects' state: DCP loads each rank's shards into it
        dcp.load(sd, checkpoint_id=args.ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, optimizer, sd["optim"])
        pruner.load_state_dict(sd["pruner"])
        start = pruner.step  # pruner() counts iterations, so it knows where the checkpoint was written
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}", flush=True)

    for step in range(start, args.steps):
        x, y = local_batch(step, teacher, rank, world, BATCH_PER_RANK, device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if pruner():  # False on a topology-update step: that optimizer step is skipped, as in rigl-torch
            optimizer.step()
        if step + 1 == save_at and not args.resume:
            dcp.save(state(model, optimizer, pruner), checkpoint_id=args.ckpt)
            if rank == 0:
                print(f"saved {args.ckpt} after step {step + 1}", flush=True)
        if rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            s = pruner.stats()
            print(f"step {step + 1:4d}  loss {loss.item():.4f} (rank 0's shard of the batch)  "
                  f"density {s['density']:.3f}  updates {int(s['updates'])}", flush=True)

    if rank == 0:
        print(pruner, flush=True)
    # each rank prints its own: a collective after the last step made one rank abort at exit (gloo, 1 run in 4)
    print(f"rank {rank} masks digest {masks_digest(pruner)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
