"""TrajectoryRecorder: exactness against brute force, learning-rate credit, training integrity, errors."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.gradients.noise import NoiseStream, fixed_noise
from lightning_influence.models.vae import MLPVAE

X, Y = load_digits_tensors()


def small_data(n: int = 40) -> TensorDataset:
    return TensorDataset(X[:n].clone(), Y[:n].clone())


class TwoGroupVAE(MLPVAE):
    """SGD with different learning rates for encoder and decoder and a per-step decaying schedule."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            [{"params": self.encoder.parameters(), "lr": 0.05}, {"params": self.decoder.parameters(), "lr": 0.02}]
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def brute_force_tracin(vae, store, train_x, test_x, lrs_per_step, steps_per_epoch, measurement=None):
    """sum_c sum_g eta_{c,g} <grad f(theta_c, z'), grad l(theta_c, z)> by a per-sample autograd loop (f = l by default)."""
    model = copy.deepcopy(vae).eval()
    groups = {"encoder": 0, "decoder": 1}
    total = torch.zeros(len(test_x), len(train_x), dtype=torch.float64)
    prev_step = 0
    for ckpt in store.checkpoints:
        etas = [sum(lrs[g] for lrs in lrs_per_step[prev_step : ckpt.step]) / steps_per_epoch for g in (0, 1)]
        prev_step = ckpt.step
        model.load_state_dict(ckpt.state())
        params = [p for _, p in model.named_parameters()]
        group_of = [groups[n.split(".")[0]] for n, _ in model.named_parameters()]

        def grads(x, stream, fn=None):
            out = []
            for i in range(len(x)):
                with fixed_noise(torch.tensor([i]), store.noise_seed, stream):
                    loss = (fn or (lambda m, b: m.per_sample_loss(b)))(model, x[i : i + 1])[0]
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                out.append(
                    [(torch.zeros_like(p) if g is None else g).detach().double().flatten() for g, p in zip(gs, params)]
                )
            return out

        g_train, g_test = grads(train_x, NoiseStream.TRAIN), grads(test_x, NoiseStream.TEST, measurement)
        for j, gt in enumerate(g_test):
            for i, gi in enumerate(g_train):
                total[j, i] += sum(etas[grp] * torch.dot(a, b) for a, b, grp in zip(gt, gi, group_of))
    return total


def test_exact_tracin_equals_a_brute_force_autograd_loop(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = small_data(40)
    vae = TwoGroupVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=4)
    lrs_per_step = []

    class LRProbe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs_per_step.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    rec = TrajectoryRecorder(tmp_path / "store", every_n_steps=3, batch_size=16, seed=7)
    quiet_trainer(max_steps=8, callbacks=[rec, LRProbe()]).fit(vae, DataLoader(data, batch_size=8, shuffle=True))
    store = GradientStore(rec.store_path)
    # Checkpoints every 3 steps, and the last two steps earn a final checkpoint at train end.
    assert [c.step for c in store.checkpoints] == [3, 6, 8]
    assert store.checkpoints[0].param_scales is not None, "two learning rates must be folded into the rows"
    test_x = X[100:106]
    scores = InfluenceAnalysis(store, vae).tracin(test_x)
    ref = brute_force_tracin(vae, store, data.tensors[0], test_x, lrs_per_step, steps_per_epoch=5)
    rel = (scores.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"

    # Cross-loss TracIn: the test side differentiates another objective (here the latent code's norm).
    def latent_norm(module, batch):
        return module.encode(batch)[0].pow(2).sum(dim=1)

    cross = InfluenceAnalysis(store, vae).tracin(test_x, measurement=latent_norm)
    ref_cross = brute_force_tracin(vae, store, data.tensors[0], test_x, lrs_per_step, 5, measurement=latent_norm)
    assert (cross.double() - ref_cross).norm() / ref_cross.norm() < 1e-5
    assert not torch.allclose(cross, scores)
    # The stored eta is the lr credit of the faster group: lr x (steps / steps per epoch).
    assert store.checkpoints[0].eta == pytest.approx(sum(s[0] for s in lrs_per_step[:3]) / 5, rel=1e-12)


def test_skipped_grad_scaler_steps_earn_no_learning_rate_credit(tmp_path):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, influence_draws=2)
    # A huge initial scale overflows fp16: the first steps are skipped while the scale halves.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    rec = TrajectoryRecorder(tmp_path / "store", every_n_epochs=1, batch_size=32)
    trainer = quiet_trainer(max_epochs=3, callbacks=[rec], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    before = copy.deepcopy(vae.state_dict())
    trainer.fit(vae, DataLoader(small_data(64), batch_size=8))
    store = GradientStore(rec.store_path)
    skipped = sum(c.entry["skipped_steps"] for c in store.checkpoints)
    taken = sum(c.entry["optimizer_steps"] for c in store.checkpoints)
    assert skipped > 0 and taken > 0
    assert skipped + taken == trainer.global_step == 24
    for c in store.checkpoints:
        assert c.eta == pytest.approx(1e-3 * c.entry["optimizer_steps"] / 8, rel=1e-12)
    assert store.checkpoints[0].eta < 1e-3, "the first epoch lost credit to skipped steps"
    assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items())


