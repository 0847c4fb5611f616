"""The gradient store: the boundary between training (writes) and analysis (reads).

Layout of a store directory::

    manifest.json                 schema version, parameters, projection, dtype, checkpoints, checksums
    ckpt-00000/grads.npy          [n_samples, dim] gradient rows (numpy .npy, memory-mapped on read)
    ckpt-00000/weights.safetensors all parameters and buffers at that checkpoint
    .tmp-ckpt-00001/              a checkpoint being written (never listed)

A checkpoint becomes visible only after its directory is complete (written, fsynced and renamed)
and the manifest listing it has been atomically replaced, so a reader can open the store while
training goes on and a checkpoint killed mid-write is never listed.

bfloat16 rows are stored as ``uint16`` bit patterns (numpy has no bfloat16); the manifest's
``grad_dtype`` says how to view them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_influence.errors import StoreError
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection

__all__ = ["GradientStore", "GradientStoreWriter", "StoredCheckpoint"]

SCHEMA_VERSION = 1
FORMAT = "lightning_influence.gradient_store"
MANIFEST = "manifest.json"
GRADS_FILE = "grads.npy"
WEIGHTS_FILE = "weights.safetensors"

_STORAGE = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical storage dtype name (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
    name = str(dtype).replace("torch.", "")
    if name not in _STORAGE:
        raise ValueError(f"`grad_dtype` must be one of float32, float16, bfloat16; got {dtype!r}.")
    return name


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class StoreHeader:
    """What every checkpoint of a store shares."""

    n_samples: int
    dim: int
    grad_dtype: str
    param_names: list[str]
    param_shapes: dict[str, list[int]]
    projection: dict[str, Any] | None
    noise_seed: int
    precision: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "dim": self.dim,
            "grad_dtype": self.grad_dtype,
            "param_names": self.param_names,
            "param_shapes": self.param_shapes,
            "projection": self.projection,
            "noise_seed": self.noise_seed,
            "precision": self.precision,
            "extra": self.extra,
        }


class GradientStoreWriter:
    """Appends checkpoints to a store directory (training side).

    Args:
        path: the store directory (created if missing).
        header: the store's shared description.
        overwrite: replace an existing store at ``path``; otherwise an existing store with the
            same header is appended to and one with a different header raises.
    """

    def __init__(self, path: str | os.PathLike, header: StoreHeader, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.header = header
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and overwrite:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            existing = json.loads(manifest_path.read_text())
            if existing.get("format") != FORMAT or existing.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} holds a manifest of another format or schema version"
                    f" ({existing.get('format')!r} v{existing.get('schema_version')}); use a new `dirpath`."
                )
            mine = header.to_dict()
            if any(existing.get(k) != v for k, v in mine.items() if k != "extra"):
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} already holds a gradient store recorded with different settings"
                    " (parameters, projection, dtype or sample count). Use a new `dirpath`, or overwrite=True to"
                    " replace it."
                )
            self.manifest = existing
        else:
            self.manifest = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                **header.to_dict(),
                "checkpoints": [],
            }
            _write_json_atomic(manifest_path, self.manifest)

    @property
    def n_checkpoints(self) -> int:
        return len(self.manifest["checkpoints"])

    def truncate(self, n_checkpoints: int) -> list[dict[str, Any]]:
        """Keep only the first ``n_checkpoints`` (a resumed run abandons what came after its checkpoint).

        The manifest is replaced atomically first, so a crash in between leaves at worst unlisted
        directories, which the next :meth:`begin_checkpoint` clears.

        Returns:
            The manifest entries that were dropped.
        """
        if not 0 <= n_checkpoints <= self.n_checkpoints:
            raise StoreError(f"Cannot truncate {self.n_checkpoints} checkpoints to {n_checkpoints}.")
        dropped = self.manifest["checkpoints"][n_checkpoints:]
        if dropped:
            self.manifest["checkpoints"] = self.manifest["checkpoints"][:n_checkpoints]
            _write_json_atomic(self.path / MANIFEST, self.manifest)
            for entry in dropped:
                shutil.rmtree(self.path / entry["dir"], ignore_errors=True)
        return dropped

    def begin_checkpoint(self) -> CheckpointWriter:
        """Start writing the next checkpoint into a hidden temporary directory."""
        index = self.n_checkpoints
        name = f"ckpt-{index:05d}"
        tmp = self.path / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        stale = self.path / name  # a directory renamed before a crash, never listed
        if stale.exists():
            shutil.rmtree(stale)
        tmp.mkdir()
        return CheckpointWriter(self, index, name, tmp)

    def _commit(self, entry: dict[str, Any]) -> None:
        self.manifest["checkpoints"].append(entry)
        _write_json_atomic(self.path / MANIFEST, self.manifest)


class CheckpointWriter:
    """Writes one checkpoint's gradient rows and weights; :meth:`commit` publishes it."""

    def __init__(self, store: GradientStoreWriter, index: int, name: str, tmp: Path) -> None:
        self.store, self.index, self.name, self.tmp = store, index, name, tmp
        h = store.header
        self._torch_dtype, np_dtype = _STORAGE[h.grad_dtype]
        self._rows = np.lib.format.open_memmap(tmp / GRADS_FILE, mode="w+", dtype=np_dtype, shape=(h.n_samples, h.dim))
        self._written = np.zeros(h.n_samples, dtype=bool)

    def write_rows(self, ids: Tensor, rows: Tensor) -> None:
        """Store ``rows`` ``[B, dim]`` (any float dtype) at positions ``ids``."""
        ids_np = ids.detach().cpu().numpy()
        r = rows.detach().to(self._torch_dtype).cpu()
        arr = r.view(torch.int16).numpy().view(np.uint16) if self._torch_dtype == torch.bfloat16 else r.numpy()
        self._rows[ids_np] = arr
        self._written[ids_np] = True

    def commit(self, state: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Write the weights, checksum both files, rename into place and list the checkpoint."""
        missing_meta = [key for key in ("step", "epoch", "lr") if key not in meta]
        if missing_meta:
            raise StoreError(f"Checkpoint {self.index}: metadata lacks {missing_meta}; nothing was listed.")
        if not self._written.all():
            missing = int((~self._written).sum())
            raise StoreError(
                f"Checkpoint {self.index}: {missing} of {len(self._written)} sample rows were never written."
            )
        self._rows.flush()
        with open(self.tmp / GRADS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        del self._rows
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(self.tmp / WEIGHTS_FILE))
        files = {
            fn: {"sha256": _sha256(self.tmp / fn), "bytes": (self.tmp / fn).stat().st_size}
            for fn in (GRADS_FILE, WEIGHTS_FILE)
        }
        _fsync_dir(self.tmp)
        final = self.store.path / self.name
        os.rename(self.tmp, final)
        _fsync_dir(self.store.path)
        entry = {
            "index": self.index,
            "dir": self.name,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            **dict(meta),
            "files": files,
        }
        self.store._commit(entry)
        return entry

    def abort(self) -> None:
        """Drop the partial checkpoint (nothing listed is touched)."""
        if hasattr(self, "_rows"):
            del self._rows
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoredCheckpoint:
    """One recorded checkpoint: its step, epoch, learning-rate credit, weights and gradient rows.

    Attributes:
        index: position in the trajectory.
        step: ``trainer.global_step`` when recorded.
        epoch: ``trainer.current_epoch`` when recorded.
        lr: the TracIn weight eta_c of the interval ending here: the sum of the learning rates of
            the optimizer steps taken since the previous checkpoint (steps the GradScaler skipped
            earn nothing), divided by the optimizer steps per epoch -- ``lr x epochs`` for a
            constant learning rate.
    """

    def __init__(self, store: GradientStore, entry: Mapping[str, Any]) -> None:
        self._store = store
        self.entry = dict(entry)
        self.index: int = entry["index"]
        self.step: int = entry["step"]
        self.epoch: int = entry["epoch"]
        self.lr: float = float(entry["lr"])
        self.param_scales: dict[str, float] | None = entry.get("param_scales")
        self.nonfinite: list[int] = list(entry.get("nonfinite", []))
        self.dir = store.path / entry["dir"]

    def gradients(self) -> Tensor:
        """Gradient rows ``[n_samples, dim]`` in the storage dtype, memory-mapped (copy-on-write)."""
        arr = np.load(self.dir / GRADS_FILE, mmap_mode="c")
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self._store.grad_dtype == torch.bfloat16 else t

    def state(self) -> dict[str, Tensor]:
        """All parameters and buffers at this checkpoint."""
        return load_file(str(self.dir / WEIGHTS_FILE))

    def weights(self) -> dict[str, Tensor]:
        """The tracked parameters at this checkpoint, name -> tensor."""
        state = self.state()
        return {n: state[n] for n in self._store.param_names}

    def __repr__(self) -> str:
        return f"StoredCheckpoint(index={self.index}, step={self.step}, epoch={self.epoch}, lr={self.lr:.4g})"


class GradientStore:
    """A recorded trajectory, opened read-only.

    Args:
        path: the store directory (``TrajectoryRecorder.store_path``).

    Raises:
        StoreError: if there is no store at ``path`` or its schema is unknown.

    Example::

        store = GradientStore("runs/influence")
        for ckpt in store.checkpoints:
            print(ckpt.step, ckpt.lr, ckpt.gradients().shape)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest (a store being written gains checkpoints)."""
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"No gradient store at {str(self.path)!r} (missing {MANIFEST}).")
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT:
            raise StoreError(f"{str(mpath)!r} is not a lightning_influence gradient store manifest.")
        if m.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"Store schema version {m.get('schema_version')} is not supported (this version reads {SCHEMA_VERSION})."
            )
        self.manifest = m
        self.n_samples: int = m["n_samples"]
        self.dim: int = m["dim"]
        self.grad_dtype: torch.dtype = _STORAGE[m["grad_dtype"]][0]
        self.param_names: list[str] = list(m["param_names"])
        self.param_shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in m["param_shapes"].items()}
        self.projection_spec: ProjectionSpec | None = (
            ProjectionSpec.from_dict(m["projection"]) if m["projection"] is not None else None
        )
        self.noise_seed: int = m["noise_seed"]
        self.precision = GradientPrecision.from_dict(m["precision"])
        self.checkpoints: list[StoredCheckpoint] = [StoredCheckpoint(self, e) for e in m["checkpoints"]]

    def projector(self, checkpoint: int = 0) -> RandomProjection | None:
        """The projection checkpoint ``checkpoint``'s gradients went through (``None`` for exact gradients)."""
        if self.projection_spec is None:
            return None
        numels = [int(np.prod(self.param_shapes[n])) for n in self.param_names]
        return RandomProjection(self.projection_spec, self.param_names, numels, checkpoint=checkpoint)

    def verify(self) -> None:
        """Recompute every file's checksum; raise :class:`StoreError` on a mismatch."""
        for ckpt in self.checkpoints:
            for fn, info in ckpt.entry["files"].items():
                p = ckpt.dir / fn
                if not p.is_file() or _sha256(p) != info["sha256"]:
                    raise StoreError(f"Checkpoint {ckpt.index}: {fn} is missing or does not match its checksum.")

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __repr__(self) -> str:
        proj = f"projected to {self.dim}" if self.projection_spec else f"exact, dim {self.dim}"
        return (
            f"GradientStore({str(self.path)!r}: {len(self.checkpoints)} checkpoints, {self.n_samples} samples, {proj},"
            f" {self.manifest['grad_dtype']})"
        )


def header_for(
    n_samples: int,
    param_names: Sequence[str],
    param_shapes: Mapping[str, Sequence[int]],
    grad_dtype: str,
    projection: ProjectionSpec | None,
    noise_seed: int,
    precision: GradientPrecision,
    extra: Mapping[str, Any] | None = None,
) -> StoreHeader:
    dim = projection.dim if projection is not None else int(sum(np.prod(param_shapes[n]) for n in param_names))
    return StoreHeader(
        n_samples=int(n_samples),
        dim=dim,
        grad_dtype=dtype_name(grad_dtype),
        param_names=list(param_names),
        param_shapes={n: [int(s) for s in param_shapes[n]] for n in param_names},
        projection=projection.to_dict() if projection is not None else None,
        noise_seed=int(noise_seed),
        precision=precision.to_dict(),
        extra=dict(extra or {}),
    )
