import pytest
import torch
from torch import nn

from lightning_influence.gradients.featurizer import GradientFeaturizer, cast_state
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.gradients.parameters import flatten_gradients
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.gradients.vmap import VmapEngine, module_state, per_sample_gradients
from lightning_influence.models import MLPVAE

CPU = torch.device("cpu")


def _vae():
    torch.manual_seed(0)
    return MLPVAE(input_dim=10, hidden_dim=8, latent_dim=2, influence_draws=2)


def _loss(m, batch):
    return m.per_sample_loss(batch)


def _setup(names=None):
    vae = _vae()
    names = names or [n for n, _ in vae.named_parameters()]
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([5, 0, 9, 2, 7, 11])
    state = cast_state(module_state(vae), GradientPrecision(), CPU)
    return vae, names, x, ids, state


def test_exact_rows_equal_flattened_per_sample_gradients():
    vae, names, x, ids, state = _setup()
    feat = GradientFeaturizer(vae, _loss, names, noise_seed=3)
    rows, bad = feat.rows(x, ids, state)
    g = per_sample_gradients(vae, _loss, x, {n: state[n] for n in names}, state=state, sample_ids=ids, noise_seed=3)
    ref = flatten_gradients(g, names)
    assert rows.shape == (6, feat.dim()) and feat.dim() == feat.input_dim == ref.shape[1]
    assert rows.dtype == torch.float32
    assert torch.allclose(rows, ref, rtol=1e-6, atol=1e-7)
    assert bad.dtype == torch.bool and not bad.any()


def test_parameter_subset_and_scales():
    vae, _, x, ids, state = _setup()
    names = ["decoder.2.weight", "encoder.0.bias"]
    feat = GradientFeaturizer(vae, _loss, names)
    rows, _ = feat.rows(x, ids, state, param_scales={"encoder.0.bias": 3.0})
    g = per_sample_gradients(vae, _loss, x, {n: state[n] for n in names}, state=state, sample_ids=ids)
    assert feat.dim() == 10 * 8 + 8
    assert torch.allclose(rows, torch.cat([g[names[0]].flatten(1), 3.0 * g[names[1]]], dim=1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sjlt", "gaussian"])
def test_projected_rows_equal_projection_of_exact_rows(kind):
    vae, names, x, ids, state = _setup()
    numels = [p.numel() for _, p in vae.named_parameters()]
    proj = RandomProjection(ProjectionSpec(dim=32, seed=5, kind=kind), names, numels)
    exact, _ = GradientFeaturizer(vae, _loss, names).rows(x, ids, state)
    feat = GradientFeaturizer(vae, _loss, names)
    rows, bad = feat.rows(x, ids, state, projection=proj)
    assert feat.dim(proj) == 32 and rows.shape == (6, 32) and not bad.any()
    assert torch.allclose(rows, proj.project_flat(exact), rtol=1e-5, atol=1e-5)
    # with per-parameter scales
    scales = {names[0]: 0.5}
    scaled, _ = feat.rows(x, ids, state, projection=proj, param_scales=scales)
    exact_scaled, _ = GradientFeaturizer(vae, _loss, names).rows(x, ids, state, param_scales=scales)
    assert torch.allclose(scaled, proj.project_flat(exact_scaled), rtol=1e-5, atol=1e-5)


def test_rows_are_keyed_by_ids_and_stream():
    vae, names, x, ids, state = _setup()
    feat = GradientFeaturizer(vae, _loss, names)
    rows, _ = feat.rows(x, ids, state)
    # a sample's row depends on its id, not on its batch
    single, _ = feat.rows(x[2:3], ids[2:3], state)
    assert torch.allclose(single, rows[2:3], rtol=1e-5, atol=1e-6)
    second, _ = feat.rows(x, ids, state, stream=NoiseStream.TRAIN_SECOND)
    assert not torch.allclose(second, rows, atol=1e-4)
    again, _ = feat.rows(x, ids, state)
    assert torch.equal(again, rows)


def test_chunk_size_does_not_change_rows():
    vae, names, x, ids, state = _setup()
    a, _ = GradientFeaturizer(vae, _loss, names).rows(x, ids, state)
    b, _ = GradientFeaturizer(vae, _loss, names, engine=VmapEngine(chunk_size=2)).rows(x, ids, state)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_module_is_not_modified():
    vae, names, x, ids, state = _setup()
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    GradientFeaturizer(vae, _loss, names).rows(x, ids, state)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in vae.named_parameters())


def test_cast_state():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    st = dict(module_state(net, upcast=False))
    st["extra64"] = torch.zeros(2, dtype=torch.float64)
    half = cast_state(st, GradientPrecision("true", "bfloat16"), CPU)
    assert half["0.weight"].dtype == torch.bfloat16 and half["1.running_var"].dtype == torch.bfloat16
    assert half["1.num_batches_tracked"].dtype == torch.int64 and half["extra64"].dtype == torch.float64
    st16 = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in st.items()}
    for p in (GradientPrecision(), GradientPrecision("mixed", "float16")):
        up = cast_state(st16, p, CPU)
        assert up["0.weight"].dtype == torch.float32
        assert not up["0.weight"].requires_grad