class NoisyBNVAE(MLPVAE):
    """Dropout and BatchNorm: recording must restore modes and RNG to leave training untouched."""

    def __init__(self, **kw):
        super().__init__(**kw)
        h = self.hparams.hidden_dim
        self.encoder = nn.Sequential(
            nn.Linear(64, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.2), nn.Linear(h, 2 * self.hparams.latent_dim)
        )


def _train(tmp_path, with_recorder: bool, name: str):
    pl.seed_everything(3, verbose=False)
    vae = NoisyBNVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    callbacks = [TrajectoryRecorder(tmp_path / name, every_n_steps=2, batch_size=16)] if with_recorder else []

    class ModeProbe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert pl_module.training and all(m.training for m in pl_module.modules())

    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks + [ModeProbe()], deterministic=True)
    trainer.fit(vae, DataLoader(small_data(48), batch_size=8, shuffle=True))
    return vae


def test_training_is_unchanged_by_the_recorder(tmp_path):
    plain = _train(tmp_path, False, "a")
    recorded = _train(tmp_path, True, "b")
    for (k, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs"
    for (k, a), (_, b) in zip(plain.named_parameters(), recorded.named_parameters()):
        assert (a.grad is None) == (b.grad is None), f"{k}: .grad presence differs"
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    assert len(GradientStore(tmp_path / "b")) == 6 + 0  # 12 steps / every 2


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_default_fp32_gradients_under_trainer_precisions(tmp_path, precision):
    pl.seed_everything(0, verbose=False)
    # SGD: Adam's eps underflows in fp16 and a 16-true Adam run diverges (the weights, not the recorder).
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(tmp_path / "store", every_n_epochs=1, batch_size=16)
    quiet_trainer(max_epochs=1, precision=precision, callbacks=[rec]).fit(vae, DataLoader(small_data(32), batch_size=8))
    store = GradientStore(rec.store_path)
    ckpt = store.checkpoints[-1]
    rows = ckpt.gradients()
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    # Reference: fp32 copy of the stored (possibly half) weights, per-sample autograd.
    ref_model = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2).eval()
    ref_model.load_state_dict({k: v.float() for k, v in ckpt.state().items()})
    for i in (0, 17):
        with fixed_noise(torch.tensor([i]), store.noise_seed, NoiseStream.TRAIN):
            loss = ref_model.per_sample_loss(X[i : i + 1])[0]
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(ref_model.parameters()))])
        assert (rows[i] - g).norm() / g.norm() < 1e-5


