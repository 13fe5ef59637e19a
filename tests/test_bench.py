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
def test_bench_quick_runs_and_reports_every_mode(ray_runner, tmp_path):  # its simulation attaches to the session's Ray
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_meta_step.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    text = json.dumps(report)
    for name in ("exact", "first_order", "per-fedavg", "local-moml", "end_to_end_over_bare_loop"):
        assert name in text
    assert report["round"]["end_to_end_over_bare_loop"] > 0


@pytest.mark.subprocess
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


@pytest.mark.ray
def test_bench_scale_smoke_reports_every_section(tmp_path):
    """``--smoke``: every section on the smallest sizes (the figures stay in ``make bench``). The timeout is a hang
    guard, many times the idle duration."""
    out = tmp_path / "bench_scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["budget"]["workloads"] == ["sine"] and "mlp" not in report  # one workload runs every code path
    for wl in report["budget"]["workloads"]:
        part = report[wl]
        assert {(r["path"], r["threads"]) for r in part["bare"]["rates"]} == {("loop", 1), ("vmap", 1), ("loop", 2), ("vmap", 2)}
        assert all(r["steps_per_s_min"] > 0 and r["steps_per_s_median"] > 0 for r in part["bare"]["rates"])
        for run in [*part["e2e"].values(), *part["scale"].values()]:
            assert run["client_steps_per_s"] > 0 and run["steady_median_s"] > 0
            pss = run["memory"]["peak_pss_bytes"]  # None where /proc/<pid>/smaps_rollup is not readable
            assert run["memory"]["peak_rss_bytes"] > 0 and (pss is None or pss > 0)
            assert run["ray_leftovers"] == []
        assert set(part["e2e"]) == {"one_client_per_node", "multi_client_nodes"} and part["scale"]
        assert part["ratios"] and all(x > 0 for v in part["ratios"].values() for x in v.values())
        assert part["bare"]["concurrent_vmap_1thread"]["steps_per_s"] > 0
    for kind in ("single", "vmapped"):
        assert report["exact_vs_first_order"][kind]["exact_over_first_order"]["median"] > 0
    assert report["pfllib"]["e2e"]["client_steps_per_s"] > 0 and report["pfllib"]["over_pfllib"] > 0
    assert report["pfllib"]["bare_vmap_1thread"]["steps_per_s_median"] > 0
    assert report["pfllib"]["concurrent_vmap_1thread"]["steps_per_s"] > 0
    assert report["targets"] and all(v > 0 for t in report["targets"] for v in t["values"].values())
    assert "Targets" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)
