"""The factored engine against the vmap engine, Captum's TracInCP and the bare factor trick: one run, one table.

For each workload (digits ``MLPVAE`` with a deterministic loss, and trained and recorded with 16 ELBO
draws; ``ConvVAE`` on synthetic 28x28 images at n = 1000 and 4000, recording with one draw, and at
n = 1000 recording 16 draws against 16 one-draw training epochs) it trains once with one
recorder per variant attached (recorders do not perturb training: RNG and modes are isolated)
and prints, side by side:

- the plain training epoch (fastest of the fit's epochs) and, per variant, one recording sweep
  (fastest checkpoint, the recorder's own timing: gradients, projection, durable write) as a
  multiple of it;
- TracIn for the queries over every checkpoint (fastest of ``--repeats`` fresh analyses: no
  cache reuse between repeats), and end to end = every recording's wall time (the sweep, the
  durable write, the rename and the manifest listing it) + that TracIn; for the two factored exact
  variants the recordings of a fit with that recorder alone (the others share the disk), fastest
  of ``--repeats`` such fits (a single stalled fsync of this VM's disk can add 200 ms to one fit;
  a conv fit with dense rows runs once);
- Captum ``TracInCP`` (default loop and ``sample_wise_grads_per_batch``) on the same checkpoints
  and learning-rate weights, when Captum is installed (optional ``bench`` extra);
- ``factored exact (factored storage)``: the factored engine with exact factored storage (Linear-like
  layers whose factors are smaller than their gradient are stored as ``a``/``g`` and scored from them);
- a bare factor-trick computation (hooks + Gram/product inner products, nothing stored);
- Pearson / Spearman (mean over queries) and top-10 overlap against our exact scores;
- the peak RSS rise of an exact top-10 request.

    python benchmarks/bench_factored.py [--quick] [--repeats 3]

Ratios measured side by side are the figures to quote: the machine is shared. GPU rows need CUDA.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from timing import EpochTimer, bench_trainer, sync  # benchmarks/timing.py (the script's folder is on sys.path)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lightning_influence import GradientStore, InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import DigitsDataModule
from lightning_influence.gradients import (
    FactoredEngine,
    GradientFeaturizer,
    NoiseStream,
    ProjectionSpec,
    RandomProjection,
    VmapEngine,
    cast_state,
    factored_inner_products,
    fixed_noise,
)
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.models import MLPVAE, ConvVAE
from lightning_influence.models.objectives import gaussian_kl
from lightning_influence.trajectory.tracin import streaming_top_k

try:  # optional: the `bench` extra; the table says "n/a" without it
    from captum.influence import TracInCP
except ImportError:  # pragma: no cover
    TracInCP = None


#: The variant recorded with exact factored storage (``TrajectoryRecorder(factored_storage=True)``).
FACTORED_STORAGE = "factored exact (factored storage)"

# ---------------------------------------------------------------------------------------------
# losses and data


def deterministic_loss(m: nn.Module, batch: Any) -> Tensor:
    """The ELBO at the posterior mean (no sampling): reconstruction of ``decode(mu)`` plus KL."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    mu, logvar = m.encode(x)
    out = m.decode(mu).reshape(x.shape[0], -1)
    rec = 0.5 * (out - x.reshape(x.shape[0], -1)).pow(2).sum(1) / m.sigma**2
    return rec + m.beta * gaussian_kl(mu, logvar)


def elbo_loss(draws: int) -> Callable[[nn.Module, Any], Tensor]:
    def loss(m: nn.Module, batch: Any) -> Tensor:
        return m.per_sample_loss(batch, n_draws=draws)

    loss.__qualname__ = f"elbo_{draws}_draws"
    return loss


