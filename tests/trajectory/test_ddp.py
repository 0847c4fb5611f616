"""Two-process CPU DDP: the recorder records the whole dataset on rank 0 and nothing deadlocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_influence import GradientStore


@pytest.mark.slow
def test_ddp_two_processes_record_on_rank_zero(tmp_path):
    job = Path(__file__).with_name("ddp_recording_job.py")
    proc = subprocess.run(
        [sys.executable, str(job), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK0_DONE 6" in proc.stdout  # 96 samples / 2 ranks / batch 16 = 3 steps per epoch
    assert "records on global rank 0 only" in proc.stderr
    store = GradientStore(tmp_path / "store")
    assert len(store) == 2 and store.n_samples == 96
    # Each rank takes 3 steps per epoch; the learning-rate credit is per epoch.
    assert all(c.entry["optimizer_steps"] == 3 and c.lr == pytest.approx(1e-3) for c in store.checkpoints)
    assert torch.isfinite(store.checkpoints[-1].gradients()).all()
