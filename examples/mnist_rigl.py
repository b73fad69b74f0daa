"""MNIST with RigL: pytorch/examples' mnist/main.py with rigl_fast added.

Needs torchvision (the data set and transforms): this script runs only where `import torchvision` works.
For a torchvision-free demo use `rigl-fast train`.

The original: https://github.com/pytorch/examples/blob/0f0c9131ca5c79d1332dce1f4c06fe942fbdc665/mnist/main.py
(the version rigl-torch's README links). What changed, all marked `# RigL`:
  * arguments: --dense-allocation, --distribution, --delta, --alpha, --grad-accumulation-n, --static-topo,
    --checkpoint, --resume;
  * `pruner = RigLScheduler(...)` after the optimizer, with T_end = 75% of the training iterations;
  * `if pruner(): optimizer.step()` instead of `optimizer.step()`;
  * a checkpoint (model, optimizer, LR scheduler, pruner) after every epoch, and resuming from it.

    python examples/mnist_rigl.py --dense-allocation 0.1 --epochs 14
    python examples/mnist_rigl.py --dense-allocation 0.1 --epochs 14 --resume mnist_rigl.pth
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR
from torchvision import datasets, transforms

from rigl_fast import RigLScheduler  # RigL


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(args, model, device, train_loader, optimizer, epoch, pruner):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        if pruner():  # RigL: a topology update replaces this iteration's optimizer step
            optimizer.step()
        if batch_idx % args.log_interval == 0:
            print("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss, correct = 0, 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    test_loss /= len(test_loader.dataset)
    print("\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n".format(
        test_loss, correct, len(test_loader.dataset), 100. * correct / len(test_loader.dataset)))
    return correct / len(test_loader.dataset)


def main():
    parser = argparse.ArgumentParser(description="PyTorch MNIST Example with RigL (rigl_fast)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--test-batch-size", type=int, default=1000, metavar="N")
    parser.add_argument("--epochs", type=int, default=14, metavar="N")
    parser.add_argument("--lr", type=float, default=1.0, metavar="LR")
    parser.add_argument("--gamma", type=float, default=0.7, metavar="M", help="learning rate step gamma")
    parser.add_argument("--no-cuda", action="store_true", default=False)
    parser.add_argument("--dry-run", action="store_true", default=False, help="a single pass, to check the script")
    parser.add_argument("--seed", type=int, default=1, metavar="S")
    parser.add_argument("--log-interval", type=int, default=10, metavar="N")
    parser.add_argument("--save-model", action="store_true", default=False)
    parser.add_argument("--data-dir", default="../data")
    # RigL: the scheduler's hyperparameters (the paper's names in parentheses)
    parser.add_argument("--dense-allocation", type=float, default=0.1, help="fraction of weights kept (1 - sparsity)")
    parser.add_argument("--distribution", default="uniform", choices=["uniform", "erk"])
    parser.add_argument("--delta", type=int, default=100, help="iterations between topology updates (delta T)")
    parser.add_argument("--alpha", type=float, default=0.3, help="initial drop fraction (alpha)")
    parser.add_argument("--grad-accumulation-n", type=int, default=1,
                        help="backward passes whose gradients score the regrowth (rigl-torch's extension)")
    parser.add_argument("--static-topo", action="store_true", help="a fixed random mask (the static baseline)")
    parser.add_argument("--checkpoint", default="mnist_rigl.pth", help="written after every epoch")
    parser.add_argument("--resume", default="", help="continue from this checkpoint")
    args = parser.parse_args()
    use_cuda = not args.no_cuda and torch.cuda.is_available()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if use_cuda else "cpu")
    train_kwargs = {"batch_size": args.batch_size, "shuffle": True}
    test_kwargs = {"batch_size": args.test_batch_size}
    if use_cuda:
        train_kwargs.update(num_workers=1, pin_memory=True)
        test_kwargs.update(num_workers=1, pin_memory=True)

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset1 = datasets.MNIST(args.data_dir, train=True, download=True, transform=transform)
    dataset2 = datasets.MNIST(args.data_dir, train=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(dataset1, **train_kwargs)
    test_loader = torch.utils.data.DataLoader(dataset2, **test_kwargs)

    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)

    # RigL: checkpoints hold the pruner's state (masks, step, schedule) beside the model's and optimizer's.
    checkpoint, start_epoch = None, 1
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        print(f"resumed from {args.resume} at epoch {start_epoch}")

    # RigL: update the topology for the first 75% of the iterations, as the paper and rigl-torch recommend.
    T_end = int(0.75 * args.epochs * len(train_loader))
    pruner = RigLScheduler(model, optimizer, dense_allocation=args.dense_allocation,
                           sparsity_distribution=args.distribution, T_end=T_end, delta=args.delta,
                           alpha=args.alpha, grad_accumulation_n=args.grad_accumulation_n,
                           static_topo=args.static_topo, ignore_linear_layers=False,
                           state_dict=None if checkpoint is None else checkpoint["pruner"])
    print(pruner)

    for epoch in range(start_epoch, args.epochs + 1):
        train(args, model, device, train_loader, optimizer, epoch, pruner)
        test(model, device, test_loader)
        scheduler.step()
        torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "pruner": pruner.state_dict()},  # RigL
                   args.checkpoint)
        if args.dry_run:
            break

    print(pruner)  # RigL: per-layer nonzeros, step, number of topology updates
    if args.save_model:
        torch.save(model.state_dict(), os.path.splitext(args.checkpoint)[0] + "_model.pt")


if __name__ == "__main__":
    main()
