"""A small CNN trained sparse with Lightning: RigLCallback on scikit-learn's bundled digits (8x8 images,
no download). Runs on CPU in well under a minute.

    python examples/lightning_cnn.py                                    # 90% sparse, 10 epochs
    python examples/lightning_cnn.py --epochs 20 --resume last          # continue from the last checkpoint

The only RigL line is the callback (marked `# RigL`): it builds the scheduler from the model and its
optimizer when training starts, runs the topology updates inside the optimizer's step, logs `rigl/*`
metrics and saves its state in every Lightning checkpoint.
"""
import argparse
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from rigl_fast.integrations.lightning import RigLCallback  # RigL


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr=3e-3, width=32):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(batch_size):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    train = torch.utils.data.TensorDataset(x_tr, y_tr)
    test = torch.utils.data.TensorDataset(x_te, y_te)
    # shuffled by epoch number and seed (Lightning calls set_epoch), so a resumed run sees the batches the
    # uninterrupted one would have seen
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler),
            torch.utils.data.DataLoader(test, batch_size=256))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dense-allocation", type=float, default=0.1, help="fraction of weights kept (0.1: 90%% sparse)")
    p.add_argument("--distribution", default="erk", choices=["uniform", "erk", "er"])
    p.add_argument("--delta", type=int, default=20, help="optimizer steps between topology updates")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=)")
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (for a quick check)")
    p.add_argument("--root", default="lightning_cnn_runs", help="checkpoints go here")
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'last'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    train, test = loaders(args.batch_size)
    rigl = RigLCallback(dense_allocation=args.dense_allocation, sparsity_distribution=args.distribution,  # RigL
                        delta=args.delta, alpha=args.alpha, ignore_linear_layers=False)  # T_end: 75% of the run
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.root, "checkpoints"), save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, callbacks=[rigl, ckpt],
                         accumulate_grad_batches=args.accumulate, limit_train_batches=args.limit_batches,
                         logger=pl.loggers.CSVLogger(args.root), default_root_dir=args.root,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
    model = DigitsCNN()
    trainer.fit(model, train, test, ckpt_path=args.resume)

    st = rigl.pruner.stats()
    print(rigl.pruner.summary())
    print(f"density {st['density']:.3f}  updates {st['updates']}  skipped {st['skipped_updates']}  "
          f"last regrown {st['regrown_fraction']:.3f}  steps {st['step']}  "
          f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}")
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv; checkpoints: {ckpt.dirpath}")


if __name__ == "__main__":
    main()
