"""Data: the reference DataModules and the ordered iteration every stage relies on (a sample's id is its position)."""

from lightning_influence.data.batches import (
    batch_inputs,
    batch_labels,
    gather_samples,
    iterate_batches,
    num_samples,
    subset,
)
from lightning_influence.data.datamodules import DigitsDataModule, MNISTDataModule, load_digits_tensors

__all__ = [
    "DigitsDataModule",
    "MNISTDataModule",
    "batch_inputs",
    "batch_labels",
    "gather_samples",
    "iterate_batches",
    "load_digits_tensors",
    "num_samples",
    "subset",
]
