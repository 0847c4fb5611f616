"""CUDA-only checks: true fp16 loss scaling, autocast error bounds, the 16-true upcast.

Skipped cleanly without a GPU (CI has none); run on a CUDA machine with `pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models.vae import MLPVAE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Requires: a CUDA device"),
]


def _loader(n=256):
    x, y = load_digits_tensors()
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32, shuffle=True)


def _fit(tmp_path, precision, **rec_kwargs):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(likelihood="gaussian", sigma=0.2, lr=1e-3, optimizer="sgd", influence_draws=4)
    recs = {
        "fp32": TrajectoryRecorder(tmp_path / "fp32", batch_size=64),
        "auto": TrajectoryRecorder(tmp_path / "auto", batch_size=64, grad_precision="autocast", **rec_kwargs),
    }
    trainer = quiet_trainer(accelerator="gpu", max_epochs=2, precision=precision, callbacks=list(recs.values()))
    trainer.fit(vae, _loader())
    return vae, {k: GradientStore(r.store_path) for k, r in recs.items()}


@pytest.mark.parametrize("precision,tol", [("16-mixed", 0.01), ("bf16-mixed", 0.05)])
def test_cuda_autocast_rows_match_fp32(tmp_path, precision, tol):
    vae, stores = _fit(tmp_path, precision)
    ga = stores["auto"].checkpoints[-1].gradients()
    gf = stores["fp32"].checkpoints[-1].gradients()
    assert torch.isfinite(ga).all()
    rel = ((ga - gf).norm(dim=1) / gf.norm(dim=1)).max().item()
    assert rel < tol, rel
    scores = InfluenceAnalysis(stores["auto"], vae).tracin(load_digits_tensors()[0][300:304])
    assert torch.isfinite(scores).all()


def test_cuda_16_true_records_fp32_gradients(tmp_path):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(likelihood="gaussian", sigma=0.2, lr=1e-3, optimizer="sgd", influence_draws=4)
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=64)
    quiet_trainer(accelerator="gpu", max_epochs=1, precision="16-true", callbacks=[rec]).fit(vae, _loader())
    store = GradientStore(rec.store_path)
    assert store.checkpoints[-1].state()["decoder.0.weight"].dtype == torch.float16
    rows = store.checkpoints[-1].gradients()
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()


def test_cuda_real_grad_scaler_skips_earn_no_credit(tmp_path):
    pl.seed_everything(0, verbose=False)
    vae = MLPVAE(likelihood="gaussian", sigma=0.2, lr=1e-3, influence_draws=4)
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=64)
    trainer = quiet_trainer(accelerator="gpu", max_epochs=2, precision="16-mixed", callbacks=[rec])
    trainer.fit(vae, _loader())
    store = GradientStore(rec.store_path)
    taken = sum(c.entry["optimizer_steps"] for c in store.checkpoints)
    skipped = sum(c.entry["skipped_steps"] for c in store.checkpoints)
    assert taken + skipped == trainer.global_step
    for c in store.checkpoints:
        assert c.eta == pytest.approx(1e-3 * c.entry["optimizer_steps"] / 8, rel=1e-9)
