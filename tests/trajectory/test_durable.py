"""Durable writes: concurrent fsyncs, atomic replacement."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from lightning_influence.trajectory.store import durable


def _files(tmp_path, n):
    fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY) for i in range(n)]
    for fd in fds:
        os.write(fd, b"rows")
    return fds


def test_fsync_all_syncs_every_file_concurrently_and_names_the_first_failure(tmp_path, monkeypatch):
    fds = _files(tmp_path, 4)
    real = os.fsync
    barrier = threading.Barrier(4, timeout=10)
    synced = []

    def fsync(fd):
        barrier.wait()  # passes only when all four fsyncs are under way at once
        synced.append(fd)
        if fd in (fds[1], fds[3]):
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    named = [(fd, lambda err, i=i: OSError(err.errno, f"file {i}: {err.strerror}")) for i, fd in enumerate(fds)]
    with pytest.raises(OSError, match="file 1: I/O error"):  # the first failure in the order given
        durable.fsync_all(named)
    assert sorted(synced) == sorted(fds)
    for fd in fds:
        os.close(fd)


def test_fsync_all_waits_for_every_fsync_even_when_the_callers_own_is_interrupted(tmp_path, monkeypatch):
    # The caller closes the files right after: no fsync may still run on a closed (or reused) descriptor.
    fds = _files(tmp_path, 3)
    real = os.fsync
    done = []

    def fsync(fd):
        if fd == fds[0]:  # the calling thread's own file
            raise KeyboardInterrupt
        time.sleep(0.2)
        real(fd)
        done.append(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        durable.fsync_all([(fd, lambda err: err) for fd in fds])
    assert sorted(done) == sorted(fds[1:])
    for fd in fds:
        os.close(fd)


def test_write_atomic_replaces_the_file_whole_or_leaves_it(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    durable.write_atomic(path, b"old")
    real = durable.write_file

    def half(p, data):
        real(p, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable, "write_file", half)
    with pytest.raises(OSError, match=r"Not enough disk space .* manifest\.json: it needs 3 bytes"):
        durable.write_atomic(path, b"new", store=tmp_path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "the temporary file was removed"