@pytest.mark.parametrize("precision,tolerance", [("bf16-mixed", 0.05), ("16-mixed", 0.01)])
def test_autocast_gradients_stay_close_to_fp32(tmp_path, precision, tolerance):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(input_dim=64, hidden_dim=32, latent_dim=4, lr=1e-3, influence_draws=2)
    plugins = []
    if precision == "16-mixed":  # true fp16 AMP on CPU (otherwise Lightning silently uses bf16)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0))]
        kw = dict(plugins=plugins)
    else:
        kw = dict(precision=precision)
    auto = TrajectoryRecorder(tmp_path / "auto", grad_precision="autocast", batch_size=16)
    full = TrajectoryRecorder(tmp_path / "full", batch_size=16)
    quiet_trainer(max_epochs=1, callbacks=[auto, full], **kw).fit(vae, DataLoader(small_data(32), batch_size=8))
    a = GradientStore(auto.store_path)
    f = GradientStore(full.store_path)
    assert a.precision.mode == "mixed"
    ga, gf = a.checkpoints[-1].gradients(), f.checkpoints[-1].gradients()
    assert torch.isfinite(ga).all()
    rel = ((ga - gf).norm(dim=1) / gf.norm(dim=1)).max().item()
    assert rel < tolerance, f"max per-sample relative error {rel:.4f}"
    # Test gradients follow the store's numerics too.
    scores_a = InfluenceAnalysis(a, vae).tracin(X[200:204])
    scores_f = InfluenceAnalysis(f, vae).tracin(X[200:204])
    assert torch.nn.functional.cosine_similarity(scores_a.flatten(), scores_f.flatten(), dim=0) > 0.99


def _poisoned(n: int = 24, bad: int = 5) -> TensorDataset:
    x = X[:n].clone()
    x[bad, 0] = float("inf")
    return TensorDataset(x, Y[:n].clone())


def test_nonfinite_gradients_raise_by_default_and_nothing_is_listed(tmp_path):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    rec = TrajectoryRecorder(tmp_path / "store", dataset=_poisoned(), batch_size=8)
    with pytest.raises(FloatingPointError, match=r"1 sample\(s\) have non-finite.*ids \[5\]"):
        quiet_trainer(max_epochs=2, callbacks=[rec]).fit(vae, DataLoader(small_data(16), batch_size=8))
    store = GradientStore(rec.store_path)
    assert len(store) == 0
    assert not any(p.name.startswith(".tmp") for p in rec.store_path.iterdir())


def _scaled_loss(m, batch):
    return m.per_sample_loss(batch[:2]) * batch[2]


def _weighted(n: int = 24, bad: int = 5) -> TensorDataset:
    w = torch.ones(n)
    w[bad] = 1e7  # its gradients stay finite in fp32 but exceed float16's range (65504) once stored
    return TensorDataset(X[:n].clone(), Y[:n].clone(), w)


def test_rows_that_overflow_float16_storage_are_non_finite_and_score_nan(tmp_path):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    loader = DataLoader(small_data(16), batch_size=8)
    kw = dict(dataset=_weighted(), train_loss=_scaled_loss, batch_size=8, grad_dtype="float16")
    rec = TrajectoryRecorder(tmp_path / "raise", **kw)
    with pytest.raises(FloatingPointError, match=r"1 sample\(s\) have non-finite .*beyond float16's range.*ids \[5\]"):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(vae, loader)
    rec = TrajectoryRecorder(tmp_path / "skip", nonfinite="skip", **kw)
    with pytest.warns(UserWarning, match="non-finite"):
        quiet_trainer(max_epochs=2, callbacks=[rec]).fit(vae, loader)
    store = GradientStore(rec.store_path)
    assert all(c.nonfinite == [5] for c in store.checkpoints)
    row = store.checkpoints[0].gradients()[5].float()
    assert torch.isinf(row).any() and not torch.isnan(row).any(), "stored as inf: +inf scores unless masked"
    with pytest.warns(UserWarning, match="non-finite recorded gradients"):
        analysis = InfluenceAnalysis(store, vae, train_loss=_scaled_loss, train_block=4)
    queries = [X[100:103], Y[100:103], torch.ones(3)]
    scores = analysis.tracin(queries)
    assert torch.isnan(scores[:, 5]).all() and torch.isfinite(torch.cat([scores[:, :5], scores[:, 6:]], 1)).all()
    assert torch.isnan(analysis.self_influence()[5])
    for proponents in (True, False):
        idx, vals = analysis.top_k(queries, k=6, proponents=proponents)
        assert not (idx == 5).any() and torch.isfinite(vals).all()


