"""Exact-leave-one-out reference rows of a fragility report (KDE and k-NN)."""

from __future__ import annotations

import math

import torch

from lightning_influence.fragility import FragilityReport
from lightning_influence.fragility.references import density_references, scott_bandwidth


def _points(n=40, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_closed_forms_agree_perfectly_with_refits_through_the_metrics():
    refs = density_references(_points(), _points(6, seed=1), k=4)
    for name in ("kde", "knn"):
        assert refs[name]["max_abs_error"] < 1e-10
        assert refs[name]["pearson"] > 0.999999
    assert refs["kde"]["bandwidth"] == scott_bandwidth(_points())
    assert refs["knn"]["k"] == 4.0


def test_report_lists_the_references_with_a_verdict_and_survives_json():
    report = FragilityReport(retrain="warm_start", removal="single", selection="abs", n_train=40, seeds=[0])
    report.add_density_references(_points(), _points(5, seed=2))
    verdicts = {v.check: v for v in report.verdicts()}
    assert verdicts["reference"].status == "OK"
    assert "reference kde (exact leave-one-out)" in report.summary()
    again = FragilityReport.from_json(report.to_json())
    assert math.isclose(again.references["knn"]["pearson"], report.references["knn"]["pearson"])
    report.references["kde"]["max_abs_error"] = 1e-3  # a broken pipeline must not pass
    assert {v.check: v for v in report.verdicts()}["reference"].status == "FAIL"
