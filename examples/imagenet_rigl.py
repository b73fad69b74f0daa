"""ImageNet with RigL: pytorch/examples' imagenet/main.py with rigl_fast added.

Needs torchvision (models, data sets, transforms): this script runs only where `import torchvision` works.
`--dummy` trains on torchvision's FakeData, to try the script without ImageNet.

The original: https://github.com/pytorch/examples/blob/0f0c9131ca5c79d1332dce1f4c06fe942fbdc665/imagenet/main.py
(the version rigl-torch's README links). Kept: the arguments, the train/validate loops, the meters, the step
learning-rate decay, checkpoint/resume, `--evaluate`. Multi-GPU runs use `torchrun` (DistributedDataParallel,
one process per GPU) instead of the original's mp.spawn. What RigL adds, all marked `# RigL`:
  * arguments: --dense-allocation, --distribution, --delta, --alpha, --grad-accumulation-n, --static-topo;
  * `pruner = RigLScheduler(...)` after the optimizer, T_end = 75% of the training iterations;
  * `if pruner(): optimizer.step()`;
  * the pruner's state in every checkpoint, and passed back on --resume.

    python examples/imagenet_rigl.py -a resnet50 --dense-allocation 0.1 /path/to/imagenet
    torchrun --nproc_per_node 8 examples/imagenet_rigl.py -a resnet50 -b 128 --dense-allocation 0.1 /path/to/imagenet
    python examples/imagenet_rigl.py -a resnet18 --dummy --epochs 1 --print-freq 1
"""
import argparse
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data
import torch.utils.data.distributed
import torchvision.datasets as datasets
import torchvision.models as models
import torchvision.transforms as transforms

from rigl_fast import RigLScheduler  # RigL

model_names = sorted(name for name in models.__dict__
                     if name.islower() and not name.startswith("__") and callable(models.__dict__[name]))

parser = argparse.ArgumentParser(description="PyTorch ImageNet Training with RigL (rigl_fast)")
parser.add_argument("data", metavar="DIR", nargs="?", default="imagenet", help="path to dataset (train/ and val/)")
parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet18", choices=model_names,
                    help="model architecture: " + " | ".join(model_names) + " (default: resnet18)")
parser.add_argument("-j", "--workers", default=4, type=int, metavar="N")
parser.add_argument("--epochs", default=90, type=int, metavar="N")
parser.add_argument("--start-epoch", default=0, type=int, metavar="N")
parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N", help="per process")
parser.add_argument("--lr", "--learning-rate", default=0.1, type=float, metavar="LR", dest="lr")
parser.add_argument("--momentum", default=0.9, type=float, metavar="M")
parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay")
parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N")
parser.add_argument("--resume", default="", type=str, metavar="PATH", help="path to latest checkpoint")
parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true")
parser.add_argument("--pretrained", dest="pretrained", action="store_true")
parser.add_argument("--seed", default=None, type=int)
parser.add_argument("--dummy", action="store_true", help="use fake data to benchmark/try the script")
# RigL: the scheduler's hyperparameters (the paper's names in parentheses)
parser.add_argument("--dense-allocation", default=0.1, type=float, help="fraction of weights kept (1 - sparsity)")
parser.add_argument("--distribution", default="uniform", choices=["uniform", "erk"])
parser.add_argument("--delta", default=100, type=int, help="iterations between topology updates (delta T)")
parser.add_argument("--alpha", default=0.3, type=float, help="initial drop fraction (alpha)")
parser.add_argument("--grad-accumulation-n", default=1, type=int,
                    help="backward passes whose gradients score the regrowth (rigl-torch's extension)")
parser.add_argument("--static-topo", action="store_true", help="a fixed random mask (the static baseline)")

best_acc1 = 0


