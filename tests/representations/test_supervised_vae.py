"""SupervisedVAE on the digits: invariance sampling, classifier independence from z_n, loss, logging, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional import pearson_corrcoef

from lightning_influence.data import DigitsDataModule
from lightning_influence.gradients.noise import fixed_noise
from lightning_influence.gradients.vmap import per_sample_gradients
from lightning_influence.models.objectives import negative_elbo
from lightning_influence.reporting.representations import log_invariances
from lightning_influence.representations.invariances import (
    IndependentClassifier,
    PlainClassifier,
    attribution_panel,
    invariance_attributions,
    invariance_grids,
    invariance_metrics,
    label_preservation,
)
from lightning_influence.representations.supervised_vae import SupervisedVAE

EPOCHS = 30


def _fit(module: pl.LightningModule, dm: DigitsDataModule) -> None:
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)


@pytest.fixture(scope="module")
def trained() -> dict:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = SupervisedVAE()
    _fit(model, dm)
    pl.seed_everything(0, verbose=False)
    plain = PlainClassifier.like(model)
    _fit(plain, dm)
    x_train, y_train = dm.train_set.tensors
    x_test, y_test = dm.test_set.tensors
    judge = IndependentClassifier().fit(x_train, y_train)
    metrics = invariance_metrics(model, x_test, y_test, judge, n_samples=10, plain_classifier=plain)
    return {"model": model, "plain": plain, "judge": judge, "x": x_test, "y": y_test, "metrics": metrics}


def test_invariance_samples_keep_their_label(trained: dict) -> None:
    m = trained["metrics"]
    assert m["judge_accuracy"] >= 0.9, m  # the independent judge is trustworthy on real digits
    assert m["invariance_preservation_independent"] >= 0.90, m
    assert m["invariance_preservation"] >= 0.90, m


def test_resampling_z_s_changes_the_label(trained: dict) -> None:
    m = trained["metrics"]
    assert m["variation_preservation_independent"] <= 0.50, m
    assert m["variation_preservation"] <= 0.50, m


def test_invariances_are_not_copies(trained: dict) -> None:
    # Preservation means nothing if the decoder ignores z_n: the samples must actually vary.
    m = trained["metrics"]
    assert m["nuisance_kl"] > 0.1, m
    assert m["invariance_diversity"] > 0.2 * m["variation_diversity"], m


def test_accuracy_close_to_plain_classifier_of_same_size(trained: dict) -> None:
    m = trained["metrics"]
    plain, model = trained["plain"], trained["model"]
    n_plain = sum(p.numel() for p in plain.parameters())
    n_path = sum(p.numel() for p in [*model.encoder.parameters(), *model.classifier.parameters()])
    # Same trunk and head; the VAE's last encoder layer also outputs z_n and the log-variances.
    assert n_plain < n_path
    assert m["accuracy"] >= 0.9, m
    assert m["accuracy"] >= m["plain_accuracy"] - 0.03, m


def test_classifier_gradient_wrt_z_n_is_exactly_zero(trained: dict) -> None:
    model = trained["model"]
    z = torch.randn(5, model.latent_dim, generator=torch.Generator().manual_seed(0))
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model.classify_latent(v.unsqueeze(0))[0]))(z)  # [B, C, d]
    k = model.supervised_dim
    assert torch.equal(jac[..., k:], torch.zeros_like(jac[..., k:]))
    assert float(jac[..., :k].detach().abs().sum()) > 0
    # The same through autograd on inputs: z_n's gradient is exactly zero.
    zg = z.clone().requires_grad_(True)
    model.classify_latent(zg).logsumexp(1).sum().backward()
    assert torch.equal(zg.grad[:, k:], torch.zeros(5, model.nuisance_dim))


def test_attributions_of_invariance_samples_match_the_input(trained: dict) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    same, other = [], []
    for i in range(12):
        images, maps = invariance_attributions(model, x[i], n=4, method="saliency", seed=i)
        assert images.shape == (5, 1, 8, 8) and maps.shape == (5, 8, 8)
        flat = maps.flatten(1)
        same += [float(pearson_corrcoef(flat[0], flat[j])) for j in range(1, 5)]
        j = int((y != y[i]).nonzero()[i, 0])
        _, other_map = invariance_attributions(model, x[j], n=1, method="saliency")
        other.append(float(pearson_corrcoef(flat[0], other_map[0].flatten())))
    assert np.mean(same) > 0.5 and np.mean(same) > np.mean(other) + 0.3, (np.mean(same), np.mean(other))
    images, maps = invariance_attributions(model, x[0], n=2, method="relax", relax_kwargs={"n_masks": 200})
    assert maps.shape == (3, 8, 8) and bool(torch.isfinite(maps).all())


def test_per_sample_loss_is_elbo_plus_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    model = SupervisedVAE(hidden_dim=16, classification_weight=3.0)
    x, y = torch.rand(4, 64), torch.tensor([1, 2, 3, -1])
    ids = torch.arange(4)
    with fixed_noise(ids, seed=7):
        loss = model.per_sample_loss((x, y), n_draws=2)
    with fixed_noise(ids, seed=7):
        elbo = negative_elbo(model, x, beta=model.beta, likelihood="bernoulli", n_draws=2, sigma=model.sigma)
    ce = F.cross_entropy(model.classify(x)[:3], y[:3], reduction="none")
    assert loss.shape == (4,)
    assert torch.allclose(loss[:3], elbo[:3] + 3.0 * ce, atol=1e-5)
    assert torch.allclose(loss[3], elbo[3], atol=1e-6)  # label -1: ELBO only
    with fixed_noise(ids, seed=7):
        assert torch.equal(model.per_sample_loss({"x": x, "y": y}, n_draws=2), loss)  # dict batches too


def test_per_sample_gradients_work_unchanged() -> None:
    torch.manual_seed(0)
    model = SupervisedVAE(hidden_dim=16)
    x, y = torch.rand(3, 64), torch.tensor([4, 5, 6])
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = lambda m, b: m.per_sample_loss(b, n_draws=2)
    grads = per_sample_gradients(model, loss_fn, (x, y), params, sample_ids=torch.tensor([10, 11, 12]), noise_seed=3)
    assert grads["classifier.0.weight"].shape == (3, *model.classifier[0].weight.shape)
    # Sample 1's gradient equals a plain backward of its own loss under the same keyed noise.
    model.zero_grad()
    with fixed_noise(torch.tensor([11]), seed=3):
        model.per_sample_loss((x[1:2], y[1:2]), n_draws=2).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name][1], p.grad, atol=1e-5), name


def test_recorder_and_tracin_use_it_unchanged(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence.data import load_digits_tensors
    from lightning_influence.trajectory.analysis import InfluenceAnalysis
    from lightning_influence.trajectory.recorder import TrajectoryRecorder

    x, y = load_digits_tensors()
    train = TensorDataset(x[:200], y[:200])
    test = (x[1000:1010], y[1000:1010])
    pl.seed_everything(0, verbose=False)
    model = SupervisedVAE(hidden_dim=32, influence_draws=4)
    recorder = TrajectoryRecorder(tmp_path / "store", dataset=train)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    analysis = InfluenceAnalysis(recorder.store_path, model)
    scores = analysis.tracin(test)
    # Cross-loss TracIn on the classification term alone: same-class training digits are proponents.
    ce = analysis.tracin(test, measurement=lambda m, b: m.loss_terms(b, n_draws=1)["ce"])
    assert scores.shape == (10, 200) and bool(torch.isfinite(scores).all())
    same = y[1000:1010, None] == y[None, :200]
    assert float(ce[same].mean()) > 0 > float(ce[~same].mean())
    assert float(scores[same].mean()) > float(scores[~same].mean())


def test_sampling_shapes_determinism_and_modes(trained: dict) -> None:
    model, x = trained["model"], trained["x"][:3]
    was_training = model.training
    model.train()
    inv = model.sample_invariances(x, 4, generator=torch.Generator().manual_seed(1))
    assert model.training  # mode restored
    again = model.sample_invariances(x, 4, generator=torch.Generator().manual_seed(1))
    assert inv.shape == (3, 4, 64) and torch.equal(inv, again)
    assert float(inv.min()) >= 0 and float(inv.max()) <= 1
    images = model.sample_variations(x.view(3, 1, 8, 8), 2)
    assert images.shape == (3, 2, 1, 8, 8)
    model.train(was_training)


def test_label_preservation_counts() -> None:
    judge = lambda t: t.flatten(1)[:, 0].round().long()
    samples = torch.tensor([[[1.0], [1.0], [0.0]], [[0.0], [0.0], [0.0]]])
    assert label_preservation(samples, torch.tensor([1, 0]), judge) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="`samples` must be"):
        label_preservation(samples[0], torch.tensor([1, 0]), judge)


def test_collapsed_nuisance_is_warned() -> None:
    torch.manual_seed(0)
    model = SupervisedVAE(hidden_dim=8)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.zero_()  # every posterior is N(0, I): zero KL
    x, y = torch.rand(6, 64), torch.arange(6)
    with pytest.warns(UserWarning, match="z_n carries almost no information"):
        out = invariance_metrics(model, x, y, n_samples=2)
    assert out["nuisance_kl"] == pytest.approx(0.0, abs=1e-6)


def test_bad_input_raises_clear_errors() -> None:
    model = SupervisedVAE(hidden_dim=8)
    with pytest.raises(ValueError, match="labelled batches"):
        model.per_sample_loss(torch.rand(2, 64))
    with pytest.raises(ValueError, match="`x` must be a batch of inputs with 64 values"):
        model.encode(torch.rand(2, 10))
    with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
        model.sample_invariances(torch.rand(2, 64), 0)
    with pytest.raises(TypeError, match="`x` must be a Tensor"):
        model.sample_variations([[0.0] * 64], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`supervised_dim` must be an integer >= 1"):
        SupervisedVAE(supervised_dim=0)
    with pytest.raises(ValueError, match="`nuisance_dim` must be an integer >= 1"):
        SupervisedVAE(nuisance_dim=0)
    with pytest.raises(ValueError, match="`num_classes`"):
        SupervisedVAE(num_classes=1)
    with pytest.raises(ValueError, match="`classification_weight`"):
        SupervisedVAE(classification_weight=-1.0)
    with pytest.raises(ValueError, match="`image_shape`"):
        SupervisedVAE(image_shape=(1, 7, 7))
    with pytest.raises(ValueError, match="`reference`"):
        invariance_metrics(model, torch.rand(2, 64), torch.tensor([0, 1]), reference="truth")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`method`"):
        invariance_attributions(model, torch.rand(64), method="ig")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not fitted"):
        IndependentClassifier()(torch.rand(2, 64))


def test_log_to_tensorboard(trained: dict, tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="svae", version=0)
    model, x, y = trained["model"], trained["x"][:6], trained["y"][:6]
    log_invariances(
        logger,
        invariance_grids(model, x, n=5),
        metrics=trained["metrics"],
        attributions=attribution_panel(model, x[:1], n=5),
        label=int(y[0]),
        step=2,
    )
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0}).Reload()
    images = set(acc.Tags()["images"])
    assert {"supervised_vae/invariances", "supervised_vae/variations", "supervised_vae/attributions"} <= images
    grid = acc.Images("supervised_vae/invariances")[0]
    assert grid.step == 2 and grid.height >= 6 * 32  # six rows of 8x8 digits, upscaled to 32 px
    assert "supervised_vae/invariance_preservation_independent" in acc.Tags()["scalars"]
    assert "supervised_vae/summary/text_summary" in acc.Tags()["tensors"]
