"""Acceptance of VAE-TracIn on the digits: sanity checks from the paper, projection, storage dtypes."""

from __future__ import annotations

import weakref

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc

import lightning_influence.trajectory.analysis as analysis_module
import lightning_influence.trajectory.tracin as tracin_module
from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data.batches import gather_samples
from lightning_influence.gradients import FactoredEngine
from lightning_influence.models.vae import MLPVAE
from lightning_influence.trajectory.store import StoredCheckpoint


def _per_sample_loss(vae, dataset):
    with torch.no_grad():
        return torch.cat([vae.per_sample_loss(b) for b in DataLoader(dataset, batch_size=512)])


@pytest.fixture(scope="module")
def exact(digits_run):
    return InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, train_data=digits_run.dm.train_set)


@pytest.fixture(scope="module")
def queries(digits_run):
    return Subset(digits_run.dm.test_set, range(20))


def test_training_samples_are_their_own_strongest_proponent(exact, digits_run):
    """The paper's sanity check: at least 95% of the first 128 training samples (paper: > 99%)."""
    first = Subset(digits_run.dm.train_set, range(128))
    idx, _ = exact.top_k(first, k=1)
    rate = (idx[:, 0] == torch.arange(128)).float().mean().item()
    assert rate >= 0.95, f"self-proponent rate {rate:.3f}"


def test_top_k_matches_the_full_score_matrix_and_is_blockwise(exact, queries, digits_run):
    scores = exact.tracin(queries)
    assert scores.shape == (20, len(digits_run.dm.train_set))
    idx, val = exact.top_k(queries, k=7)
    ref_val, ref_idx = torch.topk(scores, 7, dim=1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
    opp_idx, opp_val = exact.top_k(queries, k=3, proponents=False)
    assert torch.equal(opp_idx, torch.topk(scores, 3, dim=1, largest=False).indices)
    assert (opp_val < 0).all(), "the strongest opponents of a digit should have negative TracIn"
    small_blocks = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, train_block=100)
    idx2, val2 = small_blocks.top_k(queries, k=7)
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(val2, val, rtol=1e-5, atol=1e-6)


def test_projected_tracin_ranks_like_exact(exact, queries, digits_run):
    projected = InfluenceAnalysis(digits_run.stores["proj"], digits_run.vae)
    assert projected.store.dim == 1024
    s_exact, s_proj = exact.tracin(queries), projected.tracin(queries)
    rho = spearman_corrcoef(s_proj.T, s_exact.T)
    assert rho.min() >= 0.9, f"per-test Spearman min {rho.min():.3f}, mean {rho.mean():.3f}"


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_half_precision_storage_keeps_the_ranking(exact, queries, digits_run, storage):
    half = InfluenceAnalysis(digits_run.stores[storage], digits_run.vae)
    assert half.store.checkpoints[0].gradients().dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[storage]
    s_exact, s_half = exact.tracin(queries), half.tracin(queries)
    assert s_half.dtype == torch.float32
    rho = spearman_corrcoef(s_half.T, s_exact.T)
    assert rho.min() >= 0.99, f"{storage}: per-test Spearman min {rho.min():.4f}"
    si_rho = spearman_corrcoef(half.self_influence(), exact.self_influence())
    assert si_rho >= 0.99


def test_self_influence_rises_with_the_loss(exact, digits_run):
    si = exact.self_influence()
    loss = _per_sample_loss(digits_run.vae, digits_run.dm.train_set)
    rho = spearman_corrcoef(si, loss).item()
    assert rho > 0.3, f"Spearman(self-influence, loss) = {rho:.3f}"


def test_unbiased_self_influence_agrees_in_rank_and_is_smaller_on_average(exact, digits_run):
    biased = exact.self_influence()
    unbiased = exact.self_influence(unbiased=True)
    assert spearman_corrcoef(unbiased, biased) > 0.9
    # E|g|^2 = |E g|^2 + tr Cov: the plain squared norm carries the Monte-Carlo variance on top.
    assert unbiased.mean() < biased.mean()
    with pytest.raises(ValueError, match="train_data"):
        InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae).self_influence(unbiased=True)


def test_injected_outliers_have_high_self_influence(outlier_run):
    analysis = InfluenceAnalysis(outlier_run.store, outlier_run.vae)
    si = analysis.self_influence()
    # binary_auroc squashes scores outside [0, 1] through a sigmoid; min-max scaling keeps the order.
    auc = binary_auroc((si - si.min()) / (si.max() - si.min()), outlier_run.is_outlier).item()
    assert auc >= 0.9, f"outlier AUROC {auc:.3f} (chance 0.5)"
    n_out = int(outlier_run.is_outlier.sum())
    found = outlier_run.is_outlier[torch.argsort(si, descending=True)[:n_out]].float().mean().item()
    assert found >= 0.5, f"precision@{n_out} = {found:.2f} (chance 0.05)"


