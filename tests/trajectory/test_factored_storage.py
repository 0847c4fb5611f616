"""Exact factored storage: the same fit recorded densely and as factors scores the same."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import VAE_KWARGS, quiet_trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import Subset, TensorDataset

import lightning_influence.trajectory.store as store_module
from lightning_influence import GradientStore, InfluenceAnalysis, InfluenceFunction, TrajectoryRecorder
from lightning_influence.data import DigitsDataModule, load_digits_tensors
from lightning_influence.errors import StoreError
from lightning_influence.gradients import (
    FactoredEngine,
    GradientFeaturizer,
    GradientPrecision,
    LayerFactors,
    SplitRows,
    VmapEngine,
    bias_partners,
    split_inner_products,
    split_rowwise_inner_products,
)
from lightning_influence.gradients.featurizer import cast_state
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.gradients.parameters import module_state
from lightning_influence.models import MLPVAE
from lightning_influence.trajectory.distributed import DistributedInfluence
from lightning_influence.trajectory.store import durable, layout

N_TRAIN = 300
REPO = Path(__file__).resolve().parents[2]


class TwoGroupVAE(MLPVAE):
    """Different learning rates per group: the per-parameter scales are folded into the stored ``g``."""

    def configure_optimizers(self):
        return torch.optim.Adam(
            [
                {"params": self.encoder.parameters(), "lr": 2e-3},
                {"params": self.decoder.parameters(), "lr": 5e-4},
            ]
        )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    train = Subset(dm.train_set, range(N_TRAIN))
    vae = TwoGroupVAE(**VAE_KWARGS)
    root = tmp_path_factory.mktemp("factored_storage")
    common = dict(dataset=train, every_n_epochs=2, batch_size=128)
    dense = TrajectoryRecorder(root / "dense", **common)
    factored = TrajectoryRecorder(root / "factored", factored_storage=True, **common)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    quiet_trainer(max_epochs=4, callbacks=[dense, factored]).fit(vae, loader)
    queries = Subset(dm.test_set, range(12))
    return dict(vae=vae, train=train, queries=queries, dense=dense.store_path, factored=factored.store_path)


def test_the_manifest_lists_the_factored_parameters_and_dense_stores_are_unchanged(run):
    dense, factored = GradientStore(run["dense"]), GradientStore(run["factored"])
    assert dense.manifest["schema_version"] == 1 and "factored" not in dense.manifest
    assert dense.factored == {} and dense.dense_dim == dense.dim
    assert set(dense.checkpoints[0].entry["files"]) == {"grads.npy", "weights.safetensors"}
    assert factored.manifest["schema_version"] == 4
    # Linear layers without positions, and the decoder's output layer with 16 ELBO draws
    # (16 x (128 + 64) < 128 x 64); decoder.0 with 16 draws (16 x 136 > 1024) stays dense, with its
    # bias; the biases of the stored layers are their g summed over positions (no file, no columns).
    weights = ["decoder.2.weight", "encoder.0.weight", "encoder.2.weight"]
    assert sorted(n for n, f in factored.factored.items() if "bias_of" not in f) == weights
    assert {n: f["bias_of"] for n, f in factored.factored.items() if "bias_of" in f} == {
        w.replace("weight", "bias"): w for w in weights
    }
    assert factored.factored["encoder.0.bias"] == {"bias_of": "encoder.0.weight", "shape": [128]}
    assert factored.factored["encoder.0.weight"] == {
        "positions": 1,
        "inputs": 64,
        "outputs": 128,
        "groups": 1,
        "shape": [128, 64],
    }
    assert factored.factored["decoder.2.weight"]["positions"] == 16
    assert factored.dim == dense.dim
    assert factored.dense_dim == dense.dim - sum(math.prod(f["shape"]) for f in factored.factored.values())
    assert factored.dense_dim == 1024 + 128  # decoder.0's weight and bias
    assert factored.row_values == 4560 and dense.dim == 19792  # 1152 dense + 192 + 144 + 16 x 192
    ckpt = factored.checkpoints[0]
    assert set(ckpt.entry["files"]) == {"grads.npy", "weights.safetensors", *(f"f.{w}.npy" for w in weights)}
    assert not any(fn.startswith(("a.", "g.")) for fn in ckpt.entry["files"]), "a and g share one file"
    assert ckpt.dense_gradients().shape == (N_TRAIN, factored.dense_dim)
    a, g = ckpt.factors("decoder.2.weight")
    assert a.shape == (N_TRAIN, 16, 128) and g.shape == (N_TRAIN, 16, 64)
    bias_a, bias_g = ckpt.factors("decoder.2.bias")
    assert bias_a is None and torch.equal(bias_g, g)
    # Two param groups: g is stored unscaled and the reader applies the checkpoint's scale.
    scales = ckpt.entry["param_scales"]
    assert scales["decoder.2.weight"] == 0.5 and scales["encoder.0.weight"] == 1.0
    raw = torch.from_numpy(np.load(ckpt.dir / "f.decoder.2.weight.npy"))[..., 128:]
    assert torch.allclose(g, raw * 0.5)
    with pytest.raises(StoreError, match="factored_storage=True.*block\\(start, stop\\).*materialized"):
        ckpt.gradients()
    disk = sum(p.stat().st_size for p in ckpt.dir.glob("*.npy"))
    assert disk < (dense.checkpoints[0].dir / "grads.npy").stat().st_size / 4


class BiasGroupVAE(MLPVAE):
    """Biases learn at another rate than their weights: a folded bias's scale differs from its layer's."""

    def configure_optimizers(self):
        params = dict(self.named_parameters())
        return torch.optim.SGD(
            [
                {"params": [p for n, p in params.items() if n.endswith("weight")], "lr": 2e-2},
                {"params": [p for n, p in params.items() if n.endswith("bias")], "lr": 5e-3},
            ]
        )


def test_a_bias_in_another_parameter_group_than_its_weight_scores_like_the_dense_store(tmp_path):
    pl.seed_everything(1, verbose=False)
    x, _ = load_digits_tensors()
    data = TensorDataset(x[:96])
    common = dict(every_n_epochs=1, batch_size=48)
    dense = TrajectoryRecorder(tmp_path / "dense", **common)
    factored = TrajectoryRecorder(tmp_path / "factored", factored_storage=True, **common)
    vae = BiasGroupVAE(input_dim=64, hidden_dim=32, latent_dim=4, likelihood="gaussian", sigma=0.2)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    quiet_trainer(max_epochs=2, callbacks=[dense, factored]).fit(vae, loader)
    d, f = GradientStore(dense.store_path), GradientStore(factored.store_path)
    assert f.factored["encoder.0.bias"] == {"bias_of": "encoder.0.weight", "shape": [32]}
    scales = f.checkpoints[0].param_scales
    assert scales["encoder.0.weight"] == 1.0 and scales["encoder.0.bias"] == pytest.approx(0.5)
    for cd, cf in zip(d.checkpoints, f.checkpoints):
        _, gb = cf.factors("encoder.0.bias")
        _, gw = cf.factors("encoder.0.weight")
        assert torch.allclose(gb, 0.5 * gw)
        assert _rel(cf.materialized(), cd.gradients()) < 1e-5
    q = x[200:206]
    s_d, s_f = InfluenceAnalysis(d, vae).tracin(q), InfluenceAnalysis(f, vae).tracin(q)
    assert _rel(s_f, s_d) < 1e-5


class TiedAutoencoder(pl.LightningModule):
    """The decoder reuses the encoder's weight (F.linear with its transpose): the factored engine must not store it."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(64, 8)
        self.dec_bias = torch.nn.Parameter(torch.zeros(64))

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)

    def per_sample_loss(self, batch):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return (self(x) - x).pow(2).sum(1)

    def training_step(self, batch, _):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_tied_weight_is_stored_densely_and_scores_like_the_vmap_store(tmp_path):
    x, _ = load_digits_tensors()
    data, q = TensorDataset(x[:64]), x[200:205]
    stores, models = {}, {}
    for engine in ("vmap", "auto"):
        pl.seed_everything(2, verbose=False)
        rec = TrajectoryRecorder(
            tmp_path / engine, every_n_epochs=1, batch_size=32, engine=engine, factored_storage=engine == "auto"
        )
        models[engine] = TiedAutoencoder()
        loader = torch.utils.data.DataLoader(data, batch_size=16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_epochs=2, callbacks=[rec]).fit(models[engine], loader)
        stores[engine] = GradientStore(rec.store_path)
    assert any("'enc.weight' (by torch.Tensor.t) is read outside" in str(w.message) for w in caught)
    auto = stores["auto"]
    assert auto.manifest["extra"]["engine_rules"] == {"enc.weight": "vmap", "enc.bias": "linear", "dec_bias": "vmap"}
    assert "enc.weight" not in auto.factored
    reference = InfluenceAnalysis(stores["vmap"], models["vmap"], engine="vmap").tracin(q)
    assert _rel(InfluenceAnalysis(auto, models["auto"]).tracin(q), reference) < 1e-5


