"""The benchmark scripts must not rot: their reference computations agree with the library, on tiny inputs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.models import ConvVAE

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_factored.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # as when run as a script: its folder's helpers import
    spec = importlib.util.spec_from_file_location("bench_factored", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_factored"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_factored", None)
    sys.path.remove(str(BENCH.parent))


@pytest.fixture(scope="module")
def conv_run(bench, tmp_path_factory):
    x = bench.synthetic_images(40, seed=3)
    train = TensorDataset(x[:32])
    vae = ConvVAE(image_size=28, channels=1, width=4, latent_dim=3, likelihood="gaussian", sigma=0.2, lr=2e-3)
    root = tmp_path_factory.mktemp("bench")
    rec = TrajectoryRecorder(root / "s", train_loss=bench.elbo_loss(2), every_n_epochs=1, batch_size=16)
    torch.manual_seed(0)
    bench.bench_trainer("cpu", 2, [rec]).fit(vae, DataLoader(train, batch_size=8, shuffle=True))
    return dict(vae=vae, train=x[:32], queries=x[32:], store=GradientStore(rec.store_path), loss=bench.elbo_loss(2))


def test_synthetic_images_are_deterministic_28x28_in_unit_range(bench):
    a, b = bench.synthetic_images(5, seed=1), bench.synthetic_images(5, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_the_bare_factor_trick_equals_the_librarys_exact_tracin(bench, conv_run):
    r = conv_run
    ours = InfluenceAnalysis(r["store"], r["vae"], train_loss=r["loss"]).tracin(r["queries"])
    bare = bench.bare_factor_tracin(r["vae"], r["loss"], r["train"], r["queries"], r["store"], batch=16)
    pearson, spearman, overlap = bench.agreement(bare, ours)
    assert pearson > 0.999999 and overlap == 1.0
    assert torch.allclose(bare, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))


def test_the_gpu_rows_run_on_any_device(bench, capsys):
    # The GPU benchmark's code path (precisions, Kronecker sweep, streaming top-10) at toy sizes on the CPU.
    args = argparse.Namespace(quick=True)
    bench.gpu_rows(args, torch.device("cpu"), sizes=(80, 8, 500))
    out = capsys.readouterr().out
    assert out.count("| sweep 80 x 4096 |") == 3 and "| top-10, 8 queries x 500 x 10000" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_only_without_cuda_stops_with_a_clear_message(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_factored.py", "--gpu-only"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and "--gpu-only needs a CUDA device" in capsys.readouterr().err


def test_record_batch_must_be_positive(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_factored.py", "--record-batch", "0"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and "--record-batch must be a positive integer, got 0" in capsys.readouterr().err


def test_the_timed_recorder_counts_the_wait_for_the_last_commit(bench, tmp_path, monkeypatch):
    """End to end must include the durable store: the last checkpoint is listed in the background, after fit's last
    recording, and the recorder waits for it at the end of fit."""
    import time

    from lightning_influence.models import MLPVAE
    from lightning_influence.trajectory.store import durable

    real = durable.fsync_dir

    def slow(path):
        if path.name.startswith(".tmp-ckpt-"):
            time.sleep(0.3)
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", slow)
    x = torch.rand(32, 64)
    rec = bench.TimedRecorder(tmp_path / "s", train_loss=bench.deterministic_loss, every_n_epochs=1, batch_size=16)
    vae = MLPVAE(input_dim=64, hidden_dim=8, latent_dim=2, likelihood="gaussian", sigma=0.2)
    bench.bench_trainer("cpu", 1, [rec]).fit(vae, DataLoader(TensorDataset(x), batch_size=8))
    assert len(GradientStore(rec.store_path)) == 1
    assert sum(rec.walls) >= 0.3
