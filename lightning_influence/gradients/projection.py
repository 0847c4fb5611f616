"""Seeded random projections of per-sample gradients, applied block by block.

A dense ``D x k`` Johnson-Lindenstrauss matrix is never built: each parameter tensor's block of
the matrix is regenerated from ``(seed, parameter name, block index)`` when needed, in blocks of
at most ``block_elements`` entries. The same spec therefore projects training gradients during
``fit`` and test gradients after it, on any device, without storing the matrix.

Kinds:

- ``"sjlt"`` (default): a sparse JL transform; every input coordinate lands in ``nnz`` output
  buckets with random signs ``+-1/sqrt(nnz)``. Cost ``O(B * D * nnz)``, memory ``O(D * nnz)``
  integers (cached up to ``cache_bytes``).
- ``"rademacher"`` / ``"gaussian"``: dense entries ``+-1/sqrt(k)`` or ``N(0, 1/k)``, generated
  block by block (``O(B * D * k)``).
- ``"kronecker"``: per parameter, its gradient viewed as a matrix ``G`` ``[d_0, d_1]`` (``d_1`` the
  product of the other axes; 1 for a vector) is sketched as ``P_g G P_a^T`` with Gaussian
  ``P_g`` ``[k_g, d_0]`` and ``P_a`` ``[k_a, d_1]`` (``k_g k_a <= k``); a side whose full size fits is
  left unprojected, and a parameter with ``d_0 d_1 <= 4k`` is kept whole. Each parameter's sketch
  then lands in the ``k`` shared outputs in one pass: a CountSketch with random signs whose hash
  shifts each chunk of ``k`` coordinates by a random offset. On
  :class:`~lightning_influence.gradients.engine.LayerFactors` this is ``sum_s (P_g g_s)(P_a a_s)^T``:
  ``O(S (d_in k_a + d_out k_g + k_g k_a))`` per sample, and only a kept-whole parameter's (at most
  ``4k``-entry) gradient is ever formed. Dense gradients (the ``vmap`` engine's) get the same map,
  so either engine's rows live in the same space.

All kinds satisfy :math:`\\mathbb E[\\langle Pa, Pb\\rangle] = \\langle a, b\\rangle`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_influence.gradients.engine import LayerFactors, PerSampleGradients, dense_gradient

__all__ = ["ProjectionSpec", "RandomProjection"]

ProjectionKind = Literal["sjlt", "rademacher", "gaussian", "kronecker"]

#: The map ``"kronecker"`` computes. 1 (manifests without the field): kept whole up to ``k`` entries,
#: every sketch coordinate sent to ``nnz`` buckets by a sparse JL. 2: kept whole up to ``4k``
#: entries, each parameter's sketch mixed in by a one-pass CountSketch (:meth:`RandomProjection._mix`).
KRONECKER_VERSION = 2

#: A parameter with at most this many times ``k`` entries is kept whole by ``"kronecker"``: its
#: gradient (at most ``4k`` floats a sample) is cheaper to form from the factors and count-sketch
#: than to Kronecker-sketch, and more accurate (JL variance of width ``k`` instead of
#: ``1/k_g + 1/k_a``). On the 28x28 ConvVAE at ``k = 4096`` (256 samples, one thread) a
#: ``[32, 256]`` conv gradient (49 positions) takes 5.5 ms whole against 41 ms sketched, a
#: ``[1568, 8]`` linear one 2.7 ms against 5 ms; at 8k the ``[16, 1568]`` one would take 5.4 ms
#: whole against 2.7 ms sketched.
_KRON_WHOLE = 4


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything needed to rebuild a projection: recorded in the store manifest.

    Args:
        dim: output dimension ``k``.
        seed: base seed.
        kind: ``"sjlt"``, ``"rademacher"``, ``"gaussian"`` or ``"kronecker"``.
        nnz: non-zeros per input coordinate (``"sjlt"`` only).
        per_checkpoint: draw an independent projection for every checkpoint (its index joins the
            seed). Projection errors then average out over the trajectory instead of adding up
            coherently (consecutive checkpoints have similar gradients): on the digits VAE at
            ``k = 1024`` the worst per-query Spearman against exact TracIn rose from 0.91 to 0.98.
        block_elements: largest matrix block generated at once (dense kinds); for the sparse
            kind, ``block_elements / nnz`` coordinates share a generator and each ``index_add``
            touches at most ``block_elements`` gradient entries.
        kronecker_version: the ``"kronecker"`` map (:data:`KRONECKER_VERSION`, the only one computed).
            Recorded so that a store projected by another map is refused instead of scored against
            test rows projected differently; ignored by the other kinds.
    """

    dim: int
    seed: int = 0
    kind: ProjectionKind = "sjlt"
    nnz: int = 4
    per_checkpoint: bool = True
    block_elements: int = 1 << 22
    kronecker_version: int = KRONECKER_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"`projection_dim` must be a positive integer, got {self.dim!r}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            # numpy's SeedSequence, which seeds every block, takes non-negative integers only.
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}.")
        if self.kind not in ("sjlt", "rademacher", "gaussian", "kronecker"):
            raise ValueError(
                f"`projection_kind` must be 'sjlt', 'rademacher', 'gaussian' or 'kronecker', got {self.kind!r}."
            )
        if self.kind == "sjlt" and not 1 <= self.nnz <= self.dim:
            raise ValueError(f"`nnz` must be in [1, projection_dim], got {self.nnz}.")
        if self.block_elements < 1:
            raise ValueError(f"`block_elements` must be >= 1, got {self.block_elements}.")
        if self.kind == "kronecker" and self.kronecker_version != KRONECKER_VERSION:
            raise ValueError(
                f"`kronecker_version` {self.kronecker_version!r} is not computed by this version (only"
                f" {KRONECKER_VERSION}): the projection was recorded with another kronecker map; re-record."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProjectionSpec:
        """Rebuild a recorded spec; a ``"kronecker"`` one recorded before ``kronecker_version`` is refused.

        Such a manifest was projected with the version-1 map, which is no longer computed: scoring it
        against test rows projected with the current map would silently mix two spaces.
        """
        d = dict(d)
        if d.get("kind") == "kronecker" and "kronecker_version" not in d:
            raise ValueError(
                "This projection was recorded with an older kronecker projection; re-record. (The manifest has"
                f" no `kronecker_version`: it predates version {KRONECKER_VERSION}, the only map computed now, so"
                " test gradients cannot be projected into the space of its rows.)"
            )
        return cls(**d)


def _block_seed(seed: int, name: str, block: int, checkpoint: int) -> int:
    # SeedSequence mixes the keys well; the CRC makes the stream independent of which other
    # parameters are tracked.
    keys = [seed, zlib.crc32(name.encode()), block, checkpoint]
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


class RandomProjection:
    """Projects per-sample gradients ``{name: [B, *shape]}`` (or flat ``[B, D]``) to ``[B, k]``.

    Args:
        spec: the projection spec.
        param_names: parameter names, in the order of the flat layout.
        param_numels: number of elements of each parameter.
        param_shapes: each parameter's shape (``"kronecker"`` only). Default: taken from the
            gradients themselves (``LayerFactors.shape`` or a dense block's trailing axes); flat
            rows (:meth:`project_flat`) need it.
        checkpoint: index of the checkpoint this projection serves (ignored unless
            ``spec.per_checkpoint``).
        cache_bytes: cache the sparse transform's indices up to this size.

    Example:
        >>> import torch
        >>> proj = RandomProjection(ProjectionSpec(dim=256, seed=1), ["w"], [1000])
        >>> a, b = torch.randn(1, 1000), torch.randn(1, 1000)
        >>> pa, pb = proj.project_flat(a), proj.project_flat(b)
        >>> pa.shape
        torch.Size([1, 256])
        >>> bool(torch.allclose(proj.project_flat(a), pa))
        True
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        param_names: Sequence[str],
        param_numels: Sequence[int],
        checkpoint: int = 0,
        cache_bytes: int = 256 << 20,
        param_shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if len(param_names) != len(param_numels):
            raise ValueError("`param_names` and `param_numels` must have the same length.")
        self.spec = spec
        self.param_names = list(param_names)
        self.param_numels = [int(n) for n in param_numels]
        if param_shapes is not None and (
            len(param_shapes) != len(self.param_numels)
            or any(math.prod(s) != n for s, n in zip(param_shapes, self.param_numels))
        ):
            raise ValueError("`param_shapes` must give one shape per parameter, matching `param_numels`.")
        self.param_shapes: list[tuple[int, ...]] | None = (
            None if param_shapes is None else [tuple(int(d) for d in s) for s in param_shapes]
        )
        self.checkpoint = int(checkpoint) if spec.per_checkpoint else 0
        # Generated once per (checkpoint, parameter): a projection object serves one checkpoint.
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        # "kronecker": per parameter its (P_g, P_a) and its mixing map (offsets, signs).
        self._kron: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._kron_maps: dict[str, tuple[list[int], Tensor]] = {}
        self._cache_left = cache_bytes

    @classmethod
    def for_shapes(
        cls, spec: ProjectionSpec, shapes: Mapping[str, Sequence[int]], checkpoint: int = 0
    ) -> RandomProjection:
        """The projection of parameters of these shapes, in this order (what a store's header describes).

        Example:
            >>> spec = ProjectionSpec(dim=64, kind="kronecker")
            >>> proj = RandomProjection.for_shapes(spec, {"w": (16, 32), "b": (16,)})
            >>> proj.input_dim, proj.param_shapes
            (528, [(16, 32), (16,)])
        """
        names = list(shapes)
        return cls(
            spec,
            names,
            [math.prod(shapes[n]) for n in names],
            checkpoint=checkpoint,
            param_shapes=[shapes[n] for n in names],
        )

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def input_dim(self) -> int:
        return sum(self.param_numels)

    def project(self, grads: PerSampleGradients, scales: Mapping[str, float] | None = None) -> Tensor:
        """Project per-parameter per-sample gradients; ``scales`` multiply each parameter's block.

        Args:
            grads: name -> dense ``[B, *shape]`` gradients or
                :class:`~lightning_influence.gradients.engine.LayerFactors` (expanded one
                parameter at a time: these kinds act on the flat gradient).
            scales: optional per-parameter multipliers.
        """
        first = grads[self.param_names[0]]
        batch = first.batch_size if isinstance(first, LayerFactors) else first.shape[0]
        device = first.output_grads.device if isinstance(first, LayerFactors) else first.device
        if self.spec.kind == "kronecker":
            return self._project_kronecker(grads, scales, batch, device)
        # Accumulated transposed, [k, B]: index_add_ along dim 0 moves contiguous rows of B values,
        # several times faster than scattering columns of a [B, k] matrix.
        out = torch.zeros(self.dim, batch, dtype=torch.float32, device=device)
        for name, numel in zip(self.param_names, self.param_numels):
            scale = 1.0 if scales is None else float(scales.get(name, 1.0))
            if scale == 0.0:
                continue
            g = dense_gradient(grads[name]).reshape(batch, numel).float()
            self._accumulate(out, g if scale == 1.0 else g * scale, name)
        return out.T.contiguous()

    def _project_kronecker(
        self, grads: PerSampleGradients, scales: Mapping[str, float] | None, batch: int, device: torch.device
    ) -> Tensor:
        # Accumulated as [B, k]: the sketches come out [B, m] and mostly land as contiguous slices.
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for j, (name, numel) in enumerate(zip(self.param_names, self.param_numels)):
            scale = 1.0 if scales is None else float(scales.get(name, 1.0))
            if scale == 0.0:
                continue
            block = grads[name]
            if self.param_shapes is not None:
                shape = self.param_shapes[j]
            else:
                shape = block.shape if isinstance(block, LayerFactors) else tuple(block.shape[1:])
            if math.prod(shape) != numel:
                raise ValueError(
                    f"Parameter {name!r}: gradients of shape {tuple(shape)} do not have its {numel} elements; a"
                    " kronecker projection of flat rows needs `param_shapes`."
                )
            sketch = self._kron_sketch(block, name, shape, batch)
            self._mix(out, sketch if scale == 1.0 else sketch * scale, name)
        return out

    def kron_dims(self, shape: Sequence[int]) -> tuple[int, int, int, int]:
        """``(d_0, d_1, k_g, k_a)`` of the Kronecker sketch of a parameter of ``shape``, ``k_g k_a <= k``.

        A Kronecker sketch of ``g a^T`` multiplies two independent JL estimates, so its relative
        variance is about ``1/k_g + 1/k_a`` (a side kept whole contributes nothing). Of the three
        splits -- output side whole (``d_0 / k``), input side whole (``d_1 / k``), balanced
        (``2 / sqrt(k)``) -- the one with the smallest variance is taken; a parameter with
        ``d_0 d_1 <= 4k`` is kept whole (exact up to the final mixing, see :meth:`_mix`).

        Example:
            >>> p = RandomProjection(ProjectionSpec(dim=4096, kind="kronecker"), ["w"], [16 * 1568])
            >>> p.kron_dims((16, 1568))
            (16, 1568, 16, 256)
        """
        d0 = int(shape[0]) if len(shape) else 1
        d1 = math.prod(shape[1:]) if len(shape) > 1 else 1
        k = self.dim
        if d0 * d1 <= _KRON_WHOLE * k:
            return d0, d1, d0, d1
        root = math.isqrt(k)
        candidates = []
        if d0 <= k:
            candidates.append((d0 / k, d0, min(d1, k // d0)))
        if d1 <= k:
            candidates.append((d1 / k, min(d0, k // d1), d1))
        candidates.append((2.0 / root, min(d0, root), min(d1, root)))
        _, kg, ka = min(candidates)
        return d0, d1, kg, ka

    def _kron_matrices(
        self, name: str, shape: Sequence[int], device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(P_g, P_a)``: Gaussian ``[k_side, d_side]``, entries ``N(0, 1/k_side)``; ``None`` for a side kept whole."""
        cached = self._kron.get(name)
        if cached is not None and all(m is None or m.device == device for m in cached):
            return cached
        d0, d1, kg, ka = self.kron_dims(shape)
        mats: list[Tensor | None] = []
        for side, (k, d) in enumerate(((kg, d0), (ka, d1))):
            if k == d:
                mats.append(None)  # exact on this side
                continue
            gen = torch.Generator().manual_seed(_block_seed(self.spec.seed, f"{name}/kron{side}", 0, self.checkpoint))
            mats.append(torch.randn(k, d, generator=gen).mul_(1.0 / math.sqrt(k)).to(device))
        pair = (mats[0], mats[1])
        self._kron[name] = pair
        return pair

    def _kron_sketch(self, block: Tensor | LayerFactors, name: str, shape: Sequence[int], batch: int) -> Tensor:
        """``P_g G P_a^T`` per sample, flattened to ``[B, k_g k_a]`` (a side kept whole: the identity).

        From :class:`LayerFactors` as ``sum_s (P_g g_s)(P_a a_s)^T``: ``G`` is formed only when both
        sides are whole (``d_0 d_1 <= 4k`` entries).
        """
        device = block.output_grads.device if isinstance(block, LayerFactors) else block.device
        pg, pa = self._kron_matrices(name, shape, device)
        d0, d1, _, _ = self.kron_dims(shape)
        if isinstance(block, LayerFactors) and block.inputs is not None:
            a, g = block.grouped()
            a, g = a.float(), g.float()  # [B, S, G, d_1], [B, S, G, d_0 / G]
            if pa is not None:
                a = a @ pa.T
            if pg is None:
                m = torch.einsum("bsgo,bsgl->bgol", g, a).reshape(batch, d0, -1)
            else:
                g = torch.einsum("bsgo,kgo->bsgk", g, pg.reshape(pg.shape[0], block.groups, -1))
                m = torch.einsum("bsgk,bsgl->bkl", g, a)
            return m.reshape(batch, -1)
        m = dense_gradient(block).float().reshape(batch, d0, d1)
        if pa is not None:
            m = m @ pa.T  # one [B d_0, d_1] x [d_1, k_a] product
        if pg is not None:
            m = (m.transpose(1, 2) @ pg.T).transpose(1, 2)  # one [B k_a, d_0] x [d_0, k_g] product
        return m.reshape(batch, -1)

    def _kron_map(self, name: str, width: int, device: torch.device) -> tuple[list[int], Tensor]:
        """Where a parameter's ``width`` sketch coordinates go: ``(offsets, signs)``.

        Chunk ``c`` of ``k`` coordinates lands in ``[0, k)`` at the cyclic offset ``offsets[c]``, each
        coordinate multiplied by its entry of ``signs`` ``[width]`` (independent ``+-1``).
        """
        cached = self._kron_maps.get(name)
        if cached is not None and cached[1].device == device:
            return cached
        k = self.dim
        gen = torch.Generator().manual_seed(_block_seed(self.spec.seed, f"{name}/kronmix", 0, self.checkpoint))
        offsets = torch.randint(0, k, (math.ceil(width / k),), generator=gen).tolist()
        signs = torch.randint(0, 2, (width,), generator=gen).float().mul_(2).sub_(1).to(device)
        entry = (offsets, signs)
        self._kron_maps[name] = entry
        return entry

    def _mix(self, out: Tensor, v: Tensor, name: str) -> None:
        """Add one parameter's sketch ``v`` ``[B, m]`` into the shared outputs ``out`` ``[B, k]``.

        A CountSketch of width ``k`` whose hash shifts each chunk of ``k`` coordinates cyclically by
        its own random offset, with independent random signs: every chunk is two fused
        ``addcmul_`` on slices of ``out`` (about the cost of a plain add), no scatter, no temporary.
        Why a shift is as good as a random hash here: with independent signs the estimate of
        ``<x, y>`` is ``<x, y> + sum_{i != j} [h(i) = h(j)] s_i s_j x_i y_j`` (``x``, ``y``: two samples'
        sketches of all parameters, concatenated): zero-mean, with variance
        ``sum_{i != j} P(h(i) = h(j)) (x_i^2 y_j^2 + x_i y_i x_j y_j)``, which depends on the hash only
        through its pairwise collision probabilities -- ``1/k`` for coordinates of different chunks
        (independent uniform offsets), as for a fully random hash, and 0 within a chunk (a
        parameter's first ``k`` coordinates never collide: its self term is exact).
        """
        k, m = self.dim, v.shape[1]
        offsets, signs = self._kron_map(name, m, v.device)
        for c, offset in enumerate(offsets):
            lo, hi = c * k, min(m, (c + 1) * k)
            n1 = min(hi - lo, k - offset)
            out[:, offset : offset + n1].addcmul_(v[:, lo : lo + n1], signs[lo : lo + n1])
            if hi - lo > n1:
                out[:, : hi - lo - n1].addcmul_(v[:, lo + n1 : hi], signs[lo + n1 : hi])

    def project_flat(self, flat: Tensor) -> Tensor:
        """Project a flat ``[B, D]`` gradient laid out in ``param_names`` order."""
        if flat.shape[1] != self.input_dim:
            raise ValueError(f"Expected gradients with {self.input_dim} columns, got {flat.shape[1]}.")
        if self.spec.kind == "kronecker" and self.param_shapes is None:
            raise ValueError(
                "A kronecker projection of flat rows needs `param_shapes` (the matrix view of each block)."
            )
        parts = dict(zip(self.param_names, flat.split(self.param_numels, dim=1)))
        return self.project(parts)

    def _accumulate(self, out: Tensor, g: Tensor, name: str) -> None:
        # ``out`` is the transposed result ``[k, B]``.
        # Generator blocks have a fixed number of coordinates (never dependent on the batch
        # size), so the same coordinate always meets the same random entries.
        numel, batch = g.shape[1], max(1, g.shape[0])
        if self.spec.kind == "sjlt":
            rows = max(1, self.spec.block_elements // self.spec.nnz)
            step = max(1, self.spec.block_elements // batch)
            for block, start in enumerate(range(0, numel, rows)):
                stop = min(start + rows, numel)
                idx, sign = self._sjlt_block(name, block, stop - start, g.device)
                for s0 in range(start, stop, step):
                    s1 = min(s0 + step, stop)
                    gbt = g[:, s0:s1].T.contiguous()
                    for s in range(self.spec.nnz):
                        out.index_add_(0, idx[s0 - start : s1 - start, s], gbt * sign[s0 - start : s1 - start, s, None])
        else:
            rows = max(1, self.spec.block_elements // self.dim)
            for block, start in enumerate(range(0, numel, rows)):
                stop = min(start + rows, numel)
                gen = torch.Generator().manual_seed(_block_seed(self.spec.seed, name, block, self.checkpoint))
                if self.spec.kind == "gaussian":
                    m = torch.randn(stop - start, self.dim, generator=gen)
                else:
                    m = torch.randint(0, 2, (stop - start, self.dim), generator=gen).float().mul_(2).sub_(1)
                m = m.to(g.device).mul_(1.0 / math.sqrt(self.dim))
                out.addmm_(m.T, g[:, start:stop].T)

    def _sjlt_block(self, name: str, block: int, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (name, block)
        cached = self._cache.get(key)
        if cached is not None and cached[0].device == device:
            return cached
        gen = torch.Generator().manual_seed(_block_seed(self.spec.seed, name, block, self.checkpoint))
        idx = torch.randint(0, self.dim, (rows, self.spec.nnz), generator=gen)
        sign = torch.randint(0, 2, (rows, self.spec.nnz), generator=gen).float().mul_(2).sub_(1)
        sign.mul_(1.0 / math.sqrt(self.spec.nnz))
        idx, sign = idx.to(device), sign.to(device)
        cost = idx.numel() * 8 + sign.numel() * 4
        if cost <= self._cache_left:
            self._cache[key] = (idx, sign)
            self._cache_left -= cost
        return idx, sign
