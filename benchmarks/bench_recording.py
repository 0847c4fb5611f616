"""Cost of recording and of scoring on the digits VAE, measured side by side in one run.

Prints, for MLPVAE on scikit-learn's digits (1,259 training samples):
- one recording sweep (per-sample gradients of every training sample, 16 ELBO draws) relative to
  one plain training epoch, for exact and projected gradients;
- exact vs projected TracIn for a batch of test queries over all checkpoints.

    python benchmarks/bench_recording.py [--repeats 3] [--device cpu|cuda]

Ratios are the figures to quote: the machine is shared and absolute times are noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from timing import EpochTimer, bench_trainer  # benchmarks/timing.py (the script's folder is on sys.path)
from torch.utils.data import Subset

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import MLPVAE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    with tempfile.TemporaryDirectory(prefix="li_bench_") as tmp:
        run(args, dm, Path(tmp))


def run(args: argparse.Namespace, dm: DigitsDataModule, root: Path) -> None:

    # Plain epochs, then the same training with recorders; the recorders' own timings give the
    # sweep cost. Timer callbacks come last so the sweep (at epoch end) is inside the epoch time.
    plain_timer = EpochTimer()
    bench_trainer(args.device, args.epochs, [plain_timer]).fit(MLPVAE(likelihood="gaussian", sigma=0.2, lr=2e-3), dm)
    plain_epoch = statistics.median(plain_timer.times[1:])

    exact = TrajectoryRecorder(root / "exact", every_n_epochs=1, batch_size=256)
    proj = TrajectoryRecorder(root / "proj", every_n_epochs=1, batch_size=256, projection_dim=1024)
    one_draw = TrajectoryRecorder(
        root / "one_draw", every_n_epochs=1, batch_size=256, train_loss=lambda m, b: m.per_sample_loss(b, n_draws=1)
    )
    vae = MLPVAE(likelihood="gaussian", sigma=0.2, lr=2e-3)
    bench_trainer(args.device, args.epochs, [exact, proj, one_draw]).fit(vae, dm)
    sweeps = {}
    for name, rec in (("exact", exact), ("projected k=1024", proj), ("exact, 1 draw", one_draw)):
        analysis = InfluenceAnalysis(rec.store_path, vae)
        sweeps[name] = statistics.median(c.entry["seconds"] for c in analysis.store.checkpoints[1:])

    queries = Subset(dm.test_set, range(args.queries))
    scoring = {}
    for name, rec in (("exact", exact), ("projected k=1024", proj)):
        analysis = InfluenceAnalysis(rec.store_path, vae)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            analysis.tracin(queries)
            times.append(time.perf_counter() - t)
        scoring[name] = statistics.median(times)

    n_params = sum(p.numel() for p in vae.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}"
    )
    print(f"model: MLPVAE 64-128-8, {n_params} parameters; {len(dm.train_set)} training samples")
    print("per-sample gradients average 16 ELBO draws (the VAE-TracIn default) unless marked '1 draw'")
    print(f"plain training epoch (median):             {plain_epoch * 1000:8.1f} ms")
    for name, s in sweeps.items():
        print(f"recording sweep, {name:<17}          {s * 1000:8.1f} ms  = {s / plain_epoch:5.2f} x a training epoch")
    for name, s in scoring.items():
        print(f"TracIn {args.queries} queries x {args.epochs} ckpts, {name:<17} {s * 1000:8.1f} ms")
    print(f"exact / projected scoring time:            {scoring['exact'] / scoring['projected k=1024']:5.2f}")
    sizes = {d: sum(f.stat().st_size for f in (root / d).rglob("*")) / 1e6 for d in ("exact", "proj")}
    print(f"store size for {args.epochs} checkpoints: exact {sizes['exact']:.1f} MB, projected {sizes['proj']:.1f} MB")


if __name__ == "__main__":
    main()