def test_test_data_forms_agree(exact, digits_run):
    ds = Subset(digits_run.dm.test_set, range(6))
    batch = gather_samples(ds, range(6))
    a = exact.tracin(ds)
    b = exact.tracin(DataLoader(ds, batch_size=4))
    c = exact.tracin(batch)
    # Batch composition changes float32 reduction order; scores carry cancellation, so compare
    # against the score scale.
    tol = dict(rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(a, c, **tol)
    with pytest.raises(ValueError, match="shuffle"):
        exact.tracin(DataLoader(ds, batch_size=4, shuffle=True))


def test_measurement_equal_to_the_loss_is_matched_tracin(exact, digits_run):
    ds = Subset(digits_run.dm.test_set, range(5))
    matched = exact.tracin(ds)
    same = exact.tracin(ds, measurement=lambda m, b: m.per_sample_loss(b))
    torch.testing.assert_close(matched, same)
    recon_only = exact.tracin(
        ds, measurement=lambda m, b: m.per_sample_loss(b, n_draws=4) * 0 + m.encode(b[0])[0].pow(2).sum(1)
    )
    assert not torch.allclose(recon_only, matched)
    with pytest.raises(ValueError, match="measurement"):
        exact.tracin(ds, measurement=lambda m, b: m.per_sample_loss(b).mean())


def test_model_that_does_not_match_the_store_is_refused(digits_run):
    other = MLPVAE(input_dim=64, hidden_dim=64, latent_dim=8)
    with pytest.raises(ValueError, match="does not match the store.*shape mismatches"):
        InfluenceAnalysis(digits_run.stores["exact"], other)
    with pytest.raises(ValueError, match="`k`"):
        InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae).top_k(digits_run.dm.test_set, k=0)


def test_query_blocks_keep_noise_keys_and_results(exact, digits_run):
    ds = Subset(digits_run.dm.test_set, range(10))
    (i1, v1), (o1, w1) = exact.ranked(ds, 5, largest=(True, False))
    (i2, v2), (o2, w2) = exact.ranked(ds, 5, largest=(True, False), query_block=3)
    assert torch.equal(i1, i2) and torch.equal(o1, o2)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    full = exact.tracin(ds)
    torch.testing.assert_close(v1, torch.topk(full, 5, dim=1).values, rtol=1e-5, atol=1e-6)


def test_cross_loss_tracin_on_a_projected_store_ranks_like_exact(exact, digits_run):
    """The test side of a projected store is projected with the recording's seeds."""

    def latent_norm(module, batch):
        return module.encode(batch[0])[0].pow(2).sum(dim=1)

    queries = Subset(digits_run.dm.test_set, range(10))
    projected = InfluenceAnalysis(digits_run.stores["proj"], digits_run.vae)
    rho = spearman_corrcoef(
        projected.tracin(queries, measurement=latent_norm).T, exact.tracin(queries, measurement=latent_norm).T
    )
    assert rho.min() >= 0.9, f"per-test Spearman min {rho.min():.3f}"


class _LiveBlocks:
    """Counts the training-row mappings alive at once (each `gradients()` call maps a checkpoint)."""

    def __init__(self, monkeypatch):
        self.live = 0
        self.peak = 0
        self.calls = 0
        original = StoredCheckpoint.gradients

        def tracked(ckpt):
            t = original(ckpt)
            self.live += 1
            self.calls += 1
            self.peak = max(self.peak, self.live)
            # The tensor's storage holds its numpy memmap; the mapping dies with the last view.
            weakref.finalize(t.numpy() if t.dtype != torch.bfloat16 else t, self._release)
            return t

        monkeypatch.setattr(StoredCheckpoint, "gradients", tracked)

    def _release(self):
        self.live -= 1


