import math

import pytest
import torch
from torch.func import functional_call, grad, hessian
from torchmetrics.functional import pearson_corrcoef

from lightning_influence.influence.influence_function import InfluenceFunction
from lightning_influence.representations.clustering import (
    DECClustering,
    cluster_nll,
    log_student_t_assignment,
    student_t_assignment,
    target_distribution,
)


def test_student_t_assignment_matches_definition():
    torch.manual_seed(0)
    e, mu = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for alpha in (1.0, 2.5):
        kernel = (1 + torch.cdist(e, mu).pow(2) / alpha).pow(-(alpha + 1) / 2)
        expected = kernel / kernel.sum(1, keepdim=True)
        assert torch.allclose(student_t_assignment(e, mu, alpha), expected, atol=1e-14)
        assert torch.allclose(log_student_t_assignment(e, mu, alpha).exp(), expected, atol=1e-14)


def test_target_distribution_sharpens_and_normalises():
    q = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(1)), 1)
    p = target_distribution(q)
    w = q**2 / q.sum(0)
    assert torch.allclose(p, w / w.sum(1, keepdim=True))
    assert torch.allclose(p.sum(1), torch.ones(20))
    entropy = lambda d: -(d * d.log()).sum(1)
    assert (entropy(p) < entropy(q)).float().mean() > 0.9


def test_losses_per_sample_and_validation():
    torch.manual_seed(0)
    model = DECClustering(weight_decay=1e-2).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    model.init_centres(x)
    p = model.targets(x)
    loss = model.per_sample_loss((x, p))
    q = model(x)
    kl = (p * (p.log() - q.log())).sum(1)
    penalty = 0.5 * 1e-2 * sum(t.pow(2).sum() for t in model.parameters())
    assert loss.shape == (8,) and torch.allclose(loss, kl + penalty)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert torch.allclose(cluster_nll(model, (x, y)), -q.log().gather(1, y[:, None]).squeeze(1))
    nll_model = DECClustering(objective="nll", weight_decay=0.0).double()
    nll_model.load_state_dict(model.state_dict())
    assert torch.allclose(nll_model.per_sample_loss((x, y)), cluster_nll(model, (x, y)))
    with pytest.raises(ValueError, match="target probabilities p"):
        model.per_sample_loss((x, y))
    with pytest.raises(ValueError, match="`cluster_nll` needs .* integer cluster labels"):
        cluster_nll(model, (x, p))
    with pytest.raises(ValueError, match="`objective`"):
        DECClustering(objective="kmeans")
    with pytest.raises(ValueError, match="`activation`"):
        DECClustering(activation="sigmoid")


def test_init_centres_uses_kmeans_on_embeddings():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [8.0, 8.0], [8.0, -8.0]], dtype=torch.float64)
    x = (means[:, None, :] + 0.3 * torch.randn(3, 20, 2, dtype=torch.float64)).reshape(-1, 2)
    model = DECClustering().double()
    model.init_centres(x, noise_std=0.0)
    # with no noise, each k-means centre is the mean embedding of one blob
    blob_means = model.embed(x).detach().reshape(3, 20, -1).mean(1)
    dist = torch.cdist(blob_means, model.centres.detach())
    assert dist.min(1).values.max() < 1e-6


def _newton(model, batch, start, tol=1e-9, max_iter=60):
    """Saddle-free Newton with a pseudo-inverse (the network's symmetries make H singular)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [start[n].shape for n in names]
    sizes = [start[n].numel() for n in names]
    flat = torch.cat([start[n].reshape(-1) for n in names])

    def unflat(v):
        return dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))))

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, b):
            return self.m.per_sample_loss(b).mean()

    wrapper = Loss()

    def f(v):
        return functional_call(wrapper, {"m." + k: t for k, t in unflat(v).items()}, (batch,))

    value = f(flat)
    for _ in range(max_iter):
        g = grad(f)(flat)
        if g.norm() < tol:
            break
        w, V = torch.linalg.eigh(hessian(f)(flat))
        keep = w.abs() > 1e-7 * w.abs().max()
        d = V[:, keep] @ ((V[:, keep].T @ g) / w[keep].abs())
        t = 1.0
        while f(flat - t * d) > value - 1e-4 * t * (g @ d) and t > 1e-8:
            t /= 2
        flat = flat - t * d
        value = f(flat)
    assert g.norm() < tol, f"Newton did not converge: |grad| = {float(g.norm()):.2e}"
    return unflat(flat)


def test_cross_loss_influence_predicts_leave_one_out_on_dec():
    """Cross-loss influence (DEC training loss, cluster NLL measurement) vs retraining without each point."""
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [5.0, 5.0], [5.0, -5.0]], dtype=torch.float64)
    comp = torch.arange(3).repeat_interleave(10)
    x = means[comp] + 1.25 * torch.randn(30, 2, generator=gen, dtype=torch.float64)
    x_test = means + 1.25 * torch.randn(3, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = DECClustering(hidden_dim=6, embed_dim=4, activation="softplus", weight_decay=0.1).double()
    model.init_centres(x)
    p = model.targets(x)
    y_test = model.predict_clusters(means)  # each Gaussian's cluster
    start = {n: t.detach() for n, t in model.named_parameters()}
    optimum = _newton(model, (x, p), start)
    with torch.no_grad():
        for n, t in model.named_parameters():
            t.copy_(optimum[n])

    inf = InfluenceFunction(model, (x, p), solver="exact", damping=1e-6)
    predicted = inf.influence((x_test, y_test), measurement=cluster_nll)
    assert not inf.diagnostics.negative_curvature

    def nll(params):
        with torch.no_grad():
            saved = {n: t.clone() for n, t in model.named_parameters()}
            for n, t in model.named_parameters():
                t.copy_(params[n])
            out = cluster_nll(model, (x_test, y_test))
            for n, t in model.named_parameters():
                t.copy_(saved[n])
        return out

    base = nll(optimum)
    actual = torch.stack(
        [nll(_newton(model, (x[torch.arange(30) != i], p[torch.arange(30) != i]), optimum)) - base for i in range(30)],
        dim=1,
    )
    r = pearson_corrcoef(predicted.T.contiguous(), actual.T.contiguous())
    assert r.min() >= 0.95, r
    assert pearson_corrcoef(predicted.flatten(), actual.flatten()) >= 0.95
    assert math.isclose(float(predicted.abs().max()), float(actual.abs().max()), rel_tol=0.5)


def test_cross_loss_example_runs_end_to_end(tmp_path):
    """The example on a reduced budget: it trains, scores, retrains and logs to TensorBoard."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "cross_loss_clusters.py"
    spec = importlib.util.spec_from_file_location("cross_loss_clusters", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(
        ["--logdir", str(tmp_path), "--n-per-cluster", "15", "--n-test", "6", "--n-loo", "8", "--adam-epochs", "30"]
    )
    assert len(summary) == 2
    for stats in summary.values():
        assert set(stats) >= {"mean", "std", "frac_ge_0.6", "frac_ge_0.8", "pearson_all"}
        assert -1.0 <= stats["mean"] <= 1.0 and math.isfinite(stats["std"])
    assert list(tmp_path.rglob("events.out.tfevents.*"))
