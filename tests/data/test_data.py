import struct

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_influence.data import DigitsDataModule, MNISTDataModule, load_digits_tensors


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(1.0, 2.0, x[0].numel(), dtype=torch.float64)
    return torch.sort(x.reshape(len(x), -1).double() @ w + 1000.0 * y.double()).values


def test_load_digits_tensors():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    x_img, y_img = load_digits_tensors(flatten=False)
    assert x_img.shape == (1797, 1, 8, 8)
    assert torch.equal(x_img.reshape(1797, 64), x) and torch.equal(y_img, y)


def test_digits_split_sizes_partition_and_determinism():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (1259, 269, 269)
    # The three splits partition the data.
    x, y = load_digits_tensors()
    parts = [ds.tensors for ds in (dm.train_set, dm.val_set, dm.test_set)]
    joined = _fingerprint(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert torch.allclose(joined, _fingerprint(x, y), rtol=0, atol=1e-9)
    # Same seed, same order (ids are stable across runs); another seed, another split.
    dm2 = DigitsDataModule(batch_size=32)
    dm2.setup("fit")
    assert torch.equal(dm2.train_set.tensors[0], dm.train_set.tensors[0])
    dm3 = DigitsDataModule(batch_size=32, seed=1)
    dm3.setup("fit")
    assert not torch.equal(dm3.train_set.tensors[0], dm.train_set.tensors[0])
    # setup is idempotent
    train = dm.train_set
    dm.setup("test")
    assert dm.train_set is train


def test_digits_fractions_and_image_layout():
    dm = DigitsDataModule(batch_size=8, val_fraction=0.0, test_fraction=0.5, flatten=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (899, 0, 898)
    x, y = dm.train_set[0]
    assert x.shape == (1, 8, 8) and y.dim() == 0


def test_digits_loaders():
    dm = DigitsDataModule(batch_size=50)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.batch_size == 50
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 64) and torch.equal(x, dm.test_set.tensors[0][:50])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "`batch_size` must be >= 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "`val_fraction` and `test_fraction`"),
        ({"val_fraction": -0.1}, "`val_fraction`"),
        ({"test_fraction": 1.0}, "`test_fraction`"),
    ],
)
def test_digits_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def _write_idx(root, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    train_y = np.arange(20) % 10
    test_x = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    test_y = np.arange(6)
    _write_idx(tmp_path, "train", train_x, train_y)
    _write_idx(tmp_path, "t10k", test_x, test_y)
    return tmp_path, train_x, train_y, test_x, test_y


def test_mnist_reads_local_idx_files(tiny_mnist):
    root, train_x, train_y, test_x, _ = tiny_mnist
    dm = MNISTDataModule(root, batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    x, y = dm.test_set[2]
    assert x.shape == (784,) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(test_x[2].reshape(-1)).float() / 255.0)
    assert int(y) == 2
    # train + val partition the training file
    xs = torch.cat([dm.train_set.x, dm.val_set.x])
    ys = torch.cat([dm.train_set.y, dm.val_set.y])
    ref_x = torch.from_numpy(train_x).float().reshape(20, -1) / 255.0
    assert torch.allclose(_fingerprint(xs, ys), _fingerprint(ref_x, torch.from_numpy(train_y)), rtol=0, atol=1e-9)
    assert float(xs.max()) <= 1.0 and float(xs.min()) >= 0.0
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (4, 784)


def test_mnist_images_and_limit(tiny_mnist):
    root, train_x, *_ = tiny_mnist
    dm = MNISTDataModule(root, flatten=False, limit_train=10, val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 10 and len(dm.val_set) == 0
    x, _ = dm.train_set[0]
    assert x.shape == (1, 28, 28)
    limited = _fingerprint(dm.train_set.x, dm.train_set.y)
    first_ten = _fingerprint(torch.from_numpy(train_x[:10]).float().unsqueeze(1) / 255.0, torch.arange(10))
    assert torch.allclose(limited, first_ten, rtol=0, atol=1e-9)


def test_mnist_missing_files_never_download(tmp_path):
    dm = MNISTDataModule(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="never downloads") as err:
        dm.setup()
    assert str(tmp_path / "empty" / "MNIST" / "raw") in str(err.value)
    assert not (tmp_path / "empty" / "MNIST" / "raw").exists() or not any(
        (tmp_path / "empty" / "MNIST" / "raw").iterdir()
    )


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.5}, {"val_fraction": -0.1}, {"limit_train": 0}])
def test_mnist_argument_validation(tmp_path, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`"):
        MNISTDataModule(tmp_path, **kwargs)
