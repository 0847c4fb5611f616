"""TensorBoard output of InfluenceAnalysis, read back with EventAccumulator."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from scipy import ndimage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset

from lightning_influence import InfluenceAnalysis, log_influence
from lightning_influence.reporting.figures import OPPONENT, PROPONENT, QUERY, SAMPLE
from lightning_influence.reporting.relax import log_relax
from lightning_influence.reporting.representations import log_invariances
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer
from lightning_influence.representations.invariances import InvarianceGrids
from lightning_influence.representations.relax.explainer import Explanation


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _png(acc: EventAccumulator, tag: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB")).astype(int)


def tiles(image: np.ndarray, color: str) -> list[tuple[int, int]]:
    """(height, width) in pixels of every tile framed in ``color`` (a frame is one connected outline)."""
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    mask = np.abs(image - rgb).max(axis=2) <= 8
    labelled, n = ndimage.label(mask)
    boxes = [ndimage.find_objects(labelled)[i] for i in range(n)]
    sizes = [(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes]
    return [s for s in sizes if min(s) >= 20]  # outlines, not specks of antialiased text


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
    assert {"influence/highest_self_influence", "influence/query_0", "influence/query_1"} <= set(tags["images"])
    assert "influence/summary/text_summary" in tags["tensors"]
    assert "influence/self_influence_median" in tags["scalars"]
    hist = acc.Histograms("influence/self_influence")[0].histogram_value
    assert hist.num == len(digits_run.dm.train_set)
    img = acc.Images("influence/query_0")[0]
    assert img.width > img.height > 0  # two rows: the query then its k proponents, k opponents
    text = acc.Tensors("influence/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    top = int(out.proponents.indices[0, 0])
    label = int(digits_run.dm.train_set.tensors[1][top])
    assert f"| 0 | {int(queries[0][1])} | {top} y={label} (" in text
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


def test_views_are_readable_tiles_with_titles(tmp_path, digits_run):
    """Every image tile is at least 64 px; each query shows one outlined query, k proponents and k opponents."""
    train = digits_run.dm.train_set
    analysis = InfluenceAnalysis(digits_run.stores["exact"], digits_run.vae, train_data=train)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    queries = Subset(digits_run.dm.test_set, range(2))
    summary = analysis.summary(queries, k=5)
    with torch.no_grad():
        losses = digits_run.vae.per_sample_loss(train.tensors[0])
    log_influence(logger, summary, queries, train_data=train, losses=losses, n_self=12)
    acc = _events(logger.log_dir)
    images = set(acc.Tags()["images"])
    assert {"influence/self_influence_hist", "influence/self_influence_vs_loss"} <= images
    for q in range(2):
        png = _png(acc, f"influence/query_{q}")
        assert len(tiles(png, QUERY)) == 1
        assert len(tiles(png, PROPONENT)) == 5 and len(tiles(png, OPPONENT)) == 5
        assert all(min(t) >= 64 for color in (QUERY, PROPONENT, OPPONENT) for t in tiles(png, color))
    gallery = tiles(_png(acc, "influence/highest_self_influence"), SAMPLE)
    assert len(gallery) == 12 and all(min(t) >= 64 for t in gallery)
    text = acc.Tensors("influence/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| class | samples | median self-influence |" in text
    for c in range(10):
        assert f"\n| {c} | {int((train.tensors[1] == c).sum())} |" in text


def test_invariance_grids_and_relax_maps_mark_the_input_column(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    rows = torch.rand(3, 6, 1, 8, 8)
    log_invariances(logger, InvarianceGrids(invariances=rows, variations=rows.flip(1)))
    maps = torch.rand(3, 8, 8)
    log_relax(logger, rows[:, 0], Explanation(maps, maps / 2, maps, torch.ones(8, 8), 10), tag="relax")
    acc = _events(logger.log_dir)
    for tag in ("supervised_vae/invariances", "supervised_vae/variations"):
        inputs = tiles(_png(acc, tag), QUERY)
        assert len(inputs) == 3 and all(min(t) >= 64 for t in inputs)  # one outlined input per row
    for tag in ("relax/overlay", "relax/importance", "relax/uncertainty", "relax/u_relax"):
        assert len(tiles(_png(acc, tag), QUERY)) == 3
