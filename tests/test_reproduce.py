"""The reproduction runner: grid, momentum tuning and ordering checks (fake runs), and one tiny real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fakes import check_provenance
from fedmeta import config as C
from fedmeta.provenance import RUNS_PREFIX
from fedmeta.simulations import reproduce, reproduce_flower, reproduce_ggs
from fedmeta.simulations.reproduce_flower import Budget
from fedmeta.simulations.runcache import runs_line


def fake_run(log):
    def run(cfg):
        log.append(cfg)
        before = 0.5
        after = {C.FEDAVG: 0.7, C.PER_FEDAVG: 0.8, C.LOCAL_MOML: 0.75 + 0.1 * (cfg.momentum == 0.9)}[cfg.algorithm]
        final = {C.ACC_BEFORE: before, C.ACC_AFTER: after}
        return {"final": final, "evaluate": {cfg.num_rounds: final}, "clients": {0: final}, "path": "-"}

    return run


def test_fig1_grid_and_ordering():
    log = []
    summary, runs = reproduce_flower.fig1(Budget(rounds=7, evaluate_every=7, seeds=(0, 1), cells=((10, 2), (4, 5))), fake_run(log))
    assert len(log) == 2 * 2 * 2
    assert {(c.algorithm, c.local_steps, c.clients_per_round) for c in log} == {
        (a, t, b) for a in (C.FEDAVG, C.PER_FEDAVG) for t, b in ((10, 2), (4, 5))
    }
    assert all(c.model == "mlp-80-60-elu" and c.num_clients == 10 and c.meta_gradient == "first_order" and c.num_rounds == 7 for c in log)
    assert summary.count("| holds |") == 2 and "50.00 ± 0.00 | 70.00 ± 0.00 | 80.00 ± 0.00" in summary


def test_table3_tunes_momentum_on_the_first_seed_only():
    log = []
    summary, runs = reproduce_flower.table3(Budget(rounds=5, evaluate_every=5, seeds=(0, 1, 2), cells=((4, 1),), momenta=(0.1, 0.9)), fake_run(log))
    moml = [c for c in log if c.algorithm == C.LOCAL_MOML]
    assert [(c.momentum, c.seed) for c in moml] == [(0.1, 0), (0.9, 0), (0.9, 1), (0.9, 2)]
    assert all(c.sampling_groups == 4 and c.clients_per_round == 1 and c.eval_setting == (10, 5) for c in log)
    assert "0.9 of [0.1, 0.9]" in summary and "| yes, beyond the seed bands |" in summary
    assert len(runs[f"{C.LOCAL_MOML} (H=4, B'=1)"]) == 3


def test_table3_authors_protocol_is_their_federated_settings():
    """GitHub bokun-wang/moml, federated/run.sh and train.py: the settings the strategies receive."""
    log = []
    protocol = reproduce_flower.TABLE3_PROTOCOLS["authors"]
    summary, runs = reproduce_flower.table3(protocol.full, fake_run(log), protocol=protocol)
    assert len(log) == 6 and {c.seed for c in log} == {0, 1, 2} and all(c.num_rounds == 5000 for c in log)
    for c in log:
        kw = c.with_nodes_for(2).strategy_kwargs()
        assert (kw["inner_lr"], kw["lr_decay_at"], kw["lr_decay"], kw["eval_lr"], kw["eval_steps"], kw["eval_shots"]) == (
            0.01, (0.5, 0.75), 0.1, 0.001, 10, 5)
        assert (kw["local_steps"], kw["clients_per_round"], kw["sampling_groups"], kw["batch_size"], kw["outer_batch_size"]) == (4, 5, 4, 5, 10)
        assert (kw["meta_gradient"], kw["batch_draws"], c.a_train, c.num_nodes, c.model) == ("first_order", "per-round", 168, -1, "moml-mlp-40-40")
        eta = kw["lr"] if c.algorithm == C.LOCAL_MOML else kw["meta_lr"]
        assert eta == 0.01
    assert {(c.momentum, c.memory_policy) for c in log if c.algorithm == C.LOCAL_MOML} == {(0.7, "reset")}
    assert "| 4 | 5 (20) | 80.00 ± 0.00 | 75.00 ± 0.00 | -5.00 ± 0.00 | 0.7 of [0.7] | no: behind, beyond the seed bands |" in summary


def test_table3_verdicts_follow_the_seed_bands():
    assert reproduce_flower._bands([0.80, 0.82], [0.84, 0.86]) == "yes, beyond the seed bands"
    assert reproduce_flower._bands([0.80, 0.84], [0.82, 0.86]) == "ahead within the seed bands"
    assert reproduce_flower._bands([0.82, 0.86], [0.80, 0.84]) == "behind within the seed bands"


@pytest.mark.ray
def test_reproduce_command_end_to_end_with_a_tiny_budget(ray_runner, tmp_path, monkeypatch, capsys):
    tiny = Budget(rounds=2, evaluate_every=2, seeds=(0,), cells=((2, 5),))
    monkeypatch.setitem(reproduce_flower.REPRODUCTIONS, "per-fedavg-fig1", (reproduce_flower.fig1, tiny, tiny))
    assert reproduce.main(["per-fedavg-fig1", "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 0
    out = tmp_path / "per-fedavg-fig1-quick"
    text = (out / "summary.md").read_text()
    assert "fedmeta-reproduce per-fedavg-fig1 --quick" in text and "| 2 | 0.5 (5) |" in text
    for png in ("accuracy_vs_round.png", "client_accuracy_distribution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = json.loads((tmp_path / "runs" / "per-fedavg-fig1-quick" / "runs.json").read_text())
    check_provenance(index["provenance"], {"name": "per-fedavg-fig1", "quick": True, "rounds": 2, "evaluate_every": 2, "seeds": [0],
                                      "cells": [[2, 5]], "momenta": index["provenance"]["config"]["momenta"]})
    for paths in index["runs"].values():
        for path in paths:  # each run's own results file
            check_provenance(json.loads(Path(path).read_text())["provenance"])
    capsys.readouterr()
    # Run again: every finished run is reused, none simulated again, and the summary is the same.
    assert reproduce.main(["per-fedavg-fig1", "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 0
    log = capsys.readouterr().out
    assert log.count("(reused,") == 2 and "(ran," not in log
    again = (out / "summary.md").read_text()
    assert _runs_line(text) == runs_line(index["provenance"], 2, 0)  # the code, libraries and machine behind it
    assert "(2 of 2 runs reused from an earlier invocation" in _runs_line(again)
    assert _without_runs_line(again).split("\n\n", 2)[2] == _without_runs_line(text).split("\n\n", 2)[2]


@pytest.mark.ray
def test_table3_authors_protocol_end_to_end_with_a_tiny_budget(ray_runner, tmp_path, monkeypatch, capsys):
    """The authors' settings go through Flower's simulation (multi-client nodes, the decay, per-round draws)."""
    protocol = reproduce_flower.TABLE3_PROTOCOLS["authors"]
    tiny = Budget(rounds=4, evaluate_every=2, seeds=(0,), cells=((2, 1),), momenta=(0.7,))
    monkeypatch.setitem(reproduce_flower.TABLE3_PROTOCOLS, "authors", dataclasses.replace(protocol, quick=tiny,
                                                                                     base=protocol.base.replace(num_clients=8, clients_per_round=1)))
    args = ["localmoml-table3", "--protocol", "authors", "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert reproduce.main(args) == 0
    text = (tmp_path / "localmoml-table3-authors-quick" / "summary.md").read_text()
    assert text.startswith("## localmoml-table3-authors (quick budget)")
    assert "`fedmeta-reproduce localmoml-table3 --protocol authors --quick`: 2 simulations" in text and "| 2 | 1 (4) |" in text
    (index,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/runs.json")]
    assert index["provenance"]["config"]["protocol"] == "authors"
    for paths in index["runs"].values():
        res = json.loads(Path(paths[0]).read_text())
        assert res["status"] == "ok" and res["config"]["lr-decay-at"] == "0.5,0.75" and res["config"]["batch-draws"] == "per-round"
        assert 0 < res["final"]["accuracy-after"] <= 1
        assert res["config"]["num-nodes"] >= 1  # -1 resolved to the actor slots, as the run was simulated
    capsys.readouterr()
    # Again: the runs are found under their resolved num-nodes and reused, none simulated again.
    assert reproduce.main(args) == 0
    log = capsys.readouterr().out
    assert log.count("(reused,") == 2 and "(ran," not in log and "all reused from an earlier invocation" in log


def _runs_line(summary: str) -> str:
    (line,) = [ln for ln in summary.splitlines() if ln.startswith(RUNS_PREFIX)]
    assert line.startswith("Runs: commit ") and "; Python " in line, line
    return line


def _without_runs_line(summary: str) -> str:
    return "\n".join(ln for ln in summary.splitlines() if not ln.startswith(RUNS_PREFIX))


# --- multistep-maml-ggs Figures 1-2 (centralized runner) -------------------------------------

from fedmeta.centralized import RunResult  # noqa: E402
from fedmeta.meta import Cost  # noqa: E402


def fake_ggs_runs(log, final):
    """Runs whose final meta-loss is ``final(cfg)``; NaN marks a diverged run."""

    def run_all(cfgs):
        log.extend(cfgs)
        out = []
        for cfg in cfgs:
            v = final(cfg)
            diverged = v != v
            out.append(RunResult(config=cfg, iterations=(0, cfg.iterations), meta_loss=(1.0, 1.0 if diverged else v), train_loss=(v,),
                                 seconds=1.0, cost=Cost(), diverged_at=1 if diverged else None))
        return out

    return run_all


def test_ggs_figure_runs_the_grid_and_picks_each_algorithm_by_its_mean_over_seeds():
    fig = reproduce_ggs.GGS_FIGURES["ggs-fig1"]
    budget = reproduce_ggs.GridBudget(iterations=5, eval_every=5, seeds=(0, 1, 2), meta_lrs=(0.01, 0.003), deltas=(1e-2, 1e-4), eval_tasks=3)

    def final(cfg):
        if cfg.meta_gradient == "zeroth_order" and cfg.delta == 1e-4:
            return float("nan") if cfg.seed == 2 else 0.01  # best on two seeds, but one diverged: never chosen
        if cfg.meta_gradient == "ggs":  # lr 0.003 wins on average over the seeds, though not on seed 0
            return {0.01: (0.2, 0.5, 0.5), 0.003: (0.3, 0.3, 0.3)}[cfg.meta_lr][cfg.seed] + (cfg.delta == 1e-2) * 0.01
        return 0.5 if cfg.meta_lr == 0.01 else 0.6

    log = []
    summary, best, grid = reproduce_ggs.ggs_figure(fig, budget, fake_ggs_runs(log, final))
    assert len(log) == 3 * (2 + 2 * 2 + 2 + 2 * 2 + 2)  # exact, ggs, first_order, zeroth_order, fo_muml over (lr[, delta]) x seeds
    assert all(c.task == "matrix-factorization" and c.inner_steps == 3 and c.inner_lr == 0.01 and c.iterations == 5 for c in log)
    assert {c.meta_gradient for c in log} == {"exact", "ggs", "first_order", "zeroth_order", "fo_muml"}
    chosen = {label: (rs[0].config.meta_lr, rs[0].config.delta) for label, rs in best.items()}
    assert chosen["GGS-MAML"] == (0.003, 1e-4)
    assert chosen["ZO-MAML"] == (0.01, 1e-2)
    assert chosen["MAML"][0] == 0.01 and [r.config.seed for r in best["MAML"]] == [0, 1, 2]
    assert len(grid) == 14 and "ZO-MAML (lr=0.01, delta=0.0001)" in grid
    assert "| GGS-MAML | ggs | 0.003 | 0.0001 | 0.3 ± 0 | -40.00% ± 0.00 |" in summary
    assert "| ZO-MAML | 0.01 | 0.0001 | diverged in 1 of 3 seeds |" in summary
    assert "Ranking by final meta-loss: GGS-MAML < " in summary


@pytest.mark.parametrize("name", ["ggs-fig1", "ggs-fig2"])
def test_ggs_quick_commands_write_their_summary_and_plot(tmp_path, capsys, monkeypatch, name):
    from dataclasses import replace

    fig = reproduce_ggs.GGS_FIGURES[name]  # the --quick grid with 2 seeds, half the iterations and 50 held-out tasks
    small = replace(fig.quick, seeds=fig.quick.seeds[:2], iterations=fig.quick.iterations // 2, eval_tasks=50)
    monkeypatch.setitem(reproduce_ggs.GGS_FIGURES, name, replace(fig, quick=small))
    args = [name, "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert reproduce.main(args) == 0
    out = tmp_path / f"{name}-quick"
    text = (out / "summary.md").read_text()
    assert f"fedmeta-reproduce {name} --quick" in text
    for label in ("MAML", "GGS-MAML", "FO-MAML", "ZO-MAML", "FO-MuML"):
        assert f"| {label} | " in text
    assert (out / "meta_loss_vs_iteration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    # Run again: every run is reused and the tables are the same.
    assert reproduce.main(args) == 0
    assert "(ran," not in capsys.readouterr().out
    again = (out / "summary.md").read_text()
    assert "all reused from an earlier invocation" in again and "runs reused from an earlier invocation" in _runs_line(again)
    assert "reused" not in _runs_line(text)
    assert _without_runs_line(again).split("\n\n", 2)[2] == _without_runs_line(text).split("\n\n", 2)[2]
