"""The engine seam: a second engine plugs into the recorder, the analysis and influence functions unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis, InfluenceFunction, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.data.batches import slice_batch
from lightning_influence.gradients import (
    GradientFeaturizer,
    LayerFactors,
    PerSampleGradientEngine,
    ProjectionSpec,
    RandomProjection,
    VmapEngine,
    fixed_noise,
    module_state,
)
from lightning_influence.gradients.losses import ModuleCall, PerSampleLoss
from lightning_influence.models import MLPVAE


class LoopEngine:
    """Per-sample gradients the slow, obvious way: one ``autograd.grad`` per sample."""

    name = "loop"

    def __init__(self, factored: tuple[str, ...] = ()) -> None:
        self.factored = factored  # parameters returned as LayerFactors instead of dense tensors
        self.calls = 0

    def gradients(
        self,
        module: nn.Module,
        loss_fn: PerSampleLoss,
        batch: Any,
        params: Mapping[str, Tensor],
        *,
        state: Mapping[str, Tensor],
        sample_ids: Tensor,
        noise_seed: int,
        noise_stream: int,
        loss_scale: float = 1.0,
        argname: str = "loss_fn",
    ) -> dict[str, Tensor | LayerFactors]:
        self.calls += 1
        call = ModuleCall(module, loss_fn)
        per_sample: list[tuple[Tensor, ...]] = []
        for i in range(int(sample_ids.shape[0])):
            p = {n: v.detach().clone().requires_grad_(True) for n, v in params.items()}
            full = {**{"m." + k: v for k, v in state.items()}, **{"m." + k: v for k, v in p.items()}}
            with fixed_noise(sample_ids[i : i + 1], noise_seed, noise_stream):
                loss = functional_call(call, full, (slice_batch(batch, i, i + 1),), strict=False)
            per_sample.append(torch.autograd.grad(loss[0] * loss_scale, list(p.values())))
        out: dict[str, Tensor | LayerFactors] = {}
        for j, name in enumerate(params):
            dense = torch.stack([g[j] for g in per_sample])
            if name in self.factored and dense.dim() == 3:
                # G = sum_s g_s a_s^T with one position per input column: a_s = e_s, g_s = G[:, s].
                d_out, d_in = dense.shape[1:]
                eye = torch.eye(d_in, dtype=dense.dtype).expand(dense.shape[0], d_in, d_in)
                out[name] = LayerFactors(inputs=eye, output_grads=dense.transpose(1, 2), shape=(d_out, d_in))
            else:
                out[name] = dense
        return out


X, _ = load_digits_tensors()


def _vae() -> MLPVAE:
    return MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2, lr=5e-3)


def test_engines_implement_the_protocol():
    assert isinstance(VmapEngine(), PerSampleGradientEngine)
    assert isinstance(LoopEngine(), PerSampleGradientEngine)
    with pytest.raises(TypeError, match="`engine` must implement"):
        GradientFeaturizer(_vae(), lambda m, b: m.per_sample_loss(b), ["decoder.2.weight"], engine=object())


def test_layer_factors_expand_to_the_dense_gradient():
    a, g = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    ref = torch.stack([sum(torch.outer(g[b, s], a[b, s]) for s in range(3)) for b in range(4)])
    torch.testing.assert_close(LayerFactors(a, g, (2, 5)).dense(), ref)
    torch.testing.assert_close(LayerFactors(None, g, (2,)).dense(), g.sum(1))


@pytest.mark.parametrize("projected", [False, True])
def test_factored_and_dense_returns_give_the_same_rows(projected):
    vae = _vae()
    names = ["decoder.2.weight", "decoder.2.bias", "encoder.0.weight"]
    state = module_state(vae)
    proj = None
    if projected:
        numels = [state[n].numel() for n in names]
        proj = RandomProjection(ProjectionSpec(dim=64, seed=2), names, numels, checkpoint=3)
    x, ids = X[:5], torch.arange(10, 15)
    loss = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    scales = {"encoder.0.weight": 0.5}
    ref, _ = GradientFeaturizer(vae, loss, names).rows(x, ids, state, projection=proj, param_scales=scales)
    engine = LoopEngine(factored=("decoder.2.weight", "encoder.0.weight"))
    rows, bad = GradientFeaturizer(vae, loss, names, engine=engine).rows(
        x, ids, state, projection=proj, param_scales=scales
    )
    assert engine.calls == 1 and not bad.any()
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_engine_run(tmp_path_factory):
    """One fit recorded twice: by the default engine and by the loop engine."""
    pl.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("engines")
    data = TensorDataset(X[:48].clone())
    common = dict(every_n_epochs=1, batch_size=16, seed=3)
    by_vmap = TrajectoryRecorder(root / "vmap", engine="vmap", **common)
    by_loop = TrajectoryRecorder(root / "loop", engine=LoopEngine(factored=("decoder.2.weight",)), **common)
    vae = _vae()
    quiet_trainer(max_epochs=2, callbacks=[by_vmap, by_loop]).fit(vae, DataLoader(data, batch_size=16, shuffle=True))
    return vae, GradientStore(by_vmap.store_path), GradientStore(by_loop.store_path)


def test_recorder_with_a_second_engine_stores_the_same_rows(two_engine_run):
    _, vmap_store, loop_store = two_engine_run
    assert loop_store.manifest["extra"]["engine"] == "loop"
    assert vmap_store.manifest["extra"]["engine"] == "vmap"
    assert len(loop_store) == len(vmap_store) == 2
    for a, b in zip(vmap_store.checkpoints, loop_store.checkpoints):
        assert a.eta == b.eta
        torch.testing.assert_close(b.gradients(), a.gradients(), rtol=1e-5, atol=1e-6)


def test_analysis_with_a_second_engine_gives_the_same_scores(two_engine_run):
    vae, vmap_store, loop_store = two_engine_run
    queries = X[100:106]
    ref = InfluenceAnalysis(vmap_store, vae).tracin(queries)
    engine = LoopEngine()
    scores = InfluenceAnalysis(loop_store, vae, engine=engine).tracin(queries)
    assert engine.calls > 0
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-6)
    self_ref = InfluenceAnalysis(vmap_store, vae).self_influence(unbiased=True, train_data=X[:48])
    self_loop = InfluenceAnalysis(loop_store, vae, engine=engine).self_influence(unbiased=True, train_data=X[:48])
    torch.testing.assert_close(self_loop, self_ref, rtol=1e-4, atol=1e-6)


def test_influence_function_with_a_second_engine_gives_the_same_scores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2 + 1e-2 * sum(p.pow(2).sum() for p in m.parameters())  # noqa: E731
    common = dict(train_loss=loss, params=["2"], solver="exact", damping=1e-3)
    ref = InfluenceFunction(net, (x, y), **common).influence((x[:3], y[:3]))
    engine = LoopEngine(factored=("2.weight",))
    inf = InfluenceFunction(net, (x, y), engine=engine, **common)
    scores = inf.influence((x[:3], y[:3]))
    assert engine.calls > 0 and scores.dtype == torch.float64
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(inf.self_influence(), InfluenceFunction(net, (x, y), **common).self_influence())
