"""Two-process CPU DDP (gloo): every rank records its own shard, and scoring is split over ranks.

Both are compared with one process computing the same quantities at the stored weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis
from lightning_influence.data import load_digits_tensors
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.models.vae import MLPVAE

REPO = Path(__file__).resolve().parents[2]


def _run_job(name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # The job must import this checkout's package, whatever is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(Path(__file__).with_name(name)), str(tmp_path / "store"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    proc = _run_job("ddp_recording_job.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x, y = load_digits_tensors()
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    return tmp_path, proc, vae, TensorDataset(x[:96], y[:96]), x[200:205]


@pytest.mark.slow
def test_ddp_recording_each_rank_computes_its_shard(ddp_run):
    tmp_path, proc, vae, data, _ = ddp_run
    assert "RANK0_DONE 6" in proc.stdout  # 96 samples / 2 ranks / batch 16 = 3 steps per epoch
    store = GradientStore(tmp_path / "store")
    assert len(store) == 2 and store.n_samples == 96
    # Each rank takes 3 steps per epoch; the learning-rate credit is per epoch.
    assert all(c.entry["optimizer_steps"] == 3 and c.eta == pytest.approx(1e-3) for c in store.checkpoints)
    assert torch.isfinite(store.checkpoints[-1].gradients()).all()
    # Every rank computed the rows of its own contiguous shard, and only those (rank 0 also probes 2 samples).
    for ckpt in store.checkpoints:
        assert [(s["rank"], s["start"], s["stop"]) for s in ckpt.entry["shards"]] == [(0, 0, 48), (1, 48, 96)]
        assert len(ckpt.entry["files"]["grads.npy"]["segments"]) == 2
    seen = [json.loads((tmp_path / f"ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(seen[0]) == set(range(48)) and len(seen[0]) == 2 + 2 * 48
    assert set(seen[1]) - {0, 1} == set(range(48, 96)) and len(seen[1]) == 2 + 2 * 48
    store.verify()
    # Row for row, the same as one process computes at the stored weights.
    analysis = InfluenceAnalysis(store, vae)
    for ckpt in store.checkpoints:
        single = analysis.gradients(data, ckpt, stream=NoiseStream.TRAIN, name="train_data")
        stored = ckpt.gradients()
        err = ((stored - single).abs().max() / single.abs().max()).item()
        assert err < 1e-5, f"checkpoint {ckpt.index}: max relative difference {err:.2e}"


@pytest.mark.slow
def test_ddp_scoring_matches_one_process(ddp_run):
    tmp_path, _, vae, _, tests = ddp_run
    results = [torch.load(tmp_path / f"scores_rank{r}.pt") for r in (0, 1)]
    analysis = InfluenceAnalysis(tmp_path / "store", vae, train_block=20)
    tracin = analysis.tracin(tests)
    self_inf = analysis.self_influence()
    proponents, opponents = analysis.ranked(tests, k=7)
    # The training blocks (20 rows each) were split over the ranks: disjoint, together all of them.
    blocks = [set(res["blocks"]) for res in results]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]
    assert sorted(blocks[0] | blocks[1]) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 96)]
    for res in results:  # every rank holds the whole result
        torch.testing.assert_close(res["tracin"], tracin, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["self_influence"], self_inf, rtol=1e-5, atol=1e-7)
        for got, ref in ((res["proponents"], proponents), (res["opponents"], opponents)):
            assert torch.equal(got[0], ref.indices)
            torch.testing.assert_close(got[1], ref.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ddp_a_failing_rank_stops_every_rank_and_lists_nothing(tmp_path):
    proc = _run_job("ddp_failure_job.py", tmp_path)
    files = {(c, r): tmp_path / f"{c}_rank{r}.txt" for c in ("nonfinite", "error") for r in (0, 1)}
    assert all(f.exists() for f in files.values()), (proc.returncode, proc.stderr[-3000:])
    errors = {k: f.read_text() for k, f in files.items()}
    # A non-finite row on rank 1: every rank learns the ids and raises the same error.
    for r in (0, 1):
        assert errors["nonfinite", r].startswith("FloatingPointError") and "ids [30]" in errors["nonfinite", r]
    # An exception on rank 1: it raises its own, rank 0 is told which rank failed and why.
    assert errors["error", 1] == "RuntimeError: engine failed on rank 1's samples"
    assert (
        errors["error", 0].startswith("StoreError")
        and "another rank failed to compute its gradient rows" in (errors["error", 0])
    )
    assert "rank 1: RuntimeError: engine failed" in errors["error", 0]
    for store in (tmp_path / "store", tmp_path / "store-engine"):
        assert len(GradientStore(store)) == 0
        assert sorted(p.name for p in store.iterdir()) == ["manifest.json"]