def _record_four_ways(tmp_path, make_model, data, k: int, seed: int):
    """The same fit recorded by the vmap engine and by "auto" (factored storage), exact and Kronecker-projected."""
    stores, models = {}, {}
    for label, kwargs in {
        "vmap": dict(engine="vmap"),
        "auto": dict(engine="auto", factored_storage=True),
        "vmap k": dict(engine="vmap", projection_dim=k, projection_kind="kronecker"),
        "auto k": dict(engine="auto", projection_dim=k, projection_kind="kronecker"),
    }.items():
        pl.seed_everything(seed, verbose=False)
        rec = TrajectoryRecorder(tmp_path / label.replace(" ", "_"), every_n_epochs=1, batch_size=16, **kwargs)
        models[label] = make_model()
        quiet_trainer(max_epochs=2, callbacks=[rec]).fit(models[label], torch.utils.data.DataLoader(data, batch_size=8))
        stores[label] = GradientStore(rec.store_path)
    return stores, models


def _assert_factored_scores_and_kronecker_rows_match_vmap(stores, models, queries):
    reference = InfluenceAnalysis(stores["vmap"], models["vmap"], engine="vmap").tracin(queries)
    assert reference.abs().max() > 0
    assert _rel(InfluenceAnalysis(stores["auto"], models["auto"]).tracin(queries), reference) < 1e-5
    # Kronecker rows straight from the layer factors equal the projection of the dense vmap gradients.
    projected = stores["vmap k"].checkpoints[-1].gradients()
    assert _rel(stores["auto k"].checkpoints[-1].gradients(), projected) < 1e-5


