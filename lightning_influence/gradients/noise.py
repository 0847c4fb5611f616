"""Counter-based Gaussian noise keyed by (seed, stream, sample id).

VAE-TracIn needs a sample to see the *same* reparameterisation noise at every checkpoint, and
per-sample gradients are computed under ``torch.func.vmap``, where stateful generators cannot be
indexed by sample. A stateless hash of ``(seed, stream, sample id, position)`` solves both: it is
pure tensor arithmetic (so it batches under ``vmap``), needs no generator state, and gives the
same numbers on every device.

Inside :func:`fixed_noise`, :func:`standard_normal` returns the keyed noise; outside, it falls
back to ``torch.randn`` so the same model code trains with fresh noise.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NoiseStream",
    "fixed_noise",
    "global_rng_error",
    "keyed_standard_normal",
    "refusing_global_rng",
    "standard_normal",
]

_MASK32 = 0xFFFFFFFF


class NoiseStream:
    """Named noise streams: independent draw sets for the same sample id."""

    TRAIN = 0
    #: The second, independent draw set used for unbiased self-influence (g1 . g2).
    TRAIN_SECOND = 1
    TEST = 2


@dataclass(frozen=True)
class _NoiseKey:
    ids: Tensor
    seed: int
    stream: int


_current: contextvars.ContextVar[_NoiseKey | None] = contextvars.ContextVar("lightning_influence_noise", default=None)


def _mul32(x: Tensor, c: int) -> Tensor:
    # x * c mod 2**32 without int64 overflow: split x into 16-bit halves.
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    # "lowbias32" integer hash (C. Wellons); full avalanche on 32-bit inputs.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _to_uniform(h: Tensor) -> Tensor:
    # 24 high bits -> a float32-exact value strictly inside (0, 1).
    return ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def keyed_standard_normal(
    ids: Tensor, tail_shape: Sequence[int], seed: int, stream: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal noise that depends only on ``(seed, stream, id, position)``.

    .. math::
        \\epsilon_{i,j} = \\sqrt{-2\\ln u_1}\\,\\cos(2\\pi u_2),\\quad
        u_{1,2} = \\mathrm{hash}(\\mathrm{seed}, \\mathrm{stream}, \\mathrm{id}_i, 2j \\text{ or } 2j{+}1)

    Args:
        ids: integer sample ids, shape ``[B]``.
        tail_shape: shape of the noise for one sample.
        seed: base seed.
        stream: independent draw set (see :class:`NoiseStream`).
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``[B, *tail_shape]`` on ``ids.device``.

    Example:
        >>> import torch
        >>> a = keyed_standard_normal(torch.tensor([3, 7]), (4,), seed=0)
        >>> b = keyed_standard_normal(torch.tensor([7]), (4,), seed=0)
        >>> bool(torch.equal(a[1], b[0]))
        True
    """
    n = math.prod(tail_shape)
    pos = torch.arange(n, device=ids.device, dtype=torch.int64)
    key = _hash32(torch.full((), seed & _MASK32, dtype=torch.int64, device=ids.device))
    key = _hash32(key + (stream & _MASK32))
    key = _hash32(key + ids.to(torch.int64).reshape(-1, 1))  # [B, 1]
    h1 = _hash32(key + 2 * pos)
    h2 = _hash32(key + 2 * pos + 1)
    u1, u2 = _to_uniform(h1), _to_uniform(h2)
    eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return eps.to(dtype).reshape(-1, *tail_shape)


@contextlib.contextmanager
def fixed_noise(ids: Tensor, seed: int, stream: int = NoiseStream.TRAIN) -> Iterator[None]:
    """Within this context, :func:`standard_normal` returns noise keyed by ``ids``.

    Args:
        ids: the dataset positions of the samples in the current batch, shape ``[B]``.
        seed: base seed (recorded in the store manifest).
        stream: which independent draw set to use.
    """
    token = _current.set(_NoiseKey(ids=ids, seed=int(seed), stream=int(stream)))
    try:
        yield
    finally:
        _current.reset(token)


def standard_normal(shape: Sequence[int], *, like: Tensor) -> Tensor:
    """Reparameterisation noise ``[B, ...]``: keyed inside :func:`fixed_noise`, ``torch.randn`` outside.

    Use this instead of ``torch.randn_like`` in a model's reparameterisation so that influence
    recording sees the same noise for a sample at every checkpoint.

    Args:
        shape: full noise shape; its leading dimension is the batch.
        like: a tensor whose dtype and device the noise takes.
    """
    key = _current.get()
    if key is None:
        return torch.randn(tuple(shape), dtype=like.dtype, device=like.device)
    if key.ids.shape[0] != shape[0]:
        raise ValueError(
            f"fixed_noise was given {key.ids.shape[0]} sample ids but noise of batch size {shape[0]} was requested;"
            " the loss must draw noise with the batch as leading dimension."
        )
    return keyed_standard_normal(key.ids.to(like.device), tuple(shape[1:]), key.seed, key.stream, dtype=like.dtype)


def global_rng_error(argname: str) -> ValueError:
    """The error for a loss that draws from torch's global RNG, naming the loss argument ``argname``."""
    return ValueError(
        f"`{argname}` draws random numbers with torch's global RNG (e.g. torch.randn_like), which per-sample"
        " gradients cannot key by sample. Draw reparameterisation noise with"
        " lightning_influence.standard_normal(shape, like=...) so each sample gets the same noise at every"
        " checkpoint; put dropout layers in eval mode."
    )


@contextlib.contextmanager
def refusing_global_rng(argname: str, devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Raises :func:`global_rng_error` if the body draws from torch's global RNG, whose state it then restores.

    Compares the default CPU generator's state, and that of each CUDA device among ``devices``,
    before and after the body (copies of a few kilobytes): any draw advances one of them, keyed
    noise (:func:`standard_normal` inside :func:`fixed_noise`) none. An exception from the body
    propagates unchanged.

    Args:
        argname: the loss argument's name, for the message.
        devices: the devices the body computes on.

    Example:
        >>> with refusing_global_rng("loss_fn"):
        ...     _ = keyed_standard_normal(torch.arange(2), (3,), seed=0)
        >>> with refusing_global_rng("loss_fn"):
        ...     _ = torch.randn(2)
        Traceback (most recent call last):
        ...
        ValueError: `loss_fn` draws random numbers with torch's global RNG (e.g. torch.randn_like), ...
    """
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    cpu_before = torch.get_rng_state()
    cuda_before = [torch.cuda.get_rng_state(d) for d in cuda]
    yield
    drew = not torch.equal(torch.get_rng_state(), cpu_before)
    drew |= any(not torch.equal(torch.cuda.get_rng_state(d), state) for d, state in zip(cuda, cuda_before))
    if drew:
        # What the loss drew is discarded: the caller's random stream stays where it was.
        torch.set_rng_state(cpu_before)
        for d, state in zip(cuda, cuda_before):
            torch.cuda.set_rng_state(state, d)
        raise global_rng_error(argname)
