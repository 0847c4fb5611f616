"""Cross-loss influence on a mixture of Gaussians (the CLIF experiment, Silva et al. 2022, §5.1).

Question: *which training points pushed this test point into its cluster?* The clustering model is
trained on an unsupervised objective (DEC: KL to a fixed sharpened target); the question is asked
with a different objective, the test point's cluster-assignment NLL. Cross-loss influence answers
it with the training loss in the Hessian and the training gradients and the NLL in the test
gradient. The matched baseline trains the same network on the NLL itself.

Both are checked against leave-one-out retraining: for every training point i, the model is
retrained without i (warm-started from the optimum and run to stationarity with Levenberg-Marquardt
Newton steps in float64) and the change of every test point's NLL is measured. As in the paper, the
agreement is the Pearson correlation per test point across the training points.

Protocol notes (differences from the paper's script, on purpose):
- Each model is compared with *its own* leave-one-out ground truth (the DEC model retrained on DEC,
  the NLL model on NLL). The paper retrains with NLL for both, which is not what the cross-loss
  influence of a DEC model predicts.
- Both models are trained to a stationary point (Adam, then Newton polishing) and carry a small
  weight decay in every sample's loss; the paper's two Adam steps are no minimum (methods.md §3).
- The DEC target p is computed once from the initial model and held fixed, so the per-sample loss
  is well defined.

Run::

    python examples/cross_loss_clusters.py --logdir runs/cross_loss_clusters
    tensorboard --logdir runs/cross_loss_clusters
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lightning_influence.influence.influence_function import InfluenceFunction
from lightning_influence.reporting.tensorboard import get_summary_writer
from lightning_influence.representations.clustering import DECClustering, cluster_nll

MEANS = torch.tensor([[0.0, 0.0], [5.0, 5.0], [5.0, -5.0]], dtype=torch.float64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--n-per-cluster", type=int, default=50, help="training points per Gaussian")
    ap.add_argument("--sigma", type=float, default=1.25, help="standard deviation per axis")
    ap.add_argument("--n-test", type=int, default=60, help="test points (drawn from the mixture, balanced)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
    ap.add_argument("--adam-epochs", type=int, default=1000, help="full-batch Adam epochs before Newton polishing")
    ap.add_argument(
        "--activation",
        default="softplus",
        choices=["softplus", "tanh", "relu", "gelu"],
        help="hidden nonlinearity (CLIF uses ReLU; a smooth one makes the optimum a proper stationary point)",
    )
    ap.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty in every sample's loss")
    ap.add_argument("--solver", default="exact", choices=["exact", "cg", "lissa", "arnoldi"])
    ap.add_argument("--damping", type=float, default=1e-4, help="Tikhonov damping of the influence function")
    ap.add_argument("--n-loo", type=int, default=None, help="retrain without only the first N training points")
    ap.add_argument("--logdir", default="runs/cross_loss_clusters", help="TensorBoard log directory")
    ap.add_argument("--show-points", type=int, default=3, help="test points whose proponents are drawn")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def mixture(n_per: int, sigma: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    comp = torch.arange(len(MEANS)).repeat_interleave(n_per)
    x = MEANS[comp] + sigma * torch.randn(len(comp), 2, generator=gen, dtype=torch.float64)
    return x, comp


def align_clusters(model: DECClustering) -> Tensor:
    """``perm[g]`` = the cluster of Gaussian ``g``: the assignment of the means that is most probable overall."""
    with torch.no_grad():
        logq = model.log_assignment(MEANS)
    k = logq.shape[1]
    best = max(
        itertools.permutations(range(k), len(MEANS)), key=lambda p: sum(float(logq[g, c]) for g, c in enumerate(p))
    )
    return torch.tensor(best)


# ----------------------------------------------------------------------------------------------
# training to a stationary point
# ----------------------------------------------------------------------------------------------
def train_adam(
    model: DECClustering, batch: tuple[Tensor, Tensor], epochs: int, logger: TensorBoardLogger, name: str
) -> None:
    if epochs <= 0:
        return
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]), shuffle=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(logger.root_dir, name=logger.name, version=f"{logger.version}/{name}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*small number of batches.*")
        trainer.fit(model, loader)


def newton_polish(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
    batch: tuple[Tensor, Tensor],
    start: dict[str, Tensor] | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    curvature: tuple[Tensor, Tensor] | None = None,
    rcond: float = 1e-7,
) -> tuple[dict[str, Tensor], float]:
    """Minimise the mean per-sample loss over ``batch`` to ``||grad|| < tol`` (float64).

    Saddle-free Newton steps ``d = V diag(1 / |w|) V^T g`` (``H = V diag(w) V^T``) with a
    backtracking line search: a descent direction even where the network's loss is not convex, and
    Newton's quadratic convergence at a minimum. The symmetries of the network (rotating the
    embedding together with the centres) make ``H`` singular; the gradient has no component along
    them, so eigenvalues below ``rcond * max|w|`` are left out (a pseudo-inverse).

    With ``curvature = (w, V)`` of a nearby problem (the full-data optimum, for leave-one-out
    retraining) the Hessian is not recomputed: the iterations are chord-Newton steps, which
    converge linearly at the rate ``||I - H_full^{-1} H_loo|| = O(1/n)``; convergence is still judged
    on the true gradient, and the full Hessian is used if the chord steps stall.

    Returns:
        The parameters and the final gradient norm.
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta0 = start if start is not None else {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([theta0[n].reshape(-1) for n in names]).clone()

    def f(v: Tensor) -> Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))))
        return _mean_loss(model, loss_fn, parts, batch)

    value = f(flat)
    gnorm = math.inf
    w_v = curvature
    previous = math.inf
    for _ in range(max_iter):
        g = grad(f)(flat)
        gnorm = float(g.norm())
        if gnorm < tol:
            break
        if curvature is not None and gnorm > 0.25 * previous:  # chord steps too slow: use the true Hessian
            curvature = w_v = None
        previous = gnorm
        if w_v is None:
            H = hessian(f)(flat)
            w_v = torch.linalg.eigh(0.5 * (H + H.T))
        w, V = w_v
        # Pseudo-inverse of |H|: directions with |w| below rcond are the network's symmetries.
        keep = w.abs() > rcond * float(w.abs().max())
        Vk = V[:, keep]
        d = Vk @ ((Vk.T @ g) / w[keep].abs())
        slope = float(g @ d)
        t, cand, cval = 1.0, flat, value
        while t >= 1e-8:
            cand = flat - t * d
            cval = f(cand)
            if cval <= value - 1e-4 * t * slope:
                break
            t *= 0.5
        if t < 1e-8:  # no decrease along d
            if w_v is curvature and curvature is not None:
                w_v = None  # chord steps stalled: take true Newton steps from here on
                curvature = None
                continue
            break
        flat, value = cand, cval
        if curvature is None:
            w_v = None
    out = dict(zip(names, (t.reshape(s).clone() for t, s in zip(torch.split(flat, sizes), shapes))))
    return out, gnorm