class VolumeAutoencoder(pl.LightningModule):
    """A 3-D convolutional autoencoder (volumes, as in medical imaging): Conv3d, GroupNorm, ConvTranspose3d."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, stride=2, padding=1),
            torch.nn.GroupNorm(2, 4),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 27, 6),
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(6, 4 * 27),
            torch.nn.Unflatten(1, (4, 3, 3, 3)),
            torch.nn.Tanh(),
            torch.nn.ConvTranspose3d(4, 1, 3, stride=2, padding=1, output_padding=1),
        )

    def per_sample_loss(self, batch):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return (self.decoder(self.encoder(x)) - x).pow(2).flatten(1).sum(1)

    def training_step(self, batch, _):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_volumetric_conv_autoencoder_records_with_layer_rules_and_scores_like_vmap(tmp_path):
    x = torch.rand(48, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    data, q = TensorDataset(x[:40]), x[40:]
    stores, models = _record_four_ways(tmp_path, VolumeAutoencoder, data, k=256, seed=3)
    rules = stores["auto"].manifest["extra"]["engine_rules"]
    assert rules["encoder.0.weight"] == "conv" and rules["decoder.3.weight"] == "conv_transpose"
    assert rules["encoder.1.weight"] == "norm" and "vmap" not in rules.values()
    assert set(stores["auto"].factored) == {"encoder.4.weight", "encoder.4.bias", "decoder.0.weight", "decoder.0.bias"}
    _assert_factored_scores_and_kronecker_rows_match_vmap(stores, models, q)


class TokenAutoencoder(pl.LightningModule):
    """Token sequences (a SMILES or text model in miniature): embedding, pooled code, per-position logits."""

    def __init__(self, vocab: int = 40, width: int = 24, length: int = 3):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width, padding_idx=0)
        self.code = torch.nn.Linear(width, 6)
        self.out = torch.nn.Linear(6, vocab * length)
        self.vocab, self.length = vocab, length

    def per_sample_loss(self, batch):
        tokens = batch[0]
        logits = self.out(torch.tanh(self.code(self.emb(tokens).mean(1))))
        logits = logits.reshape(-1, self.length, self.vocab).transpose(1, 2)
        return torch.nn.functional.cross_entropy(logits, tokens, reduction="none").sum(1)

    def training_step(self, batch, _):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_token_model_records_its_embedding_as_factors_and_scores_like_vmap(tmp_path):
    tokens = torch.randint(0, 40, (56, 3), generator=torch.Generator().manual_seed(1))
    tokens[:8, -1] = 0  # padded sequences
    data, q = TensorDataset(tokens[:48]), (tokens[48:],)
    stores, models = _record_four_ways(tmp_path, TokenAutoencoder, data, k=128, seed=4)
    assert stores["auto"].manifest["extra"]["engine_rules"]["emb.weight"] == "embedding"
    assert "emb.weight" in stores["auto"].factored
    _assert_factored_scores_and_kronecker_rows_match_vmap(stores, models, q)


def test_a_bias_whose_g_is_not_its_layers_is_refused(run, tmp_path):
    src = GradientStore(run["factored"])
    w = store_module.GradientStoreWriter(tmp_path / "s", _header_like(src))
    rows = src.checkpoints[0].block(0, 4)
    g = rows.factors["encoder.0.weight"].output_grads
    for bias, match in (
        (LayerFactors(None, 2 * g, (128,)), "its g differs from that layer's weight's g"),
        (LayerFactors(None, g[:, :, :5], (5,)), r"g \(4, 1, 128\), but the rows give it a g of shape \(4, 1, 5\)"),
        (g.sum(1), "the rows give a dense gradient"),
    ):
        bad = SplitRows(rows.dense, {**rows.factors, "encoder.0.bias": bias}, rows.names, rows.numels)
        ck = w.begin_checkpoint()
        with pytest.raises(StoreError, match=f"Bias 'encoder.0.bias' is stored as the sum of its layer's.*{match}"):
            ck.write_rows(torch.arange(4), bad)
        ck.abort()
    ck = w.begin_checkpoint()
    same = LayerFactors(None, g.clone(), (128,))  # equal values in another tensor (a loss-scale back-off) are fine
    ck.write_rows(
        torch.arange(4), SplitRows(rows.dense, {**rows.factors, "encoder.0.bias": same}, rows.names, rows.numels)
    )
    ck.abort()


def test_materialized_rows_equal_the_dense_store(run):
    dense, factored = GradientStore(run["dense"]), GradientStore(run["factored"])
    for cd, cf in zip(dense.checkpoints, factored.checkpoints):
        ref = cd.gradients()
        got = cf.materialized()
        assert got.shape == ref.shape
        err = _rel(got, ref)
        assert err < 1e-5, f"checkpoint {cd.index}: relative error {err:.2e}"


def test_tracin_self_influence_and_top_k_equal_the_dense_store(run):
    dense = InfluenceAnalysis(run["dense"], run["vae"], train_data=run["train"], train_block=70)
    factored = InfluenceAnalysis(run["factored"], run["vae"], train_data=run["train"], train_block=70)
    q = run["queries"]
    s_dense, s_fact = dense.tracin(q), factored.tracin(q)
    assert s_fact.shape == (12, N_TRAIN)
    err = _rel(s_fact, s_dense)
    print(f"TracIn relative error {err:.2e}")
    assert err < 1e-5
    si_d, si_f = dense.self_influence(), factored.self_influence()
    assert _rel(si_f, si_d) < 1e-5, f"self-influence relative error {_rel(si_f, si_d):.2e}"
    ub_d, ub_f = dense.self_influence(unbiased=True), factored.self_influence(unbiased=True)
    assert _rel(ub_f, ub_d) < 1e-5, f"unbiased self-influence relative error {_rel(ub_f, ub_d):.2e}"
    assert not torch.allclose(ub_f, si_f), "the unbiased estimate uses a second draw set"
    top_d, top_f = dense.top_k(q, k=10), factored.top_k(q, k=10)
    assert torch.equal(top_f.indices, top_d.indices)
    assert _rel(top_f.scores, top_d.scores) < 1e-5
    summary = factored.summary(q, k=5)
    assert torch.equal(summary.proponents.indices, torch.topk(s_fact, 5, dim=1).indices)
    assert torch.equal(summary.opponents.indices, torch.topk(s_fact, 5, dim=1, largest=False).indices)


def test_a_vmap_test_side_scores_a_factored_store_the_same(run):
    dense = InfluenceAnalysis(run["dense"], run["vae"])
    factored = InfluenceAnalysis(run["factored"], run["vae"], engine="vmap")
    q = Subset(run["queries"].dataset, range(4))
    assert _rel(factored.tracin(q), dense.tracin(q)) < 1e-5


def test_distributed_influence_on_a_factored_store(run):
    analysis = InfluenceAnalysis(run["factored"], run["vae"], train_data=run["train"])
    reference = InfluenceAnalysis(run["dense"], run["vae"], train_data=run["train"])
    trainer = quiet_trainer(max_epochs=1)
    scorer = DistributedInfluence(analysis, trainer, train_block=64)
    q = run["queries"]
    assert _rel(scorer.tracin(q), reference.tracin(q)) < 1e-5
    assert _rel(scorer.self_influence(), reference.self_influence()) < 1e-5
    top = scorer.top_k(q, k=6)
    assert torch.equal(top.indices, reference.top_k(q, k=6).indices)


def test_influence_function_materialises_a_factored_store(run):
    vae = copy.deepcopy(run["vae"])
    vae.load_state_dict(GradientStore(run["factored"]).checkpoints[-1].state())
    kw = dict(solver="cg", damping=0.1, batch_size=128)
    from_factored = InfluenceFunction(vae, run["train"], store=GradientStore(run["factored"]), **kw)
    from_dense = InfluenceFunction(vae, run["train"], store=GradientStore(run["dense"]), **kw)
    blocks_f = list(from_factored.train_gradients())
    blocks_d = list(from_dense.train_gradients())
    assert [len(i) for i, _ in blocks_f] == [128, 128, 44]
    for (ids_f, rows_f), (ids_d, rows_d) in zip(blocks_f, blocks_d):
        assert torch.equal(ids_f, ids_d)
        assert _rel(rows_f, rows_d) < 1e-5


def test_split_rows_materialise_to_rows_for_both_engines():
    torch.manual_seed(0)
    vae = MLPVAE(**VAE_KWARGS)
    names = [n for n, _ in vae.named_parameters()]
    x = torch.rand(5, 64)
    ids = torch.arange(5)
    state = cast_state(module_state(vae, upcast=False), GradientPrecision(), torch.device("cpu"))
    scales = {n: (0.5 if n.startswith("decoder") else 1.0) for n in names}
    factored = ["encoder.0.weight", "decoder.2.weight", "decoder.0.bias"]
    for engine in (FactoredEngine(), VmapEngine()):
        f = GradientFeaturizer(vae, lambda m, b: m.per_sample_loss(b), names, engine=engine)
        rows, _ = f.rows(x, ids, state, param_scales=scales)
        split, bad = f.split_rows(x, ids, state, factored=factored, param_scales=scales)
        assert not bad.any()
        assert split.dense.shape == (5, rows.shape[1] - 64 * 128 - 128 * 64 - 128)
        assert _rel(split.materialize(), rows) < 1e-5
        assert _rel(split_inner_products(split, split), rows @ rows.T) < 1e-5
        assert _rel(split_rowwise_inner_products(split, split), (rows * rows).sum(1)) < 1e-5
        if engine.name == "factored":
            assert isinstance(split.factors["encoder.0.weight"], LayerFactors)
        with pytest.raises(ValueError, match="`factored` names"):
            f.split_rows(x, ids, state, factored=["nope"])


def test_grouped_factors_score_exactly():
    torch.manual_seed(1)
    a, g = torch.randn(4, 3, 6), torch.randn(4, 3, 8)
    f = LayerFactors(a, g, (8, 3), groups=2)
    rows = SplitRows(torch.randn(4, 2), {"w": f}, ("b", "w"), (2, 24))
    full = rows.materialize()
    assert _rel(split_inner_products(rows, rows), full @ full.T) < 1e-5
    assert _rel(split_rowwise_inner_products(rows, rows), (full * full).sum(1)) < 1e-5


def test_fp16_loss_scale_back_off_in_split_rows():
    """A loss scale that overflows is backed off per sample, and divided out of the stored ``g``."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1))
    names = [n for n, _ in net.named_parameters()]
    x = torch.randn(6, 30)
    x[2] *= 1e3  # this sample's gradient overflows at a large loss scale
    ids = torch.arange(6)

    def loss(m, b):
        return m(b).squeeze(-1) ** 2 * 1e4

    state = {k: v.detach() for k, v in net.state_dict().items()}
    precision = GradientPrecision(mode="fp32")
    plain = GradientFeaturizer(net, loss, names, engine=FactoredEngine(), precision=precision)
    ref, _ = plain.rows(x, ids, state)
    scaled = GradientFeaturizer(net, loss, names, engine=FactoredEngine(), precision=precision)
    scaled.precision = _ScaledPrecision(mode="fp32", init_loss_scale=2.0**120)
    split, bad = scaled.split_rows(x, ids, state, factored=["0.weight"])
    assert not bad.any()
    assert _rel(split.materialize(), ref) < 1e-5
    with_bias, bad = scaled.split_rows(x, ids, state, factored=["0.weight", "0.bias"])
    assert not bad.any() and bias_partners(with_bias) == {"0.bias": "0.weight"}, "the back-off keeps g shared"
    assert _rel(with_bias.materialize(), ref) < 1e-5