def test_mixed_bf16_rows_are_close_to_fp32_rows():
    vae, names, x, ids, state = _setup()
    exact, _ = GradientFeaturizer(vae, _loss, names).rows(x, ids, state)
    p = GradientPrecision("mixed", "bfloat16")
    rows, bad = GradientFeaturizer(vae, _loss, names, precision=p).rows(x, ids, cast_state(state, p, CPU))
    assert rows.dtype == torch.float32 and not bad.any()
    rel = (rows - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 0.1
    assert float(rel.max()) > 0  # it really ran under autocast


def test_true_bf16_rows_are_close_to_fp32_rows_without_loss_scaling():
    vae, names, x, ids, state = _setup()
    p = GradientPrecision("true", "bfloat16")
    st = cast_state(state, p, CPU)
    assert st[names[0]].dtype == torch.bfloat16
    rows, bad = GradientFeaturizer(vae, _loss, names, precision=p).rows(x, ids, st)
    # reference at the same (bf16-rounded) weights in fp32
    exact, _ = GradientFeaturizer(vae, _loss, names).rows(x, ids, cast_state(st, GradientPrecision(), CPU))
    assert rows.dtype == torch.float32 and not bad.any()
    rel = (rows - exact).norm(dim=1) / exact.norm(dim=1)
    assert 0 < float(rel.max()) < 0.1


def _overflow_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).sum(1) * batch["w"]

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, generator=g), 3 * torch.randn(5, 3, generator=g)
    w = torch.full((5,), 10.0)
    return net, loss_fn, {"x": x, "y": y, "w": w}


@pytest.mark.parametrize("mode", ["true", "mixed"])
def test_fp16_backs_off_loss_scale_and_returns_finite_rows(mode):
    net, loss_fn, batch = _overflow_problem()
    names = [n for n, _ in net.named_parameters()]
    ids = torch.arange(5)
    p16 = GradientPrecision(mode, "float16")
    st16 = cast_state(module_state(net), p16, CPU)
    if mode == "true":
        # At the initial loss scale every per-sample gradient overflows fp16.
        half_batch = {k: v.half() for k, v in batch.items()}
        params = {n: st16[n] for n in names}
        g = per_sample_gradients(net, loss_fn, half_batch, params, state=st16, loss_scale=p16.init_loss_scale)
        assert not torch.isfinite(flatten_gradients(g, names)).all(dim=1).any()
    rows, bad = GradientFeaturizer(net, loss_fn, names, precision=p16).rows(batch, ids, st16)
    assert not bad.any() and torch.isfinite(rows).all()
    # fp32 reference (from the same weights): agreement to fp16 accuracy
    st32 = cast_state({k: v.half() if v.is_floating_point() else v for k, v in st16.items()}, GradientPrecision(), CPU)
    ref, _ = GradientFeaturizer(net, loss_fn, names).rows(batch, ids, st32)
    rel = (rows - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 5e-3


def test_fp16_true_flags_only_genuinely_nonfinite_samples():
    net, loss_fn, batch = _overflow_problem()
    batch["w"][3] = float("inf")  # this sample's loss (and gradient) is infinite at any scale
    names = [n for n, _ in net.named_parameters()]
    p16 = GradientPrecision("true", "float16")
    st16 = cast_state(module_state(net), p16, CPU)
    rows, bad = GradientFeaturizer(net, loss_fn, names, precision=p16).rows(batch, torch.arange(5), st16)
    assert bad.tolist() == [False, False, False, True, False]
    assert torch.isfinite(rows[~bad]).all()
    assert not torch.isfinite(rows[3]).all()  # reported, never zeroed
    assert rows[3].abs().sum() != 0


def test_fp32_mode_flags_nonfinite_without_loss_scaling():
    net, loss_fn, batch = _overflow_problem()
    batch["w"][1] = float("nan")
    names = [n for n, _ in net.named_parameters()]
    state = cast_state(module_state(net), GradientPrecision(), CPU)
    rows, bad = GradientFeaturizer(net, loss_fn, names).rows(batch, torch.arange(5), state)
    assert bad.tolist() == [False, True, False, False, False]
    assert torch.isnan(rows[1]).all() and torch.isfinite(rows[[0, 2, 3, 4]]).all()


def test_rows_on_huge_pages_equal_rows_on_small_pages(monkeypatch):
    import lightning_influence.gradients.featurizer as featurizer

    vae, names, x, ids, state = _setup()
    feat = GradientFeaturizer(vae, _loss, names, noise_seed=3)
    small, _ = feat.rows(x, ids, state)
    monkeypatch.setattr(featurizer, "HUGE_ROWS_BYTES", 0)
    huge, _ = feat.rows(x, ids, state)
    assert torch.equal(huge, small)
    fresh = featurizer.empty_rows(3, 5, torch.float64, CPU)
    assert fresh.shape == (3, 5) and fresh.dtype == torch.float64
    fresh.fill_(1.0)  # writable, and usable like any tensor
    assert float(torch.cat([fresh, fresh]).sum()) == 30.0
