"""Turning what a user hands us (a Dataset, a DataLoader or a collated batch) into ordered batches.

A sample's id is its position in the data, so every path here iterates in order and refuses
loaders that shuffle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset, default_collate

__all__ = [
    "batch_inputs",
    "batch_labels",
    "batch_size_of",
    "check_ordered_loader",
    "gather_samples",
    "is_collated_batch",
    "iterate_batches",
    "num_samples",
    "slice_batch",
    "subset",
    "tensor_leaves",
]


def tensor_leaves(batch: Any) -> list[Tensor]:
    """All tensors inside a (nested) tuple/list/dict batch, in order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in tensor_leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in tensor_leaves(v)]
    return []


def is_collated_batch(data: Any, name: str = "data") -> bool:
    """True for a tensor, or a tuple/list/dict whose leaves are tensors sharing a leading dimension.

    A list whose tensors differ in length is a list of samples (variable-length sequences behind a
    DataLoader with a padding ``collate_fn``, say), so it is not a batch. A tuple with a tensor among
    its elements, or a dict, holding only tensors can only be meant as a collated batch, so there a
    disagreement is an error: read as samples, ``(X[20], y[10])`` would become a 2-sample dataset.

    Args:
        data: what the user passed.
        name: the argument ``data`` came from, for the error message.

    Raises:
        ValueError: for a tuple or dict of tensors whose leading dimensions (batch sizes) differ,
            naming ``name`` and two of the sizes.
    """
    if isinstance(data, Tensor):
        return data.dim() >= 1
    if isinstance(data, (Dataset, DataLoader)):
        return False
    if isinstance(data, (tuple, list, Mapping)):
        leaves = tensor_leaves(data)
        if not leaves or any(t.dim() == 0 for t in leaves) or not _only_tensors(data):
            return False
        n = leaves[0].shape[0]
        other = next((t.shape[0] for t in leaves if t.shape[0] != n), None)
        if other is None:
            return True
        # A tuple of sample tuples ((x0, y0), (x1, y1)) has no tensor of its own: leave it to len().
        if isinstance(data, Mapping) or (isinstance(data, tuple) and any(isinstance(v, Tensor) for v in data)):
            raise ValueError(
                f"`{name}` is a collated batch (a {type(data).__name__} of tensors) whose tensors disagree on the"
                f" batch size (leading dimension): {n} and {other}. Every tensor must have one row per sample."
            )
        return False
    return False