class _ScaledPrecision(GradientPrecision):
    """fp32 numerics with a huge initial loss scale, so the back-off path runs on CPU."""

    @property
    def loss_scaling(self) -> bool:
        return True


def test_factored_storage_needs_exact_rows(tmp_path):
    with pytest.raises(MisconfigurationException, match="factored_storage=True.*projection_dim"):
        TrajectoryRecorder(tmp_path, factored_storage=True, projection_dim=16)
    with pytest.raises(MisconfigurationException, match="`factored_storage` must be True or False"):
        TrajectoryRecorder(tmp_path, factored_storage="yes")


def test_a_corrupted_factor_file_is_named(run, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(run["factored"], copy)
    path = copy / "ckpt-00000" / "f.encoder.0.weight.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    store = GradientStore(copy)
    store.checkpoints[0].dense_gradients()  # other files are fine
    with pytest.raises(StoreError, match="f.encoder.0.weight.npy does not match its checksum"):
        store.checkpoints[0].block(0, 10)
    with pytest.raises(StoreError, match="f.encoder.0.weight.npy"):
        store.verify()


def test_an_old_dense_manifest_still_opens_and_scores(run, tmp_path):
    """A store written before factored storage existed (no ``factored``/``dense_dim`` keys) reads as before."""
    copy = tmp_path / "old"
    shutil.copytree(run["dense"], copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert "factored" not in m and "dense_dim" not in m and m["schema_version"] == 1
    a = InfluenceAnalysis(copy, run["vae"])
    b = InfluenceAnalysis(run["dense"], run["vae"])
    q = Subset(run["queries"].dataset, range(3))
    assert torch.equal(a.tracin(q), b.tracin(q))


def _write_npy(path: Path, array: np.ndarray, files: dict) -> None:
    np.save(path, np.ascontiguousarray(array))
    data = path.read_bytes()
    files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _as_old_schema(src: Path, dst: Path, version: int) -> None:
    """Rewrite a version-4 store as an older lightning_influence wrote it.

    Versions 2 and 3 folded the per-parameter scale into ``g`` and kept biases in ``grads.npy``;
    version 2 also kept ``a`` and ``g`` in two files.
    """
    shutil.copytree(src, dst)
    store = GradientStore(src)
    m = json.loads((dst / "manifest.json").read_text())
    weights = {n: f for n, f in m["factored"].items() if "bias_of" not in f}
    m["factored"] = weights
    m["dense_dim"] = m["dim"] - sum(math.prod(f["shape"]) for f in weights.values())
    m["schema_version"] = version
    numels = [math.prod(store.param_shapes[n]) for n in store.param_names]
    offsets = np.cumsum([0, *numels])
    for entry, ckpt in zip(m["checkpoints"], store.checkpoints):
        files, folder = entry["files"], dst / entry["dir"]
        full = ckpt.materialized().numpy()
        dense = [full[:, offsets[i] : offsets[i + 1]] for i, n in enumerate(store.param_names) if n not in weights]
        _write_npy(folder / "grads.npy", np.concatenate(dense, axis=1), files)
        for name in weights:
            a, g = ckpt.factors(name)  # g scaled, as versions 2 and 3 stored it
            if version == 2:
                (folder / f"f.{name}.npy").unlink()
                del files[f"f.{name}.npy"]
                _write_npy(folder / f"a.{name}.npy", a.numpy(), files)
                _write_npy(folder / f"g.{name}.npy", g.numpy(), files)
            else:
                _write_npy(folder / f"f.{name}.npy", torch.cat([a, g], -1).numpy(), files)
    (dst / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("version", [2, 3])
def test_an_older_factored_store_still_reads_and_scores_the_same(run, tmp_path, version):
    """Version 3 (scaled g, biases in grads.npy) and version 2 (a and g in two files) stores are read as such."""
    old = tmp_path / f"v{version}"
    _as_old_schema(run["factored"], old, version)
    store = GradientStore(old)
    store.verify()
    assert "encoder.0.bias" not in store.factored
    assert store.checkpoints[0].dense_gradients().shape == (N_TRAIN, 1360)
    new = GradientStore(run["factored"])
    a, g = store.checkpoints[0].factors("decoder.2.weight")
    a4, g4 = new.checkpoints[0].factors("decoder.2.weight")
    assert torch.equal(a, a4) and torch.equal(g, g4), "scales are not applied twice"
    assert torch.equal(store.checkpoints[1].materialized(), new.checkpoints[1].materialized())
    q = Subset(run["queries"].dataset, range(3))
    assert _rel(InfluenceAnalysis(old, run["vae"]).tracin(q), InfluenceAnalysis(new, run["vae"]).tracin(q)) < 1e-6


def test_an_older_factored_store_is_not_appended_to(run, tmp_path):
    """Appending version-4 checkpoints to a version-3 store would mix two meanings of the stored g."""
    old = tmp_path / "v3"
    _as_old_schema(run["factored"], old, 3)
    src = GradientStore(run["factored"])
    header = _header_like(src)
    with pytest.raises(StoreError, match="schema version 3, written by an older lightning_influence.*new `dirpath`"):
        store_module.GradientStoreWriter(old, header)


def test_disk_full_while_creating_factor_files_names_the_store(run, tmp_path, monkeypatch):
    store = GradientStore(run["factored"])
    header = _header_like(store)
    writer = store_module.GradientStoreWriter(tmp_path / "full", header)
    real = durable.preallocate

    def full(fd, size):
        if size == header.file_bytes("f.decoder.2.weight.npy"):
            raise OSError(28, "No space left on device")
        real(fd, size)

    monkeypatch.setattr(durable, "preallocate", full)
    with pytest.raises(OSError, match="Not enough disk space for the gradient store at .*full.*f.encoder"):
        writer.begin_checkpoint()
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "full").iterdir())


def test_disk_full_while_writing_a_factor_file_names_it_and_lists_nothing(run, tmp_path, monkeypatch):
    """One write task carries every file's rows of a batch: the error still names the file that failed."""
    store = GradientStore(run["factored"])
    header = _header_like(store)
    writer = store_module.GradientStoreWriter(tmp_path / "full", header)
    rows = store.checkpoints[0].block(0, N_TRAIN)
    real = store_module.ShardWriter._write

    def full(self, data, offset, hashed):
        if self.fname == "f.decoder.2.weight.npy":
            raise OSError(28, "No space left on device")
        real(self, data, offset, hashed)

    monkeypatch.setattr(store_module.ShardWriter, "_write", full)
    ckpt = writer.begin_checkpoint()
    with pytest.raises(OSError, match=r"while writing gradient rows \(f\.decoder\.2\.weight\.npy\): it needs"):
        ckpt.write_rows(torch.arange(N_TRAIN), rows)
        ckpt.commit(store.checkpoints[0].state(), {"step": 1, "epoch": 0, "lr": 0.1})
    ckpt.abort()
    assert GradientStore(tmp_path / "full").checkpoints == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "full").iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names descriptors through /proc/self/fd")
