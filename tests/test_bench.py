"""The benchmark script still runs (a smoke test; its figures are not asserted: speed is not tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakes import check_provenance
from fedmeta.meta import META_GRADIENTS

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``bench/<script>`` with ``args`` and ``--out out`` (the timeout is a hang guard, many times the idle
    duration); it must exit 0 and write a JSON report with a provenance block. Returns the process and the report."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check_provenance(report["provenance"])
    return proc, report


@pytest.mark.ray
def test_bench_quick_runs_and_reports_every_mode(ray_runner, tmp_path):  # its simulation attaches to the session's Ray
    out = tmp_path / "bench.json"
    proc, report = run_bench("bench_meta_step.py", "--quick", out=out, timeout=600)
    assert {"quick": True, "out": str(out)}.items() <= report["provenance"]["config"].items()
    text = json.dumps(report)
    for name in ("exact", "first_order", "per-fedavg", "local-moml", "end_to_end_over_bare_loop"):
        assert name in text
    assert report["round"]["end_to_end_over_bare_loop"] > 0


@pytest.mark.subprocess
def test_bench_estimators_quick_reports_every_estimator(tmp_path):
    out = tmp_path / "bench_estimators.json"
    proc, report = run_bench("bench_estimators.py", "--quick", out=out, timeout=600)
    assert {"quick": True, "out": str(out)}.items() <= report["provenance"]["config"].items()
    cells = report["cells"]
    for name in META_GRADIENTS:
        mine = [c for c in cells if c["estimator"] == name]
        assert mine, name
        assert all(c["ms"]["min_ms"] > 0 and c["ms"]["median_ms"] > 0 for c in mine), name
        assert all(c["peak_bytes"] > 0 for c in mine), name
        assert f"| {name} |" in proc.stdout


@pytest.mark.ray
def test_bench_scale_smoke_reports_every_section(ray_runner, tmp_path):  # its simulations attach to the session's Ray
    """``--smoke``: every section on the smallest sizes (the figures stay in ``make bench``). The timeout is a hang
    guard, many times the idle duration."""
    out = tmp_path / "bench_scale.json"
    proc, report = run_bench("bench_scale.py", "--smoke", out=out, timeout=1800)
    assert {"quick": False, "smoke": True, "out": str(out)}.items() <= report["provenance"]["config"].items()
    assert report["provenance"]["git"]["commit"]  # run in a process of its own, from this checkout
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
    assert report["targets"] and all(v > 0 for t in report["targets"] for v in t["values"].values())
    assert "Targets" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)


@pytest.mark.subprocess
def test_bench_local_round_quick_times_every_cell(tmp_path):
    out = tmp_path / "local_round.json"
    proc, report = run_bench("bench_local_round.py", "--quick", out=out, timeout=600)
    assert {"quick": True, "out": str(out)}.items() <= report["provenance"]["config"].items()
    cells = report["cells"]
    assert {"plain PyTorch, epoch slices", "FedAvg func, check/step", "FedAvg fast", "Per-FedAvg FO fast"} <= set(cells)
    assert all(c["us_per_step_min"] > 0 and c["us_per_step_median"] >= c["us_per_step_min"] for c in cells.values())


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_bench_peers_exports_fedmetas_own_clients_for_the_peer(tmp_path):
    """The peer trains on fedmeta's split: the file holds each client's training data, flattened, unchanged."""
    import numpy as np

    from fedmeta.data import client_data

    peers = _bench_module("bench_peers")
    cfg = peers.fedmeta_configs(peers.SMOKE)["fedavg_multi"]
    info = peers.export_split(cfg, tmp_path / "split.npz")
    f = np.load(tmp_path / "split.npz")
    assert int(f["num_clients"]) == cfg.num_clients == info["clients"]
    for c in range(cfg.num_clients):
        d = client_data(cfg.dataset, c, **cfg.data_kwargs())
        assert np.array_equal(f[f"x_{c}"], d.x_train.reshape(d.num_train, -1).numpy()) and f[f"x_{c}"].shape[1] == 784
        assert np.array_equal(f[f"y_{c}"], d.y_train.numpy()) and len(set(f[f"y_{c}"].tolist())) == 2  # 2 classes each
    assert info["train_samples"] == [peers.SMOKE.train_per_client] * cfg.num_clients


@pytest.mark.ray
def test_bench_peers_smoke_measures_pfl_and_fedmeta_in_one_run(ray_runner, tmp_path):  # fedmeta's runs attach to the session's Ray
    """``bench_peers.py --smoke``: pfl-research's venv built (cached in build/pfl060), its probe (one process of 1 or 2
    threads, and 2 real worker processes of pfl's distributed simulation, every one of them gone afterwards), and one
    interleaved repeat of pfl at its best and fedmeta's three runs; every ratio comes from this run's figures. The
    timeout is a hang guard."""
    out = tmp_path / "peers.json"
    proc, report = run_bench("bench_peers.py", "--smoke", out=out, timeout=1800)
    clients, n, batch = (report["workload"][k] for k in ("clients", "train_per_client", "batch_size"))
    steps = clients * -(-n // batch)  # one local epoch, every client once
    probe = report["pfl_probe"]
    assert list(probe) == ["1x1", "1x2", "2x1"] and report["smoke"] and not report["quick"]
    for key, run in probe.items():
        assert f"{run['workers']}x{run['threads']}" == key and run["versions"]["pfl"] == "0.6.0"
        assert run["client_steps_per_round"] == steps and run["busy_cores"] > 0 and run["steady_busy_cores"] > 0
        assert len(run["worker_pids"]) == len(set(run["worker_pids"])) == run["workers"]
        assert sum(run["users_per_worker"]) == clients
    assert probe["2x1"]["users_per_worker"] == [clients // 2] * 2  # pfl split the cohort between its 2 workers
    assert probe["2x1"]["final_train_loss"] == pytest.approx(probe["1x1"]["final_train_loss"], rel=1e-5)
    (rep,) = report["repeats"]
    fastest = max(probe.values(), key=lambda r: r["client_steps_per_s"])
    assert report["pfl_best"] == {"workers": fastest["workers"], "threads": fastest["threads"]}
    assert (rep["pfl"]["workers"], rep["pfl"]["threads"]) == (fastest["workers"], fastest["threads"])
    assert rep["pfl"]["client_steps_per_round"] == steps
    pids = [p for run in [*probe.values(), rep["pfl"]] for p in run["worker_pids"]]
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []  # every pfl worker process was stopped
    for key in ("fedavg_multi", "fedavg_single", "per_fedavg_fo"):
        assert rep[key]["client_steps_per_s"] > 0 and rep[key]["ray_leftovers"] == [] and rep[key]["busy_cores"] > 0
    assert rep["fedavg_multi"]["config"]["num-nodes"] == 2 and rep["fedavg_single"]["config"]["num-nodes"] == 0
    for key in ("fedavg_multi", "fedavg_single"):
        fed, pfl = rep[key], rep["pfl"]
        assert rep["ratios"][f"{key}_over_pfl"] == pytest.approx(fed["client_steps_per_s"] / pfl["client_steps_per_s"])
        assert rep["ratios_per_core"][f"{key}_over_pfl"] == pytest.approx(
            (fed["client_steps_per_s"] / fed["steady_busy_cores"]) / (pfl["client_steps_per_s"] / pfl["steady_busy_cores"]))
    quoted = report["pfllib_reference"]["client_meta_steps_per_s"]
    assert report["medians"]["per_fedavg_over_pfllib_quoted"] == pytest.approx(rep["per_fedavg_fo"]["client_steps_per_s"] / quoted)
    assert "Per-FedAvg FO / PFLlib (quoted figure" in proc.stdout and "Per busy core" in proc.stdout
    # the same invocation: the plain-PyTorch reference, the floor bench, and where each steady round went
    ref = report["reference"]
    plain = ref["plain_client_steps_per_s"]["plain PyTorch, epoch slices"]
    assert plain > 0 and report["medians"]["fedavg_multi_per_core_over_plain"] == pytest.approx(
        rep["fedavg_multi"]["client_steps_per_s"] / rep["fedavg_multi"]["steady_busy_cores"] / plain)
    assert [r["algorithm"] for r in ref["floor"]["rows"]] == ["FedAvg"]  # at smoke size; the full run has all three
    assert all(r["auto"] in ("vmap", "compile", "loop") and r["default_of_floor"] > 0 for r in ref["floor"]["rows"])
    for key in ("fedavg_multi", "fedavg_single", "per_fedavg_fo"):
        sp = rep[key]["split"]
        assert 0 < sp["node_handler_s"] < sp["round_s"] == rep[key]["steady_median_s"]
        assert 0 < rep[key]["steady_busy_cores"] <= os.cpu_count() + 0.5
    assert "Where fedmeta's steady rounds go" in proc.stdout and "hand-batched floor" in proc.stdout


@pytest.mark.ray
def test_bench_default_run_smoke_runs_every_layout_side_by_side(ray_runner, tmp_path):  # its fedmeta-sim children attach to the session's Ray
    out = tmp_path / "bench_default_run.json"
    proc, report = run_bench("bench_default_run.py", "--smoke", out=out, timeout=1800)
    rows = {r["layout"]: r for r in report["rows"]}
    assert list(rows) == ["one client per node", "default: multi-client, vmap", "multi-client nodes, loop"]
    for r in rows.values():
        split = r["split_s"]
        assert r["client_steps"] == 3 * 3 * 4 and r["rounds"] == 3  # 3 rounds x 3 clients x H = 4
        assert r["wall_s"] > 0 and r["client_steps_per_s"] > 0
        assert min(split["start_up"], split["first_round"], split["train_math"], split["train_framework"], split["evaluation"],
                   split["checkpoint"]) > 0
        assert 0 < split["evaluation_math"] < split["evaluation"]
        # the parts add up to the wall time (the train framework's part and the rest are what is left of measured totals)
        parts = ("start_up", "first_round", "train_math", "train_framework", "evaluation", "checkpoint", "rest")
        assert set(split) == {*parts, "evaluation_math"} and sum(split[k] for k in parts) == pytest.approx(r["wall_s"], rel=1e-9)
    assert rows["one client per node"]["nodes"] == {"local-moml": 6}
    slots = min(os.cpu_count() or 1, 6)  # num-nodes = -1 (the default): one node per Ray actor slot (a CPU each), at most one per client
    assert rows["default: multi-client, vmap"]["nodes"] == rows["multi-client nodes, loop"]["nodes"] == {"local-moml": slots}
    base = rows["one client per node"]["final"]
    for r in rows.values():  # the same clients, batches and math: the same final loss to round-off
        for a, f in r["final"].items():
            assert f["loss-after"] == pytest.approx(base[a]["loss-after"], rel=1e-5)
    assert "multi-client nodes, loop: final loss-after minus one client per node" in proc.stdout


def _floor_batches(case, clients: int, seed: int = 0):
    """Per-client batches of ``case``'s step from random images (any data does: the check compares two computations)."""
    from fedmeta import algorithms
    from fedmeta.batched import stack_batches

    def sampler(c: int):
        g = torch.Generator().manual_seed(seed * 100 + c)
        return lambda k: (torch.randn(k, 1, 28, 28, generator=g), torch.randint(0, 10, (k,), generator=g))

    return stack_batches([algorithms.get(case.algorithm).draw(sampler(c), case.hp) for c in range(clients)])


