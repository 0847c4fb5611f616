"""The loop engine: exact where vmap cannot batch (RNN/GRU, checkpointing), equal to vmap elsewhere; "auto" picks it
(recorder, post hoc, analysis) where the other engines cannot differentiate a model."""

from __future__ import annotations

import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.errors import EngineUnsupportedError
from lightning_influence.gradients import FactoredEngine, LoopEngine, VmapEngine, module_state, resolve_engine
from lightning_influence.gradients.engine import LayerFactors, dense_gradient
from lightning_influence.models import MLPVAE


def _square_loss(m, b):
    return m(b).pow(2).flatten(1).sum(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _run(engine, net, x, loss=_square_loss, loss_scale=1.0):
    params = {k: v.detach() for k, v in net.named_parameters()}
    kw = dict(state=module_state(net, upcast=False), sample_ids=torch.arange(7, 7 + x.shape[0]), noise_seed=3)
    return engine.gradients(net, loss, x, params, noise_stream=0, loss_scale=loss_scale, **kw)


def _autograd_per_sample(net, x, loss=_square_loss):
    """The reference: ``loss.backward()`` on each sample alone, on the module itself."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(net, x[i : i + 1]).sum().backward()
        for k, p in net.named_parameters():
            out.setdefault(k, []).append(p.grad.clone())
    net.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


class Recurrent(nn.Module):
    """A Linear, a recurrent layer vmap cannot batch, a Linear head."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(torch.tanh(self.inp(x)))[0])


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))


def test_loop_engine_equals_vmap_with_keyed_elbo_draws_and_a_loss_scale():
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3)
    x = torch.rand(6, 64)

    def loss(m, b):
        return m.per_sample_loss(b, n_draws=3)

    ref = _run(VmapEngine(), vae, x, loss, loss_scale=8.0)
    got = _run(LoopEngine(), vae, x, loss, loss_scale=8.0)
    assert set(got) == set(ref)
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-5, name


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU])
def test_recurrent_layers_vmap_cannot_batch_are_exact_with_the_loop_engine(cell):
    torch.manual_seed(0)
    net, x = Recurrent(cell), torch.randn(5, 6, 3)
    ref = _autograd_per_sample(net, x)
    with pytest.raises(RuntimeError, match=r"torch.func.vmap cannot compute .* Pass engine='loop'") as caught:
        _run(VmapEngine(), net, x)
    assert caught.value.__cause__ is not None  # vmap's own error stays attached
    for engine in (LoopEngine(), FactoredEngine(fallback=LoopEngine())):
        got = _run(engine, net, x)
        for name in ref:
            assert _rel(dense_gradient(got[name]), ref[name]) < 1e-5, (engine, name)
    mixed = _run(FactoredEngine(fallback=LoopEngine()), net, x)
    assert isinstance(mixed["inp.weight"], LayerFactors) and isinstance(mixed["head.weight"], LayerFactors)
    rules = FactoredEngine(fallback=LoopEngine()).describe(net, list(ref))["engine_rules"]
    assert rules["rnn.weight_hh_l0"] == "loop" and rules["head.weight"] == "linear"


def test_a_loss_that_fails_on_its_own_keeps_its_own_error_under_vmap():
    net = nn.Linear(3, 2)

    def broken(m, b):
        return m(b) @ torch.ones(5)  # a shape error of the user's own

    with pytest.raises(RuntimeError) as caught:
        _run(VmapEngine(), net, torch.randn(4, 3), broken)
    assert "engine='loop'" not in str(caught.value)
    assert "cannot be multiplied" in str(caught.value) or "size mismatch" in str(caught.value)


def test_activation_checkpointing_needs_the_loop_engine_and_says_so():
    torch.manual_seed(0)
    net, x = Checkpointed(), torch.randn(5, 4)
    ref = _autograd_per_sample(net, x)
    got = _run(LoopEngine(), net, x)
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-5, name
    with pytest.raises(RuntimeError, match=r"activation checkpointing .*engine='loop'"):
        _run(FactoredEngine(), net, x)
    with pytest.raises(
        RuntimeError, match=r"activation checkpointing\); vmap's error: .*saved tensor hooks.*[^.]\. Pass engine='loop'"
    ):
        _run(VmapEngine(), net, x)


def test_unreached_parameters_get_zero_rows_and_a_reduced_loss_is_refused():
    net = Recurrent(nn.GRU)
    x = torch.randn(3, 4, 3)

    def head_free(m, b):  # never calls the head
        return m.rnn(m.inp(b))[0].pow(2).sum((1, 2))

    got = _run(LoopEngine(), net, x, head_free)
    assert got["head.weight"].shape == (3, 2, 5) and not got["head.weight"].any()
    assert got["rnn.weight_hh_l0"].abs().sum() > 0
    with pytest.raises(ValueError, match=r"`loss_fn` must return one loss per sample.*shape \(\)"):
        _run(LoopEngine(), net, x, lambda m, b: m(b).pow(2).sum())


def test_loop_is_an_engine_name_and_a_typo_is_refused(tmp_path):
    assert isinstance(resolve_engine("loop", nn.Linear(2, 1), ["weight"]), LoopEngine)
    assert TrajectoryRecorder(tmp_path / "a", engine="loop").engine == "loop"
    with pytest.raises(MisconfigurationException, match=r"`engine` must be 'auto', 'factored', 'vmap', 'loop'"):
        TrajectoryRecorder(tmp_path / "b", engine="loops")


