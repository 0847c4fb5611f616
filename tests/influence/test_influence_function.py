"""InfluenceFunction on L2-regularised logistic regression (breast cancer, float64) against closed forms and LOO."""

import warnings

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

import lightning_influence.trajectory.store
from lightning_influence.errors import SingularHessianError, SolverNotConvergedError
from lightning_influence.gradients.parameters import flatten_gradients
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.vmap import per_sample_gradients
from lightning_influence.influence.influence_function import InfluenceFunction

ALPHA = 1e-2  # L2 penalty on the weights, part of every sample's loss
DAMPING = 1e-3
N_TRAIN, N_TEST = 400, 40


class LogisticRegression(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1, dtype=torch.float64)

    def forward(self, x):
        return self.linear(x).squeeze(-1)

    def per_sample_loss(self, batch):
        x, y = batch
        bce = nn.functional.binary_cross_entropy_with_logits(self(x), y, reduction="none")
        return bce + 0.5 * ALPHA * self.linear.weight.pow(2).sum()


def _augment(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _reg():
    reg = torch.full((31,), ALPHA, dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not penalised
    return reg


def _newton(xa, y, theta, max_iter=50):
    """Minimise the mean of the per-sample losses by Newton's method (closed-form gradient and Hessian)."""
    reg = _reg()
    for _ in range(max_iter):
        p = torch.sigmoid(xa @ theta)
        g = xa.T @ (p - y) / len(y) + reg * theta
        H = (xa.T * (p * (1 - p))) @ xa / len(y) + torch.diag(reg)
        step = torch.linalg.solve(H, g)
        theta = theta - step
        if step.norm() < 1e-14:
            break
    return theta


@pytest.fixture(scope="module")
def problem():
    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(StandardScaler().fit_transform(x))
    y = torch.tensor(y, dtype=torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_TEST]
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    theta = _newton(_augment(xtr), ytr, torch.zeros(31, dtype=torch.float64))
    model = LogisticRegression(30)
    with torch.no_grad():
        model.linear.weight.copy_(theta[:30])
        model.linear.bias.copy_(theta[30:])

    # Closed forms: per-sample gradients and the Hessian of the mean loss.
    reg = _reg()
    xa = _augment(xtr)
    p = torch.sigmoid(xa @ theta)
    H = (xa.T * (p * (1 - p))) @ xa / N_TRAIN + torch.diag(reg)
    g_train = (p - ytr)[:, None] * xa + reg * theta
    pt = torch.sigmoid(_augment(xte) @ theta)
    g_test = (pt - yte)[:, None] * _augment(xte) + reg * theta
    inv = torch.linalg.inv(H + DAMPING * torch.eye(31, dtype=torch.float64))
    closed = g_test @ inv @ g_train.T / N_TRAIN
    return {
        "model": model,
        "train": (xtr, ytr),
        "test": (xte, yte),
        "theta": theta,
        "H": H,
        "g_train": g_train,
        "closed": closed,
        "inv": inv,
    }


@pytest.fixture(scope="module")
def exact_scores(problem):
    inf = InfluenceFunction(problem["model"], problem["train"], solver="exact", damping=DAMPING, batch_size=128)
    return inf.influence(problem["test"]), inf


def test_exact_matches_closed_form(problem, exact_scores):
    scores, inf = exact_scores
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float64
    rel = (scores - problem["closed"]).norm() / problem["closed"].norm()
    assert rel < 1e-6
    d = inf.diagnostics
    assert d.solver.solver == "exact" and d.converged and d.damping == DAMPING
    ev = torch.linalg.eigvalsh(problem["H"])
    assert d.smallest_eigenvalue == pytest.approx(float(ev[0]), rel=1e-8)
    assert d.largest_eigenvalue == pytest.approx(float(ev[-1]), rel=1e-8)
    assert not d.negative_curvature and d.n_train == N_TRAIN and d.n_test == N_TEST


@pytest.mark.parametrize("engine", ["factored", "auto", "loop"])
def test_every_engine_gives_the_closed_form(problem, engine):
    # The loss reads the weight outside its layer (the L2 penalty): the factored engine must see it
    # and send the weight to its fallback, or the scores would miss the penalty's gradient.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = InfluenceFunction(problem["model"], problem["train"], solver="exact", damping=DAMPING, engine=engine)
        scores = inf.influence(problem["test"])
    assert (scores - problem["closed"]).norm() / problem["closed"].norm() < 1e-6
    penalty_seen = any("'linear.weight' (by torch.Tensor.pow) is read outside" in str(w.message) for w in caught)
    assert penalty_seen == (engine != "loop")


@pytest.mark.parametrize(
    ("solver", "options", "threshold"),
    [("cg", {}, 0.99), ("arnoldi", {"n_iter": 31, "top_k": 25}, 0.99), ("lissa", {}, 0.95)],
)
def test_iterative_solvers_rank_like_exact(problem, exact_scores, solver, options, threshold):
    exact, _ = exact_scores
    inf = InfluenceFunction(
        problem["model"], problem["train"], solver=solver, damping=DAMPING, batch_size=128, solver_options=options
    )
    scores = inf.influence(problem["test"])
    rho = spearman_corrcoef(scores.flatten(), exact.flatten())
    assert rho >= threshold
    d = inf.diagnostics
    assert d.converged and d.solver.solver == solver
    assert d.largest_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(problem["H"])[-1]), rel=1e-6)