def test_a_failed_fsync_of_one_factor_file_names_it_and_lists_nothing(run, tmp_path, monkeypatch):
    """A checkpoint's files are fsynced concurrently: the failure of one (on a pool thread) still names its file."""
    store = GradientStore(run["factored"])
    header = _header_like(store)
    writer = store_module.GradientStoreWriter(tmp_path / "full", header)
    rows = store.checkpoints[0].block(0, N_TRAIN)
    real = os.fsync
    synced: list[str] = []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append(name)
        if name == "f.encoder.2.weight.npy":  # neither the first file nor the last
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt = writer.begin_checkpoint()
    ckpt.write_rows(torch.arange(N_TRAIN), rows)
    with pytest.raises(OSError, match=r"while writing gradient rows \(f\.encoder\.2\.weight\.npy\): it needs"):
        ckpt.commit(store.checkpoints[0].state(), {"step": 1, "epoch": 0, "lr": 0.1})
    assert set(header.file_rows()) <= set(synced), "every file's fsync ran (and ended) before the error was raised"
    ckpt.abort()
    monkeypatch.undo()
    assert GradientStore(tmp_path / "full").checkpoints == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "full").iterdir())
    again = writer.begin_checkpoint()  # the writer carries on once the disk recovers
    again.write_rows(torch.arange(N_TRAIN), rows)
    again.commit(store.checkpoints[0].state(), {"step": 1, "epoch": 0, "lr": 0.1})
    written = GradientStore(tmp_path / "full")
    written.verify()
    torch.testing.assert_close(written.checkpoints[0].materialized(), store.checkpoints[0].materialized())


