import math

import pytest
import torch

from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection

KINDS = ["sjlt", "rademacher", "gaussian"]
ALL_KINDS = KINDS + ["kronecker"]
NAMES = ["enc.weight", "enc.bias", "dec.weight"]
NUMELS = [600, 30, 1200]
SHAPES = {"enc.weight": (20, 30), "enc.bias": (30,), "dec.weight": (40, 30)}


def _proj(kind, dim=512, seed=0, names=NAMES, numels=NUMELS, checkpoint=0, **kw):
    # kronecker needs the matrix view of flat rows: the shapes above, or the parameter kept flat
    shapes = [SHAPES.get(n, (m,)) for n, m in zip(names, numels)] if kind == "kronecker" else None
    spec = ProjectionSpec(dim=dim, seed=seed, kind=kind, **kw)
    return RandomProjection(spec, names, numels, checkpoint=checkpoint, param_shapes=shapes)


def _gram_rel_error(x: torch.Tensor, px: torch.Tensor) -> float:
    g, pg = x.double() @ x.double().T, px.double() @ px.double().T
    return float((pg - g).norm() / g.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_gram_matrix_approximately_preserved(kind):
    torch.manual_seed(0)
    x = torch.randn(12, sum(NUMELS))
    errs = {}
    for k in (64, 1024):
        p = _proj(kind, dim=k, seed=3)
        px = p.project_flat(x)
        assert px.shape == (12, k) and px.dtype == torch.float32
        errs[k] = _gram_rel_error(x, px)
    # Off-diagonal inner products of random vectors are ~sqrt(D) against norms ~D, so the error is
    # dominated by the diagonal: O(sqrt(2/k)) relative.
    for k, e in errs.items():
        assert e < 3.0 * math.sqrt(2.0 / k), (k, e)
    assert errs[1024] < errs[64]  # error shrinks with k


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unbiased_over_seeds(kind):
    torch.manual_seed(1)
    names, numels = ["w"], [300]
    a, b = torch.randn(1, 300), torch.randn(1, 300)
    b = 0.6 * a + 0.8 * b  # correlated pair: <a, b> is far from zero
    exact = float((a * b).sum())
    n_seeds, k = 200, 16
    vals = []
    for s in range(n_seeds):
        p = _proj(kind, dim=k, seed=s, names=names, numels=numels)
        vals.append(float((p.project_flat(a) * p.project_flat(b)).sum()))
    vals = torch.tensor(vals, dtype=torch.float64)
    se = float(vals.std()) / math.sqrt(n_seeds)
    assert abs(float(vals.mean()) - exact) < 4 * se, (float(vals.mean()), exact, se)
    # and the estimator is not degenerate
    assert se > 0


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_deterministic_across_instances(kind):
    torch.manual_seed(2)
    x = torch.randn(5, sum(NUMELS))
    p1, p2 = _proj(kind, seed=9), _proj(kind, seed=9)
    assert torch.equal(p1.project_flat(x), p2.project_flat(x))
    # Repeated calls (sjlt uses a cache) agree as well.
    assert torch.equal(p1.project_flat(x), p2.project_flat(x))
    # Another seed gives another projection.
    assert not torch.allclose(_proj(kind, seed=10).project_flat(x), p1.project_flat(x))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_free_instance_matches_cached(kind):
    torch.manual_seed(3)
    x = torch.randn(4, sum(NUMELS))
    spec = ProjectionSpec(dim=128, seed=4, kind=kind)
    no_cache = RandomProjection(spec, NAMES, NUMELS, cache_bytes=0)
    cached = RandomProjection(spec, NAMES, NUMELS)
    assert torch.allclose(no_cache.project_flat(x), cached.project_flat(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_independent_of_batch_size_and_block_chunking(kind):
    torch.manual_seed(4)
    x = torch.randn(9, sum(NUMELS))
    # Small blocks force many generator blocks and (sjlt) many index_add chunks.
    p = _proj(kind, dim=64, seed=5, block_elements=256)
    full = p.project_flat(x)
    rows = torch.cat([p.project_flat(x[i : i + 1]) for i in range(9)])
    halves = torch.cat([p.project_flat(x[:4]), p.project_flat(x[4:])])
    assert torch.allclose(full, rows, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full, halves, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parameter_projection_depends_only_on_seed_and_name(kind):
    torch.manual_seed(5)
    g = {n: torch.randn(3, m) for n, m in zip(NAMES, NUMELS)}
    full = _proj(kind, dim=96, seed=6).project(g)
    parts = [_proj(kind, dim=96, seed=6, names=[n], numels=[m]).project({n: g[n]}) for n, m in zip(NAMES, NUMELS)]
    assert torch.allclose(full, sum(parts), rtol=1e-5, atol=1e-4)
    # Tracking the parameters in another order gives the same projection.
    rev = _proj(kind, dim=96, seed=6, names=NAMES[::-1], numels=NUMELS[::-1]).project(g)
    assert torch.allclose(full, rev, rtol=1e-5, atol=1e-4)
    # Renaming a parameter changes its block.
    renamed = _proj(kind, dim=96, seed=6, names=["other"], numels=[NUMELS[0]]).project({"other": g[NAMES[0]]})
    assert not torch.allclose(renamed, parts[0], atol=1e-3)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_project_dict_equals_project_flat_and_accepts_shaped_tensors(kind):
    torch.manual_seed(6)
    g = {n: torch.randn(4, *SHAPES[n]) for n in NAMES}
    p = _proj(kind, dim=80, seed=7)
    flat = torch.cat([g[n].reshape(4, -1) for n in NAMES], dim=1)
    tol = 1e-5 if kind == "kronecker" else 1e-6  # its matrix products round by memory layout
    assert torch.allclose(p.project(g), p.project_flat(flat), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_projection_is_linear(kind):
    torch.manual_seed(7)
    a, b = torch.randn(2, sum(NUMELS)), torch.randn(2, sum(NUMELS))
    p = _proj(kind, dim=64)
    assert torch.allclose(p.project_flat(2.0 * a - b), 2.0 * p.project_flat(a) - p.project_flat(b), atol=1e-4)


def test_per_parameter_scales():
    torch.manual_seed(8)
    g = {n: torch.randn(3, m) for n, m in zip(NAMES, NUMELS)}
    p = _proj("sjlt", dim=64, seed=1)
    scales = {"enc.weight": 2.0, "enc.bias": 0.0}  # dec.weight defaults to 1
    scaled = p.project(g, scales)
    manual = p.project(
        {"enc.weight": 2.0 * g["enc.weight"], "enc.bias": 0.0 * g["enc.bias"], "dec.weight": g["dec.weight"]}
    )
    assert torch.allclose(scaled, manual, atol=1e-5)
    assert not torch.allclose(scaled, p.project(g), atol=1e-3)


def test_sjlt_norm_preserved_exactly_in_expectation_and_integer_buckets():
    # With nnz=1 every coordinate maps to exactly one bucket with sign +-1: a one-hot input keeps norm 1.
    p = RandomProjection(ProjectionSpec(dim=32, seed=0, kind="sjlt", nnz=1), ["w"], [50])
    eye = torch.eye(50)
    out = p.project_flat(eye)
    assert torch.allclose(out.abs().sum(1), torch.ones(50))
    assert torch.equal((out != 0).sum(1), torch.ones(50, dtype=torch.long))


def test_project_flat_rejects_wrong_width():
    p = _proj("sjlt", dim=8)
    with pytest.raises(ValueError, match=f"{sum(NUMELS)} columns, got 7"):
        p.project_flat(torch.zeros(2, 7))


def test_mismatched_names_and_numels():
    with pytest.raises(ValueError, match="`param_names` and `param_numels`"):
        RandomProjection(ProjectionSpec(dim=4), ["a", "b"], [3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "`projection_dim`"),
        ({"dim": 2.5}, "`projection_dim`"),
        ({"dim": 8, "kind": "fourier"}, "`projection_kind`"),
        ({"dim": 8, "nnz": 0}, "`nnz`"),
        ({"dim": 8, "nnz": 9}, "`nnz`"),
        ({"dim": 8, "block_elements": 0}, "`block_elements`"),
        # Accepted before, then refused by numpy's SeedSequence during recording, naming no argument.
        ({"dim": 8, "seed": -1}, "`seed` must be a non-negative integer, got -1"),
        ({"dim": 8, "seed": 1.5}, "`seed`"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectionSpec(**kwargs)


def test_spec_round_trip_and_properties():
    spec = ProjectionSpec(dim=100, seed=3, kind="gaussian", nnz=2, block_elements=1000)
    assert ProjectionSpec.from_dict(spec.to_dict()) == spec
    import json

    assert ProjectionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    p = RandomProjection(spec, NAMES, NUMELS)
    assert p.dim == 100 and p.input_dim == sum(NUMELS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_same_projection_on_cuda_as_on_cpu(kind):
    torch.manual_seed(9)
    x = torch.randn(3, sum(NUMELS))
    p = _proj(kind, dim=64, seed=2)
    assert torch.allclose(p.project_flat(x.cuda()).cpu(), p.project_flat(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_random_blocks_are_bounded_by_block_elements(kind, monkeypatch):
    # The D x k matrix is never materialised: every random block has at most block_elements entries.
    sizes = []
    for fn in ("randn", "randint"):
        orig = getattr(torch, fn)

        def recording(*args, _orig=orig, **kwargs):
            out = _orig(*args, **kwargs)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, fn, recording)
    x = torch.ones(2, 6000)
    p = _proj(kind, dim=64, seed=0, names=["w"], numels=[6000], block_elements=1024)
    out = p.project_flat(x)
    monkeypatch.undo()
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    assert sizes and max(sizes) <= 1024
    assert sum(sizes) >= 6000  # every coordinate got its random entries


@pytest.mark.parametrize("kind", ["sjlt", "kronecker"])
def test_each_checkpoint_gets_an_independent_projection_unless_disabled(kind):
    x = torch.randn(3, sum(NUMELS))
    a = _proj(kind, dim=64, seed=2, checkpoint=0).project_flat(x)
    b = _proj(kind, dim=64, seed=2, checkpoint=1).project_flat(x)
    again = _proj(kind, dim=64, seed=2, checkpoint=1).project_flat(x)
    assert not torch.allclose(a, b)
    assert torch.equal(b, again)
    assert torch.equal(
        _proj(kind, dim=64, seed=2, checkpoint=0, per_checkpoint=False).project_flat(x),
        _proj(kind, dim=64, seed=2, checkpoint=5, per_checkpoint=False).project_flat(x),
    )


# ---------------------------------------------------------------------------------------------
# kronecker: parameters kept whole, the one-pass CountSketch mixing, the recorded map version


def test_kronecker_keeps_parameters_up_to_4k_entries_whole():
    p = _proj("kronecker", dim=1024)
    assert p.kron_dims((64, 8, 8)) == (64, 64, 64, 64)  # 4096 = 4k entries: whole
    d0, d1, kg, ka = p.kron_dims((65, 64))
    assert (d0, d1) == (65, 64) and kg * ka <= 1024 and (kg, ka) != (65, 64)


def test_kronecker_single_parameter_up_to_k_entries_is_an_exact_isometry():
    # Kept whole and mixed in without collisions: a signed injection, so inner products are exact.
    torch.manual_seed(10)
    x = torch.randn(5, 20, 30)
    p = RandomProjection(ProjectionSpec(dim=600, seed=3, kind="kronecker"), ["w"], [600])
    px = p.project({"w": x})
    flat = x.reshape(5, -1).double()
    torch.testing.assert_close(px.double() @ px.double().T, flat @ flat.T, rtol=1e-5, atol=1e-4)
    assert (px != 0).sum(1).eq(600).all()  # 600 distinct buckets of the 600 outputs


def _collision_variance(x, y, chunk_of, k):
    """``(1/k) sum_{i<j, different chunks} (x_i y_j + x_j y_i)^2``: the CountSketch variance of ``<x, y>``
    when coordinates of different chunks collide with probability ``1/k`` and those of one chunk never."""
    x, y = x.double(), y.double()
    pair = (x[:, None] * y[None, :] + x[None, :] * y[:, None]) ** 2
    apart = chunk_of[:, None] != chunk_of[None, :]
    return float(pair[apart].sum() / 2 / k)


def test_kronecker_mixing_is_unbiased_with_the_variance_of_a_random_hash():
    # One parameter kept whole across four chunks of k (24 x 20 = 480 <= 4k) and a bias: every
    # collision (between chunks, between parameters) must be zero-mean, and their variance that of
    # a CountSketch with collision probability 1/k -- what the per-chunk random offsets claim.
    torch.manual_seed(11)
    k, names, numels = 128, ["w", "b"], [480, 30]
    x = torch.randn(2, 510)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # correlated pair
    # A common positive mean makes every unsigned collision bias the estimate, and spikes at the same
    # place in each chunk would collide every time if the chunks shared an offset (6.8x the variance).
    x = x + 1.0
    x[:, (torch.arange(4)[:, None] * k + torch.arange(8)).flatten()] += 6.0
    exact = float(x[0].double() @ x[1].double())
    chunk_of = torch.cat([torch.arange(480) // k, torch.full((30,), -1)])  # the bias: its own "chunk"
    predicted = _collision_variance(x[0], x[1], chunk_of, k)
    est = []
    for seed in range(600):
        spec = ProjectionSpec(dim=k, seed=seed, kind="kronecker")
        p = RandomProjection(spec, names, numels, param_shapes=[(24, 20), (30,)])
        assert p.kron_dims((24, 20)) == (24, 20, 24, 20)
        px = p.project_flat(x).double()
        est.append(float(px[0] @ px[1]))
    est = torch.tensor(est, dtype=torch.float64)
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)
    assert 0.75 < float(est.var()) / predicted < 1.33, (float(est.var()), predicted)


def test_kronecker_cross_terms_between_sketched_parameters_average_out():
    # Two Gaussian-sketched parameters (not kept whole) land in the same outputs: the estimate of the
    # full inner product stays unbiased over seeds.
    torch.manual_seed(12)
    shapes = [(40, 30), (30, 40)]
    a, b = torch.randn(2400), torch.randn(2400)
    b = 0.6 * a + 0.8 * b
    exact = float(a.double() @ b.double())
    est = []
    for seed in range(300):
        p = RandomProjection(ProjectionSpec(dim=64, seed=seed, kind="kronecker"), ["u", "v"], [1200, 1200],
                             param_shapes=shapes)  # fmt: skip
        assert all(p.kron_dims(s)[2] * p.kron_dims(s)[3] <= 64 for s in shapes)
        pa, pb = p.project_flat(torch.stack([a, b])).double()
        est.append(float(pa @ pb))
    est = torch.tensor(est, dtype=torch.float64)
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * se and se > 0, (float(est.mean()), exact, se)


def test_kronecker_spec_records_its_map_version_and_refuses_an_older_one():
    import json

    spec = ProjectionSpec(dim=64, kind="kronecker")
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["kronecker_version"] == 2 and ProjectionSpec.from_dict(d) == spec
    # A manifest written before the field existed was projected with the old map: refused, not rebuilt.
    old = {key: v for key, v in d.items() if key != "kronecker_version"}
    with pytest.raises(ValueError, match="older kronecker projection; re-record"):
        ProjectionSpec.from_dict(old)
    with pytest.raises(ValueError, match="`kronecker_version` 1"):
        ProjectionSpec.from_dict({**d, "kronecker_version": 1})
    # The other kinds never changed: their old manifests still load.
    sjlt = {key: v for key, v in ProjectionSpec(dim=64).to_dict().items() if key != "kronecker_version"}
    assert ProjectionSpec.from_dict(sjlt) == ProjectionSpec(dim=64)
    # nnz belongs to sjlt only: a tiny kronecker projection does not trip over its default
    assert ProjectionSpec(dim=2, kind="kronecker").dim == 2
