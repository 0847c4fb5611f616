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
durable (drained, and its files fsynced together) before it can be listed.

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

The package: :mod:`~.layout` (file names, schema versions, the header, the manifest's text: what
writers and readers agree on), :mod:`~.durable` (preallocated, fsynced and atomically replaced files,
and the errors a full disk becomes), :mod:`~.writer` (the training side) and :mod:`~.reader` (the
analysis side). The writer and the reader depend on the first two, never on each other.
"""

from lightning_influence.trajectory.store.layout import (
    FACTORED_SCHEMA_VERSION,
    GRADS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    StoreHeader,
    dtype_name,
    factor_file,
    header_for,
    new_run_id,
    shard_bounds,
)
from lightning_influence.trajectory.store.reader import GradientStore, StoredCheckpoint
from lightning_influence.trajectory.store.writer import CheckpointWriter, GradientStoreWriter, RowsWriter, ShardWriter

__all__ = [
    "FACTORED_SCHEMA_VERSION",
    "GRADS_FILE",
    "MANIFEST",
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "CheckpointWriter",
    "GradientStore",
    "GradientStoreWriter",
    "RowsWriter",
    "ShardWriter",
    "StoreHeader",
    "StoredCheckpoint",
    "dtype_name",
    "factor_file",
    "header_for",
    "new_run_id",
    "shard_bounds",
]
