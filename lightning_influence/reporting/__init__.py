"""Reporting: TensorBoard views and figures that take results and never compute them."""

from lightning_influence.reporting.influence import log_influence
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer

__all__ = ["as_images", "get_summary_writer", "log_influence"]
