"""TensorBoard output of InfluenceAnalysis, read back with EventAccumulator."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset

from lightning_influence import InfluenceAnalysis, log_influence
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_log_to_tensorboard_writes_histograms_images_and_text(tmp_path, digits_run):
    analysis = InfluenceAnalysis(digits_run.stores["proj"], digits_run.vae, train_data=digits_run.dm.train_set)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = quiet_trainer(logger=logger, max_epochs=1)
    queries = Subset(digits_run.dm.test_set, range(2))
    out = analysis.summary(queries, k=6)
    log_influence(trainer, out, queries, train_data=digits_run.dm.train_set, n_self=12)
    acc = _events(logger.log_dir)
    tags = acc.Tags()
    assert "influence/self_influence" in tags["histograms"]
    assert {"influence/highest_self_influence", "influence/query_0/proponents", "influence/query_1/opponents"} <= set(
        tags["images"]
    )
    assert "influence/summary/text_summary" in tags["tensors"]
    assert "influence/self_influence_median" in tags["scalars"]
    hist = acc.Histograms("influence/self_influence")[0].histogram_value
    assert hist.num == len(digits_run.dm.train_set)
    img = acc.Images("influence/query_0/proponents")[0]
    assert img.width > img.height > 0  # a row: the query then its k proponents
    text = acc.Tensors("influence/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    top = int(out.proponents.indices[0, 0])
    assert f"| 0 | {top} (" in text
    assert out.proponents.indices.shape == (2, 6)
    torch.testing.assert_close(out.self_influence, analysis.self_influence())


def test_writer_lookup_scans_all_loggers_and_explains_a_missing_one(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(logger=[CSVLogger(tmp_path), tb])
    assert get_summary_writer(trainer) is tb.experiment
    assert get_summary_writer(tb) is tb.experiment
    with pytest.raises(MisconfigurationException, match="without a pytorch_lightning.loggers.TensorBoardLogger"):
        get_summary_writer(quiet_trainer(logger=CSVLogger(tmp_path)))
    with pytest.raises(MisconfigurationException, match="`trainer_or_logger` must be"):
        get_summary_writer("runs")


def test_as_images_reshapes_square_vectors_and_scales():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    imgs = as_images(x)
    assert imgs.shape == (2, 1, 8, 8)
    assert imgs.amin() == 0 and imgs.amax() == 1
    with pytest.raises(ValueError, match="image_fn"):
        as_images(torch.zeros(2, 10))