def test_stochastic_lissa_over_minibatches(problem, exact_scores):
    exact, _ = exact_scores
    inf = InfluenceFunction(
        problem["model"],
        problem["train"],
        solver="lissa",
        damping=DAMPING,
        hessian_batch_size=100,
        solver_options={"stochastic": True, "depth": 400, "repeat": 2, "residual_tol": 0.5},
    )
    scores = inf.influence(problem["test"])
    assert spearman_corrcoef(scores.flatten(), exact.flatten()) >= 0.95
    d = inf.diagnostics.solver
    assert d.details["stochastic"] and d.iterations == 800 and 0 < d.residual < 0.5


def test_matches_leave_one_out_retraining(problem):
    model = problem["model"]
    xtr, ytr = problem["train"]
    xte, yte = problem["test"]
    inf = InfluenceFunction(model, problem["train"], solver="cg", damping=0.0, batch_size=128)
    predicted = inf.influence(problem["test"])
    xa, theta = _augment(xtr), problem["theta"]

    def test_losses(th):
        z = _augment(xte) @ th
        return (
            nn.functional.binary_cross_entropy_with_logits(z, yte, reduction="none")
            + 0.5 * ALPHA * th[:30].pow(2).sum()
        )

    base = test_losses(theta)
    actual = torch.empty(N_TEST, N_TRAIN, dtype=torch.float64)
    for i in range(N_TRAIN):
        keep = torch.ones(N_TRAIN, dtype=torch.bool)
        keep[i] = False
        actual[:, i] = test_losses(_newton(xa[keep], ytr[keep], theta.clone())) - base  # warm start
    assert pearson_corrcoef(predicted.flatten(), actual.flatten()) >= 0.95
    # The average test loss, the usual summary, too.
    assert pearson_corrcoef(predicted.mean(0), actual.mean(0)) >= 0.95
    # Sign convention: a positive score (proponent) means removal raised the test loss.
    top = predicted.flatten().argmax()
    assert actual.flatten()[top] > 0


def test_cross_loss_measurement_matches_closed_form_and_loo(problem, exact_scores):
    """Measurement = the test logit (not the training loss): the scores predict the logit's change."""
    xte, _ = problem["test"]
    inf = exact_scores[1]
    scores = inf.influence(problem["test"], measurement=lambda m, b: m(b[0]))
    closed = _augment(xte) @ problem["inv"] @ problem["g_train"].T / N_TRAIN
    assert (scores - closed).norm() / closed.norm() < 1e-6
    assert inf.diagnostics.measurement == "<lambda>"

    xtr, ytr = problem["train"]
    xa, theta = _augment(xtr), problem["theta"]
    actual = torch.empty(N_TEST, 60, dtype=torch.float64)
    for i in range(60):
        keep = torch.ones(N_TRAIN, dtype=torch.bool)
        keep[i] = False
        actual[:, i] = _augment(xte) @ (_newton(xa[keep], ytr[keep], theta.clone()) - theta)
    assert pearson_corrcoef(scores[:, :60].flatten(), actual.flatten()) >= 0.95
    # Matched (default) differs from cross-loss.
    assert not torch.allclose(inf.influence(problem["test"]), scores)