@pytest.mark.parametrize("side", ["checkpoint", "shard"])
def test_an_abandoned_checkpoint_does_not_write_the_rows_held_for_gathering(run, tmp_path, monkeypatch, side):
    """Small batches' rows wait to be gathered into one write; abandoning the files drops them unwritten."""
    src = GradientStore(run["factored"])
    header = _header_like(src)
    writer = store_module.GradientStoreWriter(tmp_path / "s", header)
    rows = src.checkpoints[0].block(0, 4)  # far below the ~1 MB a gathered write waits for
    writes: list[str] = []
    real = store_module.ShardWriter._write

    def counted(self, data, offset, hashed):
        writes.append(self.fname)
        real(self, data, offset, hashed)

    monkeypatch.setattr(store_module.ShardWriter, "_write", counted)
    ckpt = writer.begin_checkpoint(stop=2)
    if side == "checkpoint":
        ckpt.write_rows(torch.arange(2), rows[:2])
        assert writes == [], "the rows are held, not written yet"
        ckpt.abort()
    else:
        other = store_module.GradientStoreWriter(tmp_path / "s", header, run_id=writer.run_id, attach=True)
        shard = other.open_shard(ckpt.index, 2, 4)
        shard.write_rows(torch.arange(2, 4), rows[2:4])
        assert writes == [], "the rows are held, not written yet"
        shard.close()
        ckpt.abort()
    assert writes == [], f"abandoned rows were written into {sorted(set(writes))}"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "s").iterdir())