def _only_tensors(batch: Any) -> bool:
    if isinstance(batch, Tensor):
        return True
    if isinstance(batch, Mapping):
        return all(_only_tensors(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return all(_only_tensors(v) for v in batch)
    return False


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in ``batch``."""
    leaves = tensor_leaves(batch)
    if not leaves:
        raise ValueError(f"Expected a batch containing tensors, got {type(batch).__name__}.")
    return int(leaves[0].shape[0])


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a collated batch, keeping its structure."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def check_ordered_loader(loader: DataLoader, name: str = "data") -> None:
    """Refuse a DataLoader whose batches are not the dataset's samples in order, each exactly once.

    Sample ids are positions, so a loader that shuffles (through its sampler or batch sampler),
    drops its last batch, or does not batch at all would attach ids to the wrong samples.
    """
    if loader.batch_size is None and loader.batch_sampler is None:
        raise ValueError(
            f"`{name}` is a DataLoader with batch_size=None (no automatic batching); sample ids are positions, so"
            " pass the Dataset or a DataLoader with a batch_size."
        )
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else loader.sampler
    if not isinstance(sampler, SequentialSampler):
        raise ValueError(
            f"`{name}` is a DataLoader that shuffles or reorders samples (sampler {type(sampler).__name__}); sample ids"
            " are positions, so pass the Dataset or a DataLoader with shuffle=False and the default sequential sampler."
        )
    if getattr(batch_sampler, "drop_last", False):
        raise ValueError(
            f"`{name}` is a DataLoader with drop_last=True, which would lose samples; use drop_last=False."
        )


def num_samples(data: Any, name: str = "data") -> int:
    """Number of samples in a Dataset, DataLoader or collated batch."""
    if data is None:
        raise TypeError(
            f"`{name}` is None. A LightningDataModule creates its datasets in setup(): call dm.setup('test') before"
            " using dm.test_set (dm.setup('fit') for dm.train_set and dm.val_set)."
        )
    if isinstance(data, DataLoader):
        return num_samples(data.dataset, name)
    if is_collated_batch(data, name):
        return batch_size_of(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return len(data)
    raise TypeError(
        f"`{name}` must be a torch Dataset (with __len__), a DataLoader or a collated batch of tensors;"
        f" got {type(data).__name__}."
    )


def iterate_batches(
    data: Any,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    name: str = "data",
) -> Iterator[tuple[Tensor, Any]]:
    """Yield ``(ids, batch)`` in dataset order.

    Args:
        data: a Dataset, a non-shuffling DataLoader, or a collated batch.
        batch_size: rows per yielded batch (ignored for a DataLoader, which keeps its own).
        collate_fn: collate function for a Dataset (default: torch's ``default_collate``).
        name: the argument's name, for error messages.

    Yields:
        ``ids`` (``int64`` positions, shape ``[B]``) and the batch.

    Raises:
        ValueError: if ``data`` is empty or a DataLoader that shuffles.
    """
    n = num_samples(data, name)
    if n == 0:
        raise ValueError(f"`{name}` is empty: influence needs at least one sample.")
    if isinstance(data, DataLoader):
        check_ordered_loader(data, name)
        start = 0
        for batch in data:
            b = batch_size_of(batch)
            yield torch.arange(start, start + b), batch
            start += b
        return
    if is_collated_batch(data, name):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield torch.arange(start, stop), slice_batch(data, start, stop)
        return
    sliced = _tensor_rows(data) if collate_fn in (None, default_collate) else None
    if sliced is not None:
        # What default_collate makes of a TensorDataset's samples (a list of stacked tensors), as
        # views: no per-sample __getitem__ and stack, which cost more than a small model's gradients.
        tensors, offset = sliced
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield torch.arange(start, stop), [t[offset + start : offset + stop] for t in tensors]
        return
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    start = 0
    for batch in loader:
        b = batch_size_of(batch)
        yield torch.arange(start, start + b), batch
        start += b


def _tensor_rows(data: Any) -> tuple[tuple[Tensor, ...], int] | None:
    """``(tensors, offset)`` when ``data`` is a ``TensorDataset`` or a contiguous ``Subset`` of one, else ``None``."""
    offset = 0
    while isinstance(data, Subset):
        indices = data.indices
        if not isinstance(indices, range) or indices.step != 1 or indices.start < 0:
            return None  # a negative range counts from the end: left to the Dataset's own indexing
        offset += indices.start
        data = data.dataset
    if type(data) is TensorDataset:
        return tuple(data.tensors), offset
    return None


def gather_samples(data: Any, indices: Sequence[int], collate_fn: Callable[[list[Any]], Any] | None = None) -> Any:
    """The samples at ``indices`` of a Dataset, DataLoader or collated batch, as one collated batch."""
    idx = [int(i) for i in indices]
    if isinstance(data, DataLoader):
        collate_fn = collate_fn or data.collate_fn
        data = data.dataset
    if is_collated_batch(data):
        index = torch.tensor(idx, dtype=torch.long)
        return _index_batch(data, index)
    collate = collate_fn or torch.utils.data.default_collate
    return collate([data[i] for i in idx])


def _index_batch(batch: Any, index: Tensor) -> Any:
    if isinstance(batch, Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return type(batch)({k: _index_batch(v, index) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index_batch(v, index) for v in batch)
    return batch


def subset(data: Any, start: int, stop: int, name: str = "test_data") -> Any:
    """Samples ``start:stop`` of a Dataset, DataLoader or collated batch, in the same form.

    A DataLoader becomes a non-shuffling DataLoader over the same samples with the same batch
    size and collate function. ``name`` is the argument ``data`` came from, for error messages.
    """
    if start == 0 and stop >= num_samples(data, name):
        return data
    if isinstance(data, DataLoader):
        check_ordered_loader(data, name)
        sub = torch.utils.data.Subset(data.dataset, range(start, stop))
        return DataLoader(sub, batch_size=data.batch_size or 1, shuffle=False, collate_fn=data.collate_fn)
    if is_collated_batch(data, name):
        return slice_batch(data, start, stop)
    return torch.utils.data.Subset(data, range(start, stop))


def batch_inputs(batch: Any) -> Tensor:
    """The input tensor of a batch: the batch itself, its first element, or its ``"x"``/``"image"`` entry."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("x", "image", "input", "inputs"):
            if key in batch:
                return batch[key]
        raise ValueError(f"Cannot find the input tensor in a dict batch with keys {sorted(batch)}; use key 'x'.")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"Expected a batch that is a Tensor, a (x, ...) tuple or a dict; got {type(batch).__name__}.")


_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def batch_labels(batch: Any) -> Tensor:
    """The label tensor of a batch: the second element of ``(x, y, ...)`` or a dict's ``"y"``/``"label"``/``"target"``.

    Raises:
        ValueError: for a batch without labels (a bare tensor), naming what is expected.
    """
    if isinstance(batch, Mapping):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(f"Cannot find labels in a dict batch with keys {sorted(batch)}; use key 'y'.")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    raise ValueError(
        "SupervisedVAE needs labelled batches (x, y) or {'x': ..., 'y': ...}; give unlabelled samples the label -1."
        f" Got {type(batch).__name__}."
    )