def test_gauss_newton_equals_hessian_for_logistic_regression(problem, exact_scores):
    def outputs(m, b):
        return m(b[0]), m.linear.weight

    def loss_on_outputs(o, b):
        logits, w = o
        return (
            nn.functional.binary_cross_entropy_with_logits(logits, b[1], reduction="none")
            + 0.5 * ALPHA * w.pow(2).sum()
        )

    inf = InfluenceFunction(
        problem["model"],
        problem["train"],
        solver="cg",
        damping=DAMPING,
        gauss_newton=True,
        train_outputs=outputs,
        train_loss_on_outputs=loss_on_outputs,
    )
    scores = inf.influence(problem["test"])
    assert (scores - problem["closed"]).norm() / problem["closed"].norm() < 1e-6
    assert inf.diagnostics.curvature == "gauss-newton"
    explicit = InfluenceFunction(
        problem["model"],
        problem["train"],
        solver="exact",
        damping=DAMPING,
        gauss_newton=True,
        train_outputs=outputs,
        train_loss_on_outputs=loss_on_outputs,
    )
    assert (explicit.influence(problem["test"]) - problem["closed"]).norm() / problem["closed"].norm() < 1e-6
    with pytest.raises(MisconfigurationException, match="train_outputs"):
        InfluenceFunction(problem["model"], problem["train"], gauss_newton=True)


def test_parameter_block_and_self_influence(problem):
    inf = InfluenceFunction(
        problem["model"], problem["train"], params=["linear.weight"], solver="exact", damping=DAMPING
    )
    scores = inf.influence(problem["test"])
    Hw = problem["H"][:30, :30] + DAMPING * torch.eye(30, dtype=torch.float64)
    xte, yte = problem["test"]
    theta = problem["theta"]
    pt = torch.sigmoid(_augment(xte) @ theta)
    gt = (pt - yte)[:, None] * xte + ALPHA * theta[:30]
    closed = gt @ torch.linalg.solve(Hw, problem["g_train"][:, :30].T) / N_TRAIN
    assert (scores - closed).norm() / closed.norm() < 1e-6
    self_inf = inf.self_influence()
    g = problem["g_train"][:, :30]
    expected = (g @ torch.linalg.inv(Hw) * g).sum(1) / N_TRAIN
    assert torch.allclose(self_inf, expected, rtol=1e-8)
    assert (self_inf > 0).all()


def test_bad_inputs_raise_clear_errors(problem):
    model = problem["model"]
    with pytest.raises(ValueError, match="`measurement` must return one value per test sample.*shape \\(\\)"):
        InfluenceFunction(model, problem["train"], solver="exact").influence(
            problem["test"], measurement=lambda m, b: m(b[0]).mean()
        )
    with pytest.raises(ValueError, match="`params` entry 'encoder'"):
        InfluenceFunction(model, problem["train"], params=["encoder"])
    with pytest.raises(ValueError, match="`train_data` is empty"):
        InfluenceFunction(model, (torch.empty(0, 30, dtype=torch.float64), torch.empty(0, dtype=torch.float64)))
    with pytest.raises(MisconfigurationException, match="`solver`"):
        InfluenceFunction(model, problem["train"], solver="newton")
    with pytest.raises(MisconfigurationException, match="`solver_options` has keys \\['depth'\\]"):
        InfluenceFunction(model, problem["train"], solver="cg", solver_options={"depth": 10})
    with pytest.raises(MisconfigurationException, match="`damping`"):
        InfluenceFunction(model, problem["train"], damping=-1.0)
    with pytest.raises(MisconfigurationException, match="`train_loss`"):
        InfluenceFunction(nn.Linear(30, 1), problem["train"])
    with pytest.raises(MisconfigurationException, match="`engine` must be 'auto', 'factored', 'vmap', 'loop'"):
        InfluenceFunction(model, problem["train"], engine="hooks")


def test_singular_hessian_with_zero_damping_raises(problem):
    """A duplicated feature column makes the unregularised Hessian singular."""
    xtr, ytr = problem["train"]
    x = torch.cat([xtr[:, :3], xtr[:, :1]], 1)
    model = nn.Linear(4, 1, dtype=torch.float64)

    def loss(m, b):
        return nn.functional.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1], reduction="none")

    inf = InfluenceFunction(model, (x, ytr), train_loss=loss, solver="exact", damping=0.0)
    with pytest.raises(SingularHessianError, match="singular.*`damping`"):
        inf.influence((x[:5], ytr[:5]))
    ok = InfluenceFunction(model, (x, ytr), train_loss=loss, solver="exact", damping=1e-3)
    assert torch.isfinite(ok.influence((x[:5], ytr[:5]))).all()


