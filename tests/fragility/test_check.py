"""FragilityCheck end to end: the convex baseline, groups, the noise floor, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from iris import IrisClassifier, IrisDataModule, iris_loss
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_influence.errors import ArchitectureMismatchError, RetrainingDivergedError
from lightning_influence.fragility.check import FragilityCheck, select_removals
from lightning_influence.fragility.estimates import influence_function_estimates
from lightning_influence.fragility.retraining import Retrainer, resolve_training_data

WD = 0.01


def make_convex() -> IrisClassifier:
    return IrisClassifier(depth=0, weight_decay=WD, optimizer="lbfgs")


@pytest.fixture(scope="module")
def iris() -> IrisDataModule:
    return IrisDataModule()


@pytest.fixture(scope="module")
def convex(iris):
    """L2-regularised multinomial logistic regression at its optimum, and its exact IF estimates."""
    torch.manual_seed(0)
    ds, kw = resolve_training_data(iris)
    model = Retrainer(make_convex, ds, kw, {"max_epochs": 5}, mode="scratch").fit([], 0)
    # The objective's Hessian is the data Hessian + WD * I: the weight decay enters as damping.
    est = influence_function_estimates(model, iris_loss, iris.train_set, iris.test_set, damping=WD)
    return model, est


@pytest.fixture(scope="module")
def convex_report(iris, convex):
    model, est = convex
    check = FragilityCheck(
        make_convex,
        iris,
        trainer_kwargs={"max_epochs": 3},
        retrain="warm_start",
        n_removals=40,
        seeds=2,
        train_loss=iris_loss,
        curvature_params="lin_last",
        verbose=False,
    )
    return check.run(est, iris.test_set, model=model)


def test_convex_baseline_pearson_at_least_095(convex_report):
    m = convex_report.metrics
    assert convex_report.complete and not convex_report.errors
    assert len(convex_report.measured) == 40
    assert m["pearson"] >= 0.95, m
    assert m["spearman"] >= 0.9
    assert m["sign_agreement"] >= 0.9
    assert 0.8 <= m["slope"] <= 1.25  # right scale, not only the right ranking
    assert convex_report.n_fits == 2 + 40 * 2


def test_convex_noise_floor_of_deterministic_warm_start_is_zero(convex_report):
    assert convex_report.noise_floor == pytest.approx(0.0, abs=1e-9)
    assert all(r.above_noise_floor for r in convex_report.removals)
    assert abs(convex_report.control_drift) < 1e-4
    verdicts = {v.check: v.status for v in convex_report.verdicts()}
    assert verdicts["agreement"] == "OK" and verdicts["scale"] == "OK" and verdicts["sign"] == "OK"


def test_convex_damping_sweep_peaks_at_the_weight_decay(convex_report):
    c = convex_report.curvature
    assert c is not None and c.dim == 15 and not c.negative_curvature
    best = c.dampings[max(range(len(c.dampings)), key=lambda i: c.damping_pearson[i])]
    assert best == pytest.approx(WD)  # the Hessian of the objective includes WD * I
    assert c.damping_relative_change[0] == 0.0


def test_convex_scratch_retraining_agrees(iris, convex):
    model, est = convex
    check = FragilityCheck(
        make_convex,
        iris,
        trainer_kwargs={"max_epochs": 3},
        retrain="scratch",
        n_removals=8,
        seeds=2,
        train_loss=iris_loss,
        verbose=False,
    )
    report = check.run(est, iris.test_set, model=model)
    assert report.metrics["pearson"] >= 0.95
    assert report.noise_floor is not None and report.noise_floor < 1e-3  # a unique optimum


def test_group_removals_predict_sums(iris, convex):
    model, est = convex
    with pytest.warns(UserWarning, match="noise floor cannot be measured"):
        check = FragilityCheck(
            make_convex,
            iris,
            trainer_kwargs={"max_epochs": 3},
            removal=3,
            n_removals=9,
            seeds=1,
            train_loss=iris_loss,
            verbose=False,
        )
    report = check.run(est, iris.test_set, model=model)
    kinds = [r.kind for r in report.removals]
    assert kinds == ["proponent", "opponent", "random"] * 3
    for r in report.removals:
        assert len(r.indices) == 3
        assert r.predicted == pytest.approx(float(est[r.indices].sum()))
    assert report.removals[0].indices == torch.argsort(est, descending=True)[:3].tolist()
    assert report.metrics["pearson"] >= 0.95
    assert report.noise_floor is None
    assert "not measured" in report.summary()


def test_select_removals_strategies():
    est = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0, 1.0, -1.0], dtype=torch.float64)
    assert [g for g, _ in select_removals(est, 3, selection="abs")] == [[3], [1], [6]]
    assert [g for g, _ in select_removals(est, 2, selection="proponents")] == [[3], [6]]
    assert [g for g, _ in select_removals(est, 2, selection="opponents")] == [[1], [7]]
    ext = select_removals(est, 3, selection="extremes")
    assert [g for g, _ in ext] == [[3], [6], [1]]
    mixed = select_removals(est, 5, selection="mixed", seed=0)
    assert len({g[0] for g, _ in mixed}) == 5
    with pytest.raises(ValueError, match="n_removals"):
        select_removals(est, 3, group_size=3, selection="proponents")  # 3 disjoint groups of 3 > 8 samples
    groups = select_removals(est, 2, group_size=4, selection="proponents")
    assert sorted(groups[0][0] + groups[1][0]) == list(range(8))


# ---------------------------------------------------------------------------------- noise floor
def make_mlp() -> IrisClassifier:
    return IrisClassifier(depth=1, weight_decay=0.005, lr=1e-2, plateau_patience=None)


@pytest.fixture(scope="module")
def noisy_report(iris):
    """Scratch retraining of a small MLP: different seeds land in different solutions."""
    ds, kw = resolve_training_data(iris)
    model = Retrainer(make_mlp, ds, kw, {"max_epochs": 300}, mode="scratch").fit([], 0)
    est = influence_function_estimates(model, iris_loss, iris.train_set, iris.test_set, "lin_last.weight", 0.005)
    # "mixed": the strongest proponents and opponents, and typical (random) samples whose single-sample
    # effect is the kind the paper warns sits below the retraining noise.
    check = FragilityCheck(
        make_mlp,
        iris,
        trainer_kwargs={"max_epochs": 300},
        retrain="scratch",
        n_removals=6,
        selection="mixed",
        seeds=3,
        train_loss=iris_loss,
        trajectory_every_n_epochs=100,
        verbose=False,
    )
    return check.run(est, iris.test_set, model=model)


def test_noise_floor_is_measured_and_small_effects_are_labelled(noisy_report):
    r = noisy_report
    assert len(r.control_test_losses) == 3
    expected = float(torch.tensor(r.control_test_losses, dtype=torch.float64).std())
    assert r.noise_floor == pytest.approx(expected) and r.noise_floor > 1e-3
    labels = [x.label for x in r.removals]
    for x in r.removals:
        assert x.above_noise_floor == (abs(x.mean_actual) > r.noise_floor)
        assert len(x.actual) == 3 and x.seeds == [0, 1, 2]
    assert "below noise floor" in labels, (r.noise_floor, [x.mean_actual for x in r.removals])
    assert "below the noise floor" in r.summary()
    assert r.metrics["fraction_above_noise_floor"] == pytest.approx(labels.count("above noise floor") / 6)


def test_trajectories_are_recorded_for_the_first_seed(noisy_report):
    for x in noisy_report.removals:
        assert x.trajectory_epochs == [0, 100, 200, 300]
        assert len(x.trajectory_losses) == 4 and all(math.isfinite(v) for v in x.trajectory_losses)


# ---------------------------------------------------------------------------------- bad input
def test_estimates_of_the_wrong_length_are_rejected(iris, convex):
    model, est = convex
    check = FragilityCheck(
        make_convex, iris, trainer_kwargs={"max_epochs": 1}, seeds=2, train_loss=iris_loss, verbose=False
    )
    with pytest.raises(ValueError, match=r"`estimates` has 148 scores but the training set of `datamodule` has 149"):
        check.run(est[:-1], iris.test_set, model=model)
    bad = est.clone()
    bad[7] = float("nan")
    with pytest.raises(ValueError, match=r"`estimates` contains inf/NaN .*\[7\]"):
        check.run(bad, iris.test_set, model=model)
    with pytest.raises(ValueError, match="`estimates` must be 1-D"):
        check.run(est.reshape(-1, 1).repeat(1, 2), iris.test_set, model=model)
    with pytest.raises(ValueError, match="`indices` entry"):
        check.run(est, iris.test_set, model=model, indices=[0, 500])


class _Counter:
    """make_model factories that misbehave on their k-th call."""

    def __init__(self, bad_call: int, bad_factory) -> None:
        self.calls = 0
        self.bad_call = bad_call
        self.bad_factory = bad_factory

    def __call__(self) -> IrisClassifier:
        self.calls += 1
        return self.bad_factory() if self.calls >= self.bad_call else make_convex()


class _NaNModel(IrisClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_architecture_change_is_reported_and_partial_results_kept(iris, convex):
    model, est = convex
    # seeds=2: calls 1-2 are the controls, 3-6 two removals; call 7 builds a wider model.
    factory = _Counter(7, lambda: IrisClassifier(depth=1, width=4, weight_decay=WD, optimizer="lbfgs"))
    check = FragilityCheck(
        factory, iris, trainer_kwargs={"max_epochs": 3}, n_removals=5, seeds=2, train_loss=iris_loss, verbose=False
    )
    with pytest.raises(
        ArchitectureMismatchError, match="`make_model` returned a model whose architecture differs"
    ) as info:
        check.run(est, iris.test_set, model=model)
    report = info.value.report
    assert report is check.last_report
    assert not report.complete and report.errors
    assert [len(r.actual) for r in report.removals] == [2, 2, 0, 0, 0]
    assert len(report.control_test_losses) == 2 and report.noise_floor is not None
    assert report.metrics["n"] == 2
    assert "[FAIL] completed" in report.summary()


def test_divergence_is_reported_with_the_removal_and_seed(iris, convex):
    model, est = convex

    def nan_model() -> IrisClassifier:
        return _NaNModel(depth=0, weight_decay=WD, lr=1e-2, optimizer="adam")

    # Adam + NaN loss => NaN weights on the 3rd build (1 control, 1 removal done, the 2nd diverges).
    check = FragilityCheck(
        _Counter(3, nan_model),
        iris,
        trainer_kwargs={"max_epochs": 2},
        n_removals=4,
        seeds=[5],
        train_loss=iris_loss,
        verbose=False,
    )
    with pytest.raises(RetrainingDivergedError, match=r"diverged for removal of \[\d+\] with seed 5.*inf/NaN") as info:
        check.run(est, iris.test_set, model=model)
    report = info.value.report
    assert [len(r.actual) for r in report.removals] == [1, 0, 0, 0]
    assert report.control_test_losses and all(math.isfinite(v) for v in report.control_test_losses)
    assert report.to_json()  # a partial report still serialises


def test_a_fit_that_raises_is_reported(iris, convex):
    model, est = convex

    class Broken(IrisClassifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    check = FragilityCheck(
        lambda: Broken(depth=0, weight_decay=WD, optimizer="lbfgs"),
        iris,
        trainer_kwargs={"max_epochs": 1},
        n_removals=3,
        seeds=[0],
        train_loss=iris_loss,
        verbose=False,
    )
    with pytest.raises(RetrainingDivergedError, match="control .* seed 0: RuntimeError\\('boom'\\)"):
        check.run(est, iris.test_set, model=model)


def test_eager_argument_validation(iris):
    with pytest.raises(MisconfigurationException, match="`retrain`"):
        FragilityCheck(make_convex, iris, retrain="warm")
    with pytest.raises(MisconfigurationException, match="`removal`"):
        FragilityCheck(make_convex, iris, removal=0)
    with pytest.raises(MisconfigurationException, match="`n_removals`"):
        FragilityCheck(make_convex, iris, n_removals=0)
    with pytest.raises(MisconfigurationException, match="`seeds`"):
        FragilityCheck(make_convex, iris, seeds=[1, 1])
    with pytest.raises(MisconfigurationException, match="`selection`"):
        FragilityCheck(make_convex, iris, selection="top")
    with pytest.raises(MisconfigurationException, match="`datamodule`"):
        FragilityCheck(make_convex, [1, 2, 3])
    with pytest.raises(MisconfigurationException, match="`dampings`"):
        FragilityCheck(make_convex, iris, dampings=[-1.0])
    with pytest.raises(MisconfigurationException, match="`finetune_params`"):
        FragilityCheck(make_convex, iris, retrain="scratch", finetune_params="lin_last")


@pytest.mark.parametrize(
    "seeds",
    [2.5, True, [0, 1.5], [0, True], "01", None],
    ids=["float", "bool", "float-entry", "bool-entry", "str", "none"],
)
def test_seeds_that_are_not_integers_are_refused_by_name(iris, seeds):
    """seeds=2.5 failed with "'float' object is not iterable"; [0, 1.5] retrained silently with seed 1."""
    with pytest.raises(MisconfigurationException, match=r"`seeds` must be a positive integer \(the number of seeds\)"):
        FragilityCheck(make_convex, iris, seeds=seeds)


def test_seeds_of_any_integer_type(iris):
    assert FragilityCheck(make_convex, iris, seeds=np.int64(2)).seeds == [0, 1]
    assert FragilityCheck(make_convex, iris, n_removals=np.int64(3)).n_removals == 3  # as seeds
    assert FragilityCheck(make_convex, iris, seeds=np.array([3, 5])).seeds == [3, 5]


def test_run_needs_the_model_for_warm_start(iris, convex):
    _, est = convex
    check = FragilityCheck(make_convex, iris, seeds=2, train_loss=iris_loss, verbose=False)
    with pytest.raises(MisconfigurationException, match="`model`"):
        check.run(est, iris.test_set)


def test_loss_fn_defaults_to_per_sample_loss_and_is_required_otherwise(iris, convex):
    _model, est = convex

    class NoLoss(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin_last = torch.nn.Linear(4, 3)

    check = FragilityCheck(NoLoss, iris, retrain="scratch", seeds=2, verbose=False)
    with pytest.raises(MisconfigurationException, match="`train_loss` was not given"):
        check.run(est, iris.test_set)


# ---------------------------------------------------------------------------------- any estimator, a VAE
def test_vae_with_shuffled_minibatches_has_a_noise_floor():
    """A VAE (stochastic ELBO, shuffled mini-batches) through the default ``per_sample_loss``."""
    from lightning_influence.data import DigitsDataModule
    from lightning_influence.fragility.retraining import evaluate_loss
    from lightning_influence.models import MLPVAE

    dm = DigitsDataModule(batch_size=128)
    dm.setup("fit")

    def make_vae() -> MLPVAE:
        return MLPVAE(input_dim=64, hidden_dim=32, latent_dim=4, lr=2e-3, influence_draws=4)

    ds, kw = resolve_training_data(dm)
    assert kw["shuffle"] is True
    vae = Retrainer(make_vae, ds, kw, {"max_epochs": 2}, mode="scratch").fit([], 0)
    x_test = dm.val_set.tensors[0][:16]
    with torch.no_grad():  # any per-sample score works: here each sample's own loss
        scores = vae.per_sample_loss((dm.train_set.tensors[0],)).double()
    check = FragilityCheck(
        make_vae, dm, trainer_kwargs={"max_epochs": 1}, n_removals=3, seeds=2, selection="proponents", verbose=False
    )
    report = check.run(scores, (x_test,), model=vae)
    assert report.complete and len(report.measured) == 3
    expected_ref = evaluate_loss(vae, lambda m, b: m.per_sample_loss(b), (x_test,))
    assert report.reference_test_loss == pytest.approx(expected_ref)
    # Shuffling and reparameterisation noise make retraining stochastic: the floor is measured and positive.
    assert report.noise_floor is not None and report.noise_floor > 0
    assert [r.predicted for r in report.removals] == sorted(scores.tolist(), reverse=True)[:3]
    for r in report.removals:
        assert r.label in ("above noise floor", "below noise floor")


def test_influence_function_class_agrees_and_passes_the_convex_check(iris, convex, convex_report):
    """The package's InfluenceFunction (exact solver) gives the same scores, so the same verdict."""
    from lightning_influence.influence.influence_function import InfluenceFunction

    model, est = convex
    inf = InfluenceFunction(model, iris.train_set, train_loss=iris_loss, solver="exact", damping=WD, eigen_iters=0)
    scores = inf.influence(iris.test_set).reshape(-1).double()
    assert scores.shape == est.shape
    assert torch.allclose(scores, est, rtol=1e-3, atol=1e-4 * float(est.abs().max()))
    check = FragilityCheck(
        make_convex,
        iris,
        trainer_kwargs={"max_epochs": 3},
        n_removals=10,
        seeds=[0],
        train_loss=iris_loss,
        verbose=False,
    )
    report = check.run(scores, iris.test_set, model=model)
    assert report.metrics["pearson"] >= 0.95


def test_interruption_keeps_a_finalized_partial_report(iris, convex):
    model, est = convex

    def interrupt() -> IrisClassifier:
        raise KeyboardInterrupt

    check = FragilityCheck(
        _Counter(4, interrupt),
        iris,
        trainer_kwargs={"max_epochs": 3},
        n_removals=4,
        seeds=[0],
        train_loss=iris_loss,
        verbose=False,
    )
    with pytest.raises(KeyboardInterrupt):
        check.run(est, iris.test_set, model=model)
    report = check.last_report
    assert [len(r.actual) for r in report.removals] == [1, 1, 0, 0]
    assert report.errors == ["KeyboardInterrupt: interrupted"] and not report.complete
    assert report.metrics["n"] == 2