def test_bench_floor_takes_fedmetas_step_and_its_check_catches_a_different_one():
    import dataclasses

    from fedmeta import fast
    from fedmeta.models import mlp_40_40

    floor = _bench_module("bench_floor")
    torch.manual_seed(0)
    model = mlp_40_40()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    f = fast.make_loss(model, torch.nn.functional.cross_entropy)
    for case in floor.cases():
        errors = floor.check_same_step(case, model, f, w, _floor_batches(case, clients=3))
        assert set(errors) == {"floor", "autograd floor", "fast step"} and max(errors.values()) <= floor.UPDATE_RTOL, case
    exact = next(c for c in floor.cases() if c.floor == "exact")
    without_hessian = dataclasses.replace(exact, floor="first_order")  # the floor's step drops the alpha H v term
    with pytest.raises(AssertionError, match="differ from fedmeta's vmapped step"):
        floor.check_same_step(without_hessian, model, f, w, _floor_batches(exact, clients=3))


@pytest.mark.subprocess
def test_bench_floor_quick_reports_every_cell_as_a_fraction_of_the_floor(tmp_path):
    out = tmp_path / "bench_floor.json"
    proc, report = run_bench("bench_floor.py", "--quick", "--clients", "2", out=out, timeout=600)
    floor = _bench_module("bench_floor")
    assert [(r["algorithm"], r["clients"]) for r in report["rows"]] == [(c.label, 2) for c in floor.cases()]
    for r in report["rows"]:
        assert set(r["client_steps_per_s"]) == set(floor.CELLS) and all(v > 0 for v in r["client_steps_per_s"].values())
        assert r["of_floor"]["floor"] == 1.0 and max(r["equality_rel_error"].values()) <= floor.UPDATE_RTOL
    assert "vmap node step" in proc.stdout