def test_nonconverging_solver_reports_residual(problem):
    inf = InfluenceFunction(
        problem["model"], problem["train"], solver="cg", damping=0.0, solver_options={"max_iter": 2}
    )
    with pytest.warns(UserWarning, match=r"CG did not converge.*residual \d"):
        inf.influence(problem["test"])
    assert not inf.diagnostics.converged and inf.diagnostics.solver.residual > 1e-4
    strict = InfluenceFunction(
        problem["model"], problem["train"], solver="lissa", damping=0.0, solver_options={"depth": 3}, on_failure="raise"
    )
    with pytest.raises(SolverNotConvergedError, match="residual"):
        strict.influence(problem["test"])


def test_negative_curvature_is_flagged():
    """An MLP at random weights is at no minimum: the diagnostics say so."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(64, dtype=torch.float64)

    def loss(m, b):
        return (m(b[0]).squeeze(-1) - b[1]) ** 2

    inf = InfluenceFunction(net, (x, y), train_loss=loss, solver="exact", damping=10.0)
    with pytest.warns(UserWarning, match="negative curvature"):
        scores = inf.influence((x[:4], y[:4]))
    assert inf.diagnostics.negative_curvature and inf.diagnostics.smallest_eigenvalue < 0
    assert torch.isfinite(scores).all()


def test_training_gradients_from_store(problem, tmp_path):
    store_mod = lightning_influence.trajectory.store

    model = problem["model"]
    names = ["linear.weight", "linear.bias"]
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    header = store_mod.header_for(N_TRAIN, names, shapes, "float32", None, 0, GradientPrecision())
    writer = store_mod.GradientStoreWriter(tmp_path / "store", header)
    ckpt = writer.begin_checkpoint()
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = per_sample_gradients(model, lambda m, b: m.per_sample_loss(b), problem["train"], params)
    ckpt.write_rows(torch.arange(N_TRAIN), flatten_gradients(g, names))
    ckpt.commit({k: v.detach() for k, v in model.state_dict().items()}, {"step": 1, "epoch": 0, "lr": 0.1})
    store = store_mod.GradientStore(tmp_path / "store")

    inf = InfluenceFunction(model, problem["train"], solver="exact", damping=DAMPING, store=store)
    scores = inf.influence(problem["test"])
    assert inf.diagnostics.train_gradients == "store"
    # float32 storage: agreement to float32 precision
    assert (scores - problem["closed"]).norm() / problem["closed"].norm() < 1e-5
    with pytest.raises(MisconfigurationException, match="`store` recorded parameters"):
        InfluenceFunction(model, problem["train"], params=["linear.weight"], store=store)


def test_vae_decoder_block_with_bound_loss_and_dataset():
    """The issue's call shape: a VAE, ``train_loss=vae.per_sample_loss``, ``params=["decoder"]``, a Dataset."""
    from torch.utils.data import TensorDataset

    from lightning_influence.models import MLPVAE

    torch.manual_seed(0)
    vae = MLPVAE(input_dim=16, hidden_dim=8, latent_dim=2, influence_draws=2).double()
    x = torch.rand(40, 16, dtype=torch.float64)
    data = TensorDataset(x)

    def recon_error(m, b):
        inputs = b[0] if isinstance(b, (tuple, list)) else b
        mu, _ = m.encode(inputs)
        return (torch.sigmoid(m.decode(mu)) - inputs).pow(2).sum(1)

    common = {"train_loss": vae.per_sample_loss, "params": ["decoder"], "damping": 5.0, "batch_size": 16}
    exact = InfluenceFunction(vae, data, solver="exact", **common)
    s_exact = exact.influence(TensorDataset(x[:6]), measurement=recon_error)
    assert s_exact.shape == (6, 40)
    assert exact.n_params == sum(p.numel() for p in vae.decoder.parameters())
    # The reparameterisation noise is keyed by sample id: the Hessian and the scores are deterministic.
    again = InfluenceFunction(vae, data, solver="exact", **common).influence(
        TensorDataset(x[:6]), measurement=recon_error
    )
    assert torch.equal(s_exact, again)
    cg = InfluenceFunction(vae, data, solver="cg", **common)
    s_cg = cg.influence(TensorDataset(x[:6]), measurement=recon_error)
    assert cg.diagnostics.converged
    assert spearman_corrcoef(s_cg.flatten(), s_exact.flatten()) >= 0.99
    assert (s_cg - s_exact).norm() / s_exact.norm() < 1e-5


