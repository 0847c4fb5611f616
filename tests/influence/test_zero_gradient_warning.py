"""A measurement that does not depend on the tracked parameters is reported, and diagnostics print a summary."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceFunction
from lightning_influence.data import load_digits_tensors
from lightning_influence.models import MLPVAE


def latent_position(module, batch):
    mu, _ = module.encode(batch[0])
    return mu[:, 0]


def test_measurement_without_gradient_warns_with_parameter_names():
    torch.manual_seed(0)
    x, y = load_digits_tensors()
    train, test = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:44], y[40:44])
    vae = MLPVAE(input_dim=64, hidden_dim=8, latent_dim=2, likelihood="gaussian", influence_draws=2)
    inf = InfluenceFunction(vae, train, params=["decoder"], solver="exact", damping=10.0)
    with pytest.warns(
        UserWarning, match=r"zero gradient with respect to every tracked parameter \(\['decoder.0.weight'"
    ):
        scores = inf.influence(test, measurement=latent_position)
    assert not scores.any()
    assert any("zero gradient" in w for w in inf.diagnostics.warnings)
    text = str(inf.diagnostics)
    assert text == inf.diagnostics.summary() and "tensor(" not in text and "solver=exact" in text
    inf = InfluenceFunction(vae, train, params=["encoder"], solver="exact", damping=10.0)
    assert inf.influence(test, measurement=latent_position).abs().sum() > 0