def test_factor_rows_written_by_several_ranks_tile_each_file(run, tmp_path):
    """What DDP ranks do with factored storage: disjoint row ranges of every file, one checksum segment each."""
    src = GradientStore(run["factored"])
    header = _header_like(src)
    w = store_module.GradientStoreWriter(tmp_path / "s", header)
    rows = src.checkpoints[0].block(0, N_TRAIN)
    bounds = [store_module.shard_bounds(N_TRAIN, 3, r) for r in range(3)]
    ck = w.begin_checkpoint(stop=bounds[0][1])
    infos = []
    for start, stop in bounds[1:]:
        other = store_module.GradientStoreWriter(tmp_path / "s", header, run_id=w.run_id, attach=True)
        shard = other.open_shard(ck.index, start, stop)
        shard.write_rows(torch.arange(start, stop), rows[start:stop])
        infos.append(shard.finish())
    with pytest.raises(StoreError, match="write SplitRows"):
        ck.write_rows(torch.arange(2), torch.zeros(2, header.dim))
    ck.write_rows(torch.arange(*bounds[0]), rows[bounds[0][0] : bounds[0][1]])
    ck.commit(src.checkpoints[0].state(), {"step": 1, "epoch": 0, "lr": 0.1}, shards=infos)
    out = GradientStore(tmp_path / "s")
    out.verify()
    assert len(out.checkpoints[0].entry["files"]["f.encoder.0.weight.npy"]["segments"]) == 3
    got = out.checkpoints[0].materialized()
    assert torch.equal(got, src.checkpoints[0].materialized())
    assert np.array_equal(
        out.checkpoints[0].factors("encoder.0.weight")[1].numpy(), rows.factors["encoder.0.weight"].output_grads.numpy()
    )


