"""DistributedInfluence on one device: the same results as InfluenceAnalysis, and clear errors for bad inputs.

The two-process version runs in test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.errors import ConfigurationError
from lightning_influence.models.vae import MLPVAE
from lightning_influence.trajectory.distributed import DistributedInfluence

X, Y = load_digits_tensors()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-2, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(tmp_path_factory.mktemp("dist") / "store", batch_size=16)
    quiet_trainer(max_epochs=2, callbacks=[rec]).fit(vae, DataLoader(TensorDataset(X[:50], Y[:50]), batch_size=10))
    return vae, rec.store_path


def test_one_device_matches_the_analysis(recorded):
    vae, path = recorded
    analysis = InfluenceAnalysis(path, vae, train_block=16)
    scorer = DistributedInfluence(analysis, quiet_trainer())
    tests = X[300:306]
    torch.testing.assert_close(scorer.tracin(tests), analysis.tracin(tests))
    assert sorted(scorer.local_blocks) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    torch.testing.assert_close(scorer.self_influence(), analysis.self_influence())
    for got, ref in zip(scorer.ranked(tests, k=5), analysis.ranked(tests, k=5)):
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.scores, ref.scores)
    top = scorer.top_k(tests, k=3, proponents=False)
    assert torch.equal(top.indices, analysis.top_k(tests, k=3, proponents=False).indices)
    assert analysis.device == torch.device("cpu")


def test_bad_inputs_are_named(recorded):
    vae, path = recorded
    analysis = InfluenceAnalysis(path, vae)
    trainer = quiet_trainer()
    with pytest.raises(ConfigurationError, match="`analysis` must be an InfluenceAnalysis"):
        DistributedInfluence(path, trainer)
    with pytest.raises(ConfigurationError, match="`trainer` must be a pytorch_lightning.Trainer"):
        DistributedInfluence(analysis, "ddp")
    with pytest.raises(ConfigurationError, match="`train_block` must be a positive integer"):
        DistributedInfluence(analysis, trainer, train_block=0)
    scorer = DistributedInfluence(analysis, trainer)
    with pytest.raises(ConfigurationError, match="`test_data` is empty"):
        scorer.top_k(X[:0], k=3)
    with pytest.raises(ConfigurationError, match="`test_data` is empty"):
        scorer.tracin(TensorDataset(X[:0]))
    with pytest.raises(ConfigurationError, match=r"`k`=51 exceeds the 50 recorded training samples"):
        scorer.top_k(X[:2], k=51)
    with pytest.raises(ConfigurationError, match="`k` must be a positive integer"):
        scorer.ranked(X[:2], k=0)
    with pytest.raises(ConfigurationError, match="`k` must be a positive integer, got True"):  # as InfluenceAnalysis
        scorer.ranked(X[:2], k=True)
    with pytest.raises(ConfigurationError, match="`train_block` must be a positive integer, got True"):
        DistributedInfluence(analysis, trainer, train_block=True)
    with pytest.raises(ConfigurationError, match="`measurement` must be callable"):
        scorer.tracin(X[:2], measurement="elbo")
    with pytest.raises(ConfigurationError, match="`test_data` must be a torch Dataset"):
        scorer.tracin(42)
