"""Reading a gradient store: the analysis side of the boundary (see :mod:`~lightning_influence.trajectory.store`).

Files are memory-mapped and verified against the checksums recorded while writing, lazily, on
first use; a store that changed under its reader says so instead of mixing two recordings.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from lightning_influence.errors import StoreError
from lightning_influence.gradients.engine import LayerFactors
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.gradients.split import SplitRows
from lightning_influence.trajectory.store import durable
from lightning_influence.trajectory.store.layout import (
    FACTORED_SCHEMA_VERSION,
    GRADS_FILE,
    MANIFEST,
    STORAGE_DTYPES,
    TWO_FILE_FACTORED_SCHEMA_VERSION,
    WEIGHTS_FILE,
    factor_file,
    read_manifest,
)

__all__ = ["GradientStore", "StoredCheckpoint"]


#: Files already verified in this process: (path, inode, size, mtime_ns, expected checksums).
_VERIFIED: set[tuple[Any, ...]] = set()
#: A file modified less than this long ago is re-hashed by every new reader (mtime granularity).
_FRESH_NS = 2_000_000_000


class StoredCheckpoint:
    """One recorded checkpoint: its step, epoch, learning-rate credit, weights and gradient rows.

    Each file is verified against the checksum recorded while writing on its first use, so a
    corrupted file is named instead of silently changing scores; a file that changed under the
    reader (the store was truncated and re-recorded) raises :class:`StoreError` asking for
    :meth:`GradientStore.refresh`.

    Attributes:
        index: position in the trajectory.
        step: ``trainer.global_step`` when recorded.
        epoch: ``trainer.current_epoch`` when recorded.
        eta: the TracIn weight eta_c of the interval ending here (not a learning rate): the sum of
            the learning rates of the optimizer steps taken since the previous checkpoint (steps the
            GradScaler skipped earn nothing), divided by the optimizer steps per epoch -- ``lr x
            epochs`` for a constant learning rate. Kept under the manifest key ``"lr"``.
    """

    def __init__(self, store: GradientStore, entry: Mapping[str, Any]) -> None:
        self._store = store
        self.entry = dict(entry)
        self.index: int = entry["index"]
        self.step: int = entry["step"]
        self.epoch: int = entry["epoch"]
        try:
            self.eta: float = float(entry["lr"])
        except (TypeError, ValueError) as err:
            raise StoreError(
                f"Checkpoint {self.index} of {str(store.path)!r}: `lr` {entry['lr']!r} is not a number."
            ) from err
        self.param_scales: dict[str, float] | None = entry.get("param_scales")
        self.nonfinite: list[int] = list(entry.get("nonfinite", []))
        self.dir = store.path / entry["dir"]
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._layouts: dict[str, tuple[tuple[Any, ...], np.dtype, tuple[int, ...], int]] = {}

    def _check(self, fn: str) -> Path:
        """Verify ``fn`` on first use (and again if it changed on disk); return its path."""
        path = self.dir / fn
        info = self.entry["files"].get(fn)
        if info is None:
            raise self._unlisted(fn)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._store._changed_or_corrupt(self, fn, "is missing")
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, json.dumps(info, sort_keys=True))
        if self._seen.get(fn) == key or key in _VERIFIED:
            self._seen[fn] = key
            return path
        problem = _check_file(path, info, st.st_size)
        if problem:
            self._store._changed_or_corrupt(self, fn, problem)
        if time.time_ns() - st.st_mtime_ns > _FRESH_NS:
            _VERIFIED.add(key)
        self._seen[fn] = key
        return path

    def _load(self, fn: str) -> Tensor:
        path = self._check(fn)
        layout = self._layouts.get(fn)
        try:
            if layout is not None and layout[0] == self._seen[fn]:
                # The header was parsed before: map the data directly (np.load re-parses it and
                # np.memmap resolves the path on every call, a noticeable share of scoring a small
                # store block by block). Copy-on-write, like mmap_mode="c".
                with open(path, "rb") as fh:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                count = math.prod(layout[2])
                arr = np.frombuffer(mapped, dtype=layout[1], count=count, offset=layout[3]).reshape(layout[2])
            else:
                arr = np.load(path, mmap_mode="c")
                if isinstance(arr, np.memmap) and not arr.dtype.hasobject and arr.flags.c_contiguous:
                    self._layouts[fn] = (self._seen[fn], arr.dtype, tuple(arr.shape), int(arr.offset))
        except (ValueError, OSError, EOFError) as err:  # pragma: no cover - caught by the checksum first
            raise StoreError(f"Checkpoint {self.index}: cannot read {str(path)!r}: {err}") from err
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self._store.grad_dtype == torch.bfloat16 else t

    def _unlisted(self, fn: str) -> StoreError:
        return StoreError(
            f"Checkpoint {self.index} of {str(self._store.path)!r}: its manifest entry lists no {fn}; the manifest"
            " is incomplete or was edited."
        )

    def expected_files(self) -> list[str]:
        """The files this checkpoint holds under the store's settings (weights, ``grads.npy``, factor files)."""
        store = self._store
        files = [WEIGHTS_FILE] + ([GRADS_FILE] if not store.factored or store.dense_dim > 0 else [])
        two_files = store.manifest["schema_version"] == TWO_FILE_FACTORED_SCHEMA_VERSION
        for name, info in store.factored.items():
            if "bias_of" not in info:
                files += [factor_file(name, "a"), factor_file(name, "g")] if two_files else [factor_file(name)]
        return files

    def gradients(self) -> Tensor:
        """Gradient rows ``[n_samples, dim]`` in the storage dtype, memory-mapped (copy-on-write).

        Raises:
            StoreError: the store keeps some parameters as factors (``factored_storage=True``): read
                :meth:`block` (split rows) or :meth:`materialized` (full rows, materialised) instead.
        """
        if self._store.factored:
            raise StoreError(
                f"Checkpoint {self.index} of {str(self._store.path)!r} keeps {len(self._store.factored)} parameter(s)"
                f" as layer factors (recorded with factored_storage=True; e.g. {sorted(self._store.factored)[:3]}):"
                " there is no dense gradient matrix to map. Read block(start, stop) (split rows, scored exactly) or"
                " materialized(start, stop) (full rows), or record with factored_storage=False."
            )
        return self._load(GRADS_FILE)

    def dense_gradients(self) -> Tensor:
        """``grads.npy``: ``[n_samples, dense_dim]`` (all of ``dim`` unless the store keeps factors), memory-mapped.

        ``[n_samples, 0]`` for a store that keeps every parameter as factors (it has no ``grads.npy``).
        """
        if self._store.factored and self._store.dense_dim == 0:
            return torch.zeros(self._store.n_samples, 0, dtype=self._store.grad_dtype)
        return self._load(GRADS_FILE)

    def factors(self, name: str) -> tuple[Tensor | None, Tensor]:
        """A factored parameter's inputs ``a`` ``[n, S, d_in]`` and scaled output gradients ``g`` ``[n, S, d_out]``.

        Memory-mapped views of the file, or (where the checkpoint has a per-parameter scale other than
        1) a scaled copy of ``g`` (fp32 for a half-precision store). For a bias kept as its layer's
        ``g``: ``(None, g)`` with that layer's ``g`` (its gradient is ``g.sum(1)``).
        """
        info = self._store.factored.get(name)
        if info is None:
            raise StoreError(
                f"Parameter {name!r} is not stored as factors in {str(self._store.path)!r} (factored:"
                f" {sorted(self._store.factored)[:6]})."
            )
        if "bias_of" in info:
            _, g = self._stored_factors(info["bias_of"])
            return None, self._scaled(name, g)
        a, g = self._stored_factors(name)
        return a, self._scaled(name, g)

    def _stored_factors(self, name: str) -> tuple[Tensor, Tensor]:
        if self._store.manifest["schema_version"] == TWO_FILE_FACTORED_SCHEMA_VERSION:
            return self._load(factor_file(name, "a")), self._load(factor_file(name, "g"))
        both = self._load(factor_file(name))
        d_in = int(self._store.factored[name]["inputs"])
        return both[..., :d_in], both[..., d_in:]

    def _scale(self, name: str) -> float:
        # Version 4 stores g without the per-parameter scale; older stores folded it in when writing.
        if self.param_scales is None or self._store.manifest["schema_version"] < FACTORED_SCHEMA_VERSION:
            return 1.0
        return float(self.param_scales.get(name, 1.0))

    def _scaled(self, name: str, g: Tensor) -> Tensor:
        s = self._scale(name)
        if s == 1.0:
            return g
        return (g.float() if g.element_size() < 4 else g) * s  # half-precision files: scaled in fp32

    def block(self, start: int, stop: int) -> Tensor | SplitRows:
        """Training rows ``[start, stop)`` as stored: a ``[B, dim]`` tensor, or :class:`SplitRows` for a factored store.

        Tensors are views of memory-mapped files in the storage dtype (cast them before scoring); a
        factor ``g`` with a per-parameter scale other than 1 is a scaled copy. A bias kept as its
        layer's ``g`` shares that very tensor where their scales agree.
        """
        if not self._store.factored:
            return self._load(GRADS_FILE)[start:stop]
        dense = self.dense_gradients()[start:stop]
        factors: dict[str, Any] = {}
        stored: dict[str, tuple[Tensor, Tensor]] = {}
        scaled: dict[tuple[str, float], Tensor] = {}
        for name, info in self._store.factored.items():
            owner = info.get("bias_of", name)
            if owner not in stored:
                a, g = self._stored_factors(owner)
                stored[owner] = (a[start:stop], g[start:stop])
            a, g = stored[owner]
            s = self._scale(name)
            if (owner, s) not in scaled:
                scaled[owner, s] = self._scaled(name, g)
            shape = tuple(info["shape"])
            if "bias_of" in info:
                factors[name] = LayerFactors(None, scaled[owner, s], shape)
            else:
                factors[name] = LayerFactors(a, scaled[owner, s], shape, int(info["groups"]))
        names = tuple(self._store.param_names)
        numels = tuple(int(np.prod(self._store.param_shapes[n])) for n in names)
        return SplitRows(dense, factors, names, numels)

    def materialized(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Full gradient rows ``[stop - start, dim]`` (fp32 for a factored store; the stored rows otherwise)."""
        stop = self._store.n_samples if stop is None else stop
        rows = self.block(start, stop)
        return rows.to(dtype=torch.float32).materialize() if isinstance(rows, SplitRows) else rows

    def state(self) -> dict[str, Tensor]:
        """All parameters and buffers at this checkpoint."""
        path = self._check(WEIGHTS_FILE)
        try:
            return load_safetensors(path.read_bytes())
        except Exception as err:  # pragma: no cover - caught by the checksum first
            raise StoreError(f"Checkpoint {self.index}: cannot read {str(path)!r}: {err}") from err

    def weights(self) -> dict[str, Tensor]:
        """The tracked parameters at this checkpoint, name -> tensor."""
        state = self.state()
        return {n: state[n] for n in self._store.param_names}

    def __repr__(self) -> str:
        return f"StoredCheckpoint(index={self.index}, step={self.step}, epoch={self.epoch}, eta={self.eta:.4g})"


def _check_file(path: Path, info: Mapping[str, Any], size: int) -> str | None:
    """What is wrong with ``path`` against its manifest ``info`` (``None``: nothing)."""
    expected = info.get("bytes")
    if expected is not None and size != expected:
        return f"has {size} bytes, expected {expected} ({'truncated' if size < expected else 'grown'})"
    segments = info.get("segments")
    if segments:
        for s in segments:
            if durable.sha256_of(path, s["offset"], s["length"]) != s["sha256"]:
                return f"does not match its checksum (bytes {s['offset']}..{s['offset'] + s['length']})"
        return None
    if durable.sha256_of(path) != info.get("sha256"):
        return "does not match its checksum"
    return None


class GradientStore:
    """A recorded trajectory, opened read-only.

    Args:
        path: the store directory (``TrajectoryRecorder.store_path``).

    Raises:
        StoreError: if there is no store at ``path``, its schema is unknown or its manifest is broken.

    Example::

        store = GradientStore("runs/influence")
        for ckpt in store.checkpoints:
            print(ckpt.step, ckpt.eta, ckpt.gradients().shape)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest (a store being written gains checkpoints)."""
        m = read_manifest(self.path)
        if m["grad_dtype"] not in STORAGE_DTYPES:
            raise StoreError(f"{str(self.path / MANIFEST)!r}: unknown grad_dtype {m['grad_dtype']!r}.")
        self.manifest = m
        self.run_id: str | None = m.get("run_id")
        self.n_samples: int = m["n_samples"]
        self.dim: int = m["dim"]
        #: Factored parameters (exact factored storage) -> ``{"positions", "inputs", "outputs", "groups", "shape"}``.
        self.factored: dict[str, dict[str, Any]] = dict(m.get("factored") or {})
        #: Width of ``grads.npy`` (``dim`` unless some parameters are stored as factors).
        self.dense_dim: int = int(m.get("dense_dim", self.dim)) if self.factored else self.dim
        self.grad_dtype: torch.dtype = STORAGE_DTYPES[m["grad_dtype"]][0]
        self.param_names: list[str] = list(m["param_names"])
        self.param_shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in m["param_shapes"].items()}
        self.projection_spec: ProjectionSpec | None = (
            ProjectionSpec.from_dict(m["projection"]) if m["projection"] is not None else None
        )
        self.noise_seed: int = m["noise_seed"]
        self.precision = GradientPrecision.from_dict(m["precision"])
        self.checkpoints: list[StoredCheckpoint] = [StoredCheckpoint(self, e) for e in m["checkpoints"]]

    def _changed_or_corrupt(self, ckpt: StoredCheckpoint, fn: str, problem: str) -> None:
        """Raise: the store changed under this reader (stale), or ``fn`` is corrupted."""
        try:
            now = read_manifest(self.path)
        except StoreError:
            now = None
        entries = now["checkpoints"] if now is not None else []
        current = entries[ckpt.index] if ckpt.index < len(entries) else None
        stale = (
            now is None
            or now.get("run_id") != self.manifest.get("run_id")
            or current is None
            or current.get("uid") != ckpt.entry.get("uid")
            or current.get("files") != ckpt.entry.get("files")
        )
        if stale:
            what = "was dropped" if now is not None and current is None else "was rewritten"
            raise StoreError(
                f"The gradient store at {str(self.path)!r} changed since this reader opened it: checkpoint"
                f" {ckpt.index} (step {ckpt.step}) {what}. Call refresh() (or open the store again) before scoring."
            )
        raise StoreError(
            f"Checkpoint {ckpt.index}: {fn} {problem} ({str(ckpt.dir / fn)!r}): the store is corrupted (the file"
            " changed after it was recorded). Restore the file or record the run again."
        )

    def projector(self, checkpoint: int = 0) -> RandomProjection | None:
        """The projection checkpoint ``checkpoint``'s gradients went through (``None`` for exact gradients)."""
        if self.projection_spec is None:
            return None
        shapes = {n: self.param_shapes[n] for n in self.param_names}
        return RandomProjection.for_shapes(self.projection_spec, shapes, checkpoint=checkpoint)

    def verify(self) -> None:
        """Recompute every file's checksum; raise :class:`StoreError` on a mismatch."""
        for ckpt in self.checkpoints:
            for fn in ckpt.expected_files():
                if fn not in ckpt.entry["files"]:
                    raise ckpt._unlisted(fn)
            for fn, info in ckpt.entry["files"].items():
                p = ckpt.dir / fn
                problem = "is missing" if not p.is_file() else _check_file(p, info, p.stat().st_size)
                if problem:
                    raise StoreError(
                        f"Checkpoint {ckpt.index}: {fn} is missing or does not match its checksum ({str(p)!r} {problem})."
                    )

    @property
    def row_values(self) -> int:
        """Values stored per training sample and checkpoint (``dim``, less with factored storage)."""
        return self.dense_dim + sum(
            int(f["positions"]) * (int(f["inputs"]) + int(f["outputs"]))
            for f in self.factored.values()
            if "bias_of" not in f
        )

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __repr__(self) -> str:
        proj = f"projected to {self.dim}" if self.projection_spec else f"exact, dim {self.dim}"
        if self.factored:
            biases = sum("bias_of" in f for f in self.factored.values())
            proj += f", {len(self.factored) - biases} parameter(s) as factors"
            proj += f" (+{biases} bias(es) with them)" if biases else ""
        return (
            f"GradientStore({str(self.path)!r}: {len(self.checkpoints)} checkpoints, {self.n_samples} samples, {proj},"
            f" {self.manifest['grad_dtype']})"
        )
