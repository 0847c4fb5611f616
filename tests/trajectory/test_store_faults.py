"""The store under faults: full disks, corrupted or changed files, debris, foreign directories, broken manifests."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from test_store import N, _header, _rows, _state, _write

import lightning_influence.trajectory.store as store_mod
from lightning_influence import InfluenceAnalysis
from lightning_influence.errors import StoreError
from lightning_influence.trajectory.store import MANIFEST, GradientStore, GradientStoreWriter, durable, shard_bounds


def _no_temp_files(path):
    return [p.name for p in path.iterdir() if p.name.startswith(".tmp") or ".tmp-" in p.name]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _two_checkpoints(path):
    w = GradientStoreWriter(path, _header())
    _write(w, 0)
    return w


def _assert_intact(path, n=1):
    store = GradientStore(path)
    assert len(store) == n
    store.verify()
    assert torch.equal(store.checkpoints[0].gradients(), _rows(0))
    assert not _no_temp_files(path)


def test_disk_full_when_the_rows_file_is_preallocated(tmp_path, monkeypatch):
    w = _two_checkpoints(tmp_path)
    monkeypatch.setattr(durable, "preallocate", _enospc)
    with pytest.raises(OSError, match=r"Not enough disk space for the gradient store at .*needs 728 bytes") as info:
        w.begin_checkpoint()
    assert info.value.errno == errno.ENOSPC and str(tmp_path) in str(info.value)
    _assert_intact(tmp_path)


def test_disk_full_while_writing_rows(tmp_path, monkeypatch):
    w = _two_checkpoints(tmp_path)
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(4), _rows(1)[:4])
    monkeypatch.setattr(os, "pwrite", _enospc)
    # Rows are written behind the computation: the error surfaces at the next write or, at the
    # latest, at commit -- before anything is listed.
    with pytest.raises(OSError, match="gradient rows.*needs \\d+ bytes"):
        ck.write_rows(torch.arange(4, 8), _rows(1)[4:8])
        ck.write_rows(torch.arange(8, N), _rows(1)[8:])
        ck.commit(_state(1), {"step": 20, "epoch": 1, "lr": 0.2})
    ck.abort()
    monkeypatch.undo()
    _assert_intact(tmp_path)
    _write(w, 1)  # the writer carries on once there is space
    assert len(GradientStore(tmp_path)) == 2


def test_disk_full_while_writing_weights(tmp_path, monkeypatch):
    w = _two_checkpoints(tmp_path)
    real = durable.write_file

    def fail_weights(path, data):
        if path.name == store_mod.WEIGHTS_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(durable, "write_file", fail_weights)
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(N), _rows(1))
    with pytest.raises(OSError, match=r"weights\.safetensors.*needs \d+ bytes"):
        ck.commit(_state(1), {"step": 20, "epoch": 1, "lr": 0.2})
    ck.abort()
    _assert_intact(tmp_path)


def test_disk_full_at_the_manifest_lists_nothing_and_leaves_nothing(tmp_path, monkeypatch):
    w = _two_checkpoints(tmp_path)
    real = durable.write_file

    def fail_manifest(path, data):
        if path.name.startswith(MANIFEST):
            real(path, data[: len(data) // 2])  # a partial temp manifest, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(durable, "write_file", fail_manifest)
    with pytest.raises(OSError, match=r"manifest\.json"):
        _write(w, 1)
    assert not (tmp_path / "ckpt-00001").exists(), "a renamed but unlisted checkpoint was left behind"
    _assert_intact(tmp_path)
    assert w.n_checkpoints == 1
    monkeypatch.undo()
    _write(w, 1)
    assert [c.index for c in GradientStore(tmp_path).checkpoints] == [0, 1]


def test_a_real_posix_fallocate_failure(tmp_path):
    # 2**40 rows of 15 floats: larger than any filesystem allows a file to be (EFBIG) or holds (ENOSPC);
    # posix_fallocate refuses it up front, without writing anything.
    w = GradientStoreWriter(tmp_path / "huge", _header(n=2**40))
    with pytest.raises(OSError, match="Not enough disk space for the gradient store") as info:
        w.begin_checkpoint()
    assert info.value.errno in (errno.EFBIG, errno.ENOSPC)
    assert not _no_temp_files(tmp_path / "huge")


def test_disk_full_creating_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "write_file", _enospc)
    with pytest.raises(OSError, match=r"gradient store at .*manifest\.json"):
        GradientStoreWriter(tmp_path / "s", _header())
    assert not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize("which", ["grads.npy", "weights.safetensors"])
def test_scoring_verifies_lazily_and_names_the_corrupted_file(tmp_path, which):
    w = _two_checkpoints(tmp_path)
    _write(w, 1)
    p = tmp_path / "ckpt-00001" / which
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    store = GradientStore(tmp_path)
    assert torch.equal(store.checkpoints[0].gradients(), _rows(0))  # only what is used is checked
    store.checkpoints[0].state()
    read = store.checkpoints[1].gradients if which == "grads.npy" else store.checkpoints[1].state
    with pytest.raises(StoreError, match=f"Checkpoint 1: {which} does not match its checksum.*{p}.*corrupted"):
        read()


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_truncated_or_missing_files_are_named(tmp_path, damage):
    w = _two_checkpoints(tmp_path)
    p = tmp_path / "ckpt-00000" / "grads.npy"
    if damage == "delete":
        p.unlink()
    else:
        p.write_bytes(p.read_bytes()[: 100 if damage == "truncate" else 0])
    store = GradientStore(tmp_path)
    expected = {
        "truncate": "has 100 bytes, expected 728 \\(truncated\\)",
        "empty": "has 0 bytes",
        "delete": "is missing",
    }
    with pytest.raises(StoreError, match=f"Checkpoint 0: grads.npy {expected[damage]}"):
        store.checkpoints[0].gradients()
    del w


def test_analysis_refuses_a_corrupted_store(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    ck = w.begin_checkpoint()
    ck.write_rows(torch.arange(N), _rows(0))
    model = torch.nn.Module()
    model.enc = torch.nn.Linear(4, 3)
    state = {"enc.weight": model.enc.weight.detach().clone(), "enc.bias": model.enc.bias.detach().clone()}
    ck.commit(state, {"step": 1, "epoch": 0, "lr": 1.0})
    raw = tmp_path / "ckpt-00000" / "grads.npy"
    arr = np.load(raw)
    arr[3, 2] = 1e30  # one flipped value: the scores would change silently
    np.save(raw, arr)
    analysis = InfluenceAnalysis(tmp_path, model, train_loss=lambda m, b: m.enc(b).pow(2).sum(1))
    with pytest.raises(StoreError, match="grads.npy does not match its checksum"):
        analysis.tracin(torch.randn(2, 4))


def test_a_stale_reader_detects_the_store_changed_under_it(tmp_path):
    w = _two_checkpoints(tmp_path)
    _write(w, 1)
    reader = GradientStore(tmp_path)
    old_step = reader.checkpoints[1].step
    # Another writer rolls the store back and records checkpoint 1 again, with other rows.
    w2 = GradientStoreWriter(tmp_path, _header())
    w2.truncate(1)
    _write(w2, 1, rows=_rows(7))
    with pytest.raises(StoreError, match="changed since this reader opened it: checkpoint 1 .* was rewritten"):
        reader.checkpoints[1].gradients()
    reader.refresh()
    assert reader.checkpoints[1].step == old_step and torch.equal(reader.checkpoints[1].gradients(), _rows(7))
    # A checkpoint dropped under an open reader.
    w2.truncate(1)
    with pytest.raises(StoreError, match="checkpoint 1 .* was dropped"):
        reader.checkpoints[1].gradients()


def test_a_reader_verified_before_a_change_notices_it(tmp_path):
    w = _two_checkpoints(tmp_path)
    _write(w, 1)
    reader = GradientStore(tmp_path)
    reader.checkpoints[1].gradients()  # verified once
    w2 = GradientStoreWriter(tmp_path, _header())
    w2.truncate(1)
    _write(w2, 1, rows=_rows(7))
    with pytest.raises(StoreError, match="changed since this reader opened it"):
        reader.checkpoints[1].gradients()


def test_stray_temp_files_are_cleaned_at_the_next_open_for_writing(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / ".tmp-ckpt-00001").mkdir()
    (tmp_path / ".tmp-ckpt-00001" / "grads.npy").write_bytes(b"x")
    (tmp_path / "manifest.json.tmp-12345").write_text("{")
    (tmp_path / "ckpt-00003").mkdir()  # renamed, never listed
    GradientStore(tmp_path).verify()  # readers ignore debris
    GradientStoreWriter(tmp_path, _header())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000", "manifest.json"]


def test_a_directory_with_other_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"holds files the gradient store did not write \(\['notes.txt'\]\)"):
            GradientStoreWriter(tmp_path, _header(), overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    # A store with a stranger's file next to it: overwrite refuses and deletes nothing.
    store = tmp_path / "store"
    _two_checkpoints(store)
    (store / "results.csv").write_text("a,b")
    with pytest.raises(StoreError, match="results.csv"):
        GradientStoreWriter(store, _header(), overwrite=True)
    assert (store / "results.csv").exists() and len(GradientStore(store)) == 1


def test_overwrite_removes_only_what_the_store_wrote(tmp_path):
    w = _two_checkpoints(tmp_path / "s")
    _write(w, 1)
    (tmp_path / "s" / ".tmp-ckpt-00002").mkdir()
    (tmp_path / "neighbour.txt").write_text("kept")
    w2 = GradientStoreWriter(tmp_path / "s", _header(), overwrite=True)
    assert w2.run_id != w.run_id
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json"]
    assert (tmp_path / "neighbour.txt").read_text() == "kept"


def test_runs_never_mix(tmp_path):
    w = _two_checkpoints(tmp_path)
    with pytest.raises(StoreError, match=f"already holds a gradient store of run '{w.run_id}' .*steps \\[10\\]"):
        GradientStoreWriter(tmp_path, _header(), new_run=True)
    with pytest.raises(StoreError, match=f"belongs to run '{w.run_id}'.*recorded by run 'other'"):
        GradientStoreWriter(tmp_path, _header(), run_id="other")
    same = GradientStoreWriter(tmp_path, _header(), run_id=w.run_id)
    assert same.n_checkpoints == 1 and GradientStore(tmp_path).run_id == w.run_id


def test_broken_manifests_are_clear_errors(tmp_path):
    _two_checkpoints(tmp_path)
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match=r"manifest.json' is not valid JSON .*truncated or corrupted"):
        GradientStore(tmp_path)
    with pytest.raises(StoreError, match="not valid JSON"):
        GradientStoreWriter(tmp_path, _header())
    m = json.loads(text)
    del m["checkpoints"][0]["lr"]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"checkpoint entry 0 lacks \['lr'\]"):
        GradientStore(tmp_path)
    m = json.loads(text)
    del m["dim"]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"lacks the entries \['dim'\]"):
        GradientStore(tmp_path)


def test_rows_outside_the_store_are_refused(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    ck = w.begin_checkpoint()
    with pytest.raises(StoreError, match=r"Sample ids 8..10 fall outside the rows \[0, 10\).*10 samples"):
        ck.write_rows(torch.tensor([8, 9, 10]), torch.randn(3, 15))
    with pytest.raises(StoreError, match=r"shape \(2, 15\), got \(2, 14\)"):
        ck.write_rows(torch.tensor([0, 1]), torch.randn(2, 14))
    ck.abort()


def test_shards_written_by_several_writers_tile_one_file(tmp_path):
    """What the ranks of a DDP run do: rank 0 begins the checkpoint, every rank writes its rows."""
    w = GradientStoreWriter(tmp_path, _header())
    rows = _rows(0)
    bounds = [shard_bounds(N, 3, r) for r in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    ck = w.begin_checkpoint(stop=bounds[0][1])
    others = [GradientStoreWriter(tmp_path, _header(), run_id=w.run_id, attach=True) for _ in range(2)]
    infos = []
    for other, (start, stop) in zip(others, bounds[1:]):
        shard = other.open_shard(ck.index, start, stop)
        shard.write_rows(torch.arange(start, stop), rows[start:stop])
        infos.append(shard.finish())
    ck.write_rows(torch.arange(0, 3), rows[:3])
    ck.commit(_state(0), {"step": 1, "epoch": 0, "lr": 0.1}, shards=infos)
    store = GradientStore(tmp_path)
    assert torch.equal(store.checkpoints[0].gradients(), rows)
    assert len(store.checkpoints[0].entry["files"]["grads.npy"]["segments"]) == 3
    store.verify()
    raw = tmp_path / "ckpt-00000" / "grads.npy"
    data = bytearray(raw.read_bytes())
    data[-5] ^= 0x01  # in the last rank's segment
    raw.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its checksum"):
        GradientStore(tmp_path).checkpoints[0].gradients()


def test_a_shard_missing_rows_is_not_listed(tmp_path):
    w = GradientStoreWriter(tmp_path, _header())
    ck = w.begin_checkpoint(stop=5)
    ck.write_rows(torch.arange(5), _rows(0)[:5])
    shard = w.open_shard(ck.index, 5, 10)
    shard.write_rows(torch.arange(5, 8), _rows(0)[5:8])
    with pytest.raises(StoreError, match="2 of 10 sample rows were never written"):
        ck.commit(_state(0), {"step": 1, "epoch": 0, "lr": 0.1}, shards=[shard.finish()])
    ck.abort()
    assert len(GradientStore(tmp_path)) == 0 and not _no_temp_files(tmp_path)


def test_a_reader_of_a_replaced_store_is_stale(tmp_path):
    w = _two_checkpoints(tmp_path)
    reader = GradientStore(tmp_path)
    w2 = GradientStoreWriter(tmp_path, _header(), overwrite=True)
    _write(w2, 0, rows=_rows(5))
    assert w2.run_id != w.run_id
    with pytest.raises(StoreError, match="changed since this reader opened it"):
        reader.checkpoints[0].gradients()
    reader.refresh()
    assert reader.run_id == w2.run_id and torch.equal(reader.checkpoints[0].gradients(), _rows(5))
