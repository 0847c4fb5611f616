import math

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_influence.gradients.factored import FactoredEngine
from lightning_influence.gradients.featurizer import GradientFeaturizer, cast_state
from lightning_influence.gradients.parameters import module_state
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.gradients.split import SplitRows
from lightning_influence.models import MLPVAE
from lightning_influence.trajectory.sweep import (
    _overflows,
    factor_layout,
    learning_rate_scales,
    probe_rows,
    sweep_rows,
)


class _Sink:
    def __init__(self):
        self.ids, self.rows = [], []

    def write_rows(self, ids, rows):
        self.ids.append(ids.clone())
        self.rows.append(rows)

    def dense(self):
        return torch.cat([r.materialize() if isinstance(r, SplitRows) else r for r in self.rows])


def _loss(m, batch):
    return m.per_sample_loss(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _setup(engine=None):
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=10, hidden_dim=8, latent_dim=2, influence_draws=2)
    names = [n for n, _ in vae.named_parameters()]
    x = torch.rand(10, 10, generator=torch.Generator().manual_seed(1))
    feat = GradientFeaturizer(vae, _loss, names, noise_seed=3, **({"engine": engine} if engine else {}))
    state = cast_state(module_state(vae), GradientPrecision(), torch.device("cpu"))
    return vae, names, x, feat, state


def test_sweep_writes_every_sample_in_order_as_one_batch_would():
    vae, _, x, feat, state = _setup()
    reference, _ = feat.rows(x, torch.arange(10), state)
    vae.train()
    rng = torch.get_rng_state()
    sink = _Sink()
    bad = sweep_rows(feat, vae, TensorDataset(x), sink, batch_size=4)
    assert bad == []
    assert [ids.tolist() for ids in sink.ids] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Noise is keyed by sample id: the batching does not change a row.
    assert torch.allclose(sink.dense(), reference, rtol=1e-6, atol=1e-7)
    assert vae.training and torch.equal(torch.get_rng_state(), rng)


def test_sweep_of_a_shard_keys_rows_by_dataset_position():
    vae, _, x, feat, state = _setup()
    reference, _ = feat.rows(x, torch.arange(10), state)
    sink = _Sink()
    sweep_rows(feat, vae, TensorDataset(x), sink, batch_size=3, start=3, stop=8)
    assert torch.cat(sink.ids).tolist() == [3, 4, 5, 6, 7]
    assert torch.allclose(sink.dense(), reference[3:8], rtol=1e-6, atol=1e-7)


def test_projected_sweep_and_scales_equal_the_featurizer():
    vae, names, x, feat, state = _setup()
    proj = RandomProjection.for_shapes(ProjectionSpec(dim=16, seed=2), {n: state[n].shape for n in names})
    scales = {n: (0.5 if n.startswith("decoder") else 1.0) for n in names}
    reference, _ = feat.rows(x, torch.arange(10), state, projection=proj, param_scales=scales)
    sink = _Sink()
    sweep_rows(feat, vae, TensorDataset(x), sink, batch_size=4, projection=proj, param_scales=scales)
    assert torch.allclose(sink.dense(), reference, rtol=1e-5, atol=1e-6)


def test_nonfinite_samples_are_written_and_reported():
    vae, _, x, feat, _ = _setup()
    x[[2, 7]] = float("inf")
    sink = _Sink()
    bad = sweep_rows(feat, vae, TensorDataset(x), sink, batch_size=4)
    assert bad == [2, 7]
    rows = sink.dense()
    assert not rows[[2, 7]].isfinite().all(dim=1).any()
    assert rows[[0, 1, 3, 4, 5, 6, 8, 9]].isfinite().all()


def test_factored_rows_carry_no_parameter_scale():
    vae, names, x, feat, state = _setup(engine=FactoredEngine())
    factored = [n for n in names if n.endswith("weight")]
    scales = {n: 0.5 for n in names}
    unscaled, _ = feat.rows(x, torch.arange(10), state)
    sink = _Sink()
    sweep_rows(feat, vae, TensorDataset(x), sink, batch_size=4, factored=factored, param_scales=scales)
    assert all(isinstance(r, SplitRows) and set(r.factors) == set(factored) for r in sink.rows)
    # Readers apply the checkpoint's scales to factors; the dense columns are written scaled.
    col = torch.cat([torch.full((state[n].numel(),), 1.0 if n in factored else 0.5) for n in names])
    assert torch.allclose(sink.dense(), unscaled * col, rtol=1e-5, atol=1e-6)