@pytest.mark.parametrize("factored_storage", [False, True])
def test_nonfinite_skip_policy_flags_the_sample_and_scores_nan(tmp_path, factored_storage):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    rec = TrajectoryRecorder(
        tmp_path / "store", dataset=_poisoned(), batch_size=8, nonfinite="skip", factored_storage=factored_storage
    )
    with pytest.warns(UserWarning, match="non-finite"):
        quiet_trainer(max_epochs=2, callbacks=[rec]).fit(vae, DataLoader(small_data(16), batch_size=8))
    store = GradientStore(rec.store_path)
    assert all(c.nonfinite == [5] for c in store.checkpoints)
    with pytest.warns(UserWarning, match="non-finite recorded gradients"):
        analysis = InfluenceAnalysis(store, vae)
    scores = analysis.tracin(X[100:103])
    assert torch.isnan(scores[:, 5]).all() and torch.isfinite(scores[:, :5]).all()
    idx, _ = analysis.top_k(X[100:103], k=23)
    assert 5 not in idx.flatten().tolist()
    self_influence = analysis.self_influence()
    assert torch.isnan(self_influence[5]) and torch.isfinite(self_influence[torch.arange(24) != 5]).all()
    assert bool(store.factored) == factored_storage  # NaN factors stay in their sample's column


def test_bad_arguments_are_refused_eagerly(tmp_path):
    with pytest.raises(MisconfigurationException, match="mutually exclusive"):
        TrajectoryRecorder(tmp_path, every_n_epochs=1, every_n_steps=5)
    with pytest.raises(MisconfigurationException, match="`projection_dim`"):
        TrajectoryRecorder(tmp_path, projection_dim=0)
    with pytest.raises(MisconfigurationException, match="`grad_dtype`"):
        TrajectoryRecorder(tmp_path, grad_dtype="float64")
    with pytest.raises(MisconfigurationException, match="`every_n_steps`"):
        TrajectoryRecorder(tmp_path, every_n_steps=0)
    with pytest.raises(MisconfigurationException, match="`train_loss`"):
        TrajectoryRecorder(tmp_path, train_loss="per_sample_loss")


def _fit_expecting(tmp_path, match, **recorder_kwargs):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    rec = TrajectoryRecorder(tmp_path / "store", batch_size=8, **recorder_kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(vae, DataLoader(small_data(16), batch_size=8))
    return vae


def test_scalar_loss_is_refused_before_training(tmp_path):
    _fit_expecting(tmp_path, r"one loss per sample.*shape \(\)", train_loss=lambda m, b: m.per_sample_loss(b).mean())
    assert not (tmp_path / "store" / "manifest.json").exists(), "a refused loss must not leave a store behind"


def test_unknown_parameter_and_empty_dataset_are_refused(tmp_path):
    _fit_expecting(tmp_path, r"`params` entry 'decoder\.9'", params=["decoder.9"])
    _fit_expecting(tmp_path, "`dataset` is empty", dataset=TensorDataset(torch.zeros(0, 64)))


def test_module_without_per_sample_loss_needs_a_loss_fn(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 1)

        def training_step(self, batch, _):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rec = TrajectoryRecorder(tmp_path / "s", batch_size=8)
    with pytest.raises(MisconfigurationException, match="per_sample_loss"):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(Plain(), DataLoader(small_data(16), batch_size=8))
    ok = TrajectoryRecorder(tmp_path / "t", batch_size=8, train_loss=lambda m, b: m.lin(b[0]).pow(2).squeeze(1))
    quiet_trainer(max_epochs=1, callbacks=[ok]).fit(Plain(), DataLoader(small_data(16), batch_size=8))
    assert GradientStore(ok.store_path).dim == 65


def test_existing_store_with_other_settings_is_kept_and_refused(tmp_path):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    first = TrajectoryRecorder(tmp_path / "store", batch_size=8)
    quiet_trainer(max_epochs=1, callbacks=[first]).fit(vae, DataLoader(small_data(16), batch_size=8))
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    _fit_expecting(tmp_path, "already holds a gradient store", projection_dim=32)
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest
    assert len(json.loads(manifest)["checkpoints"]) == 1


def test_params_prefix_tracks_a_subset(tmp_path):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    rec = TrajectoryRecorder(tmp_path / "store", params="decoder", batch_size=8)
    quiet_trainer(max_epochs=1, callbacks=[rec]).fit(vae, DataLoader(small_data(16), batch_size=8))
    store = GradientStore(rec.store_path)
    assert store.param_names == ["decoder.0.weight", "decoder.0.bias", "decoder.2.weight", "decoder.2.bias"]
    assert store.dim == sum(p.numel() for p in vae.decoder.parameters())
    assert set(store.checkpoints[0].weights()) == set(store.param_names)


def test_sharded_strategies_are_refused():
    rec = TrajectoryRecorder("unused")
    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(MisconfigurationException, match="sharded"):
        rec.setup(trainer, None, "fit")


def test_state_dict_is_small_and_round_trips(tmp_path):
    rec = TrajectoryRecorder(tmp_path / "store")
    rec._credit = {"w": 0.5}
    rec._steps = 3
    state = rec.state_dict()
    assert len(json.dumps(state)) < 200
    other = TrajectoryRecorder(tmp_path / "store")
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert rec.state_key != TrajectoryRecorder(tmp_path / "other").state_key


def test_steps_per_epoch_uses_accumulation(tmp_path):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=0.01, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(tmp_path / "store", batch_size=16)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[rec]).fit(
        vae, DataLoader(small_data(32), batch_size=8)
    )
    store = GradientStore(rec.store_path)
    assert [c.entry["optimizer_steps"] for c in store.checkpoints] == [2, 2]
    assert all(c.eta == pytest.approx(0.01 * 2 / math.ceil(4 / 2)) for c in store.checkpoints)