def synthetic_images(n: int, seed: int) -> Tensor:
    """Smooth 28x28 images in [0, 1]: blurred mixtures of 10 prototypes plus noise (nothing downloads)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 7, 7, generator=g)
    protos = nn.functional.interpolate(protos, size=28, mode="bilinear", align_corners=False)
    label = torch.randint(0, 10, (n,), generator=g)
    x = protos[label] + 0.15 * torch.randn(n, 1, 28, 28, generator=g)
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# measurement helpers


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_rise(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the largest RSS above the starting RSS while it ran (MB), polled every 2 ms."""
    start = _rss()
    peak = [start]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return out, (peak[0] - start) / 1e6


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def agreement(scores: Tensor, exact: Tensor) -> tuple[float, float, float]:
    """Mean per-query Pearson and Spearman, and mean top-10 overlap, against ``exact``."""
    s, e = scores.double(), exact.double()
    pear = float(pearson_corrcoef(s.T, e.T).mean())
    spear = float(spearman_corrcoef(s.T.float(), e.T.float()).mean())
    k = min(10, e.shape[1])
    top_s, top_e = s.topk(k, dim=1).indices, e.topk(k, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_s, top_e)) / (k * e.shape[0])
    return pear, spear, overlap


# ---------------------------------------------------------------------------------------------
# the bare factor trick and Captum


def bare_factor_tracin(
    model: nn.Module, loss: Callable, train_x: Tensor, test_x: Tensor, store: GradientStore, batch: int = 256
) -> Tensor:
    """TracIn straight from hook-captured factors: no rows, no store, Gram or product form per layer."""
    engine = FactoredEngine()
    names = store.param_names
    out = torch.zeros(test_x.shape[0], train_x.shape[0])
    for ckpt in store.checkpoints:
        state = cast_state(ckpt.state(), store.precision, torch.device("cpu"))
        params = {n: state[n] for n in names}

        def grads(x: Tensor, ids: Tensor, stream: int) -> Any:
            return engine.gradients(
                model,
                loss,
                x,
                params,
                state=state,
                sample_ids=ids,
                noise_seed=store.noise_seed,
                noise_stream=stream,
            )

        test = grads(test_x, torch.arange(test_x.shape[0]), NoiseStream.TEST)
        for start in range(0, train_x.shape[0], batch):
            stop = min(start + batch, train_x.shape[0])
            train = grads(train_x[start:stop], torch.arange(start, stop), NoiseStream.TRAIN)
            block = sum(factored_inner_products(test[n], train[n]) for n in names)
            out[:, start:stop] += ckpt.eta * block
    return out


class _LossModel(nn.Module):
    """Captum's view: ``forward(x, key) -> per-sample loss`` with the recorder's keyed noise."""

    def __init__(self, vae: nn.Module, loss: Callable, seed: int) -> None:
        super().__init__()
        self.vae = vae
        self._loss = loss
        self._seed = seed

    def forward(self, x: Tensor, key: Tensor) -> Tensor:
        with fixed_noise(key[:, 0], self._seed, int(key[0, 1])):
            return self._loss(self.vae, x)


class _Identity(nn.Module):
    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        if self.reduction == "none":
            return out
        return out.sum() if self.reduction == "sum" else out.mean()


def captum_tracin(
    vae: nn.Module,
    loss: Callable,
    train_x: Tensor,
    test_x: Tensor,
    store: GradientStore,
    sample_wise: bool,
    batch: int = 256,
) -> Tensor:
    """Captum ``TracInCP`` scores ``[n_test, n_train]`` on the store's checkpoints and learning-rate weights."""
    model = _LossModel(vae, loss, store.noise_seed)
    lrs = {str(c.dir): c.eta for c in store.checkpoints}

    def load(m: nn.Module, path: str) -> float:
        m.vae.load_state_dict(load_file(str(Path(path) / "weights.safetensors")), strict=False)
        return lrs[path]

    n = train_x.shape[0]
    train_key = torch.stack([torch.arange(n), torch.full((n,), NoiseStream.TRAIN)], 1)
    train = TensorDataset(train_x, train_key, torch.zeros(n))
    tracin = TracInCP(
        model,
        DataLoader(train, batch_size=batch),
        checkpoints=list(lrs),
        checkpoints_load_func=load,
        loss_fn=_Identity("sum" if sample_wise else "none"),
        batch_size=batch,
        sample_wise_grads_per_batch=sample_wise,
    )
    q = test_x.shape[0]
    test_key = torch.stack([torch.arange(q), torch.full((q,), NoiseStream.TEST)], 1)
    return tracin.influence((test_x, test_key, torch.zeros(q)))


