from collections import namedtuple

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from lightning_influence.data.batches import (
    batch_size_of,
    gather_samples,
    is_collated_batch,
    iterate_batches,
    num_samples,
    slice_batch,
    tensor_leaves,
)

N = 11
X = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
Y = torch.arange(N) * 10


class DictDataset(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": X[i], "y": Y[i]}


def _collect(data, batch_size=4, **kw):
    ids, xs, ys = [], [], []
    for sid, batch in iterate_batches(data, batch_size, **kw):
        assert sid.dtype == torch.int64
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])
        assert len(sid) == len(x) == len(y)
        ids.append(sid)
        xs.append(x)
        ys.append(y)
    return torch.cat(ids), torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TensorDataset(X, Y),
        lambda: DataLoader(TensorDataset(X, Y), batch_size=3, shuffle=False),
        lambda: (X, Y),
        lambda: [X, Y],
        lambda: {"x": X, "y": Y},
        lambda: DictDataset(),
        lambda: DataLoader(DictDataset(), batch_size=5),
    ],
    ids=["dataset", "loader", "tuple", "list", "dict", "dict_dataset", "dict_loader"],
)
def test_all_inputs_yield_same_ids_and_rows(make):
    ids, xs, ys = _collect(make())
    assert torch.equal(ids, torch.arange(N))
    assert torch.equal(xs, X) and torch.equal(ys, Y)


def test_batch_size_respected_except_for_loader():
    sizes = [len(i) for i, _ in iterate_batches(TensorDataset(X, Y), 4)]
    assert sizes == [4, 4, 3]
    sizes = [len(i) for i, _ in iterate_batches((X, Y), 5)]
    assert sizes == [5, 5, 1]
    # A DataLoader keeps its own batch size.
    sizes = [len(i) for i, _ in iterate_batches(DataLoader(TensorDataset(X, Y), batch_size=6), 4)]
    assert sizes == [6, 5]


def test_single_tensor_batch_and_namedtuple_structure():
    ids, batch = next(iterate_batches(X, 100))
    assert torch.equal(ids, torch.arange(N)) and torch.equal(batch, X)
    Pair = namedtuple("Pair", "x y")
    out = list(iterate_batches(Pair(X, Y), 6))
    assert isinstance(out[1][1], Pair)
    assert torch.equal(out[1][1].y, Y[6:])


def test_custom_collate_fn_used_for_dataset():
    def collate(items):
        return torch.stack([x for x, _ in items]) * 2

    batches = [b for _, b in iterate_batches(TensorDataset(X, Y), 4, collate_fn=collate)]
    assert torch.equal(torch.cat(batches), 2 * X)


def test_shuffling_loader_raises_naming_the_argument():
    loader = DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="`test_data` is a DataLoader that shuffles"):
        list(iterate_batches(loader, 4, name="test_data"))


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, drop_last=False)),
        lambda ds: DataLoader(ds, sampler=SubsetRandomSampler(list(range(N))), batch_size=4),
    ],
    ids=["random_batch_sampler", "subset_random_sampler"],
)
def test_loader_with_other_shuffling_samplers_raises(make):
    with pytest.raises(ValueError, match="`data`"):
        list(iterate_batches(make(TensorDataset(X, Y)), 4))


def test_loader_with_drop_last_does_not_silently_lose_samples():
    loader = DataLoader(TensorDataset(X, Y), batch_size=4, drop_last=True)
    try:
        ids = torch.cat([i for i, _ in iterate_batches(loader, 4)])
    except ValueError as err:
        assert "drop_last" in str(err)
    else:
        assert torch.equal(ids, torch.arange(N))


def test_loader_without_automatic_batching_is_refused_or_numbered_per_sample():
    loader = DataLoader(TensorDataset(X, Y), batch_size=None)
    try:
        ids = torch.cat([i for i, _ in iterate_batches(loader, 4)])
    except ValueError as err:
        assert "batch_size" in str(err)
    else:
        assert torch.equal(ids, torch.arange(N))


def test_explicit_sequential_sampler_is_accepted():
    ds = TensorDataset(X, Y)
    loader = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, drop_last=False))
    ids, xs, _ = _collect(loader)
    assert torch.equal(ids, torch.arange(N)) and torch.equal(xs, X)


@pytest.mark.parametrize(
    "data",
    [TensorDataset(torch.zeros(0, 3)), DataLoader(TensorDataset(torch.zeros(0, 3))), torch.zeros(0, 3)],
    ids=["dataset", "loader", "tensor"],
)
def test_empty_data_raises(data):
    with pytest.raises(ValueError, match="`train_data` is empty"):
        list(iterate_batches(data, 4, name="train_data"))