def main():
    global best_acc1
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank = 0
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.seed is not None:
        # RigL: the initial masks come from the global RNG; under torch.distributed every rank takes rank 0's.
        torch.manual_seed(args.seed)

    print(f"=> {'using pre-trained' if args.pretrained else 'creating'} model '{args.arch}'")
    model = models.__dict__[args.arch](weights="DEFAULT" if args.pretrained else None).to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    checkpoint = None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f"--resume: no checkpoint found at {args.resume!r}")
        checkpoint = torch.load(args.resume, map_location=device)
        args.start_epoch = checkpoint["epoch"]
        best_acc1 = checkpoint["best_acc1"]
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        print(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint['epoch']})")

    train_loader, val_loader, train_sampler = make_loaders(args, distributed)

    # RigL: created on the bare model (before DDP wraps it), after the optimizer; on resume, its saved state
    # (masks, step, hyperparameters) wins over the arguments.
    T_end = int(0.75 * args.epochs * len(train_loader))
    pruner = RigLScheduler(model, optimizer, dense_allocation=args.dense_allocation,
                           sparsity_distribution=args.distribution, T_end=T_end, delta=args.delta,
                           alpha=args.alpha, grad_accumulation_n=args.grad_accumulation_n,
                           static_topo=args.static_topo,
                           state_dict=None if checkpoint is None else checkpoint["pruner"])
    if rank == 0:
        print(pruner)

    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if args.evaluate:
        validate(val_loader, model, criterion, args, device)
        return

    for epoch in range(args.start_epoch, args.epochs):
        if distributed:
            train_sampler.set_epoch(epoch)
        adjust_learning_rate(optimizer, epoch, args)
        train(train_loader, model, criterion, optimizer, epoch, args, device, pruner)
        acc1 = validate(val_loader, model, criterion, args, device)
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        if rank == 0:
            save_checkpoint({
                "epoch": epoch + 1,
                "arch": args.arch,
                "state_dict": (model.module if distributed else model).state_dict(),
                "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(),
                "pruner": pruner.state_dict(),  # RigL
            }, is_best)
            print(pruner)  # RigL


def make_loaders(args, distributed):
    if args.dummy:
        print("=> dummy data")
        train_dataset = datasets.FakeData(1281, (3, 224, 224), 1000, transforms.ToTensor())
        val_dataset = datasets.FakeData(500, (3, 224, 224), 1000, transforms.ToTensor())
    else:
        normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        train_dataset = datasets.ImageFolder(os.path.join(args.data, "train"), transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
        val_dataset = datasets.ImageFolder(os.path.join(args.data, "val"), transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]))
    train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset) if distributed else None
    val_sampler = (torch.utils.data.distributed.DistributedSampler(val_dataset, shuffle=False, drop_last=True)
                   if distributed else None)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size,
                                               shuffle=train_sampler is None, num_workers=args.workers,
                                               pin_memory=True, sampler=train_sampler)
    val_loader = torch.utils.data.DataLoader(val_dataset, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, pin_memory=True, sampler=val_sampler)
    return train_loader, val_loader, train_sampler


def train(train_loader, model, criterion, optimizer, epoch, args, device, pruner):
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    losses, top1, top5 = AverageMeter("Loss", ":.4e"), AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")
    progress = ProgressMeter(len(train_loader), [batch_time, data_time, losses, top1, top5],
                             prefix=f"Epoch: [{epoch}]")
    model.train()
    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        data_time.update(time.time() - end)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), images.size(0))
        top1.update(acc1[0], images.size(0))
        top5.update(acc5[0], images.size(0))

        optimizer.zero_grad()
        loss.backward()
        if pruner():  # RigL: a topology update replaces this iteration's optimizer step
            optimizer.step()

        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0:
            progress.display(i)


def validate(val_loader, model, criterion, args, device):
    batch_time, losses = AverageMeter("Time", ":6.3f"), AverageMeter("Loss", ":.4e")
    top1, top5 = AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")
    progress = ProgressMeter(len(val_loader), [batch_time, losses, top1, top5], prefix="Test: ")
    model.eval()
    with torch.no_grad():
        end = time.time()
        for i, (images, target) in enumerate(val_loader):
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            output = model(images)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1[0], images.size(0))
            top5.update(acc5[0], images.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            if i % args.print_freq == 0:
                progress.display(i)
        print(f" * Acc@1 {top1.avg:.3f} Acc@5 {top5.avg:.3f}")
    return top1.avg


def save_checkpoint(state, is_best, filename="checkpoint.pth.tar"):
    torch.save(state, filename)
    if is_best:
        shutil.copyfile(filename, "model_best.pth.tar")


class AverageMeter:
    def __init__(self, name, fmt=":f"):
        self.name, self.fmt = name, fmt
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        val = float(val)
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class ProgressMeter:
    def __init__(self, num_batches, meters, prefix=""):
        fmt = "{:" + str(len(str(num_batches))) + "d}"
        self.batch_fmtstr = "[" + fmt + "/" + fmt.format(num_batches) + "]"
        self.meters, self.prefix = meters, prefix

    def display(self, batch):
        print("\t".join([self.prefix + self.batch_fmtstr.format(batch)] + [str(m) for m in self.meters]))


def adjust_learning_rate(optimizer, epoch, args):
    """The original's schedule: the initial LR decayed by 10 every 30 epochs."""
    lr = args.lr * (0.1 ** (epoch // 30))
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def accuracy(output, target, topk=(1,)):
    """Top-k accuracy (%) for each k."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # gloo aborts at exit with a live group
