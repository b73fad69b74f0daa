"""Data sets for the `rigl-fast train` demo and the quality study.

`digits` (scikit-learn's bundled 8x8 digits, 1797 images) needs no download and is the default; `mnist1d`
(Greydanus 2020: 40-sample 1-D sequences, 10 classes) is generated locally from the `mnist1d` package's
templates, never downloaded; `mnist` and `cifar10` come from torchvision when it imports and the files are
under `data_dir` (or `download=True`).
Everything is held in memory as tensors: the demo's data sets are small, and a DataLoader's worker start-up
would cost more than the training itself on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DATASETS = ("digits", "mnist1d", "mnist", "cifar10")
CLI_EXTRA = "pip install 'rigl_fast[cli]'"


@dataclass
class Data:
    name: str
    train_x: torch.Tensor   # float32, normalised, shape (n, C, H, W); (n, 1, 40) for mnist1d
    train_y: torch.Tensor   # int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int

    def to(self, device) -> "Data":
        t = [v.to(device) for v in (self.train_x, self.train_y, self.test_x, self.test_y)]
        return Data(self.name, *t, self.n_classes)

    @property
    def in_shape(self):
        return tuple(self.train_x.shape[1:])


def load(name: str = "digits", data_dir: str = "data", download: bool = False, split_seed: int = 0,
         mnist1d_samples: int = 5000) -> Data:
    """`mnist1d_samples`: how many MNIST-1D sequences to generate, 80% for training (the default gives the
    paper's 4000 / 1000)."""
    if name == "digits":
        return _digits(split_seed)
    if name == "mnist1d":
        return _mnist1d(mnist1d_samples)
    if name in ("mnist", "cifar10"):
        return _torchvision(name, data_dir, download)
    raise ValueError(f"data: unknown data set {name!r}; choose one of {DATASETS}")


def _digits(split_seed: int) -> Data:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(f"the digits data set needs scikit-learn: {CLI_EXTRA}") from e
    X, y = load_digits(return_X_y=True)
    # A fixed stratified split: seeds then vary only the initialisation, the masks and the batch order, so
    # the spread across seeds is the training's, not the split's.
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=split_seed)
    Xtr = torch.tensor(Xtr, dtype=torch.float32).view(-1, 1, 8, 8)
    Xte = torch.tensor(Xte, dtype=torch.float32).view(-1, 1, 8, 8)
    # Per-pixel statistics would divide by zero on the always-blank border pixels; one global scale is enough.
    mean, std = Xtr.mean(), Xtr.std()
    return Data("digits", (Xtr - mean) / std, torch.tensor(ytr), (Xte - mean) / std, torch.tensor(yte), 10)


def _mnist1d(num_samples: int) -> Data:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(f"--data mnist1d needs the mnist1d package (it generates the data set locally): "
                          f"pip install mnist1d, or {CLI_EXTRA}") from e
    import random
    import numpy as np
    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds Python's and NumPy's global RNGs (its fixed seed 42 makes the data set the same
    # everywhere); put the caller's RNG states back so loading data does not change their later draws.
    states = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)  # never mnist1d's get_dataset, which downloads a pickle
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])

    def x(a):  # make_dataset already centres and scales the whole set to unit variance
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)

    return Data("mnist1d", x(d["x"]), torch.tensor(d["y"], dtype=torch.int64), x(d["x_test"]),
                torch.tensor(d["y_test"], dtype=torch.int64), 10)


def _torchvision(name: str, data_dir: str, download: bool) -> Data:
    try:
        import torchvision
    except Exception as e:  # a torchvision built for another torch fails with errors other than ImportError
        raise RuntimeError(f"--data {name} needs torchvision, which does not import here ({type(e).__name__}: {e}); "
                           f"install the torchvision matching your torch, or use --data digits (no download)") from e
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train = cls(data_dir, train=True, download=download)
        test = cls(data_dir, train=False, download=download)
    except RuntimeError as e:
        hint = "" if download else " (pass --download to fetch it, or --data-dir to point at it)"
        raise RuntimeError(f"--data {name}: could not load it from --data-dir {data_dir!r}: {e}{hint}") from e

    def tensors(ds):
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST is (n,H,W); CIFAR is (n,H,W,C)
        return x.float().div_(255), torch.as_tensor(ds.targets, dtype=torch.int64)

    Xtr, ytr = tensors(train)
    Xte, yte = tensors(test)
    mean = Xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = Xtr.std(dim=(0, 2, 3), keepdim=True)
    return Data(name, (Xtr - mean) / std, ytr, (Xte - mean) / std, yte, 10)
