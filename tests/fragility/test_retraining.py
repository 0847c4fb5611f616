"""Retraining machinery: data resolution, removal loaders, warm start, measurement."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from iris import IrisClassifier, IrisDataModule, iris_loss
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.errors import ArchitectureMismatchError
from lightning_influence.fragility.retraining import (
    Retrainer,
    architecture_signature,
    evaluate_loss,
    resolve_training_data,
)


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen))


def test_resolve_training_data(tensors):
    dm = IrisDataModule()
    ds, kw = resolve_training_data(dm)
    assert ds is dm.train_set and kw["batch_size"] == 149 and kw["shuffle"] is False
    ds, kw = resolve_training_data(DataLoader(tensors, batch_size=3, shuffle=True))
    assert ds is tensors and kw["shuffle"] is True and kw["batch_size"] == 3
    ds, kw = resolve_training_data(tensors)
    assert kw["batch_size"] == 10 and kw["shuffle"] is False
    with pytest.raises(MisconfigurationException, match="`datamodule`"):
        resolve_training_data(torch.zeros(3))
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(tensors), 2, False)
    with pytest.raises(MisconfigurationException, match="batch_sampler"):
        resolve_training_data(DataLoader(tensors, batch_sampler=sampler))


@pytest.mark.parametrize("drop_last", [False, True])
def test_removal_loader_matches_the_default_loader(tensors, drop_last):
    kw = {"batch_size": 4, "shuffle": False, "collate_fn": None, "drop_last": drop_last, "num_workers": 0}
    r = Retrainer(lambda: IrisClassifier(depth=0), tensors, kw, mode="scratch")
    fast = list(r.loader([2, 7], seed=0))
    keep = [i for i in range(10) if i not in (2, 7)]
    ref = list(DataLoader(torch.utils.data.Subset(tensors, keep), batch_size=4, drop_last=drop_last))
    assert len(fast) == len(ref)
    for (xa, ya), (xb, yb) in zip(fast, ref):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shuffling_loader_is_seeded(tensors):
    kw = {"batch_size": 3, "shuffle": True, "collate_fn": None, "drop_last": False, "num_workers": 0}
    r = Retrainer(lambda: IrisClassifier(depth=0), tensors, kw, mode="scratch")
    order = lambda seed: torch.cat([b[1] for b in r.loader([0], seed)]).tolist()
    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(tensors.tensors[1][1:].tolist())


def test_warm_start_fine_tunes_only_the_chosen_block():
    dm = IrisDataModule()
    ds, kw = resolve_training_data(dm)
    make = lambda: IrisClassifier(depth=1, lr=1e-2, plateau_patience=None)
    reference = Retrainer(make, ds, kw, {"max_epochs": 50}, mode="scratch").fit([], 0)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    warm = Retrainer(
        make,
        ds,
        kw,
        {"max_epochs": 20},
        mode="warm_start",
        reference_state=state,
        reference_signature=architecture_signature(reference),
        finetune_params="lin_last",
    )
    fitted = warm.fit([0, 1, 2], seed=1)
    after = fitted.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if k.startswith("body"))
    assert not torch.equal(after["lin_last.weight"], state["lin_last.weight"])
    assert warm.n_fits == 1
    with pytest.raises(MisconfigurationException, match="model"):
        Retrainer(make, ds, kw, mode="warm_start")
    with pytest.raises(ValueError, match="`finetune_params`"):
        Retrainer(make, ds, kw, mode="warm_start", reference_state=state, finetune_params="head").build(0)


def test_architecture_mismatch_names_the_difference():
    dm = IrisDataModule()
    ds, kw = resolve_training_data(dm)
    sig = architecture_signature(IrisClassifier(depth=1, width=5))
    r = Retrainer(lambda: IrisClassifier(depth=1, width=6), ds, kw, mode="scratch", reference_signature=sig)
    with pytest.raises(ArchitectureMismatchError, match=r"shape changes .*body.0.weight: \(5, 4\) vs \(6, 4\)"):
        r.build(0)
    r = Retrainer(lambda: torch.nn.Linear(4, 3), ds, kw, mode="scratch")
    with pytest.raises(MisconfigurationException, match="`make_model` must return a pytorch_lightning.LightningModule"):
        r.build(0)


def test_evaluate_loss_uses_common_random_numbers():
    model = IrisClassifier(depth=0)
    x = torch.randn(6, 4)
    data = (x, torch.zeros(6, dtype=torch.long))

    def noisy(m, batch):
        return iris_loss(m, batch) + torch.randn(batch[0].shape[0])

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate_loss(model, noisy, data, seed=7)
    b = evaluate_loss(model, noisy, data, seed=7)
    assert a == b
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert evaluate_loss(model, iris_loss, data) == pytest.approx(float(iris_loss(model, data).mean()))
    with pytest.raises(ValueError, match="one loss per sample"):
        evaluate_loss(model, lambda m, b: iris_loss(m, b).mean(), data)
    assert model.training  # mode restored
    pl.seed_everything(0, verbose=False)


def test_user_callbacks_start_fresh_on_every_fit():
    seen: list[tuple[int, int]] = []

    class CountEpochs(pl.Callback):
        def __init__(self) -> None:
            self.epochs = 0

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs += 1
            seen.append((id(self), self.epochs))

    dm = IrisDataModule()
    ds, kw = resolve_training_data(dm)
    user = CountEpochs()
    r = Retrainer(
        lambda: IrisClassifier(depth=0, plateau_patience=None),
        ds,
        kw,
        {"max_epochs": 3, "callbacks": [user], "logger": True},  # logger is forced off
        mode="scratch",
    )
    model = r.fit([1], 0)
    r.fit([2], 0)
    assert user.epochs == 0  # the user's instance is a template, never run itself
    copies = sorted({i for i, _ in seen})
    assert len(copies) == 2 and all([e for i, e in seen if i == c] == [1, 2, 3] for c in copies)
    assert r.trainer_kwargs["logger"] is False and model is not None
