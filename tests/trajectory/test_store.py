import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_influence.errors import StoreError
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.trajectory.store import (
    MANIFEST,
    GradientStore,
    GradientStoreWriter,
    dtype_name,
    durable,
    header_for,
)

SHAPES = {"enc.weight": [3, 4], "enc.bias": [3]}
N = 10
REPO = Path(__file__).resolve().parents[2]


def _header(grad_dtype="float32", projection=None, n=N, seed=0, precision=None):
    return header_for(
        n, list(SHAPES), SHAPES, grad_dtype, projection, seed, precision or GradientPrecision(), extra={"note": "t"}
    )


def _state(c: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(c)
    return {
        "enc.weight": torch.randn(3, 4, generator=g),
        "enc.bias": torch.randn(3, generator=g),
        "bn.running_mean": torch.randn(3, generator=g),
    }


def _rows(c: int, dim: int = 15) -> torch.Tensor:
    return torch.randn(N, dim, generator=torch.Generator().manual_seed(100 + c))


def _write(writer, c, rows=None, batch=4):
    rows = _rows(c, writer.header.dim) if rows is None else rows
    ck = writer.begin_checkpoint()
    for s in range(0, N, batch):
        ck.write_rows(torch.arange(s, min(s + batch, N)), rows[s : s + batch])
    return ck.commit(_state(c), {"step": 10 * (c + 1), "epoch": c, "lr": 0.1 * (c + 1)})


def test_header_dim_exact_and_projected():
    assert _header().dim == 15
    assert _header(projection=ProjectionSpec(dim=7)).dim == 7
    with pytest.raises(ValueError, match="`grad_dtype`"):
        _header(grad_dtype="int8")
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name("float16") == "float16"


@pytest.mark.parametrize("grad_dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, grad_dtype):
    w = GradientStoreWriter(tmp_path / "s", _header(grad_dtype))
    rows = [_rows(c) for c in range(2)]
    for c in range(2):
        # rows written out of order, in uneven batches
        ck = w.begin_checkpoint()
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(c))
        for chunk in perm.split(3):
            ck.write_rows(chunk, rows[c][chunk])
        ck.commit(_state(c), {"step": 5 * c, "epoch": c, "lr": 0.5, "param_scales": {"enc.bias": 2.0}})
    store = GradientStore(tmp_path / "s")
    assert len(store) == 2 and store.n_samples == N and store.dim == 15
    assert store.grad_dtype == getattr(torch, grad_dtype)
    assert store.param_names == list(SHAPES) and store.param_shapes == {"enc.weight": (3, 4), "enc.bias": (3,)}
    assert store.projection_spec is None and store.projector() is None
    assert store.precision == GradientPrecision()
    for c, ck in enumerate(store.checkpoints):
        g = ck.gradients()
        assert g.dtype == getattr(torch, grad_dtype) and g.shape == (N, 15)
        # Exactly the value a cast to the storage dtype gives (bf16 bits survive the uint16 detour).
        expected = rows[c].to(getattr(torch, grad_dtype))
        assert torch.equal(
            g.view(torch.int16) if grad_dtype != "float32" else g,
            expected.view(torch.int16) if grad_dtype != "float32" else expected,
        )
        assert (ck.step, ck.epoch, ck.eta, ck.index) == (5 * c, c, 0.5, c)
        assert ck.param_scales == {"enc.bias": 2.0}
        assert ck.nonfinite == []
        st = ck.state()
        assert set(st) == {"enc.weight", "enc.bias", "bn.running_mean"}
        assert all(torch.equal(st[k], v) for k, v in _state(c).items())
        wts = ck.weights()
        assert list(wts) == ["enc.weight", "enc.bias"]
        assert torch.equal(wts["enc.weight"], _state(c)["enc.weight"])
    store.verify()
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["grad_dtype"] == grad_dtype and manifest["extra"] == {"note": "t"}
    assert set(manifest["checkpoints"][0]["files"]) == {"grads.npy", "weights.safetensors"}


def test_small_batches_are_written_gathered_and_hashed_while_writing(tmp_path, monkeypatch):
    # Ten batches of one row: gathered behind the sweep into one write of grads.npy, hashed in
    # order as it is written (the checksum is the file's without reading it back).
    writes, reads = [], []
    pwrite_all, pread = durable.pwrite_all, os.pread

    def counted(fd, data, offset):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == "grads.npy":
            writes.append(len(data))
        pwrite_all(fd, data, offset)

    monkeypatch.setattr(durable, "pwrite_all", counted)
    monkeypatch.setattr(os, "pread", lambda *a: (reads.append(a), pread(*a))[1])
    w = GradientStoreWriter(tmp_path, _header())
    rows = _rows(0)
    ck = w.begin_checkpoint()
    writes.clear()
    for i in range(N):
        ck.write_rows(torch.tensor([i]), rows[i : i + 1])
    entry = ck.commit(_state(0), {"step": 1, "epoch": 0, "lr": 0.1})
    assert writes == [N * 15 * 4] and reads == []
    assert (
        entry["files"]["grads.npy"]["sha256"]
        == hashlib.sha256((tmp_path / "ckpt-00000" / "grads.npy").read_bytes()).hexdigest()
    )
    assert torch.equal(GradientStore(tmp_path).checkpoints[0].gradients(), rows)


def test_bfloat16_stored_as_uint16_bits(tmp_path):
    w = GradientStoreWriter(tmp_path, _header("bfloat16"))
    rows = _rows(0)
    _write(w, 0, rows)
    raw = np.load(tmp_path / "ckpt-00000" / "grads.npy")
    assert raw.dtype == np.uint16
    bits = rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(raw, bits)
    g = GradientStore(tmp_path).checkpoints[0].gradients()
    assert torch.equal(g.float(), rows.to(torch.bfloat16).float())


def test_gradients_are_memory_mapped_copy_on_write(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    rows = _rows(0)
    _write(w, 0, rows)
    store = GradientStore(tmp_path)
    g = store.checkpoints[0].gradients()
    g.zero_()  # copy-on-write: the file is untouched
    again = store.checkpoints[0].gradients()  # mapped from the cached header layout, no numpy.load
    assert torch.equal(again, rows)
    again.zero_()
    assert torch.equal(store.checkpoints[0].gradients(), rows)
    store.verify()


def test_the_manifest_keeps_one_line_per_checkpoint(tmp_path):
    """Readable (indented header, one line per checkpoint) and written by json's C encoder."""
    w = GradientStoreWriter(tmp_path, _header())
    entries = [_write(w, c) for c in range(3)]
    text = (tmp_path / MANIFEST).read_text()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[1].startswith(' "format": ')
    start = lines.index(' "checkpoints": [')
    assert [json.loads(line.rstrip(",")) for line in lines[start + 1 : start + 4]] == entries
    assert lines[start + 4 :] == [" ]", "}"]
    assert json.loads(text) == GradientStore(tmp_path).manifest


def test_projection_spec_is_recorded(tmp_path):
    spec = ProjectionSpec(dim=6, seed=4, kind="rademacher")
    w = GradientStoreWriter(tmp_path, _header(projection=spec, precision=GradientPrecision("true", "float16")))
    _write(w, 0)
    store = GradientStore(tmp_path)
    assert store.projection_spec == spec and store.dim == 6
    proj = store.projector()
    assert proj.dim == 6 and proj.input_dim == 15 and proj.param_names == list(SHAPES)
    # It is the same projection as the one built at recording time.
    x = torch.randn(3, 15, generator=torch.Generator().manual_seed(0))
    same = RandomProjection(spec, list(SHAPES), [12, 3])
    assert torch.equal(proj.project_flat(x), same.project_flat(x))
    assert store.precision == GradientPrecision("true", "float16")
    assert "projected to 6" in repr(store)


def test_missing_rows_on_commit_raise_and_nothing_listed(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(0, 7), _rows(0)[:7])
    with pytest.raises(StoreError, match="3 of 10 sample rows were never written"):
        ck.commit(_state(0), {"step": 1, "epoch": 0, "lr": 0.1})
    assert len(GradientStore(tmp_path)) == 0
    ck.abort()
    assert not ck.tmp.exists()
    # The writer continues with the same index.
    _write(w, 0)
    assert [c.index for c in GradientStore(tmp_path).checkpoints] == [0]


def test_checkpoint_begun_but_not_committed_is_not_listed(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(N), _rows(1))
    store = GradientStore(tmp_path)
    assert len(store) == 1
    assert (tmp_path / ".tmp-ckpt-00001").is_dir()
    ck.abort()
    assert not (tmp_path / ".tmp-ckpt-00001").exists()
    store.refresh()
    assert len(store) == 1


def test_reader_sees_new_checkpoint_only_after_refresh(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    store = GradientStore(tmp_path)
    _write(w, 1)
    assert len(store) == 1
    store.refresh()
    assert [c.step for c in store.checkpoints] == [10, 20]
    assert torch.equal(store.checkpoints[1].gradients(), _rows(1))


def test_append_with_identical_header_and_mismatch_raises(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    w2 = GradientStoreWriter(tmp_path, _header())  # e.g. a resumed run
    assert w2.n_checkpoints == 1
    _write(w2, 1)
    assert [c.index for c in GradientStore(tmp_path).checkpoints] == [0, 1]
    for bad in (_header("float16"), _header(n=N + 1), _header(seed=3), _header(projection=ProjectionSpec(dim=4))):
        with pytest.raises(StoreError, match="different settings"):
            GradientStoreWriter(tmp_path, bad)
    assert len(GradientStore(tmp_path)) == 2  # nothing lost


def test_overwrite_replaces(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    _write(w, 1)
    w2 = GradientStoreWriter(tmp_path, _header("float16"), overwrite=True)
    assert w2.n_checkpoints == 0
    store = GradientStore(tmp_path)
    assert len(store) == 0 and store.grad_dtype == torch.float16
    assert not (tmp_path / "ckpt-00001").exists()
    _write(w2, 0)
    assert len(GradientStore(tmp_path)) == 1


@pytest.mark.parametrize("which", ["grads.npy", "weights.safetensors"])
def test_verify_detects_corruption(tmp_path, which):
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    _write(w, 1)
    GradientStore(tmp_path).verify()
    p = tmp_path / "ckpt-00001" / which
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"Checkpoint 1: {which}"):
        GradientStore(tmp_path).verify()
    p.unlink()
    with pytest.raises(StoreError, match="missing"):
        GradientStore(tmp_path).verify()


@pytest.mark.parametrize("which", ["grads.npy", "weights.safetensors"])
def test_verify_names_a_file_the_manifest_entry_does_not_list(tmp_path, which):
    """An entry without one of the checkpoint's files (an edited manifest) fails verify(), not only a later read."""
    w = GradientStoreWriter(tmp_path, _header())
    _write(w, 0)
    m = json.loads((tmp_path / MANIFEST).read_text())
    del m["checkpoints"][0]["files"][which]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match=rf"Checkpoint 0 of '{re.escape(str(tmp_path))}': .*lists no {which}"):
        GradientStore(tmp_path).verify()


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="No gradient store"):
        GradientStore(tmp_path / "nowhere")
    GradientStoreWriter(tmp_path, _header())
    m = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**m, "schema_version": 99}))
    with pytest.raises(StoreError, match=r"manifest\.json.: store schema version 99 is not supported"):
        GradientStore(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**m, "format": "something.else"}))
    with pytest.raises(StoreError, match="not a lightning_influence gradient store"):
        GradientStore(tmp_path)


