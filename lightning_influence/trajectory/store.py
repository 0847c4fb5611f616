"""The gradient store: the boundary between training (writes) and analysis (reads).

Layout of a store directory::

    manifest.json                  schema version, run id, parameters, projection, dtype, checkpoints, checksums
    ckpt-00000/grads.npy           [n_samples, dim] gradient rows (numpy .npy, memory-mapped on read)
    ckpt-00000/f.<param>.npy       [n_samples, S, d_in + d_out]  exact factored storage only, one file per
                                   factored parameter: layer inputs a, then output gradients g
    ckpt-00000/weights.safetensors all parameters and buffers at that checkpoint
    .tmp-ckpt-00001/               a checkpoint being written (never listed)

A checkpoint becomes visible only after its directory is complete (written, fsynced and renamed)
and the manifest listing it has been atomically replaced, so a reader can open the store while
training goes on and a checkpoint killed mid-write is never listed.

Writes are ordinary file writes (``pwrite``) into a file preallocated with ``posix_fallocate``,
never a growing memory map: a full disk raises an :class:`OSError` naming the store and the space
needed (the partial checkpoint is removed, earlier ones are untouched) instead of killing the
process with SIGBUS. The writes, their checksums and the weights run behind the computation on one
background thread (:class:`~lightning_influence.trajectory.write_behind.WriteBehind`, flushing to
disk as it goes): the next batch's gradients are computed meanwhile, and a checkpoint's rows are
durable (drained and fsynced) before it can be listed.

Under DDP every rank writes a disjoint, contiguous range of rows of the same ``grads.npy``
(:meth:`GradientStoreWriter.open_shard`); rank 0 creates and preallocates the file, then lists the
checkpoint after all ranks reported. Checksums are computed while writing, one SHA-256 per
contiguous segment (the whole file in a single process, one segment per rank under DDP), and
readers verify each file lazily on its first use.

A store belongs to one run: the manifest's ``run_id`` is also kept in the recorder's Lightning
state, so a resumed fit appends to its own run and a fresh fit never appends to another's.

**Exact factored storage** (``TrajectoryRecorder(factored_storage=True)``, exact rows only): a
parameter whose factors are smaller than its gradient (``S (d_in + d_out) < d_in d_out / G`` values
per sample, e.g. a Linear layer without positions) is stored as its layer inputs ``a`` and output
gradients ``g`` side by side in one file ``f.<param>.npy`` (``[n, S, d_in + d_out]``: one file, one
fsync, per parameter), and ``grads.npy`` holds only the other parameters' columns (``dense_dim`` wide,
in ``param_names`` order). The bias of such a layer is not stored at all: its per-sample gradient is
``sum_s g_s`` of the layer's ``g`` (the manifest says ``{"bias_of": <weight>, "shape"}``), and scoring
folds it into the weight's Gram matrices. ``g`` is stored without the per-parameter learning-rate
scale (divided by the loss scale only), so a bias and its weight share it even when their parameter
groups differ; readers apply the checkpoint's ``param_scales``. The manifest's ``factored`` maps each
stored parameter to ``{"positions", "inputs", "outputs", "groups", "shape"}``, and such a store has
``schema_version`` 4 (a reader that does not know it refuses it instead of misreading it). Older
factored stores are still read: version 3 (``g`` with the scale folded in, biases in ``grads.npy``) and
version 2 (``a`` and ``g`` in two files, ``a.<param>.npy`` and ``g.<param>.npy``). A store without
factors is written exactly as before (version 1). Factor files are written, checked and sharded across
DDP ranks like ``grads.npy``.

bfloat16 rows are stored as ``uint16`` bit patterns (numpy has no bfloat16); the manifest's
``grad_dtype`` says how to view them.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import functools
import hashlib
import io
import json
import math
import mmap
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lightning_influence.errors import StoreError
from lightning_influence.gradients.engine import LayerFactors
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.gradients.split import SplitRows
from lightning_influence.trajectory.write_behind import WriteBehind, WriteThread

__all__ = [
    "CheckpointWriter",
    "GradientStore",
    "GradientStoreWriter",
    "RowsWriter",
    "ShardWriter",
    "StoredCheckpoint",
    "factor_file",
]

SCHEMA_VERSION = 1
#: The schema of a store with factored parameters (exact factored storage); it reads like version 1 otherwise.
FACTORED_SCHEMA_VERSION = 4
#: Factored stores with the per-parameter scale folded into ``g`` and biases in ``grads.npy`` (read, no longer written).
SCALED_FACTORED_SCHEMA_VERSION = 3
#: The first factored schema: as version 3, with ``a`` and ``g`` of a parameter in two files (read, no longer written).
TWO_FILE_FACTORED_SCHEMA_VERSION = 2
FORMAT = "lightning_influence.gradient_store"
MANIFEST = "manifest.json"
GRADS_FILE = "grads.npy"
WEIGHTS_FILE = "weights.safetensors"

_STORAGE = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
}

#: Directory entries a store writes; anything else in a store directory belongs to someone else.
_OWN_ENTRY = re.compile(r"^(manifest\.json|manifest\.json\.tmp-.+|ckpt-\d{5,}|\.tmp-ckpt-\d{5,})$")
_DEBRIS = re.compile(r"^(manifest\.json\.tmp-.+|\.tmp-ckpt-\d{5,})$")
_CKPT_DIR = re.compile(r"^ckpt-\d{5,}$")
#: errno values that mean "the disk (or quota) is full".
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_HEADER_KEYS = (
    "n_samples",
    "dim",
    "grad_dtype",
    "param_names",
    "param_shapes",
    "projection",
    "noise_seed",
    "precision",
)
_ENTRY_KEYS = ("index", "dir", "step", "epoch", "lr", "files")


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical storage dtype name (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
    name = str(dtype).replace("torch.", "")
    if name not in _STORAGE:
        raise ValueError(f"`grad_dtype` must be one of float32, float16, bfloat16; got {dtype!r}.")
    return name


def new_run_id() -> str:
    """A fresh run identifier (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def _sha256(path: Path, start: int = 0, length: int | None = None, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            block = f.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
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


@functools.cache
def _sync_file_range() -> Any:
    """glibc's ``sync_file_range`` (Linux; Python's ``os`` does not wrap it), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2
_writeback_hint = True


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` to disk now, without waiting.

    A hint (the fsync before a checkpoint is listed still makes it durable): the rows written while
    later batches are computed are then mostly on disk by the time that fsync runs (on this project's
    2-core VM, 0.9 ms instead of 2.8 ms for a 3.3 MB checkpoint). Pages stay cached for readers.
    """
    global _writeback_hint
    fn = _sync_file_range() if _writeback_hint else None
    if fn is not None and fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        _writeback_hint = False  # not supported by this filesystem: stop asking


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def _space_error(err: OSError, store: Path, what: str, needed: int) -> OSError:
    """The OSError a full disk becomes: it names the store, what was written and the space needed."""
    free = _free_bytes(store if store.exists() else store.parent)
    out = OSError(
        err.errno,
        f"Not enough disk space for the gradient store at {str(store)!r} while writing {what}: it needs"
        f" {needed} bytes ({_mb(needed)}), {_mb(free)} free ({os.strerror(err.errno or 0)}). The partial checkpoint"
        " was removed; checkpoints listed earlier are intact. Free space (or move `dirpath`) and resume from the last"
        " Lightning checkpoint.",
    )
    out.filename = str(store)
    return out


def _wrap_os_error(err: OSError, store: Path, what: str, needed: int) -> OSError:
    if err.errno not in _SPACE_ERRNOS or getattr(err, "store_message", False):
        return err
    out = _space_error(err, store, what, needed)
    out.store_message = True  # type: ignore[attr-defined]  # raised again through a finish: not re-wrapped
    return out


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes on disk (``posix_fallocate``), so a full disk fails here and not mid-write."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # pragma: no cover - platforms without posix_fallocate
        os.ftruncate(fd, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            # Filesystems without fallocate: a sparse file; a full disk then fails a pwrite (an OSError too).
            os.ftruncate(fd, size)
        else:
            raise


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises instead
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``: preallocated, written with ordinary writes, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _preallocate(fd, len(data))
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_text(payload: Mapping[str, Any]) -> str:
    """JSON of a manifest: the header indented, then one line per checkpoint.

    The entries go through the C encoder (``indent`` forces json's pure-Python one, which took
    milliseconds per commit once a run had a few dozen checkpoints, and grows with every one).
    """
    entries = payload.get("checkpoints")
    head = {k: v for k, v in payload.items() if k != "checkpoints"}
    if not isinstance(entries, list) or not head:
        return json.dumps(payload, indent=1)
    text = json.dumps(head, indent=1)
    lines = ",\n  ".join(json.dumps(e, separators=(", ", ": ")) for e in entries)
    body = f"[\n  {lines}\n ]" if entries else "[]"
    return f'{text[:-2]},\n "checkpoints": {body}\n}}'


def _write_json_atomic(path: Path, payload: Mapping[str, Any], store: Path | None = None) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    data = _manifest_text(payload).encode()
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _wrap_os_error(err, store or path.parent, f"{path.name}", len(data)) from err
    _fsync_dir(path.parent)


def _npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``manifest.json``; every way it can be broken becomes a :class:`StoreError` naming it."""
    mpath = path / MANIFEST
    try:
        text = mpath.read_text()
    except FileNotFoundError as err:
        raise StoreError(f"No gradient store at {str(path)!r} (missing {MANIFEST}).") from err
    except OSError as err:
        raise StoreError(f"Cannot read {str(mpath)!r}: {err}") from err
    try:
        m = json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{str(mpath)!r} is not valid JSON ({err.msg} at character {err.pos} of {len(text)}): the manifest is"
            " truncated or corrupted. Restore it from a backup or record again."
        ) from err
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{str(mpath)!r} is not a lightning_influence gradient store manifest.")
    readable = (
        SCHEMA_VERSION,
        TWO_FILE_FACTORED_SCHEMA_VERSION,
        SCALED_FACTORED_SCHEMA_VERSION,
        FACTORED_SCHEMA_VERSION,
    )
    if m.get("schema_version") not in readable:
        raise StoreError(
            f"Store schema version {m.get('schema_version')} is not supported (this version reads"
            f" {', '.join(map(str, readable))})."
        )
    missing = [k for k in (*_HEADER_KEYS, "checkpoints") if k not in m]
    if missing:
        raise StoreError(f"{str(mpath)!r} lacks the entries {missing}: the manifest is incomplete or was edited.")
    for i, entry in enumerate(m["checkpoints"]):
        lacking = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise StoreError(
                f"{str(mpath)!r}: checkpoint entry {i} lacks {lacking}: the manifest is incomplete or was edited."
            )
    return m


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
    #: Exact factored storage: parameter -> ``{"positions", "inputs", "outputs", "groups", "shape"}``, or for a
    #: bias folded into its layer's factors ``{"bias_of": <weight>, "shape"}`` (``None``: none).
    factored: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
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
        if self.factored:
            out["factored"] = self.factored
            out["dense_dim"] = self.dense_dim
        return out

    @property
    def schema_version(self) -> int:
        return FACTORED_SCHEMA_VERSION if self.factored else SCHEMA_VERSION

    @property
    def dense_dim(self) -> int:
        """Width of ``grads.npy``: ``dim`` less the factored parameters' sizes."""
        factored = self.factored or {}
        return self.dim - sum(math.prod(factored[n]["shape"]) for n in factored)

    @functools.cached_property
    def _files(self) -> dict[str, tuple[tuple[int, ...], bytes, int]]:
        # fn -> (one sample's shape, .npy header, bytes per sample); asked for on every batch written.
        # A factored store whose every parameter is kept as factors has no grads.npy.
        rows: dict[str, tuple[int, ...]] = {GRADS_FILE: (self.dense_dim,)} if self.has_dense_file else {}
        for name in self.param_names:
            info = (self.factored or {}).get(name)
            if info is not None and "bias_of" not in info:
                rows[factor_file(name)] = (int(info["positions"]), int(info["inputs"]) + int(info["outputs"]))
        dtype = np.dtype(_STORAGE[self.grad_dtype][1])
        return {
            fn: (shape, _npy_header(dtype, (self.n_samples, *shape)), math.prod(shape) * dtype.itemsize)
            for fn, shape in rows.items()
        }

    @property
    def has_dense_file(self) -> bool:
        """Whether checkpoints have a ``grads.npy`` (not when every parameter is kept as factors)."""
        return not self.factored or self.dense_dim > 0

    def file_rows(self) -> dict[str, tuple[int, ...]]:
        """Every gradient file of a checkpoint -> the shape of one sample's entry (``grads.npy`` first, if any)."""
        return {fn: f[0] for fn, f in self._files.items()}

    def file_header(self, fn: str = GRADS_FILE) -> bytes:
        return self._files[fn][1]

    def file_row_bytes(self, fn: str = GRADS_FILE) -> int:
        return self._files[fn][2]

    def file_bytes(self, fn: str = GRADS_FILE) -> int:
        return len(self.file_header(fn)) + self.n_samples * self.file_row_bytes(fn)

    @property
    def total_bytes(self) -> int:
        """Bytes of all gradient files of one checkpoint."""
        return sum(self.file_bytes(fn) for fn in self.file_rows())

    @property
    def row_bytes(self) -> int:
        return self.file_row_bytes(GRADS_FILE)

    @property
    def npy_header(self) -> bytes:
        return self.file_header(GRADS_FILE)

    @property
    def grads_bytes(self) -> int:
        return self.file_bytes(GRADS_FILE)


def factor_file(param: str, which: str | None = None) -> str:
    """The file of a factored parameter: ``f.<param>.npy`` (inputs then output gradients on the last axis).

    ``which="a"`` / ``"g"`` name the two files of a version-2 store, which kept them apart.
    """
    if which is None:
        return f"f.{param}.npy"
    if which not in ("a", "g"):
        raise ValueError(f"`which` must be None, 'a' or 'g', got {which!r}.")
    return f"{which}.{param}.npy"


def shard_bounds(n_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` rank ``rank`` of ``world_size`` records (no padding, no overlap)."""
    return n_samples * rank // world_size, n_samples * (rank + 1) // world_size


class GradientStoreWriter:
    """Appends checkpoints to a store directory (training side).

    Args:
        path: the store directory (created if missing). A directory holding anything the store
            did not write is refused.
        header: the store's shared description.
        overwrite: replace an existing store at ``path``, deleting only what the store wrote
            (``manifest.json``, ``ckpt-*``, temporary files).
        run_id: append only to the store of this run (a resumed fit); a store of another run is refused.
        new_run: the caller starts a new run: an existing store at ``path`` is refused (unless
            ``overwrite``) instead of appended to, so two runs never mix.
        attach: open an existing store of run ``run_id`` without changing anything on disk (the
            other ranks under DDP, which only write their rows through :meth:`open_shard`).

    Stray temporary files of a crashed writer (``.tmp-ckpt-*``, ``manifest.json.tmp-*`` and
    checkpoint directories renamed but never listed) are removed when a store is opened for writing.

    Raises:
        StoreError: the directory holds other files, another store, another run, a store with
            other settings, or a broken manifest.
        OSError: the disk is full (the message names the store and the space needed).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        header: StoreHeader,
        overwrite: bool = False,
        *,
        run_id: str | None = None,
        new_run: bool = False,
        attach: bool = False,
    ) -> None:
        self.path = Path(path)
        self.header = header
        # One background writer thread for every checkpoint of this store (not one started per checkpoint).
        self._write_thread = WriteThread()
        if attach:
            self.manifest = _read_manifest(self.path)
            if self.manifest.get("run_id") != run_id:
                raise StoreError(
                    f"The gradient store at {str(self.path)!r} belongs to run {self.manifest.get('run_id')!r},"
                    f" not {run_id!r}."
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"`dirpath` {str(self.path)!r} exists and is not a directory.")
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        foreign = [e for e in entries if not _OWN_ENTRY.match(e)]
        if foreign:
            raise StoreError(
                f"`dirpath` {str(self.path)!r} holds files the gradient store did not write ({foreign[:5]}"
                f"{' ...' if len(foreign) > 5 else ''}); refusing to {'overwrite' if overwrite else 'write into'} it."
                " Use an empty or new directory for the store."
            )
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and overwrite:
            self._remove_own(entries)
        elif manifest_path.exists():
            existing = _read_manifest(self.path)
            mine = header.to_dict()
            if existing.get("factored") and header.factored and existing.get("schema_version") != header.schema_version:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} holds a gradient store of schema version"
                    f" {existing.get('schema_version')}, written by an older lightning_influence; this version"
                    f" appends only to version {header.schema_version}. Record to a new `dirpath`, or overwrite=True"
                    " to replace it."
                )
            if any(existing.get(k) != v for k, v in mine.items() if k != "extra"):
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} already holds a gradient store recorded with different settings"
                    " (parameters, projection, dtype or sample count). Use a new `dirpath`, or overwrite=True to"
                    " replace it."
                )
            steps = [c["step"] for c in existing["checkpoints"]]
            if new_run:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} already holds a gradient store of run {existing.get('run_id')!r}"
                    f" ({len(steps)} checkpoint(s) at steps {steps[:8]}{'...' if len(steps) > 8 else ''}); a new fit"
                    " would mix two runs. Resume that run with trainer.fit(..., ckpt_path=...), pass overwrite=True to"
                    " replace it, or use a new `dirpath`."
                )
            if run_id is not None and existing.get("run_id") != run_id:
                raise StoreError(
                    f"The gradient store at {str(self.path)!r} belongs to run {existing.get('run_id')!r}, but the"
                    f" Lightning checkpoint being resumed was recorded by run {run_id!r}: refusing to mix them."
                )
            self.manifest = existing
            self._clean_debris()
            return
        else:
            self._remove_own(entries)  # only debris of a writer killed before its first manifest
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format": FORMAT,
            "schema_version": header.schema_version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "run_id": run_id or new_run_id(),
            **header.to_dict(),
            "checkpoints": [],
        }
        _write_json_atomic(manifest_path, self.manifest, self.path)

    def _remove_own(self, entries: Sequence[str]) -> None:
        # The manifest goes first: from then on the directory is no store, only debris.
        if MANIFEST in entries:
            (self.path / MANIFEST).unlink()
            _fsync_dir(self.path)
        for name in entries:
            p = self.path / name
            if name != MANIFEST and _OWN_ENTRY.match(name):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def _clean_debris(self) -> None:
        listed = {c["dir"] for c in self.manifest["checkpoints"]}
        for p in self.path.iterdir():
            if _DEBRIS.match(p.name) or (_CKPT_DIR.match(p.name) and p.name not in listed):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def n_checkpoints(self) -> int:
        return len(self.manifest["checkpoints"])

    def truncate(self, n_checkpoints: int) -> list[dict[str, Any]]:
        """Keep only the first ``n_checkpoints`` (a resumed run abandons what came after its checkpoint).

        The manifest is replaced atomically first, so a crash in between leaves at worst unlisted
        directories, which the next opening for writing clears.

        Returns:
            The manifest entries that were dropped.
        """
        if not 0 <= n_checkpoints <= self.n_checkpoints:
            raise StoreError(f"Cannot truncate {self.n_checkpoints} checkpoints to {n_checkpoints}.")
        dropped = self.manifest["checkpoints"][n_checkpoints:]
        if dropped:
            kept = self.manifest["checkpoints"][:n_checkpoints]
            _write_json_atomic(self.path / MANIFEST, {**self.manifest, "checkpoints": kept}, self.path)
            self.manifest["checkpoints"] = kept
            for entry in dropped:
                shutil.rmtree(self.path / entry["dir"], ignore_errors=True)
        return dropped

    def begin_checkpoint(self, stop: int | None = None) -> CheckpointWriter:
        """Start writing the next checkpoint into a hidden temporary directory.

        ``grads.npy`` is created at its full size (``posix_fallocate``), so a full disk fails here.

        Args:
            stop: this process writes rows ``[0, stop)`` (rank 0's shard under DDP; default: all rows).

        Raises:
            OSError: out of disk space (nothing is left behind).
        """
        index = self.n_checkpoints
        name = f"ckpt-{index:05d}"
        tmp = self.path / f".tmp-{name}"
        for stale in (tmp, self.path / name):  # debris of a crash, never listed
            if stale.exists():
                shutil.rmtree(stale)
        try:
            tmp.mkdir()
            return CheckpointWriter(self, index, name, tmp, stop)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            what = ", ".join(self.header.file_rows())
            raise _wrap_os_error(err, self.path, f"checkpoint {index} ({what})", self.header.total_bytes) from err

    def open_shard(self, index: int, start: int, stop: int) -> ShardWriter | RowsWriter:
        """Open rows ``[start, stop)`` of checkpoint ``index``'s ``grads.npy``, created by :meth:`begin_checkpoint`.

        Used by the other ranks under DDP, after rank 0 began the checkpoint. With factored
        storage, the same rows of every factor file too (a :class:`RowsWriter`).
        """
        writers: dict[str, ShardWriter] = {}
        behind = WriteBehind(thread=self._write_thread)
        single = not self.header.factored
        try:
            for fn, shape in self.header.file_rows().items():
                path = self.path / f".tmp-ckpt-{index:05d}" / fn
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError as err:
                    raise StoreError(
                        f"{str(path)!r} (created by rank 0) is not visible here: `dirpath` must be on a filesystem"
                        " every rank shares."
                    ) from err
                writers[fn] = ShardWriter(
                    self, fd, start, stop, fname=fn, row_shape=shape, behind=behind, owns_behind=single
                )
        except BaseException:
            for w in writers.values():
                w.close()
            behind.close()
            raise
        return writers[GRADS_FILE] if single else RowsWriter(writers, behind)

    def _commit(self, entry: dict[str, Any]) -> None:
        _write_json_atomic(
            self.path / MANIFEST, {**self.manifest, "checkpoints": [*self.manifest["checkpoints"], entry]}, self.path
        )
        self.manifest["checkpoints"].append(entry)


class ShardWriter:
    """Writes the rows ``[start, stop)`` of one checkpoint's ``grads.npy`` (or of one factor file) with ordinary writes.

    The SHA-256 of the segment is computed while writing when rows arrive in order (the recorder
    writes them so); rows written out of order are hashed by reading the segment back on :meth:`finish`.
    With ``behind``, writes and hash updates run on its background thread (write-behind) and
    :meth:`write_rows` returns at once: the rows passed must not be modified afterwards.

    Args:
        store: the store being written.
        fd: the file, opened for writing (closed by :meth:`finish` / :meth:`close`).
        start, stop: the sample rows this writer holds.
        fname: the file's name in the checkpoint directory (for messages and the header).
        row_shape: one sample's entry (``(dim,)`` for ``grads.npy``, ``(S, d)`` for a factor file).
        behind: the checkpoint's write-behind queue (``None``: write synchronously).
        owns_behind: close ``behind`` with this writer.
    """

    def __init__(
        self,
        store: GradientStoreWriter,
        fd: int,
        start: int,
        stop: int,
        *,
        fname: str = GRADS_FILE,
        row_shape: tuple[int, ...] | None = None,
        behind: WriteBehind | None = None,
        owns_behind: bool = False,
    ) -> None:
        h = store.header
        if not 0 <= start <= stop <= h.n_samples:
            raise StoreError(f"Shard rows [{start}, {stop}) are outside the store's {h.n_samples} samples.")
        self.store, self.fd, self.start, self.stop = store, fd, start, stop
        self.fname = fname
        self.row_shape = tuple(row_shape) if row_shape is not None else h.file_rows()[fname]
        self._torch_dtype, self._np_dtype = _STORAGE[h.grad_dtype]
        header = _npy_header(np.dtype(self._np_dtype), (h.n_samples, *self.row_shape))
        self._offset = len(header)
        self._file_bytes = self._offset + h.n_samples * int(np.prod(self.row_shape)) * np.dtype(self._np_dtype).itemsize
        self._row_bytes = int(np.prod(self.row_shape)) * np.dtype(self._np_dtype).itemsize
        self._written = np.zeros(stop - start, dtype=bool)
        # The segment this writer checksums: the .npy header belongs to the shard starting at row 0.
        self.seg_start = 0 if start == 0 else self._offset + start * self._row_bytes
        self.seg_stop = self._offset + stop * self._row_bytes
        self._hash = hashlib.sha256()
        self._hash_pos = self.seg_start
        self._in_order = True
        self._behind = behind
        self._owns_behind = owns_behind
        self._unsynced = 0
        if start == 0:
            self._hash.update(header)
            self._hash_pos = self._offset

    def write_rows(self, ids: Tensor, rows: Tensor) -> None:
        """Store ``rows`` ``[B, *row_shape]`` (any float dtype) at sample positions ``ids``."""
        ids_np = _ids_array(ids)
        if ids_np.size:
            self._submit([(self, self._blocks(ids_np, rows))], self._behind)

    def _blocks(
        self, ids_np: np.ndarray, rows: Tensor, span: tuple[int, int, bool] | None = None
    ) -> list[tuple[memoryview, int, bool]]:
        """Check ``rows`` at ``ids_np`` and plan their writes ``(data, offset, hashed)``, in order (marks them written).

        ``span``: :func:`_span` of ``ids_np`` when the caller has it (the same ids for every file of a batch).
        """
        if tuple(rows.shape) != (ids_np.size, *self.row_shape):
            what = "gradient rows" if self.fname == GRADS_FILE else f"factors ({self.fname})"
            raise StoreError(
                f"Expected {what} of shape {(ids_np.size, *self.row_shape)}, got {tuple(rows.shape)}."
                + (
                    ""
                    if self.fname == GRADS_FILE
                    else " A factored parameter's position count must not change between batches (fixed input sizes)."
                )
            )
        lo, hi, contiguous = span if span is not None else _span(ids_np)
        if lo < self.start or hi >= self.stop:
            raise StoreError(
                f"Sample ids {lo}..{hi} fall outside the rows [{self.start}, {self.stop}) this writer holds: the"
                f" store was created for {self.store.header.n_samples} samples (did the dataset change size?)."
            )
        if self._row_bytes == 0:  # grads.npy of a store whose every parameter is kept as factors
            self._written[ids_np - self.start] = True
            return []
        r = rows.detach().to(self._torch_dtype).cpu().contiguous().reshape(ids_np.size, -1)
        arr = r.view(torch.int16).numpy().view(np.uint16) if self._torch_dtype == torch.bfloat16 else r.numpy()
        arr = np.ascontiguousarray(arr)
        if contiguous:
            blocks = [self._plan(lo, memoryview(arr).cast("B"))]
        else:
            blocks = [
                self._plan(i, memoryview(np.ascontiguousarray(row)).cast("B")) for i, row in zip(ids_np.tolist(), arr)
            ]
        self._written[ids_np - self.start] = True
        return blocks

    def _plan(self, row: int, data: memoryview) -> tuple[memoryview, int, bool]:
        offset = self._offset + row * self._row_bytes
        hashed = self._in_order and offset == self._hash_pos
        if hashed:
            self._hash_pos += len(data)
        else:
            self._in_order = False
        return data, offset, hashed

    @staticmethod
    def _submit(work: list[tuple[ShardWriter, list[tuple[memoryview, int, bool]]]], behind: WriteBehind | None) -> None:
        """Write planned blocks of one or several files: now, or gathered with the next batches' behind the computation."""
        if behind is None:
            _write_planned(work)
        else:
            behind.gather(_write_gathered, work, sum(len(b[0]) for _, blocks in work for b in blocks))

    def _wrap(self, err: OSError) -> OSError:
        return _wrap_os_error(err, self.store.path, f"gradient rows ({self.fname})", self._file_bytes)

    def _write(self, data: memoryview, offset: int, hashed: bool) -> None:
        _pwrite_all(self.fd, data, offset)
        if self._behind is not None:
            _start_writeback(self.fd, offset, len(data))
            self._unsynced += len(data)
            if self._unsynced >= _SYNC_EVERY_BYTES:
                # Start the disk writes now, on the background thread, so the fsync that makes the
                # checkpoint durable finds little left to flush.
                os.fdatasync(self.fd)
                self._unsynced = 0
        if hashed:
            self._hash.update(data)

    @property
    def missing(self) -> int:
        return int((~self._written).sum())

    def finish(self) -> dict[str, Any]:
        """Flush the rows to disk and describe the segment: ``{start, stop, missing, offset, length, sha256}``."""
        try:
            if self._behind is not None:
                self._behind.drain()
            os.fsync(self.fd)
        except OSError as err:
            raise self._wrap(err)
        return self._describe()

    def _describe(self) -> dict[str, Any]:
        # After the fsync: the segment's checksum (from the writes, or read back), then close.
        if self._in_order and self._hash_pos == self.seg_stop:
            digest = self._hash.hexdigest()
        else:
            h = hashlib.sha256()
            length = self.seg_stop - self.seg_start
            pos = self.seg_start
            while length > 0:
                block = os.pread(self.fd, min(1 << 22, length), pos)
                if not block:
                    break
                h.update(block)
                pos += len(block)
                length -= len(block)
            digest = h.hexdigest()
        self.close()
        return {
            "start": self.start,
            "stop": self.stop,
            "missing": self.missing,
            "offset": self.seg_start,
            "length": self.seg_stop - self.seg_start,
            "sha256": digest,
        }

    def close(self) -> None:
        if self._behind is not None:
            # Pending writes use the descriptor: wait for them before closing it.
            if self._owns_behind:
                self._behind.close()
            else:
                try:
                    self._behind.drain()
                except BaseException:  # noqa: BLE001 - abandoning the file; the error was or will be raised by finish
                    pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Threads that fsync a checkpoint's files at the same time. Each fsync waits for the disk; issued
#: together, the filesystem can flush them in one journal commit and the device sees them queued. On
#: this project's 2-core VM (ext4 on a virtual disk), medians: 3.3 MB in four files 2.8 ms instead of
#: 3.6 ms, in twenty files 3.8 ms instead of 8.0 ms.
_FSYNC_THREADS = WriteThread(workers=8)


def _fsync_all(writers: Sequence[ShardWriter]) -> None:
    """``fsync`` every writer's file, concurrently; the first failure (in the order given) is raised, named by its file.

    Every fsync has finished (or failed) when this returns or raises: the caller may close the files.
    """

    def sync(w: ShardWriter) -> OSError | None:
        try:
            os.fsync(w.fd)
        except OSError as err:
            return w._wrap(err)
        return None

    if len(writers) <= 1:
        errors = [sync(w) for w in writers]
    else:
        # The calling thread syncs the first file while the pool syncs the others.
        futures = [_FSYNC_THREADS.executor().submit(sync, w) for w in writers[1:]]
        errors = [sync(writers[0])] + [f.result() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def _ids_array(ids: Tensor) -> np.ndarray:
    return np.asarray(ids.detach().cpu().numpy(), dtype=np.int64).reshape(-1)


def _span(ids_np: np.ndarray) -> tuple[int, int, bool]:
    """``(lowest id, highest id, whether the ids are consecutive and increasing)`` of a non-empty batch."""
    lo, hi = int(ids_np.min()), int(ids_np.max())
    return lo, hi, hi - lo + 1 == ids_np.size and bool(np.all(np.diff(ids_np) == 1))


def _write_planned(work: list[tuple[ShardWriter, list[tuple[memoryview, int, bool]]]]) -> None:
    for writer, blocks in work:
        try:
            for data, offset, hashed in blocks:
                writer._write(data, offset, hashed)
        except OSError as err:
            # Named here: one task may carry several files' rows.
            raise writer._wrap(err) from err


def _write_gathered(works: list[list[tuple[ShardWriter, list[tuple[memoryview, int, bool]]]]]) -> None:
    """Several batches' planned writes as one task: per file, blocks that continue each other become one write.

    One write (and one hash update) per file instead of one per batch: the worker takes the GIL
    back once per call (see :mod:`~lightning_influence.trajectory.write_behind`). Blocks keep their
    order, so each file is still hashed in order.
    """
    per_file: dict[int, tuple[ShardWriter, list[list[Any]]]] = {}
    for work in works:
        for writer, blocks in work:
            runs = per_file.setdefault(id(writer), (writer, []))[1]
            for data, offset, hashed in blocks:
                last = runs[-1] if runs else None
                if last is not None and last[1] + last[3] == offset and last[2] == hashed:
                    last[0].append(data)
                    last[3] += len(data)
                else:
                    runs.append([[data], offset, hashed, len(data)])
    _write_planned(
        [
            (writer, [(parts[0] if len(parts) == 1 else memoryview(b"".join(parts)), offset, hashed)
                      for parts, offset, hashed, _ in runs])
            for writer, runs in per_file.values()
        ]
    )  # fmt: skip


class RowsWriter:
    """The rows ``[start, stop)`` of every gradient file of a factored checkpoint: ``grads.npy`` and the factor files.

    :meth:`write_rows` takes :class:`~lightning_influence.gradients.split.SplitRows`: the dense part
    goes to ``grads.npy``, each factored parameter's ``a`` and ``g`` to its files.
    """

    def __init__(self, writers: Mapping[str, ShardWriter], behind: WriteBehind | None = None) -> None:
        self.writers = dict(writers)
        first = next(iter(self.writers.values()))
        self.store, self.start, self.stop = first.store, first.start, first.stop
        self._first = first
        self._behind = behind  # owned: closed with the writers

    def write_rows(self, ids: Tensor, rows: SplitRows | Tensor) -> None:
        """Store split rows (dense part ``[B, dense_dim]`` and factors) at sample positions ``ids``."""
        factored = self.store.header.factored or {}
        if not isinstance(rows, SplitRows):
            raise StoreError(
                f"This store keeps {sorted(factored)[:4]} as factors (factored storage): write SplitRows"
                f" (GradientFeaturizer.split_rows), not a {type(rows).__name__}."
            )
        if set(rows.factors) != set(factored):
            raise StoreError(f"Expected factors of {sorted(factored)}, got factors of {sorted(rows.factors)}.")
        parts: list[tuple[ShardWriter, Tensor]] = []
        if GRADS_FILE in self.writers:
            parts.append((self.writers[GRADS_FILE], rows.dense))
        elif rows.dense.shape[1:] != (0,):
            raise StoreError(
                f"This store keeps every parameter as factors; the rows have a dense part of {rows.dense.shape[1]}"
                " columns."
            )
        for name, info in factored.items():
            if "bias_of" in info:
                _check_folded_bias(name, rows.factors[name], rows.factors[info["bias_of"]])
                continue
            f = rows.factors[name]
            if not isinstance(f, LayerFactors) or f.inputs is None:
                raise StoreError(
                    f"Parameter {name!r} is stored as factors but the engine returned"
                    f" {'a dense gradient' if not isinstance(f, LayerFactors) else 'factors without inputs'}:"
                    " record with engine='factored' (or 'auto')."
                )
            if f.inputs.shape[:2] != f.output_grads.shape[:2]:
                raise StoreError(
                    f"Parameter {name!r}: inputs {tuple(f.inputs.shape)} and output gradients"
                    f" {tuple(f.output_grads.shape)} differ in samples or positions."
                )
            # a and g side by side: one file (one write, one fsync) per parameter.
            both = torch.cat([f.inputs, f.output_grads.to(f.inputs.dtype)], dim=-1)
            parts.append((self.writers[factor_file(name)], both))
        ids_np = _ids_array(ids)
        if ids_np.size:
            # Every file's rows checked before any is written, then one write task for the batch.
            span = _span(ids_np)
            work = [(w, w._blocks(ids_np, t, span)) for w, t in parts]
            ShardWriter._submit(work, self._first._behind)

    @property
    def missing(self) -> int:
        return max(w.missing for w in self.writers.values())

    def finish(self) -> dict[str, Any]:
        """Flush every file: ``{start, stop, missing, files: {name: segment}}`` (segments as :meth:`ShardWriter.finish`).

        The files are fsynced concurrently (:func:`_fsync_all`): one file per factored layer, and a
        model with many layers would otherwise wait for each file's flush in turn.
        """
        missing = self.missing
        try:
            # The writers share one write-behind queue (the checkpoint's, or this writer's own).
            for behind in {id(w._behind): w._behind for w in self.writers.values() if w._behind is not None}.values():
                behind.drain()
            _fsync_all(list(self.writers.values()))
            files = {fn: w._describe() for fn, w in self.writers.items()}
        finally:
            self.close()
        return {"start": self.start, "stop": self.stop, "missing": missing, "files": files}

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        if self._behind is not None:
            self._behind.close()


def _check_folded_bias(name: str, bias: Any, weight: Any) -> None:
    """A bias kept as its layer's ``g`` must be exactly that: ``LayerFactors(None, g)`` with the weight's ``g``."""
    if not isinstance(bias, LayerFactors) or bias.inputs is not None or not isinstance(weight, LayerFactors):
        raise StoreError(
            f"Bias {name!r} is stored as the sum of its layer's output gradients, but the rows give"
            f" {'a dense gradient' if not isinstance(bias, LayerFactors) else 'factors with inputs'}:"
            " record with engine='factored' (or 'auto')."
        )
    gb, gw = bias.output_grads, weight.output_grads
    if gb is gw:
        return
    if gb.shape != gw.shape:
        raise StoreError(
            f"Bias {name!r} is stored as the sum of its layer's output gradients g {tuple(gw.shape)}, but the rows"
            f" give it a g of shape {tuple(gb.shape)}."
        )
    if not torch.equal(gb, gw.to(gb.dtype)):
        raise StoreError(
            f"Bias {name!r} is stored as the sum of its layer's output gradients, but its g differs from that"
            " layer's weight's g (per-parameter scales must not be folded into the stored factors)."
        )


def _by_file(shard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A shard report per file (a single-file report is ``grads.npy``'s)."""
    files = shard.get("files")
    return {fn: dict(seg) for fn, seg in files.items()} if files is not None else {GRADS_FILE: dict(shard)}


class CheckpointWriter:
    """Writes one checkpoint's gradient rows and weights; :meth:`commit` publishes it.

    Args:
        store: the store being written.
        index: the checkpoint's position in the trajectory.
        name: its directory name.
        tmp: the temporary directory it is written to.
        stop: this process writes rows ``[0, stop)`` (default: all; rank 0's shard under DDP).
    """

    def __init__(self, store: GradientStoreWriter, index: int, name: str, tmp: Path, stop: int | None = None) -> None:
        self.store, self.index, self.name, self.tmp = store, index, name, tmp
        self.final = store.path / name
        h = store.header
        stop = h.n_samples if stop is None else stop
        self._fds: dict[str, int] = {}
        self._behind = WriteBehind(thread=store._write_thread)
        writers: dict[str, ShardWriter] = {}
        try:
            for fn, shape in h.file_rows().items():
                fd = os.open(tmp / fn, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds[fn] = fd
                _preallocate(fd, h.file_bytes(fn))
                _pwrite_all(fd, h.file_header(fn), 0)
                writers[fn] = ShardWriter(store, os.dup(fd), 0, stop, fname=fn, row_shape=shape, behind=self._behind)
        except BaseException:
            for w in writers.values():
                w.close()
            self._behind.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}
            raise
        self.rows: ShardWriter | RowsWriter | None = RowsWriter(writers) if h.factored else writers[GRADS_FILE]
        self._own: dict[str, Any] | None = None  # this process's segment report, once its rows are flushed
        self._closed = False
        self._weights: dict[str, Any] | None = None  # the manifest's entry for the weights, once queued
        self._weights_error: OSError | None = None

    def write_weights(self, state: Mapping[str, Tensor]) -> None:
        """Queue the weights (``weights.safetensors``: all weights and buffers) behind the rows' writes.

        The weights do not change while a checkpoint's rows are computed, so the recorder hands them
        over first and their write and fsync overlap the sweep. :meth:`commit` reports a failure.
        """
        if self._closed or self._weights is not None:
            raise StoreError(f"Checkpoint {self.index}: the weights were already written, or it was committed/aborted.")
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._weights = {"sha256": None, "bytes": nbytes}
        if self._own is None:
            self._behind.submit(self._write_weights, nbytes, tensors)
        else:  # the rows are already durable and the queue closed
            self._write_weights(tensors)

    def _write_weights(self, tensors: dict[str, Tensor]) -> None:
        # On the write-behind thread (serialising too): a failure is kept for commit, which names the file.
        assert self._weights is not None
        blob = save_safetensors(tensors)
        self._weights["bytes"] = len(blob)
        try:
            _write_file(self.tmp / WEIGHTS_FILE, blob)
        except OSError as err:
            self._weights_error = err
            return
        self._weights["sha256"] = hashlib.sha256(blob).hexdigest()

    def write_rows(self, ids: Tensor, rows: Tensor | SplitRows) -> None:
        """Store ``rows`` ``[B, dim]`` (any float dtype; :class:`SplitRows` for factored storage) at positions ``ids``."""
        if self.rows is None:
            raise StoreError(f"Checkpoint {self.index} was already committed, aborted or its rows finished.")
        self.rows.write_rows(ids, rows)

    def finish_rows(self) -> dict[str, Any]:
        """Make this process's rows durable (wait for the write-behind, fsync) and describe them.

        :meth:`commit` does it if not done before; calling it first lets the caller time the rows
        apart from the weights and the manifest. Idempotent.

        Raises:
            OSError: a write or the fsync failed (out of disk space: the error says how much is needed).
        """
        if self._own is None:
            if self.rows is None or self._closed:
                raise StoreError(f"Checkpoint {self.index} was already committed or aborted.")
            self._own = self.rows.finish()
            self.rows = None
            self._behind.close()
        return self._own

    def commit(
        self, state: Mapping[str, Tensor] | None, meta: Mapping[str, Any], shards: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """Write the weights, rename the checkpoint into place and list it in the manifest.

        Args:
            state: all weights and buffers (``None`` when already given to :meth:`write_weights`).
            meta: ``step``, ``epoch``, ``lr`` and anything else to keep in the manifest entry.
            shards: what :meth:`ShardWriter.finish` returned on the other ranks (DDP).

        Raises:
            StoreError: missing metadata or rows never written (nothing is listed).
            OSError: out of disk space (nothing is listed; the partial checkpoint stays for :meth:`abort`).
        """
        missing_meta = [key for key in ("step", "epoch", "lr") if key not in meta]
        if missing_meta:
            raise StoreError(f"Checkpoint {self.index}: metadata lacks {missing_meta}; nothing was listed.")
        if self._closed:
            raise StoreError(f"Checkpoint {self.index} was already committed or aborted.")
        if self._weights is None:
            if state is None:
                raise StoreError(f"Checkpoint {self.index}: no weights; pass `state` or call write_weights first.")
            self.write_weights(state)
        n = self.store.header.n_samples
        own = self.finish_rows()
        missing = int(own["missing"]) + sum(int(s["missing"]) for s in shards)
        if missing:
            raise StoreError(f"Checkpoint {self.index}: {missing} of {n} sample rows were never written.")
        self._closed = True
        reports = [_by_file(own), *[_by_file(s) for s in shards]]
        files: dict[str, Any] = {}
        for fn in self.store.header.file_rows():
            size = self.store.header.file_bytes(fn)
            segments = sorted([r[fn] for r in reports if fn in r], key=lambda s: s["offset"])
            segments = [s for s in segments if s["length"] > 0 or s["offset"] == 0]
            pos = 0
            for s in segments:
                if s["offset"] != pos:
                    raise StoreError(
                        f"Checkpoint {self.index}: the shards do not tile the rows of {fn} (gap at byte {pos})."
                    )
                pos += s["length"]
            if pos != size:
                raise StoreError(f"Checkpoint {self.index}: the shards cover {pos} of {size} bytes of {fn}.")
            info: dict[str, Any] = {"bytes": size}
            if len(segments) == 1:
                info["sha256"] = segments[0]["sha256"]
            else:
                info["sha256"] = None
                info["segments"] = [
                    {"offset": s["offset"], "length": s["length"], "sha256": s["sha256"]} for s in segments
                ]
            files[fn] = info
        self._close_fds()
        assert self._weights is not None
        if self._weights_error is not None:
            err, needed = self._weights_error, self._weights["bytes"]
            raise _wrap_os_error(err, self.store.path, f"checkpoint {self.index} ({WEIGHTS_FILE})", needed) from err
        grads_info = {GRADS_FILE: files.pop(GRADS_FILE)} if GRADS_FILE in files else {}
        files = {**grads_info, WEIGHTS_FILE: dict(self._weights), **files}
        _fsync_dir(self.tmp)
        # The rename becomes durable with the manifest: listing it fsyncs this same directory.
        os.rename(self.tmp, self.final)
        entry = {
            "index": self.index,
            "dir": self.name,
            "uid": new_run_id(),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            **dict(meta),
            "files": files,
        }
        try:
            self.store._commit(entry)
        except BaseException:
            shutil.rmtree(self.final, ignore_errors=True)  # renamed but never listed
            raise
        return entry

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def abort(self) -> None:
        """Drop the partial checkpoint (nothing listed is touched)."""
        self._closed = True
        if self.rows is not None:
            self.rows.close()
            self.rows = None
        self._behind.close()
        self._close_fds()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.final.exists() and self.name not in {c["dir"] for c in self.store.manifest["checkpoints"]}:
            shutil.rmtree(self.final, ignore_errors=True)


#: Files already verified in this process: (path, inode, size, mtime_ns, expected checksums).
_VERIFIED: set[tuple[Any, ...]] = set()
#: Written-behind bytes of one file after which the background thread flushes them to disk.
_SYNC_EVERY_BYTES = 4 << 20
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
            raise StoreError(f"Checkpoint {self.index}: the manifest lists no {fn}.")
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
            if _sha256(path, s["offset"], s["length"]) != s["sha256"]:
                return f"does not match its checksum (bytes {s['offset']}..{s['offset'] + s['length']})"
        return None
    if _sha256(path) != info.get("sha256"):
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
        m = _read_manifest(self.path)
        if m["grad_dtype"] not in _STORAGE:
            raise StoreError(f"{str(self.path / MANIFEST)!r}: unknown grad_dtype {m['grad_dtype']!r}.")
        self.manifest = m
        self.run_id: str | None = m.get("run_id")
        self.n_samples: int = m["n_samples"]
        self.dim: int = m["dim"]
        #: Factored parameters (exact factored storage) -> ``{"positions", "inputs", "outputs", "groups", "shape"}``.
        self.factored: dict[str, dict[str, Any]] = dict(m.get("factored") or {})
        #: Width of ``grads.npy`` (``dim`` unless some parameters are stored as factors).
        self.dense_dim: int = int(m.get("dense_dim", self.dim)) if self.factored else self.dim
        self.grad_dtype: torch.dtype = _STORAGE[m["grad_dtype"]][0]
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
            now = _read_manifest(self.path)
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


def header_for(
    n_samples: int,
    param_names: Sequence[str],
    param_shapes: Mapping[str, Sequence[int]],
    grad_dtype: str,
    projection: ProjectionSpec | None,
    noise_seed: int,
    precision: GradientPrecision,
    extra: Mapping[str, Any] | None = None,
    factored: Mapping[str, Mapping[str, Any]] | None = None,
) -> StoreHeader:
    """The header of a store; ``factored`` (exact rows only) lists the parameters kept as factors."""
    if factored and projection is not None:
        raise ValueError("`factored` storage keeps exact gradients; it cannot be combined with a projection.")
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
        factored={n: dict(factored[n]) for n in param_names if n in factored} if factored else None,
    )
