"""Post-hoc recording from saved Lightning checkpoints matches recording with the callback."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.errors import StoreError
from lightning_influence.models import MLPVAE
from lightning_influence.trajectory.posthoc import record_from_checkpoints

KW = dict(input_dim=64, hidden_dim=16, latent_dim=2, likelihood="gaussian", sigma=0.3, lr=0.05, optimizer="sgd")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc")
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    train = TensorDataset(x[:96], y[:96])
    loader = DataLoader(train, batch_size=32)  # 3 optimizer steps per epoch
    vae = MLPVAE(**KW)
    rec = TrajectoryRecorder(root / "callback", every_n_steps=2, batch_size=48)
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(max_steps=6, callbacks=[rec, ckpt], enable_checkpointing=True).fit(vae, loader)
    files = sorted((root / "ckpts").glob("*.ckpt"))
    return vae, train, loader, rec.store_path, files, root, x[96:104]


def test_three_checkpoints_post_hoc_match_the_callback(run):
    vae, train, loader, store_path, files, root, queries = run
    assert len(files) == 3
    posthoc = record_from_checkpoints(files[::-1], root / "posthoc", MLPVAE, loader, batch_size=48, progress=False)
    live = InfluenceAnalysis(store_path, vae)
    assert [c.step for c in posthoc.checkpoints] == [c.step for c in live.store.checkpoints] == [2, 4, 6]
    for a, b in zip(posthoc.checkpoints, live.store.checkpoints):
        assert a.eta == pytest.approx(b.eta, rel=1e-12)
    assert posthoc.manifest["extra"]["model_class"] == "lightning_influence.models.vae.MLPVAE"
    rebuilt = MLPVAE(**posthoc.manifest["extra"]["hparams"])
    ph = InfluenceAnalysis(posthoc, rebuilt)
    torch.testing.assert_close(ph.tracin(queries), live.tracin(queries), atol=1e-5, rtol=0)
    torch.testing.assert_close(ph.self_influence(), live.self_influence(), atol=1e-5, rtol=0)


def test_post_hoc_errors_name_the_argument(run, tmp_path):
    _, train, loader, _, files, _, _ = run
    with pytest.raises(ValueError, match="`checkpoints` is empty"):
        record_from_checkpoints([], tmp_path / "a", MLPVAE, loader)
    with pytest.raises(ValueError, match="`steps_per_epoch`"):
        record_from_checkpoints(files, tmp_path / "b", MLPVAE, train)
    with pytest.raises(ValueError, match="same global_step"):
        record_from_checkpoints([files[0], files[0]], tmp_path / "c", MLPVAE, loader)
    for name, bad in (("batch_size", 0), ("accumulate_grad_batches", 0), ("accumulate_grad_batches", -2)):
        with pytest.raises(ValueError, match=rf"`{name}` must be a positive integer, got {bad}"):
            record_from_checkpoints(files, tmp_path / "d", MLPVAE, loader, **{name: bad})
        assert not (tmp_path / "d").exists(), "refused before anything was created"


def test_post_hoc_never_appends_another_run_to_a_store(run, tmp_path):
    _, _, loader, _, files, _, _ = run
    first = record_from_checkpoints(files[:2], tmp_path / "s", MLPVAE, loader, batch_size=48, progress=False)
    manifest = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(StoreError, match=rf"already holds a gradient store of run '{first.run_id}' .*steps \[2, 4\]"):
        record_from_checkpoints(files[2:], tmp_path / "s", MLPVAE, loader, batch_size=48, progress=False)
    assert (tmp_path / "s" / "manifest.json").read_text() == manifest
    again = record_from_checkpoints(files[2:], tmp_path / "s", MLPVAE, loader, batch_size=48, overwrite=True)
    assert [c.step for c in again.checkpoints] == [6] and again.run_id != first.run_id


def test_post_hoc_refuses_checkpoints_of_several_optimizers(run, tmp_path):
    """Each optimizer steps its own parameters: one optimizer's learning rates would weight them all wrongly."""
    vae, _, loader, _, files, _, _ = run
    ckpt = torch.load(files[0], weights_only=False)
    ckpt["optimizer_states"] = [ckpt["optimizer_states"][0]] * 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match=r"two\.ckpt' holds the state of 2 optimizers.*TrajectoryRecorder"):
        record_from_checkpoints([tmp_path / "two.ckpt"], tmp_path / "s", vae, loader, progress=False)
    assert not (tmp_path / "s").exists(), "refused before the store was created: a retry is not blocked"


def test_a_test_set_of_none_names_setup_test(run):
    vae, _, _, store_path, _, _, _ = run
    with pytest.raises(TypeError, match=r"`test_data` is None.*dm.setup\('test'\)"):
        InfluenceAnalysis(store_path, vae).tracin(None)


def test_post_hoc_factored_storage_and_engine_rules_match_the_callback(run):
    vae, _, loader, store_path, files, root, queries = run
    live = InfluenceAnalysis(store_path, vae)
    posthoc = record_from_checkpoints(
        files, root / "posthoc_fs", MLPVAE, loader, batch_size=48, factored_storage=True, progress=False
    )
    # The engine ran its checks before the header was written: the manifest has the rules it used.
    for key in ("engine", "engine_rules"):
        assert posthoc.manifest["extra"][key] == live.store.manifest["extra"][key]
    assert posthoc.manifest["extra"]["engine"] == "factored"
    assert "encoder.0.weight" in posthoc.factored  # 16 + 64 values per sample instead of 1024
    ph = InfluenceAnalysis(posthoc, MLPVAE(**posthoc.manifest["extra"]["hparams"]))
    got, ref = ph.tracin(queries), live.tracin(queries)
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # factors against dense vmap rows: float rounding


def test_post_hoc_kronecker_projection_is_the_same_from_factors_and_from_dense_gradients(run):
    _, _, loader, _, files, root, _ = run
    stores = {
        engine: record_from_checkpoints(
            files,
            root / f"kron_{engine}",
            MLPVAE,
            loader,
            batch_size=48,
            projection_dim=256,
            projection_kind="kronecker",
            engine=engine,
            progress=False,
        )
        for engine in ("factored", "vmap")
    }
    assert stores["factored"].manifest["projection"]["kind"] == "kronecker"
    for a, b in zip(stores["factored"].checkpoints, stores["vmap"].checkpoints):
        ra, rb = a.gradients(), b.gradients()
        assert ra.shape == (96, 256)
        assert float((ra - rb).norm() / rb.norm()) < 1e-5


def test_post_hoc_refuses_factored_storage_with_a_projection_and_an_unknown_engine(run, tmp_path):
    _, _, loader, _, files, _, _ = run
    with pytest.raises(ValueError, match=r"`factored_storage=True` .* `projection_dim`=64"):
        record_from_checkpoints(files, tmp_path / "a", MLPVAE, loader, projection_dim=64, factored_storage=True)
    with pytest.raises(ValueError, match=r"`engine` must be 'auto', 'factored', 'vmap', 'loop'"):
        record_from_checkpoints(files, tmp_path / "b", MLPVAE, loader, engine="fast")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
