"""Data that needs no download: scikit-learn's digits, and torchvision MNIST from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import MNIST
from typing_extensions import override

__all__ = ["DigitsDataModule", "MNISTDataModule", "load_digits_tensors"]


def load_digits_tensors(flatten: bool = True) -> tuple[Tensor, Tensor]:
    """The 1,797 8x8 scikit-learn digits scaled to [0, 1], and their labels.

    Returns:
        ``x`` of shape ``[1797, 64]`` (or ``[1797, 1, 8, 8]`` if not ``flatten``) and ``y`` ``[1797]``.
    """
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    x = x.reshape(len(x), 64) if flatten else x.unsqueeze(1)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


class _SplitDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, ds: Dataset | None, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("The data module has not been set up; call setup() first.")
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's 8x8 digits (bundled with scikit-learn, no download) split into train/val/test.

    Samples are ``(x, y)`` with ``x`` in [0, 1]. The split is a seeded permutation, so a training
    sample's id (its position in ``train_set``) is stable across runs.

    Args:
        batch_size: training batch size.
        val_fraction: share of the data held out for validation.
        test_fraction: share held out for testing (the influence queries).
        flatten: ``x`` as ``[64]`` (for :class:`~lightning_influence.models.MLPVAE`) or ``[1, 8, 8]``.
        seed: seed of the split.
        num_workers: DataLoader workers.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.train_set), dm.train_set[0][0].shape
        (1259, torch.Size([64]))
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        flatten: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}."
            )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.flatten, self.seed = flatten, seed

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.flatten)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = int(len(x) * self.val_fraction), int(len(x) * self.test_fraction)
        val_idx, test_idx, train_idx = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


class _ScaledImages(Dataset):
    """A torchvision image dataset as ``(x in [0, 1], label)`` tensors."""

    def __init__(self, data: Tensor, targets: Tensor, flatten: bool) -> None:
        x = data.float() / 255.0
        self.x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        self.y = targets.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class MNISTDataModule(_SplitDataModule):
    """torchvision MNIST read from files the user already has (``download=False``, always).

    Expects torchvision's layout: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Args:
        root: the directory that holds ``MNIST/``.
        batch_size: training batch size.
        val_fraction: share of the training file held out for validation.
        flatten: ``x`` as ``[784]`` or ``[1, 28, 28]``.
        limit_train: keep only the first ``limit_train`` training images (None keeps all).
        seed: seed of the train/val split.
        num_workers: DataLoader workers.

    Raises:
        FileNotFoundError: if the files are missing (nothing is downloaded).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        flatten: bool = True,
        limit_train: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"`limit_train` must be None or >= 1, got {limit_train}.")
        self.root = Path(root)
        self.val_fraction, self.flatten, self.limit_train, self.seed = val_fraction, flatten, limit_train, seed

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            train = MNIST(str(self.root), train=True, download=False)
            test = MNIST(str(self.root), train=False, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"MNIST files not found under `root`={str(self.root)!r} (expected {self.root / 'MNIST' / 'raw'});"
                " lightning_influence never downloads: place the IDX files there."
            ) from err
        data, targets = train.data, train.targets
        if self.limit_train is not None:
            data, targets = data[: self.limit_train], targets[: self.limit_train]
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(data) * self.val_fraction)
        self.val_set = _ScaledImages(data[perm[:n_val]], targets[perm[:n_val]], self.flatten)
        self.train_set = _ScaledImages(data[perm[n_val:]], targets[perm[n_val:]], self.flatten)
        self.test_set = _ScaledImages(test.data, test.targets, self.flatten)

    def __repr__(self) -> str:
        return f"MNISTDataModule(root={str(self.root)!r}, batch_size={self.batch_size})"