@pytest.mark.slow
def test_ddp_ranks_write_their_factor_rows_and_score_like_dense_rows(tmp_path):
    """2-process CPU DDP: each rank writes its rows of every factor file; distributed scores equal dense ones."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    job = Path(__file__).with_name("ddp_factored_job.py")
    proc = subprocess.run(
        [sys.executable, str(job), str(tmp_path / "store"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK0_DONE 6" in proc.stdout
    store = GradientStore(tmp_path / "store")
    store.verify()
    assert len(store) == 2 and store.n_samples == 96
    # Every layer is stored as factors, every bias as its layer's g: grads.npy is empty.
    weights = ["decoder.0.weight", "decoder.2.weight", "encoder.0.weight", "encoder.2.weight"]
    assert sorted(n for n, f in store.factored.items() if "bias_of" not in f) == weights
    assert sorted(n for n, f in store.factored.items() if "bias_of" in f) == [w[:-6] + "bias" for w in weights]
    assert store.dense_dim == 0
    ckpt = store.checkpoints[-1]
    assert ckpt.dense_gradients().shape == (96, 0) and "grads.npy" not in ckpt.entry["files"]
    for fn in ("f.encoder.0.weight.npy", "f.decoder.2.weight.npy"):
        assert len(ckpt.entry["files"][fn]["segments"]) == 2, fn
    x, y = load_digits_tensors()
    data, tests = TensorDataset(x[:96], y[:96]), x[200:205]
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    analysis = InfluenceAnalysis(store, vae)
    # Dense references at the stored weights, computed in one process: full rows, their TracIn and self-influence.
    ref_tracin = torch.zeros(5, 96)
    ref_self = torch.zeros(96)
    for c in store.checkpoints:
        train_rows = analysis.gradients(data, c, stream=NoiseStream.TRAIN, name="train_data")
        assert _rel(c.materialized(), train_rows) < 1e-5
        ref_tracin += c.eta * analysis.gradients(tests, c) @ train_rows.T
        ref_self += c.eta * (train_rows * train_rows).sum(1)
    results = [torch.load(tmp_path / f"scores_rank{r}.pt") for r in (0, 1)]
    blocks = [set(res["blocks"]) for res in results]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]
    for res in results:
        assert _rel(res["tracin"], ref_tracin) < 1e-5
        assert _rel(res["self_influence"], ref_self) < 1e-5
        assert torch.equal(res["proponents"][0], torch.topk(ref_tracin, 7, dim=1).indices)
        assert torch.equal(res["opponents"][0], torch.topk(ref_tracin, 7, dim=1, largest=False).indices)


def _header_like(src: GradientStore, **changes) -> store_module.StoreHeader:
    fields = {k: src.manifest[k] for k in layout.HEADER_KEYS}
    fields.update(changes)
    return store_module.StoreHeader(**fields, factored=src.factored)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_factor_files(run, tmp_path, dtype):
    src = GradientStore(run["factored"])
    w = store_module.GradientStoreWriter(tmp_path / dtype, _header_like(src, grad_dtype=dtype))
    rows = src.checkpoints[0].block(0, N_TRAIN)
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(N_TRAIN), rows)
    ck.commit(src.checkpoints[0].state(), {"step": 1, "epoch": 0, "lr": 0.1})
    out = GradientStore(tmp_path / dtype)
    a, g = out.checkpoints[0].factors("encoder.0.weight")
    assert g.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    full = out.checkpoints[0].materialized()
    assert full.dtype == torch.float32
    assert _rel(full, src.checkpoints[0].materialized()) < (1e-2 if dtype == "bfloat16" else 2e-3)


def test_a_changed_position_count_is_refused_naming_the_factor_file(run, tmp_path):
    src = GradientStore(run["factored"])
    w = store_module.GradientStoreWriter(tmp_path / "s", _header_like(src))
    rows = src.checkpoints[0].block(0, 4)
    f = rows.factors["decoder.2.weight"]
    fewer = LayerFactors(f.inputs[:, :8], f.output_grads[:, :8], f.shape, f.groups)
    bias = LayerFactors(None, fewer.output_grads, (64,))
    bad = SplitRows(
        rows.dense, {**rows.factors, "decoder.2.weight": fewer, "decoder.2.bias": bias}, rows.names, rows.numels
    )
    ck = w.begin_checkpoint()
    with pytest.raises(StoreError, match=r"factors \(f.decoder.2.weight.npy\) of shape \(4, 16, 192\).*position count"):
        ck.write_rows(torch.arange(4), bad)
    ck.abort()


def test_factored_storage_without_a_smaller_layer_stores_densely(tmp_path):
    pl.seed_everything(0, verbose=False)
    x, _ = load_digits_tensors()
    data = TensorDataset(x[:64])
    vae = MLPVAE(**VAE_KWARGS)
    rec = TrajectoryRecorder(tmp_path / "s", params=["encoder.0.bias", "decoder.2.bias"], factored_storage=True)
    with pytest.warns(UserWarning, match="no tracked parameter has layer factors smaller than its gradient"):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(vae, torch.utils.data.DataLoader(data, batch_size=32))
    store = GradientStore(rec.store_path)
    assert store.factored == {} and store.manifest["schema_version"] == 1
    assert store.checkpoints[0].gradients().shape == (64, 128 + 64)