def test_resuming_after_a_crash_rolls_the_store_back_and_matches_an_uninterrupted_run(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    loader = DataLoader(small_data(32), batch_size=8)  # in order: resumption is then exact

    class StepNoiseVAE(MLPVAE):
        # Training noise keyed by the step, not the global RNG (which Lightning does not restore).
        def training_step(self, batch, batch_idx):
            with fixed_noise(torch.arange(len(batch[0])), seed=self.global_step, stream=9):
                return super().training_step(batch, batch_idx)

    def fit(store, callbacks, ckpt_path=None, ckpt_dir=None):
        pl.seed_everything(0, verbose=False)
        vae = StepNoiseVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=0.05, optimizer="sgd", influence_draws=2)
        rec = TrajectoryRecorder(store, batch_size=16)
        extra = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else []
        trainer = quiet_trainer(max_epochs=4, callbacks=[rec, *callbacks, *extra], enable_checkpointing=bool(ckpt_dir))
        trainer.fit(vae, loader, ckpt_path=ckpt_path)
        return GradientStore(store)

    class Crash(pl.Callback):
        # Runs after the recorder and before ModelCheckpoint: epoch 2 is recorded but not checkpointed.
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    reference = fit(tmp_path / "reference", [])
    ckpts = tmp_path / "ckpts"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "resumed", [Crash()], ckpt_dir=ckpts)
    assert len(GradientStore(tmp_path / "resumed")) == 3  # epochs 0, 1, 2 recorded before the crash
    last = sorted(ckpts.glob("epoch=1*.ckpt"))[-1]
    with pytest.warns(UserWarning, match=r"dropped and will be recorded again"):
        resumed = fit(tmp_path / "resumed", [], ckpt_path=str(last), ckpt_dir=ckpts)
    assert [c.step for c in resumed.checkpoints] == [c.step for c in reference.checkpoints] == [4, 8, 12, 16]
    for a, b in zip(resumed.checkpoints, reference.checkpoints):
        assert a.eta == pytest.approx(b.eta)
        torch.testing.assert_close(a.gradients(), b.gradients())


@pytest.mark.parametrize("stop", ["max_epochs", "max_steps"])
def test_every_checkpoint_names_the_epoch_its_last_step_was_in(tmp_path, stop):
    """The extra final checkpoint is recorded after the loop moved past the last epoch: it keeps that epoch."""
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3)
    rec = TrajectoryRecorder(tmp_path / "store", every_n_steps=3, every_n_epochs=None, batch_size=16)
    limits = dict(max_epochs=2) if stop == "max_epochs" else dict(max_steps=7, max_epochs=10)
    quiet_trainer(callbacks=[rec], **limits).fit(vae, DataLoader(small_data(32), batch_size=8))  # 4 steps an epoch
    store = GradientStore(rec.store_path)
    assert [(c.step, c.epoch) for c in store.checkpoints] == (
        [(3, 0), (6, 1), (8, 1)] if stop == "max_epochs" else [(3, 0), (6, 1), (7, 1)]
    )