_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_store import _header, _write, _rows, N
    from lightning_influence.trajectory.store import GradientStoreWriter
    import lightning_influence.trajectory.store as st
    w = GradientStoreWriter({path!r}, _header())
    _write(w, 0)
    _write(w, 1)
    mode = {mode!r}
    if mode == "mid_rows":
        ck = w.begin_checkpoint()
        ck.write_rows(torch.arange(5), _rows(2)[:5])
        os._exit(3)
    if mode == "before_manifest":
        # Dies after the checkpoint directory was renamed into place but before it was listed.
        st.GradientStoreWriter._commit = lambda self, entry: os._exit(3)
        _write(w, 2)
    """
)


@pytest.mark.parametrize("mode", ["mid_rows", "before_manifest"])
def test_checkpoint_killed_mid_write_is_not_listed(tmp_path, mode):
    path = tmp_path / "store"
    code = _CHILD.format(repo=str(REPO), tests=str(REPO / "tests" / "trajectory"), path=str(path), mode=mode)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    # The debris of the dead writer is there, but not listed.
    assert (path / (".tmp-ckpt-00002" if mode == "mid_rows" else "ckpt-00002")).is_dir()
    # Reopened in another process than the one that wrote it: same checkpoints, same data.
    store = GradientStore(path)
    assert [(c.index, c.step, c.epoch, c.eta) for c in store.checkpoints] == [(0, 10, 0, 0.1), (1, 20, 1, 0.2)]
    store.verify()
    assert torch.equal(store.checkpoints[1].gradients(), _rows(1))
    assert torch.equal(store.checkpoints[0].weights()["enc.weight"], _state(0)["enc.weight"])
    # A resumed writer replaces the debris and writes checkpoint 2 cleanly.
    w = GradientStoreWriter(path, _header())
    _write(w, 2)
    store.refresh()
    assert [c.index for c in store.checkpoints] == [0, 1, 2]
    assert torch.equal(store.checkpoints[2].gradients(), _rows(2))
    store.verify()
    assert not (path / ".tmp-ckpt-00002").exists()


def test_writeback_hints_are_asked_per_write_and_dropped_where_unsupported(tmp_path, monkeypatch):
    """sync_file_range only starts the disk writes early; a filesystem that refuses it changes nothing else."""
    if sys.platform.startswith("linux"):
        assert durable._sync_file_range() is not None
    calls = []

    def refusing(fd, offset, length, flags):
        calls.append((offset, length, flags))
        return -1

    monkeypatch.setattr(durable, "_sync_file_range", lambda: refusing)
    monkeypatch.setattr(durable, "_writeback_hint", True)
    w = GradientStoreWriter(tmp_path / "s", _header())
    _write(w, 0)
    _write(w, 1)
    assert len(calls) == 1 and calls[0][2] == durable._SYNC_FILE_RANGE_WRITE, "asked once, then not again"
    store = GradientStore(tmp_path / "s")
    store.verify()
    assert torch.equal(store.checkpoints[1].gradients(), _rows(1))
