"""How per-sample gradients are computed numerically: fp32 (default) or under the trainer's precision.

Recorded in the store manifest so test gradients after ``fit`` are computed the same way as the
training gradients were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

__all__ = ["GradientPrecision", "precision_from_trainer"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GradientPrecision:
    """Numerics of the per-sample gradient computation.

    Args:
        mode: ``"fp32"`` (fp32 copies of weights and inputs, outside autocast), ``"mixed"``
            (inside ``torch.autocast`` with fp32 weights), or ``"true"`` (weights and inputs in
            the half dtype).
        dtype: the half dtype for ``"mixed"``/``"true"`` (``"float16"`` or ``"bfloat16"``).
        init_loss_scale: first loss scale tried under fp16; halved for the samples whose
            gradient overflows, down to 1.
    """

    mode: Literal["fp32", "mixed", "true"] = "fp32"
    dtype: Literal["float16", "bfloat16"] | None = None
    init_loss_scale: float = 2.0**12

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype] if self.dtype else torch.float32

    @property
    def loss_scaling(self) -> bool:
        return self.mode != "fp32" and self.dtype == "float16"

    @property
    def upcast_weights(self) -> bool:
        return self.mode != "true"

    def context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.mode == "mixed":
            return torch.autocast(device.type, dtype=self.torch_dtype)
        # Callback hooks run outside autocast, but analysis may be called from anywhere.
        return _autocast_disabled(device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GradientPrecision:
        return cls(**dict(d))


@contextlib.contextmanager
def _autocast_disabled(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, enabled=False):
        yield


def precision_from_trainer(trainer_precision: str, grad_precision: str) -> GradientPrecision:
    """Map the Trainer's precision flag and the recorder's ``grad_precision`` to a :class:`GradientPrecision`.

    ``grad_precision="fp32"`` always gives fp32. ``"autocast"`` follows the trainer:
    ``16-mixed``/``bf16-mixed`` compute under autocast, ``16-true``/``bf16-true`` in the half
    dtype, and ``32-true``/``64-true`` fall back to fp32.
    """
    if grad_precision == "fp32":
        return GradientPrecision()
    table = {
        "16-mixed": ("mixed", "float16"),
        "bf16-mixed": ("mixed", "bfloat16"),
        "16-true": ("true", "float16"),
        "bf16-true": ("true", "bfloat16"),
    }
    if trainer_precision not in table:
        return GradientPrecision()
    mode, dtype = table[trainer_precision]
    return GradientPrecision(mode=mode, dtype=dtype)  # type: ignore[arg-type]
