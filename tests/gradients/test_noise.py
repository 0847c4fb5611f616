import math

import pytest
import torch
from torch.func import vmap

from lightning_influence.gradients.noise import NoiseStream, fixed_noise, keyed_standard_normal, standard_normal


def _normal_quantiles(probs: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * probs - 1.0)


def test_reproducible_per_key_and_independent_of_batch_composition_and_order():
    ids = torch.tensor([5, 17, 3, 1000, 2**31 + 7])
    a = keyed_standard_normal(ids, (3, 4), seed=11, stream=0)
    assert a.shape == (5, 3, 4) and a.dtype == torch.float32
    assert torch.equal(a, keyed_standard_normal(ids, (3, 4), seed=11, stream=0))
    # Reversed order and single samples: each id keeps its own noise.
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(keyed_standard_normal(ids[perm], (3, 4), seed=11)[:], a[perm])
    for i, sid in enumerate(ids):
        assert torch.equal(keyed_standard_normal(sid.reshape(1), (3, 4), seed=11)[0], a[i])
    # A batch with other companions.
    mixed = keyed_standard_normal(torch.tensor([99, 17, 42]), (3, 4), seed=11)
    assert torch.equal(mixed[1], a[1])
    # Different ids give different noise.
    assert not torch.allclose(a[0], a[1])


def test_ids_dtype_does_not_matter():
    a = keyed_standard_normal(torch.tensor([1, 2, 3], dtype=torch.int32), (8,), seed=0)
    b = keyed_standard_normal(torch.tensor([1, 2, 3], dtype=torch.int64), (8,), seed=0)
    assert torch.equal(a, b)


def test_dtype_argument_casts_same_values():
    ids = torch.arange(4)
    a = keyed_standard_normal(ids, (6,), seed=3, dtype=torch.float64)
    b = keyed_standard_normal(ids, (6,), seed=3, dtype=torch.float32)
    assert a.dtype == torch.float64
    assert torch.equal(a.float(), b)


@pytest.mark.parametrize("change", ["seed", "stream"])
def test_different_seeds_and_streams_are_uncorrelated(change):
    ids = torch.arange(200)
    base = keyed_standard_normal(ids, (100,), seed=1, stream=0, dtype=torch.float64).flatten()
    kw = {"seed": 2, "stream": 0} if change == "seed" else {"seed": 1, "stream": NoiseStream.TRAIN_SECOND}
    other = keyed_standard_normal(ids, (100,), dtype=torch.float64, **kw).flatten()
    corr = torch.corrcoef(torch.stack([base, other]))[0, 1]
    # n = 20,000: the standard error of the correlation is ~0.007.
    assert abs(float(corr)) < 0.03
    assert not torch.equal(base, other)


def test_neighbouring_ids_and_positions_are_uncorrelated():
    x = keyed_standard_normal(torch.arange(5000), (2,), seed=0, dtype=torch.float64)
    # Adjacent positions within a sample and adjacent ids.
    c_pos = torch.corrcoef(x.T)[0, 1]
    c_ids = torch.corrcoef(torch.stack([x[:-1, 0], x[1:, 0]]))[0, 1]
    assert abs(float(c_pos)) < 0.06 and abs(float(c_ids)) < 0.06


def test_moments_and_quantiles_match_standard_normal():
    x = keyed_standard_normal(torch.arange(400), (250,), seed=123, dtype=torch.float64).flatten()
    n = x.numel()  # 100,000
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.std()) - 1.0) < 0.02
    assert abs(float((x**3).mean())) < 0.05  # skewness
    assert abs(float((x**4).mean()) - 3.0) < 0.1  # kurtosis
    # KS-style check: the empirical CDF at the normal quantiles.
    probs = torch.tensor([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999], dtype=torch.float64)
    q = _normal_quantiles(probs)
    ecdf = (x.unsqueeze(1) <= q).double().mean(0)
    assert float((ecdf - probs).abs().max()) < 1.63 / math.sqrt(n) * 1.5  # ~KS 1% critical value
    assert torch.isfinite(x).all()


def test_keyed_noise_identical_under_vmap():
    ids = torch.tensor([4, 9, 2])

    def per_sample(sid):
        return keyed_standard_normal(sid.unsqueeze(0), (5,), seed=7, stream=2)[0]

    assert torch.equal(vmap(per_sample)(ids), keyed_standard_normal(ids, (5,), seed=7, stream=2))


def test_standard_normal_inside_fixed_noise_is_keyed_and_under_vmap():
    ids = torch.tensor([10, 20, 30])
    like = torch.zeros(3, dtype=torch.float64)
    with fixed_noise(ids, seed=5, stream=NoiseStream.TEST):
        a = standard_normal((3, 2, 2), like=like)
    assert a.dtype == torch.float64
    assert torch.equal(a, keyed_standard_normal(ids, (2, 2), seed=5, stream=NoiseStream.TEST, dtype=torch.float64))

    def one(sid, x):
        with fixed_noise(sid.unsqueeze(0), seed=5, stream=NoiseStream.TEST):
            return standard_normal((1, 2, 2), like=x.unsqueeze(0))[0]

    assert torch.equal(vmap(one)(ids, torch.zeros(3, 4, dtype=torch.float64)), a)


def test_standard_normal_falls_back_to_randn_outside_context():
    like = torch.zeros(1)
    torch.manual_seed(0)
    a = standard_normal((4, 3), like=like)
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn(4, 3))
    # The context is restored on exit, even after an exception.
    with pytest.raises(RuntimeError), fixed_noise(torch.arange(4), seed=0):
        raise RuntimeError("boom")
    torch.manual_seed(1)
    b = standard_normal((4, 3), like=like)
    torch.manual_seed(1)
    assert torch.equal(b, torch.randn(4, 3))


def test_nested_fixed_noise_restores_outer_key():
    outer, inner = torch.tensor([1, 2]), torch.tensor([7, 8])
    like = torch.zeros(1)
    with fixed_noise(outer, seed=0):
        with fixed_noise(inner, seed=0):
            x_in = standard_normal((2, 3), like=like)
        x_out = standard_normal((2, 3), like=like)
    assert torch.equal(x_in, keyed_standard_normal(inner, (3,), seed=0))
    assert torch.equal(x_out, keyed_standard_normal(outer, (3,), seed=0))


def test_mismatched_batch_size_raises():
    with fixed_noise(torch.arange(3), seed=0), pytest.raises(ValueError, match="3 sample ids.*batch size 5"):
        standard_normal((5, 2), like=torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_noise_on_cuda_as_on_cpu():
    ids = torch.tensor([0, 5, 123456, 2**40 + 3])
    cpu = keyed_standard_normal(ids, (7, 3), seed=9, stream=1)
    cuda = keyed_standard_normal(ids.cuda(), (7, 3), seed=9, stream=1)
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, rtol=1e-6, atol=1e-6)