def test_num_samples_and_type_error():
    assert num_samples(TensorDataset(X, Y)) == N
    assert num_samples(DataLoader(TensorDataset(X, Y), batch_size=3)) == N
    assert num_samples((X, Y)) == N
    assert num_samples({"x": X}) == N
    with pytest.raises(TypeError, match="`dataset` must be a torch Dataset"):
        num_samples(42, name="dataset")


def test_is_collated_batch():
    assert is_collated_batch(X)
    assert is_collated_batch((X, Y)) and is_collated_batch({"a": X, "b": [Y]})
    assert not is_collated_batch((X, "label"))  # non-tensor leaf
    assert not is_collated_batch(torch.tensor(1.0))
    assert not is_collated_batch(TensorDataset(X))
    assert not is_collated_batch([])


@pytest.mark.parametrize("batch", [(X, Y[:3]), {"x": X, "y": Y[:3]}, (X, [Y[:3]])], ids=["tuple", "dict", "nested"])
def test_a_collated_batch_whose_tensors_disagree_on_the_batch_size_is_refused_by_name(batch):
    """Read as samples, (X[11], Y[3]) would be a 2-sample dataset; it is a mistake in the batch."""
    with pytest.raises(ValueError, match=r"`train_data` is a collated batch .* batch size .*: 11 and 3\."):
        is_collated_batch(batch, "train_data")
    with pytest.raises(ValueError, match=r"`train_data` .* 11 and 3"):
        num_samples(batch, "train_data")
    with pytest.raises(ValueError, match=r"`test_data` .* 11 and 3"):
        list(iterate_batches(batch, 4, name="test_data"))


def test_lists_of_samples_are_still_datasets():
    """Samples of different shapes in a list (or a tuple of sample tuples) are samples, not a batch."""
    sequences = [torch.zeros(5, 3), torch.zeros(7, 3)]  # variable length, padded by a collate_fn
    assert not is_collated_batch(sequences) and num_samples(sequences) == 2
    pairs = [(X[i], Y[i : i + 1].repeat(2)) for i in range(4)]  # x [3], y [2]
    assert not is_collated_batch(pairs) and num_samples(pairs) == 4
    assert not is_collated_batch(tuple(pairs)) and num_samples(tuple(pairs)) == 4
    loader = DataLoader(sequences, batch_size=2, collate_fn=lambda b: torch.nn.utils.rnn.pad_sequence(b, True))
    assert num_samples(loader) == 2


def test_tensor_leaves_slice_and_batch_size():
    batch = {"x": X, "meta": (Y, [X[:, 0]])}
    leaves = tensor_leaves(batch)
    assert len(leaves) == 3 and leaves[0] is X
    assert batch_size_of(batch) == N
    s = slice_batch(batch, 2, 5)
    assert torch.equal(s["x"], X[2:5]) and torch.equal(s["meta"][1][0], X[2:5, 0])
    assert isinstance(s["meta"], tuple) and isinstance(s["meta"][1], list)
    with pytest.raises(ValueError, match="containing tensors"):
        batch_size_of({"a": 1})


@pytest.mark.parametrize(
    "make",
    [
        lambda: TensorDataset(X, Y),
        lambda: DataLoader(TensorDataset(X, Y), batch_size=3),
        lambda: (X, Y),
        lambda: DictDataset(),
    ],
    ids=["dataset", "loader", "tuple", "dict_dataset"],
)
def test_gather_samples(make):
    idx = [7, 0, 7, 3]
    out = gather_samples(make(), idx)
    x, y = (out["x"], out["y"]) if isinstance(out, dict) else out
    assert torch.equal(x, X[idx]) and torch.equal(y, Y[idx])


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: ds,
        lambda ds: Subset(ds, range(3, 17)),
        lambda ds: Subset(Subset(ds, range(2, 19)), range(1, 15)),
        lambda ds: Subset(ds, list(range(3, 17))),  # not a range: the per-sample path
        lambda ds: Subset(ds, range(3, 17, 2)),  # a strided range: the per-sample path
    ],
)
def test_tensor_datasets_are_sliced_like_default_collate_stacks_them(make):
    ds = TensorDataset(torch.randn(20, 3), torch.arange(20))
    data = make(ds)
    fast = list(iterate_batches(data, 4))
    reference = list(DataLoader(data, batch_size=4, shuffle=False))
    assert len(fast) == len(reference)
    start = 0
    for (ids, batch), ref in zip(fast, reference):
        assert type(batch) is type(ref)
        assert torch.equal(ids, torch.arange(start, start + len(ref[0])))
        assert all(torch.equal(a, b) for a, b in zip(batch, ref))
        start += len(ref[0])
    # The loader's own default collate takes the same path; another collate function is honoured.
    zeros = list(iterate_batches(data, 4, collate_fn=lambda items: torch.zeros(len(items), 3)))
    assert all(torch.equal(b, torch.zeros(len(ids), 3)) for ids, b in zeros)
