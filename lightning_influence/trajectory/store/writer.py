"""Writing a gradient store: the training side of the boundary (see :mod:`~lightning_influence.trajectory.store`).

:class:`GradientStoreWriter` owns the directory and its manifest; :class:`CheckpointWriter` writes
one checkpoint into a hidden directory and lists it once durable; :class:`ShardWriter` and
:class:`RowsWriter` write one process's rows of its gradient files, behind the computation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lightning_influence.errors import StoreError
from lightning_influence.gradients.engine import LayerFactors
from lightning_influence.gradients.split import SplitRows
from lightning_influence.trajectory.store import durable
from lightning_influence.trajectory.store.layout import (
    CKPT_DIR,
    CKPT_FILE,
    CLI_CONFIG,
    DEBRIS,
    FORMAT,
    GRADS_FILE,
    MANIFEST,
    OWN_ENTRY,
    STORAGE_DTYPES,
    WEIGHTS_FILE,
    StoreHeader,
    factor_file,
    manifest_text,
    new_run_id,
    npy_header,
    read_manifest,
)
from lightning_influence.trajectory.write_behind import WriteBehind, WriteThread

__all__ = ["CheckpointWriter", "GradientStoreWriter", "RowsWriter", "ShardWriter"]

#: Written-behind bytes of one file after which the background thread flushes them to disk.
_SYNC_EVERY_BYTES = 4 << 20


def _write_manifest(path: Path, payload: Mapping[str, Any], store: Path) -> None:
    durable.write_atomic(path, manifest_text(payload).encode(), store)


def _foreign_entries(path: Path, entries: Sequence[str]) -> list[str]:
    """What in the store directory ``path`` the store did not write, as paths relative to it.

    Names the store does not use; files other than a checkpoint's inside ``ckpt-*`` directories (a
    user's file put there, or a directory of the same name that is no checkpoint); a ``manifest.json``
    that is no gradient store's. Overwriting or clearing debris deletes only what passes this check.
    """
    foreign: list[str] = []
    for name in entries:
        p = path / name
        if not OWN_ENTRY.match(name):
            foreign.append(name)
        elif name == CLI_CONFIG:
            if MANIFEST not in entries:  # the command line's config of a store; without a store, someone else's
                foreign.append(name)
        elif name == MANIFEST:
            try:
                m = json.loads(p.read_text())
            except (OSError, ValueError):  # unreadable or broken: the manifest's own checks name the problem
                continue
            if not isinstance(m, dict) or m.get("format") != FORMAT:
                foreign.append(name)
        elif CKPT_DIR.match(name) or name.startswith(".tmp-ckpt-"):
            if not p.is_dir() or p.is_symlink():
                foreign.append(name)
                continue
            foreign.extend(
                f"{name}/{f.name}" for f in sorted(p.iterdir()) if not (CKPT_FILE.match(f.name) and f.is_file())
            )
    return foreign


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
            self.manifest = read_manifest(self.path)
            if self.manifest.get("run_id") != run_id:
                raise StoreError(
                    f"The gradient store at {str(self.path)!r} belongs to run {self.manifest.get('run_id')!r},"
                    f" not {run_id!r}."
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"`dirpath` {str(self.path)!r} exists and is not a directory.")
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        foreign = _foreign_entries(self.path, entries)
        if foreign:
            raise StoreError(
                f"`dirpath` {str(self.path)!r} holds files the gradient store did not write ({foreign[:5]}"
                f"{' ...' if len(foreign) > 5 else ''}); refusing to {'overwrite' if overwrite else 'write into'} it."
                " Use an empty or new directory for the store."
            )
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and overwrite:
            try:
                json.loads(manifest_path.read_text())
            except (OSError, ValueError) as err:
                raise StoreError(
                    f"{str(manifest_path)!r} cannot be read as JSON ({err}); overwrite=True deletes only a gradient"
                    " store it can identify. If the directory is a broken store of yours, delete it by hand."
                ) from err
            self._remove_own(entries)
        elif manifest_path.exists():
            existing = read_manifest(self.path)
            mine = header.to_dict()
            if existing.get("factored") and header.factored and existing.get("schema_version") != header.schema_version:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} holds a gradient store of schema version"
                    f" {existing.get('schema_version')}, written by an older lightning_influence; this version"
                    f" appends only to version {header.schema_version}. Record to a new `dirpath`, or overwrite=True"
                    " to replace it."
                )
            # Over the keys of both: a dense header has no "factored" entry, a factored store's manifest does.
            differ = sorted(
                k
                for k in {*mine, *existing.keys() & {"factored", "dense_dim"}} - {"extra"}
                if existing.get(k) != mine.get(k)
            )
            if differ:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} already holds a gradient store recorded with different settings"
                    f" ({', '.join(differ)}: parameters, projection, dtype, sample count or factored storage). Use a"
                    " new `dirpath`, or overwrite=True to replace it."
                )
            steps = [c["step"] for c in existing["checkpoints"]]
            if new_run:
                raise StoreError(
                    f"`dirpath` {str(self.path)!r} already holds a gradient store of run {existing.get('run_id')!r}"
                    f" ({len(steps)} checkpoint(s) at steps {steps[:8]}{'...' if len(steps) > 8 else ''}); recording a"
                    " new run into it would mix two runs. Pass overwrite=True to replace it or use a new `dirpath` (a fit"
                    " can also resume that run: trainer.fit(..., ckpt_path=...))."
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
        _write_manifest(manifest_path, self.manifest, self.path)

    def _remove_own(self, entries: Sequence[str]) -> None:
        # The manifest goes first: from then on the directory is no store, only debris.
        if MANIFEST in entries:
            (self.path / MANIFEST).unlink()
            durable.fsync_dir(self.path)
        for name in entries:
            p = self.path / name
            if name != MANIFEST and OWN_ENTRY.match(name):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def _clean_debris(self) -> None:
        listed = {c["dir"] for c in self.manifest["checkpoints"]}
        for p in self.path.iterdir():
            if DEBRIS.match(p.name) or (CKPT_DIR.match(p.name) and p.name not in listed):
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
            _write_manifest(self.path / MANIFEST, {**self.manifest, "checkpoints": kept}, self.path)
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
            raise durable.wrap_os_error(
                err, self.path, f"checkpoint {index} ({what})", self.header.total_bytes
            ) from err

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
        _write_manifest(
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
        self._torch_dtype, self._np_dtype = STORAGE_DTYPES[h.grad_dtype]
        header = npy_header(np.dtype(self._np_dtype), (h.n_samples, *self.row_shape))
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
        return durable.wrap_os_error(err, self.store.path, f"gradient rows ({self.fname})", self._file_bytes)

    def _write(self, data: memoryview, offset: int, hashed: bool) -> None:
        durable.pwrite_all(self.fd, data, offset)
        if self._behind is not None:
            durable.start_writeback(self.fd, offset, len(data))
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

        The files are fsynced concurrently (:func:`~lightning_influence.trajectory.store.durable.fsync_all`): one file per factored layer, and a
        model with many layers would otherwise wait for each file's flush in turn.
        """
        missing = self.missing
        try:
            # The writers share one write-behind queue (the checkpoint's, or this writer's own).
            for behind in {id(w._behind): w._behind for w in self.writers.values() if w._behind is not None}.values():
                behind.drain()
            durable.fsync_all([(w.fd, w._wrap) for w in self.writers.values()])
            files = {fn: w._describe() for fn, w in self.writers.items()}
        finally:
            self.close()
        return {"start": self.start, "stop": self.stop, "missing": missing, "files": files}

    def close(self) -> None:
        # The queue first: it drops the rows still held for gathering, which the files are abandoned with.
        if self._behind is not None:
            self._behind.close()
        for w in self.writers.values():
            w.close()


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
                durable.preallocate(fd, h.file_bytes(fn))
                durable.pwrite_all(fd, h.file_header(fn), 0)
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
            durable.write_file(self.tmp / WEIGHTS_FILE, blob)
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
            raise durable.wrap_os_error(
                err, self.store.path, f"checkpoint {self.index} ({WEIGHTS_FILE})", needed
            ) from err
        grads_info = {GRADS_FILE: files.pop(GRADS_FILE)} if GRADS_FILE in files else {}
        files = {**grads_info, WEIGHTS_FILE: dict(self._weights), **files}
        durable.fsync_dir(self.tmp)
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
        self._behind.close()  # first: rows still held for gathering are dropped, not written into doomed files
        if self.rows is not None:
            self.rows.close()
            self.rows = None
        self._close_fds()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.final.exists() and self.name not in {c["dir"] for c in self.store.manifest["checkpoints"]}:
            shutil.rmtree(self.final, ignore_errors=True)
