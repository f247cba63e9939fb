"""Smoke test of benchmarks/weight_ensembling.py: the quick mode runs end to end and writes its report."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import weight_ensembling  # noqa: E402


def test_quick_run_writes_rows_and_report(tmp_path):
    weight_ensembling.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    methods = [r["method"] for r in rows]
    assert methods == ["plain", "plain+WiSE-FT", "depth 1", "depth 1+WiSE-FT", "best single run of 4 (val)",
                       "greedy soup of 4"]
    assert all(0.0 <= float(r["test_acc_bn"]) <= 1.0 for r in rows)
    wise = rows[1]
    assert float(wise["alpha"]) in weight_ensembling.ALPHAS and len(wise["curve"].split(";")) == 11
    # WiSE-FT picks a by validation accuracy: the chosen a's value is the curve's maximum
    assert float(wise["val_acc"]) == pytest.approx(max(float(v) for v in wise["curve"].split(";")), abs=1e-4)
    report = (tmp_path / "results.md").read_text()
    assert "plain+WiSE-FT − plain" in report and "greedy soup of 4" in report
