"""Every Python block of README.md runs, in order, in one namespace (so none can rot).

The only change to the code as written: every ``Trainer`` is capped at ``TINY_EPOCHS`` epochs
(and runs without progress bars), so the whole README runs in the test suite's time.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_EPOCHS = 2


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_documented_blocks():
    blocks = python_blocks(README.read_text())
    names = ["class MyVAE", "InfluenceAnalysis(", "InfluenceFunction(", "FragilityCheck(", "RELAX("]
    for name in names:
        assert any(name in b for b in blocks), f"no README block with {name}"


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    original = pl.Trainer.__init__

    def tiny(self, *args, **kwargs):
        kwargs["max_epochs"] = min(kwargs.get("max_epochs") or TINY_EPOCHS, TINY_EPOCHS)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", tiny)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    blocks = python_blocks(README.read_text())
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert namespace["scores"].shape == (8, len(namespace["dm"].train_set))
    assert namespace["estimates"].dim() == 1
    assert (tmp_path / "runs" / "fragility.json").is_file()
    assert (tmp_path / "runs" / "my_vae" / "manifest.json").is_file()
    report = namespace["report"]
    for name in ("spearman", "pearson"):
        lo, hi = report.metrics[f"{name}_seed_ci_low"], report.metrics[f"{name}_seed_ci_high"]
        assert not (lo < -1 or hi > 1)