# ---------------------------------------------------------------------------------------------
# workloads


class TimedRecorder(TrajectoryRecorder):
    """A recorder that keeps the wall time training waited for it: each recording, and each wait for a commit.

    The manifest's ``seconds`` stop before the checkpoint is listed (it cannot hold the time of its
    own listing), and the commit runs in the background while training goes on; end to end counts
    every wait for it too (the next recording's, and the end of ``fit``'s for the last checkpoint).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.walls: list[float] = []
        self._timing = False

    def _timed(self, fn: Callable[[], None]) -> None:
        if self._timing:  # a wait inside a recording is already in its time
            return fn()
        self._timing = True
        t = time.perf_counter()
        try:
            fn()
        finally:
            self._timing = False
            self.walls.append(time.perf_counter() - t)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed(lambda: super(TimedRecorder, self)._record(trainer, pl_module))

    def wait_for_commit(self) -> None:
        self._timed(super().wait_for_commit)


class Workload:
    def __init__(
        self,
        name: str,
        make_model: Callable[[], pl.LightningModule],
        train: Dataset,
        test_x: Tensor,
        record_loss: Callable,
        epochs: int,
        captum_default: bool,
        draws: int = 1,
    ) -> None:
        self.name, self.make_model, self.train, self.test_x = name, make_model, train, test_x
        self.record_loss, self.epochs, self.captum_default = record_loss, epochs, captum_default
        self.draws = draws


def run_workload(w: Workload, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    device = "cpu"
    train_x = w.train.tensors[0]
    loader = DataLoader(w.train, batch_size=64, shuffle=True)
    # Plain fit: epoch times, and the fit time without recorders.
    pl.seed_everything(0, verbose=False)
    plain_timer = EpochTimer()
    bench_trainer(device, w.epochs, [plain_timer]).fit(w.make_model(), loader)
    epoch = min(plain_timer.times)

    projections = [None, 1024, 4096] if not args.quick else [None, 4096]
    variants: dict[str, TimedRecorder] = {}
    for engine in ("vmap", "factored"):
        for k in projections:
            kind = None if k is None else ("kronecker" if engine == "factored" else "sjlt")
            label = f"{engine} {'exact' if k is None else f'{kind} k={k}'}"
            if engine == "vmap" and w.name.startswith("conv-4000") and k is not None:
                continue  # the exact vmap sweep is the comparison; projected vmap adds minutes
            rec = TimedRecorder(
                root / w.name / label.replace(" ", "_").replace("=", ""),
                train_loss=w.record_loss,
                every_n_epochs=1,
                batch_size=args.record_batch,
                projection_dim=k,
                projection_kind=kind or "sjlt",
                engine=FactoredEngine() if engine == "factored" else VmapEngine(),
            )
            variants[label] = rec
            if engine == "factored" and k is None:
                # Exact factored storage: Linear-like layers whose factors are smaller than their
                # gradient are stored as (a, g) and scored from them; the rest stays dense.
                variants[FACTORED_STORAGE] = TimedRecorder(
                    root / w.name / "factored_exact_storage",
                    train_loss=w.record_loss,
                    every_n_epochs=1,
                    batch_size=args.record_batch,
                    engine=FactoredEngine(),
                    factored_storage=True,
                )
    pl.seed_everything(0, verbose=False)
    vae = w.make_model()
    bench_trainer(device, w.epochs, list(variants.values())).fit(vae, loader)

    # Fits with only the factored exact recorder (dense rows, then factored storage), against the
    # plain fit: fastest epoch with the recording sweep inside it (the timer runs last) over the
    # fastest plain epoch; and the recordings' total wall time, fastest of the repeated fits.
    def solo_fit(factored_storage: bool, rep: int) -> tuple[float, float]:
        pl.seed_everything(0, verbose=False)
        rec = TimedRecorder(
            root / w.name / f"solo_{factored_storage}_{rep}",
            train_loss=w.record_loss,
            every_n_epochs=1,
            batch_size=args.record_batch,
            engine=FactoredEngine(),
            factored_storage=factored_storage,
        )
        timer = EpochTimer()
        bench_trainer(device, w.epochs, [rec, timer]).fit(w.make_model(), loader)
        shutil.rmtree(rec.store_path, ignore_errors=True)
        return min(timer.times), sum(rec.walls)

    solo: dict[bool, tuple[float, float]] = {}
    for factored_storage in (False, True):
        # Fastest of --repeats fits, as every other figure; a conv fit with dense rows writes up to
        # 900 MB per checkpoint and runs once.
        repeats = args.repeats if factored_storage or w.name.startswith("mlp") else 1
        runs = [solo_fit(factored_storage, rep) for rep in range(repeats)]
        solo[factored_storage] = (min(r[0] for r in runs) / epoch, min(r[1] for r in runs))
    fit_ratio, fit_ratio_fs = solo[False][0], solo[True][0]

    queries = w.test_x
    rows: list[dict[str, Any]] = []
    exact_scores: Tensor | None = None
    for label, rec in variants.items():
        store = GradientStore(rec.store_path)
        sweeps = [c.entry["seconds"] for c in store.checkpoints]
        engine = "factored" if label.startswith("factored") else "vmap"

        def score(store: GradientStore = store, engine: str = engine) -> Tensor:
            return InfluenceAnalysis(store, vae, train_loss=w.record_loss, engine=engine).tracin(queries)

        scores, t_score = timed(score, args.repeats)
        if label == "vmap exact":
            exact_scores = scores
        row = dict(
            workload=w.name,
            variant=label,
            sweep=min(sweeps),
            x_epoch=min(sweeps) / epoch,
            tracin=t_score,
            # The recorders of the solo fits ran alone, as a user runs one: their recordings did not
            # share the disk with the other variants' (up to 100s of MB per checkpoint).
            e2e={"factored exact": solo[False][1], FACTORED_STORAGE: solo[True][1]}.get(label, sum(rec.walls))
            + t_score,
            scores=scores,
        )
        if label == "factored exact":
            row["fit_ratio"] = fit_ratio
        if label == FACTORED_STORAGE:
            row["fit_ratio"] = fit_ratio_fs
            stored = sum(p.stat().st_size for p in store.checkpoints[0].dir.glob("*.npy"))
            dense_mb = 4 * store.dim * store.n_samples / 1e6
            row["note"] = (
                f"{len(store.factored)}/{len(store.param_names)} params as factors (biases with their layer's g);"
                f" {stored / 1e6:.1f} MB per"
                f" checkpoint (dense rows {dense_mb:.1f} MB)"
            )
        if w.draws > 1 and label.startswith("factored"):
            note = f"sweep / ({w.draws} x epoch) = {min(sweeps) / (w.draws * epoch):.2f}"
            row["note"] = f"{row['note']}; {note}" if "note" in row else note
        rows.append(row)
    assert exact_scores is not None
    exact_store = GradientStore(variants["vmap exact"].store_path)

    # Exact top-10: RSS rise (streaming, one checkpoint block at a time).
    _, rss = peak_rss_rise(lambda: InfluenceAnalysis(exact_store, vae, train_loss=w.record_loss).top_k(queries, k=10))
    rows[0]["rss_top10"] = rss

    bare, t_bare = timed(
        lambda: bare_factor_tracin(vae, w.record_loss, train_x, queries, exact_store, args.record_batch), args.repeats
    )
    rows.append(dict(workload=w.name, variant="bare factor trick", tracin=t_bare, e2e=t_bare, scores=bare))

    if TracInCP is not None:
        modes = [("captum sample-wise", True)] + ([("captum default", False)] if w.captum_default else [])
        for label, sample_wise in modes:
            try:
                reps = args.repeats if sample_wise else 1
                sc, t_c = timed(
                    lambda sw=sample_wise: captum_tracin(
                        vae, w.record_loss, train_x, queries, exact_store, sw, args.record_batch
                    ),
                    reps,
                )
                rows.append(dict(workload=w.name, variant=label, tracin=t_c, e2e=t_c, scores=sc.detach()))
            except Exception as err:  # noqa: BLE001 - report Captum's failure in the table, keep going
                rows.append(dict(workload=w.name, variant=label, note=f"fails: {type(err).__name__}: {str(err)[:60]}"))
    for row in rows:
        if "scores" in row:
            row["pearson"], row["spearman"], row["top10"] = agreement(row.pop("scores"), exact_scores)
        row["epoch"] = epoch
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="MLP rows and the conv VAE at n=1000, 2 epochs (~2 min)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--record-batch",
        type=int,
        default=256,
        help="samples per gradient batch of the recordings, the bare computation and Captum (default 256, as the"
        " callbacks/ presets; the recorder's own default is 64)",
    )
    p.add_argument("--only", default=None, help="comma-separated workload names to run (default: all)")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU rows (needs CUDA; see gpu_check.sh)")
    args = p.parse_args()
    if args.record_batch < 1:
        p.error(f"--record-batch must be a positive integer, got {args.record_batch}.")
    if args.gpu_only and not torch.cuda.is_available():
        p.error("--gpu-only needs a CUDA device; none is available.")
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="li_bench_factored_"))
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    digits_train = TensorDataset(dm.train_set.tensors[0])
    digits_test = dm.val_set.tensors[0][: args.queries]
    mlp = dict(input_dim=64, hidden_dim=128, latent_dim=8, likelihood="gaussian", sigma=0.2, lr=2e-3)
    epochs = 2 if args.quick else 6
    workloads = [
        Workload("mlp-det", lambda: MLPVAE(**mlp), digits_train, digits_test, deterministic_loss, epochs, True),
        # Trained with the 16 draws it records with: the issue's "same number of ELBO draws as training".
        Workload(
            "mlp-16draws",
            lambda: MLPVAE(**mlp, train_draws=16),
            digits_train,
            digits_test,
            elbo_loss(16),
            epochs,
            True,
        ),
    ]
    conv = dict(image_size=28, channels=1, width=16, latent_dim=8, likelihood="gaussian", sigma=0.2, lr=2e-3)
    sizes = [1000] if args.quick else [1000, 4000]
    for n in sizes:
        x = synthetic_images(n + args.queries, seed=n)
        workloads.append(
            Workload(
                f"conv-{n}",
                lambda: ConvVAE(**conv),
                TensorDataset(x[:n]),
                x[n:],
                elbo_loss(1),
                2 if args.quick else 3,
                captum_default=not args.quick and n == 1000,
            )
        )
    if not args.quick:
        x = synthetic_images(1000 + args.queries, seed=16)
        workloads.append(
            Workload(
                "conv-1000-16draws",
                lambda: ConvVAE(**conv),
                TensorDataset(x[:1000]),
                x[1000:],
                elbo_loss(16),
                2,
                False,
                draws=16,
            )
        )
    if args.gpu_only:
        workloads = []
    if args.only:
        keep = set(args.only.split(","))
        workloads = [w for w in workloads if w.name in keep]
    rows = []
    try:
        for w in workloads:
            t = time.perf_counter()
            rows.extend(run_workload(w, args, root))
            shutil.rmtree(root / w.name, ignore_errors=True)  # scored: its stores take GBs of disk
            print(f"[{w.name} done in {time.perf_counter() - t:.0f} s]", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.gpu_only:
        print_table(rows, args)
    if torch.cuda.is_available():
        gpu_rows(args, torch.device("cuda"))
    else:
        print("GPU rows: skipped (no CUDA device).")


def gpu_rows(args: argparse.Namespace, dev: torch.device, sizes: tuple[int, int, int] | None = None) -> None:
    """Recording sweeps of a 28x28 ConvVAE over 60,000 synthetic images under fp32 / 16-mixed / bf16-mixed
    (factored engine, Kronecker k=4096, rows kept on the device), their agreement with fp32, and a
    projected top-10 of queries against 1,000,000 x 10,000 synthetic training rows (one checkpoint
    block on the device at a time, fp32 accumulation)."""
    n, q, n_train = sizes or ((6_000, 256, 100_000) if args.quick else (60_000, 10_000, 1_000_000))
    dim = 10_000
    x = synthetic_images(n, seed=60).to(dev)
    vae = ConvVAE(image_size=28, channels=1, width=16, latent_dim=8, likelihood="gaussian", sigma=0.2).to(dev)
    names = [name for name, _ in vae.named_parameters()]
    shapes = [tuple(p.shape) for p in vae.parameters()]
    proj = RandomProjection(
        ProjectionSpec(4096, kind="kronecker"), names, [math.prod(s) for s in shapes], param_shapes=shapes
    )
    print("| GPU row | precision | seconds | × fp32 | Spearman vs fp32 (min over 64 queries) | top-10 overlap |")
    print("|---|---|---|---|---|---|")
    ref: Tensor | None = None
    base = 0.0
    for label, prec in (
        ("fp32", GradientPrecision()),
        ("16-mixed", GradientPrecision(mode="mixed", dtype="float16")),
        ("bf16-mixed", GradientPrecision(mode="mixed", dtype="bfloat16")),
    ):
        feat = GradientFeaturizer(vae, elbo_loss(1), names, engine=FactoredEngine(), precision=prec)
        state = cast_state(dict(vae.state_dict()), prec, dev)
        out = torch.empty(n, 4096, device=dev)
        sync(dev)
        t = time.perf_counter()
        for start in range(0, n, 1024):
            stop = min(start + 1024, n)
            out[start:stop], _ = feat.rows(x[start:stop], torch.arange(start, stop), state, projection=proj)
        sync(dev)
        secs = time.perf_counter() - t
        if ref is None:
            ref, base = out, secs
            print(f"| sweep {n} x 4096 | {label} | {secs:.2f} | 1.00 | | |")
            continue
        s_ref, s_half = (ref[:64] @ ref[64:].T).cpu(), (out[:64] @ out[64:].T).cpu()
        rho = min(float(spearman_corrcoef(a, b)) for a, b in zip(s_half, s_ref))
        top = sum(
            len(set(a.tolist()) & set(b.tolist()))
            for a, b in zip(s_half.topk(10, dim=1).indices, s_ref.topk(10, dim=1).indices)
        )
        print(f"| sweep {n} x 4096 | {label} | {secs:.2f} | {secs / base:.2f} | {rho:.4f} | {top / 640:.2f} |")
    tests = [torch.randn(q, dim, device=dev)]
    gen = torch.Generator(device=dev)

    def block(c: int, start: int, stop: int) -> Tensor:
        gen.manual_seed(start)
        return torch.randn(stop - start, dim, device=dev, generator=gen, dtype=torch.float16)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    t = time.perf_counter()
    streaming_top_k(tests, block, [1.0], n_train, 10, block=16_384)
    sync(dev)
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")
    print(f"| top-10, {q} queries x {n_train} x {dim} (fp16 rows) | fp32 accumulation | {time.perf_counter() - t:.1f} |"
          f" | peak GPU memory {peak:.2f} GB | |")  # fmt: skip


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" {torch.get_num_threads()} thread(s); {args.queries} queries; gradient batches of {args.record_batch};"
        f" min of {args.repeats} repeats"
        f" (sweeps: fastest checkpoint); Captum {'installed' if TracInCP is not None else 'not installed'}"
    )
    head = (
        "| workload | variant | epoch s | sweep s | sweep × epoch | epoch+rec / epoch | TracIn s | end-to-end s |"
        " top-10 RSS rise MB | Pearson | Spearman | top-10 overlap | note |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['workload']} | {r['variant']} | {_fmt(r.get('epoch'), '.3f')} | {_fmt(r.get('sweep'), '.3f')} |"
            f" {_fmt(r.get('x_epoch'), '.2f')} | {_fmt(r.get('fit_ratio'), '.2f')} | {_fmt(r.get('tracin'), '.3f')} |"
            f" {_fmt(r.get('e2e'), '.3f')} | {_fmt(r.get('rss_top10'), '.0f')} | {_fmt(r.get('pearson'), '.6f')} |"
            f" {_fmt(r.get('spearman'), '.4f')} | {_fmt(r.get('top10'), '.2f')} | {r.get('note', '')} |"
        )


if __name__ == "__main__":
    main()