class GRUAutoencoder(pl.LightningModule):
    """A sequence autoencoder: digits rows as 8 steps of 8 pixels through a GRU."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.out = nn.Linear(6, 8)

    def per_sample_loss(self, batch):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).reshape(-1, 8, 8)
        return (self.out(self.rnn(torch.tanh(self.inp(x)))[0]) - x).pow(2).sum((1, 2))

    def training_step(self, batch, _):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_gru_model_records_with_the_loop_fallback_and_scores_like_the_loop_engine(tmp_path):
    from lightning_influence.data import load_digits_tensors

    x, _ = load_digits_tensors()
    data, q = TensorDataset(x[:48]), x[300:304]
    stores, models = {}, {}
    for label, engine in (("loop", "loop"), ("mixed", FactoredEngine(fallback=LoopEngine()))):
        pl.seed_everything(5, verbose=False)
        rec = TrajectoryRecorder(tmp_path / label, every_n_epochs=1, batch_size=16, engine=engine)
        models[label] = GRUAutoencoder()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_epochs=2, callbacks=[rec]).fit(models[label], DataLoader(data, batch_size=16))
        stores[label] = GradientStore(rec.store_path)
    rules = stores["mixed"].manifest["extra"]["engine_rules"]
    assert rules["rnn.weight_ih_l0"] == "loop" and rules["inp.weight"] == "linear" and rules["out.bias"] == "linear"
    assert set(stores["loop"].manifest["extra"]["engine_rules"].values()) == {"loop"}
    ref = InfluenceAnalysis(stores["loop"], models["loop"], engine="loop").tracin(q)
    got = InfluenceAnalysis(stores["mixed"], models["mixed"], engine=FactoredEngine(fallback=LoopEngine())).tracin(q)
    assert ref.abs().sum() > 0
    assert _rel(got, ref) < 1e-5
    # "auto" takes the loop engine wherever the recording needed it; vmap stops and says what to do.
    assert repr(InfluenceAnalysis(stores["mixed"], models["mixed"]).engine) == "FactoredEngine(fallback=LoopEngine())"
    assert repr(InfluenceAnalysis(stores["loop"], models["loop"]).engine) == "LoopEngine()"
    assert _rel(InfluenceAnalysis(stores["mixed"], models["mixed"]).tracin(q), ref) < 1e-5
    with pytest.raises(EngineUnsupportedError, match=r"FactoredEngine\(fallback=LoopEngine\(\)\)"):
        InfluenceAnalysis(stores["loop"], models["loop"], engine="vmap").tracin(q)


class CheckpointedAutoencoder(GRUAutoencoder):
    """Linear layers under activation checkpointing: neither vmap nor the capture hooks can follow it."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 8)
        self.dec = nn.Linear(8, 64)

    def per_sample_loss(self, batch):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        h = checkpoint(lambda t: torch.tanh(self.enc(t)), x, use_reentrant=False)
        return (self.dec(h) - x).pow(2).sum(1)


@pytest.mark.parametrize(
    ("model", "engine", "rules"),
    [
        (GRUAutoencoder, "FactoredEngine(fallback=LoopEngine())", {"rnn.weight_hh_l0": "loop", "inp.weight": "linear"}),
        (CheckpointedAutoencoder, "LoopEngine()", {"enc.weight": "loop", "dec.weight": "loop"}),
    ],
)
def test_auto_records_with_the_loop_engine_where_the_others_cannot_and_says_so(model, engine, rules, tmp_path):
    from lightning_influence.data import load_digits_tensors

    x, _ = load_digits_tensors()
    data, q = TensorDataset(x[:32]), x[300:303]
    pl.seed_everything(5, verbose=False)
    rec = TrajectoryRecorder(tmp_path / "auto", every_n_epochs=1, batch_size=16)
    net = model()
    with pytest.warns(UserWarning, match=rf"engine='auto': .* Recording with {re.escape(engine)} instead"):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(net, DataLoader(data, batch_size=16))
    store = GradientStore(rec.store_path)
    assert {k: store.manifest["extra"]["engine_rules"][k] for k in rules} == rules
    scores = InfluenceAnalysis(store, net).tracin(q)  # "auto" again: the store says where to loop
    ref = InfluenceAnalysis(store, net, engine="loop").tracin(q)
    assert scores.abs().sum() > 0 and _rel(scores, ref) < 1e-5
    # An engine named explicitly is not replaced: it stops before training, saying what to use.
    with pytest.raises(EngineUnsupportedError, match="engine='loop'"):
        quiet_trainer(max_epochs=1, callbacks=[TrajectoryRecorder(tmp_path / "v", engine="vmap")]).fit(
            model(), DataLoader(data, batch_size=16)
        )
    assert not (tmp_path / "v").exists() or not list((tmp_path / "v").glob("ckpt*"))


def test_post_hoc_auto_records_a_gru_model_like_the_recorder(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_influence.data import load_digits_tensors
    from lightning_influence.trajectory.posthoc import record_from_checkpoints

    x, _ = load_digits_tensors()
    data, q = TensorDataset(x[:32]), x[300:303]
    loader = DataLoader(data, batch_size=16)
    pl.seed_everything(5, verbose=False)
    net = GRUAutoencoder()
    rec = TrajectoryRecorder(tmp_path / "live", every_n_epochs=1, batch_size=16, engine="loop")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1)
    quiet_trainer(max_epochs=2, callbacks=[rec, ckpt], enable_checkpointing=True).fit(net, loader)
    with pytest.warns(UserWarning, match=r"engine='auto': torch.func.vmap cannot .* for GRUAutoencoder"):
        posthoc = record_from_checkpoints(
            sorted((tmp_path / "ckpts").glob("*.ckpt")), tmp_path / "posthoc", GRUAutoencoder(), loader, progress=False
        )
    assert posthoc.manifest["extra"]["engine_rules"]["rnn.weight_ih_l0"] == "loop"
    live = InfluenceAnalysis(rec.store_path, net).tracin(q)
    assert _rel(InfluenceAnalysis(posthoc, net).tracin(q), live) < 1e-5