def test_scoring_holds_one_checkpoint_block_at_a_time(digits_run, monkeypatch):
    store = digits_run.stores["exact"]
    queries = Subset(digits_run.dm.test_set, range(6))
    ref = InfluenceAnalysis(store, digits_run.vae, train_block=100_000, block_bytes=1 << 40)
    ref_scores, (ref_idx, ref_val) = ref.tracin(queries), ref.top_k(queries, k=5)
    ref_self = ref.self_influence()
    widths = []
    real_scores = analysis_module.tracin_scores

    def spy(train, test, etas):
        widths.extend(int(g.shape[0]) for g in train)
        return real_scores(train, test, etas)

    monkeypatch.setattr(analysis_module, "tracin_scores", spy)
    monkeypatch.setattr(tracin_module, "tracin_scores", spy)
    live = _LiveBlocks(monkeypatch)
    dim = GradientStore(store).dim
    small = InfluenceAnalysis(store, digits_run.vae, block_bytes=4 * dim * 300)
    idx, val = small.top_k(queries, k=5)
    scores = small.tracin(queries)
    self_inf = small.self_influence()
    n_ckpt = len(small.store)
    assert live.calls >= 2 * n_ckpt, "every checkpoint is read block by block"
    assert live.peak == 1, f"{live.peak} checkpoint mappings were alive at once"
    assert max(widths) <= 300
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(self_inf, ref_self, rtol=1e-5, atol=1e-6)


class _CountingEngine(FactoredEngine):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def gradients(self, *args, **kwargs):
        self.calls += 1
        return super().gradients(*args, **kwargs)


def test_test_rows_are_computed_once_per_checkpoint_across_calls(digits_run):
    engine = _CountingEngine()
    analysis = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, engine=engine, batch_size=256)
    queries = Subset(digits_run.dm.test_set, range(8))
    n_ckpt = len(analysis.store)
    scores = analysis.tracin(queries)
    assert engine.calls == n_ckpt
    idx, _ = analysis.top_k(queries, k=3)
    analysis.summary(queries, k=3)
    assert engine.calls == n_ckpt, "the same queries reuse their cached rows"
    assert torch.equal(idx, torch.topk(scores, 3, dim=1).indices)
    analysis.tracin(Subset(digits_run.dm.test_set, range(8)))  # other queries object: recomputed
    assert engine.calls == 2 * n_ckpt
    uncached = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, engine=engine, cache_bytes=0)
    uncached.tracin(queries)
    uncached.tracin(queries)
    assert engine.calls == 4 * n_ckpt


def test_queries_modified_in_place_are_not_served_from_the_cache(digits_run):
    engine = _CountingEngine()
    analysis = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, engine=engine, batch_size=256)
    n_ckpt = len(analysis.store)
    queries = digits_run.dm.test_set.tensors[0][:6].clone()
    analysis.tracin(queries)
    analysis.tracin(queries)
    assert engine.calls == n_ckpt
    queries.mul_(0.5)  # same object, other values
    scores = analysis.tracin(queries)
    assert engine.calls == 2 * n_ckpt
    fresh = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae).tracin(queries.clone())
    torch.testing.assert_close(scores, fresh, rtol=1e-5, atol=1e-6)
    analysis.tracin(queries)
    assert engine.calls == 2 * n_ckpt, "the new values are cached in turn"


def test_a_query_container_given_other_tensors_is_not_served_from_the_cache(digits_run):
    analysis = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, batch_size=256)
    x = digits_run.dm.test_set.tensors[0]
    queries = [x[:6].clone()]
    first = analysis.tracin(queries)
    queries[0] = x[6:12].clone()  # the same list, another tensor
    fresh = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae).tracin([x[6:12].clone()])
    torch.testing.assert_close(analysis.tracin(queries), fresh, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, fresh)


def test_refreshing_a_re_recorded_store_scores_the_new_checkpoints(digits_run, tmp_path):
    """Test rows cached for a checkpoint index are not reused once the store holds another recording there."""
    from conftest import VAE_KWARGS, quiet_trainer

    def record(epochs):
        pl.seed_everything(epochs, verbose=False)
        rec = TrajectoryRecorder(tmp_path / "store", every_n_epochs=1, batch_size=256, overwrite=True)
        quiet_trainer(max_epochs=epochs, callbacks=[rec]).fit(MLPVAE(**VAE_KWARGS), digits_run.dm)

    record(1)
    analysis = InfluenceAnalysis(tmp_path / "store", digits_run.vae, batch_size=256)
    queries = digits_run.dm.test_set.tensors[0][:5].clone()
    before = analysis.tracin(queries)
    record(2)  # checkpoint 0 again, other weights, and a checkpoint 1
    analysis.store.refresh()
    fresh = InfluenceAnalysis(tmp_path / "store", digits_run.vae).tracin(queries)
    torch.testing.assert_close(analysis.tracin(queries), fresh, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, fresh)