def hessian_eigh(
    model: nn.Module, loss_fn: Callable, batch: tuple[Tensor, Tensor], params: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the Hessian of the mean loss at ``params`` (for chord-Newton LOO retraining)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def f(v: Tensor) -> Tensor:
        return _mean_loss(
            model, loss_fn, dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)))), batch
        )

    H = hessian(f)(flat)
    return torch.linalg.eigh(0.5 * (H + H.T))


class _Loss(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.m, self.fn = model, fn

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.fn(self.m, batch)


def _mean_loss(model: nn.Module, fn: Callable, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    wrapper = _Loss(model, fn)
    return functional_call(wrapper, {"m." + k: v for k, v in params.items()}, (batch,)).mean()


def load(model: nn.Module, params: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


# ----------------------------------------------------------------------------------------------
# leave-one-out ground truth
# ----------------------------------------------------------------------------------------------
def loo_effects(
    model: DECClustering,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    optimum: dict[str, Tensor],
    n_loo: int,
) -> tuple[Tensor, float]:
    """``actual[j, i] = NLL_j(theta_{-i}) - NLL_j(theta)`` for the first ``n_loo`` training points."""
    n = len(train[0])
    loss = lambda m, b: m.per_sample_loss(b)
    base = _test_nll(model, optimum, test)
    curvature = hessian_eigh(model, loss, train, optimum)
    actual = torch.empty(len(test[0]), n_loo, dtype=torch.float64)
    worst = 0.0
    for i in range(n_loo):
        keep = torch.arange(n) != i
        params, gnorm = newton_polish(model, loss, (train[0][keep], train[1][keep]), start=optimum, curvature=curvature)
        worst = max(worst, gnorm)
        actual[:, i] = _test_nll(model, params, test) - base
    return actual, worst


def _test_nll(model: nn.Module, params: dict[str, Tensor], test: tuple[Tensor, Tensor]) -> Tensor:
    with torch.no_grad():
        return functional_call(_Loss(model, cluster_nll), {"m." + k: v for k, v in params.items()}, (test,))


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def per_point_pearson(predicted: Tensor, actual: Tensor) -> Tensor:
    """Pearson r across training points, one per test point: ``[n_test]``."""
    return pearson_corrcoef(predicted.T.contiguous(), actual.T.contiguous())


def summarise(r: Tensor) -> dict[str, float]:
    return {
        "mean": float(r.mean()),
        "std": float(r.std()),
        "frac_ge_0.6": float((r >= 0.6).double().mean()),
        "frac_ge_0.8": float((r >= 0.8).double().mean()),
    }


def scatter_figure(results: dict[str, tuple[Tensor, Tensor, Tensor]]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5))
    for ax, (name, (pred, act, r)) in zip(axes, results.items()):
        ax.scatter(act.flatten().numpy(), pred.flatten().numpy(), s=3, alpha=0.35)
        lo = float(min(act.min(), pred.min()))
        hi = float(max(act.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("actual change of test NLL (leave-one-out)")
        ax.set_ylabel("predicted (influence)")
        ax.set_title(f"{name}\nper-test-point Pearson {float(r.mean()):.3f} ± {float(r.std()):.3f}", fontsize=10)
    fig.tight_layout()
    return fig


def proponents_figure(
    x_train: Tensor, comp: Tensor, x_test: Tensor, scores: dict[str, Tensor], points: list[int], k: int = 8
) -> plt.Figure:
    fig, axes = plt.subplots(len(points), len(scores), figsize=(5 * len(scores), 4.2 * len(points)), squeeze=False)
    for row, j in enumerate(points):
        for col, (name, s) in enumerate(scores.items()):
            ax = axes[row, col]
            ax.scatter(x_train[:, 0], x_train[:, 1], c=comp.numpy(), cmap="tab10", vmin=0, vmax=9, s=10, alpha=0.35)
            pro = s[j].topk(k).indices
            opp = (-s[j]).topk(k).indices
            ax.scatter(
                x_train[pro, 0],
                x_train[pro, 1],
                facecolors="none",
                edgecolors="green",
                s=90,
                lw=1.8,
                label="proponents",
            )
            ax.scatter(x_train[opp, 0], x_train[opp, 1], c="red", marker="x", s=60, lw=1.8, label="opponents")
            ax.scatter(x_test[j, 0], x_test[j, 1], c="black", marker="*", s=250, label="test point")
            ax.set_title(f"{name}\ntest point {j}", fontsize=10)
            ax.set_aspect("equal")
            if row == 0 and col == 0:
                ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def histogram_figure(rs: dict[str, Tensor]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(-1, 1, 41).numpy()
    for name, r in rs.items():
        ax.hist(r.numpy(), bins=bins, alpha=0.5, label=name)
    ax.axvline(0.6, c="k", ls=":", lw=0.8)
    ax.axvline(0.8, c="k", ls="--", lw=0.8)
    ax.set_xlabel("Pearson r per test point (influence vs leave-one-out)")
    ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(args.seed)
    x_train, comp_train = mixture(args.n_per_cluster, args.sigma, gen)
    per = max(1, math.ceil(args.n_test / len(MEANS)))
    x_test, comp_test = mixture(per, args.sigma, gen)
    x_test, comp_test = x_test[: args.n_test], comp_test[: args.n_test]
    n = len(x_train)
    n_loo = n if args.n_loo is None else min(args.n_loo, n)

    torch.manual_seed(args.seed)
    init = DECClustering(weight_decay=args.weight_decay, objective="dec", activation=args.activation).double()
    init.init_centres(x_train, seed=args.seed)
    perm = align_clusters(init)
    y_train, y_test = perm[comp_train], perm[comp_test]
    p_train = init.targets(x_train)  # DEC target, fixed once

    logger = TensorBoardLogger(args.logdir, name="cross_loss_clusters")
    writer = get_summary_writer(logger)

    models = {
        "cross-loss (DEC train, NLL measure)": (
            DECClustering(weight_decay=args.weight_decay, objective="dec", activation=args.activation),
            (x_train, p_train),
        ),
        "matched (NLL train, NLL measure)": (
            DECClustering(weight_decay=args.weight_decay, objective="nll", activation=args.activation),
            (x_train, y_train),
        ),
    }
    results: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    scores: dict[str, Tensor] = {}
    summary: dict[str, dict[str, float]] = {}
    for idx, (name, (model, train)) in enumerate(models.items()):
        model = model.double()
        model.load_state_dict(init.state_dict())
        t0 = time.perf_counter()
        train_adam(model, train, args.adam_epochs, logger, name="cross" if idx == 0 else "matched")
        optimum, gnorm = newton_polish(model, lambda m, b: m.per_sample_loss(b), train)
        load(model, optimum)
        acc = float((model.predict_clusters(x_test) == y_test).double().mean())
        t_train = time.perf_counter() - t0

        t0 = time.perf_counter()
        inf = InfluenceFunction(model, train, solver=args.solver, damping=args.damping)
        predicted = inf.influence((x_test, y_test), measurement=cluster_nll)
        t_inf = time.perf_counter() - t0
        diag = inf.diagnostics

        t0 = time.perf_counter()
        actual, worst = loo_effects(model, train, (x_test, y_test), optimum, n_loo)
        t_loo = time.perf_counter() - t0
        pred = predicted[:, :n_loo]
        r = per_point_pearson(pred, actual)
        stats = summarise(r)
        stats["spearman_all"] = float(spearman_corrcoef(pred.flatten(), actual.flatten()))
        stats["pearson_all"] = float(pearson_corrcoef(pred.flatten(), actual.flatten()))
        stats["test_accuracy"] = acc
        results[name] = (pred, actual, r)
        scores[name] = predicted
        summary[name] = stats

        tag = "cross_loss" if idx == 0 else "matched"
        for key, value in {**stats, **diag.as_dict()}.items():
            writer.add_scalar(f"{tag}/{key}", value, 0)
        writer.add_text(f"{tag}/diagnostics", diag.summary().replace("\n", "  \n"), 0)
        for g in range(len(MEANS)):
            mask = comp_test == g
            if mask.any():
                writer.add_scalar(f"{tag}/pearson_mean_gaussian_{g}", float(r[mask].mean()), 0)
        print(f"\n== {name}")
        print(
            f"trained in {t_train:.1f}s (final gradient norm {gnorm:.1e}, test cluster accuracy {acc:.3f});"
            f" influence {t_inf:.2f}s; {n_loo} leave-one-out retrains {t_loo:.1f}s (worst gradient norm {worst:.1e})"
        )
        print(diag.summary())
        if max(gnorm, worst) > 1e-6:
            print(
                f"WARNING: training or leave-one-out retraining stopped short of a stationary point (gradient norm"
                f" {max(gnorm, worst):.1e}): the ground truth and the influence function's assumptions do not hold;"
                " with --activation relu the optimum can sit on a kink. The correlations below are not meaningful."
            )
        print(
            f"per-test-point Pearson: mean {stats['mean']:.3f} std {stats['std']:.3f}"
            f"  >=0.6: {100 * stats['frac_ge_0.6']:.0f}%  >=0.8: {100 * stats['frac_ge_0.8']:.0f}%"
            f"  (all pairs: Pearson {stats['pearson_all']:.3f}, Spearman {stats['spearman_all']:.3f})"
        )
        for g in range(len(MEANS)):
            mask = comp_test == g
            print(
                f"  Gaussian {g} at {MEANS[g].tolist()}: mean r {float(r[mask].mean()):.3f} ± {float(r[mask].std()):.3f}"
            )

    writer.add_figure("influence_vs_leave_one_out", scatter_figure(results), 0)
    writer.add_figure("pearson_per_test_point", histogram_figure({k: v[2] for k, v in results.items()}), 0)
    shown = [int((comp_test == g).nonzero()[0]) for g in range(len(MEANS)) if (comp_test == g).any()][
        : args.show_points
    ]
    writer.add_figure("top_proponents", proponents_figure(x_train, comp_train, x_test, scores, shown), 0)
    names = list(summary)
    # Paired over the same test points, as the paper's matched-vs-cross-loss t-test.
    diff = results[names[0]][2] - results[names[1]][2]
    t_stat = float(diff.mean() / (diff.std() / math.sqrt(len(diff))))
    writer.add_scalar("cross_minus_matched/mean_pearson", float(diff.mean()), 0)
    writer.add_scalar("cross_minus_matched/paired_t", t_stat, 0)
    writer.flush()
    print(
        f"\ncross-loss minus matched per-test-point Pearson: mean {float(diff.mean()):+.3f} (paired t = {t_stat:.2f},"
        f" {len(diff)} test points)   total {time.perf_counter() - t_start:.1f}s; TensorBoard: {logger.log_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