def test_submodules_keep_their_own_mode():
    """A submodule the user put in eval (frozen statistics) stays in eval; the rest returns to train."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 1)).double()
    net[1].eval()
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2  # noqa: E731
    before = [m.training for m in net.modules()]
    assert before[0] and not before[2]  # root in train, the BatchNorm in eval
    for solver in ("exact", "cg"):
        inf = InfluenceFunction(net, (x, y), train_loss=loss, params=["4"], solver=solver, damping=1e-2)
        inf.influence((x[:2], y[:2]))
        inf.self_influence()
        assert [m.training for m in net.modules()] == before, solver


def test_float32_model_with_cg_converges_at_its_working_precision(problem):
    """float32 products cannot push the residual below ~1e-7: the default tol=1e-8 must not report a failure."""
    model = LogisticRegression(30)
    model.load_state_dict(problem["model"].state_dict())
    model = model.float()
    train = tuple(t.float() for t in problem["train"])
    test = tuple(t.float() for t in problem["test"])
    inf = InfluenceFunction(model, train, solver="cg", damping=DAMPING)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scores = inf.influence(test)
    d = inf.diagnostics.solver
    assert d.converged and d.details["tol"] == 1e-8 and d.details["effective_tol"] == 4 * torch.finfo(torch.float32).eps
    closed = problem["closed"]
    assert float((scores.double() - closed).abs().max() / closed.abs().max()) < 1e-6
    # Too few iterations is still a failure, whatever the precision.
    short = InfluenceFunction(model, train, solver="cg", damping=DAMPING, solver_options={"max_iter": 3})
    with pytest.warns(UserWarning, match=r"CG did not converge in 3 iterations.*floored at 4 eps of torch.float32"):
        short.influence(test)
    assert not short.diagnostics.converged


def test_arnoldi_covers_repeated_eigenvalues_of_a_multi_output_linear_layer():
    """H = I_out (x) Sigma_x repeats every eigenvalue d_out times; one Krylov sequence sees d_in + 1 of 35.

    The factorisation used to stop there, keep 7 pairs and report them converged (scores 77% off).
    """
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 200, 6, 5
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    lin = nn.Linear(d_in, d_out, dtype=torch.float64)
    loss = lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    dim = d_out * (d_in + 1)
    exact = InfluenceFunction(lin, (x, y), train_loss=loss, solver="exact", damping=1e-2).influence((x[:3], y[:3]))
    inf = InfluenceFunction(
        lin, (x, y), train_loss=loss, solver="arnoldi", damping=1e-2, solver_options={"n_iter": dim, "top_k": dim}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scores = inf.influence((x[:3], y[:3]))
    d = inf.diagnostics.solver
    assert d.iterations == dim and d.details["top_k"] == dim and d.details["restarts"] >= d_out - 1
    assert d.converged and d.residual < 1e-10 and d.details["captured_fraction_min"] == pytest.approx(1.0)
    torch.testing.assert_close(scores, exact, rtol=1e-9, atol=1e-12)


def test_count_arguments_are_positive_integers_and_never_bools(problem):
    model, train = problem["model"], problem["train"]
    for kwargs, message in (
        ({"batch_size": True}, r"`batch_size` must be a positive integer, got True"),
        ({"hessian_batch_size": True}, r"`hessian_batch_size` must be a positive integer, got True"),
        ({"hessian_batch_size": 2.5}, r"`hessian_batch_size` must be a positive integer, got 2.5"),
        ({"eigen_iters": 2.5}, r"`eigen_iters` must be an integer >= 0, got 2.5"),
        ({"solver": "arnoldi", "solver_options": {"n_iter": 0}}, r"`n_iter` must be a positive integer, got 0"),
        ({"solver": "arnoldi", "solver_options": {"top_k": 0}}, r"`top_k` must be a positive integer, got 0"),
    ):
        with pytest.raises(MisconfigurationException, match=message):
            InfluenceFunction(model, train, **kwargs)
    inf = InfluenceFunction(model, train, batch_size=np.int64(100), hessian_batch_size=np.int64(200), eigen_iters=0)
    assert inf.batch_size == 100 and inf.curvature.batch_size == 200