def test_factored_sweep_refuses_a_projection():
    vae, names, x, feat, state = _setup()
    proj = RandomProjection.for_shapes(ProjectionSpec(dim=16), {n: state[n].shape for n in names})
    with pytest.raises(ValueError, match="`factored` storage keeps exact gradients"):
        sweep_rows(feat, vae, TensorDataset(x), _Sink(), batch_size=4, factored=names[:1], projection=proj)


def test_learning_rate_scales_fold_group_rates_into_one_eta():
    assert learning_rate_scales({"w": 0.1, "b": 0.1}) == (0.1, None)
    assert learning_rate_scales({"w": 0.0, "b": 0.0}) == (0.0, None)
    per_param = {"w": 0.2, "b": 0.05, "c": 0.0}
    eta, scales = learning_rate_scales(per_param)
    assert eta == 0.2 and scales == {"w": 1.0, "b": 0.5, "c": 0.0}
    # eta <r, r'> with r_p = s_p g_p is the per-parameter sum sum_p eta_p <g_p, g'_p>.
    g = {n: torch.randn(2, 5, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(per_param)}
    folded = eta * sum(float((scales[n] * g[n][0]) @ (scales[n] * g[n][1])) for n in per_param)
    direct = sum(per_param[n] * float(g[n][0] @ g[n][1]) for n in per_param)
    assert math.isclose(folded, direct, rel_tol=1e-6, abs_tol=1e-9)
    with pytest.raises(ValueError, match="`per_param` is empty"):
        learning_rate_scales({})


def test_factor_layout_keeps_layers_whose_factors_are_smaller_and_their_biases_by_reference():
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=64, hidden_dim=32, latent_dim=2, influence_draws=2)
    names = [n for n, _ in vae.named_parameters()]
    data = TensorDataset(torch.rand(6, 64))
    layout = factor_layout(GradientFeaturizer(vae, _loss, names, engine=FactoredEngine()), vae, data)
    # encoder.0 is 32 x 64 with one position: 96 values per sample instead of 2048. decoder.0 is
    # 32 x 2 with two draws: 2 (2 + 32) = 68 values are more than its 64 entries, so it stays dense.
    assert layout["encoder.0.weight"] == {"positions": 1, "inputs": 64, "outputs": 32, "groups": 1, "shape": [32, 64]}
    assert layout["decoder.2.weight"]["positions"] == 2
    assert layout["encoder.0.bias"] == {"bias_of": "encoder.0.weight", "shape": [32]}
    assert "decoder.0.weight" not in layout and "decoder.0.bias" not in layout
    assert list(layout) == [n for n in names if n in layout]  # the store's column order
    vmap = GradientFeaturizer(vae, _loss, names)  # dense gradients only: nothing to keep as factors
    assert factor_layout(vmap, vae, data) == {}


def test_probe_rows_runs_the_engines_checks_before_anything_is_recorded():
    from lightning_influence.gradients.factored import describe_engine

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(6, 3)

        def forward(self, x):
            return torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t())

    net = Tied()
    names = [n for n, _ in net.named_parameters()]
    loss = lambda m, b: (m(b[0]) - b[0]).pow(2).sum(1)  # noqa: E731
    feat = GradientFeaturizer(net, loss, names, engine=FactoredEngine())
    assert describe_engine(feat.engine, net, names, loss)["engine_rules"]["enc.weight"] == "linear"  # unchecked
    with pytest.warns(UserWarning, match="read outside the layer"):
        rows = probe_rows(feat, net, TensorDataset(torch.rand(5, 6)))
    assert rows.shape == (2, feat.dim())
    assert describe_engine(feat.engine, net, names, loss)["engine_rules"]["enc.weight"] == "vmap"


def test_only_values_that_become_inf_in_float16_count_as_overflowing():
    # 65510 is stored as 65504 (finite): flagging it would stop a fit over a finite row.
    rows = torch.tensor([[65510.0, 1.0], [-65520.0, 0.0], [1.0, 2.0]])
    assert _overflows(rows, torch.float16).tolist() == [False, True, False]
    assert rows.half().isinf().any(dim=1).tolist() == [False, True, False]
