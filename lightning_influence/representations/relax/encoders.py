"""Calling a user's encoder safely: input checks, output checks, eval mode that is put back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = ["Encoder", "as_image_batch", "check_encoder", "encode"]

#: Any module or callable mapping images ``[B, C, H, W]`` to a representation ``[B, ...]``.
Encoder = Union[nn.Module, Callable[[Tensor], Tensor]]


def check_encoder(encoder: Any, argname: str = "encoder") -> None:
    if not callable(encoder):
        raise TypeError(
            f"`{argname}` must be an nn.Module or a callable mapping images [B, C, H, W] to a representation,"
            f" got {type(encoder).__name__}."
        )


def as_image_batch(x: Any, argname: str = "x") -> tuple[Tensor, bool]:
    """``x`` as ``[B, C, H, W]`` and whether it was a single image ``[C, H, W]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{argname}` must be a Tensor image [C, H, W] or batch [B, C, H, W], got {type(x).__name__}.")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"`{argname}` must be an image [C, H, W] or a batch of images [B, C, H, W], got shape {tuple(x.shape)}"
            f" (rank {x.dim()}). Reshape flat inputs to images (e.g. x.view(-1, 1, 8, 8)); an encoder that needs"
            " them flat can flatten them itself."
        )
    if not x.is_floating_point():
        raise TypeError(f"`{argname}` must be a floating-point tensor, got dtype {x.dtype}.")
    single = x.dim() == 3
    x = x.unsqueeze(0) if single else x
    if min(x.shape) < 1:
        raise ValueError(f"`{argname}` must not be empty, got shape {tuple(x.shape)}.")
    return x, single


def _check_device(encoder: Any, x: Tensor, argname: str) -> None:
    if isinstance(encoder, nn.Module):
        p = next(encoder.parameters(), None)
        if p is not None and p.device != x.device:
            raise ValueError(
                f"`{argname}`'s parameters are on {p.device} but the images are on {x.device}; computation follows"
                f" the input, so move one of them (e.g. encoder.to(x.device))."
            )


def encode(
    encoder: Encoder,
    x: Tensor,
    argname: str = "encoder",
    autocast: bool | torch.dtype = False,
) -> Tensor:
    """``encoder(x)`` flattened to ``[B, D]`` in float32, with its output checked.

    Raises:
        TypeError: if the encoder returns something other than one tensor.
        ValueError: if its batch size differs from the input's, or its values are not finite.
    """
    _check_device(encoder, x, argname)
    if autocast:
        dtype = (
            autocast
            if isinstance(autocast, torch.dtype)
            else (torch.float16 if x.device.type == "cuda" else torch.bfloat16)
        )
        ctx: Any = torch.autocast(device_type=x.device.type, dtype=dtype)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        out = encoder(x)
    if isinstance(out, (tuple, list)):
        raise TypeError(
            f"`{argname}` returned a {type(out).__name__} of {len(out)} items; RELAX needs a single representation"
            " tensor [B, ...]. For a VAE's encode, pass e.g. `lambda x: vae.encode(x)[0]` (the posterior mean)."
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"`{argname}` must return a Tensor representation [B, ...], it returned {type(out).__name__}.")
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"`{argname}` must return one representation per image: for {x.shape[0]} images it returned shape"
            f" {tuple(out.shape)}."
        )
    if not out.is_floating_point():
        raise TypeError(f"`{argname}` must return a floating-point representation, got dtype {out.dtype}.")
    out = out.reshape(out.shape[0], -1).float()
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"`{argname}` returned non-finite values (inf/NaN) for {len(bad)} of {out.shape[0]} inputs"
            f" (first indices {bad[:5]}); RELAX cannot compare such representations."
        )
    return out
