"""The on-disk format of a gradient store: names, schema versions, the header, the manifest's text.

Everything a writer and a reader must agree on, and nothing that touches a file's bytes beyond the
manifest's JSON (see :mod:`~lightning_influence.trajectory.store` for the layout of a directory).
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_influence.errors import StoreError
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec

__all__ = [
    "CKPT_DIR",
    "CKPT_FILE",
    "CLI_CONFIG",
    "DEBRIS",
    "ENTRY_KEYS",
    "FACTORED_SCHEMA_VERSION",
    "FORMAT",
    "GRADS_FILE",
    "HEADER_KEYS",
    "MANIFEST",
    "OWN_ENTRY",
    "SCALED_FACTORED_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "STORAGE_DTYPES",
    "StoreHeader",
    "TWO_FILE_FACTORED_SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "dtype_name",
    "factor_file",
    "header_for",
    "manifest_text",
    "new_run_id",
    "npy_header",
    "read_manifest",
    "shard_bounds",
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

STORAGE_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
}

#: The LightningCLI config ``lightning-influence fit`` / ``record`` save beside a store's manifest (the store's
#: companion: replaced with it, kept on resume; a user's file of that name where there is no store).
CLI_CONFIG = "lightning_config.yaml"
#: Directory entries a store writes; anything else in a store directory belongs to someone else.
OWN_ENTRY = re.compile(
    r"^(manifest\.json|manifest\.json\.tmp-.+|ckpt-\d{5,}|\.tmp-ckpt-\d{5,}|lightning_config\.yaml)$"
)
DEBRIS = re.compile(r"^(manifest\.json\.tmp-.+|\.tmp-ckpt-\d{5,})$")
CKPT_DIR = re.compile(r"^ckpt-\d{5,}$")
#: Files a checkpoint directory holds (``a.``/``g.`` factor files: schema version 2).
CKPT_FILE = re.compile(r"^(grads\.npy|weights\.safetensors|[fag]\..+\.npy)$")
HEADER_KEYS = (
    "n_samples",
    "dim",
    "grad_dtype",
    "param_names",
    "param_shapes",
    "projection",
    "noise_seed",
    "precision",
)
ENTRY_KEYS = ("index", "dir", "step", "epoch", "lr", "files")


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical storage dtype name (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
    name = str(dtype).replace("torch.", "")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"`grad_dtype` must be one of float32, float16, bfloat16; got {dtype!r}.")
    return name


def new_run_id() -> str:
    """A fresh run identifier (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def manifest_text(payload: Mapping[str, Any]) -> str:
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


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` (version 1.0) header of a C-ordered array: a gradient file is this header, then its rows."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def read_manifest(path: Path) -> dict[str, Any]:
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
            f"{str(mpath)!r}: store schema version {m.get('schema_version')} is not supported (this version reads"
            f" {', '.join(map(str, readable))}); it was written by another version of lightning_influence."
        )
    missing = [k for k in (*HEADER_KEYS, "checkpoints") if k not in m]
    if missing:
        raise StoreError(f"{str(mpath)!r} lacks the entries {missing}: the manifest is incomplete or was edited.")
    for i, entry in enumerate(m["checkpoints"]):
        lacking = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
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
        dtype = np.dtype(STORAGE_DTYPES[self.grad_dtype][1])
        return {
            fn: (shape, npy_header(dtype, (self.n_samples, *shape)), math.prod(shape) * dtype.itemsize)
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
