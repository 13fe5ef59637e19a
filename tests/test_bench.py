"""The benchmark script still runs (a smoke test; its figures are not asserted: speed is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.meta import META_GRADIENTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_bench_quick_runs_and_reports_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_meta_step.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    text = json.dumps(report)
    for name in ("exact", "first_order", "per-fedavg", "local-moml", "end_to_end_over_bare_loop"):
        assert name in text
    assert report["round"]["end_to_end_over_bare_loop"] > 0


def test_bench_estimators_quick_reports_every_estimator(tmp_path):
    out = tmp_path / "bench_estimators.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_estimators.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    for name in META_GRADIENTS:
        mine = [c for c in cells if c["estimator"] == name]
        assert mine, name
        assert all(c["ms"]["min_ms"] > 0 and c["ms"]["median_ms"] > 0 for c in mine), name
        assert all(c["peak_bytes"] > 0 for c in mine), name
        assert f"| {name} |" in proc.stdout
