"""The tables in README.md, docs/getting-started.md, docs/results.md, docs/benchmarks.md and bench/README.md are
what scripts/docs_results.py generates from the checked-in summaries: a hand edit of a number, or a summary re-written
without `make docs-results`, fails here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported first in fast tests: torch's import runs ldconfig)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_results as D  # noqa: E402

from fedmeta.simulations.config import ExperimentConfig  # noqa: E402


def test_every_generated_block_in_the_docs_matches_its_source():
    diffs = D.drift()
    assert not diffs, "the docs differ from their sources; run `make docs-results`:\n" + "\n".join(diffs)


def test_each_doc_has_its_generated_tables():
    sources = {doc: [m.group("source") for m in D.BLOCK.finditer((ROOT / doc).read_text())] for doc in D.DOCS}
    assert sources["README.md"] == sources["docs/getting-started.md"] == [D.DEFAULT_RUN]  # what `make run` prints
    assert sorted(sources["bench/README.md"]) == sorted(sources["docs/benchmarks.md"]) == sorted(D.BENCHES.values())
    summaries = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*/summary.md"))
    assert sorted(s for s in sources["docs/results.md"] if "#" not in s) == summaries  # every reproduction's table, once
    assert all(s.partition("#")[0] in summaries for s in sources["docs/results.md"])  # and sections of them
    for doc, found in sources.items():
        text = (ROOT / doc).read_text()
        assert text.count("<!-- docs-results: ") == text.count("<!-- /docs-results -->") == len(found), doc


def _copy_docs(tmp_path: Path) -> Path:
    for rel in [*D.DOCS, D.DEFAULT_RUN, *D.BENCHES.values(), *(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*/summary.md"))]:
        if (ROOT / rel).exists():  # a benchmark's report may not be kept yet
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_a_hand_edited_number_or_a_new_summary_is_caught_and_regenerated(tmp_path):
    root = _copy_docs(tmp_path)
    assert D.drift(root) == []
    doc = root / "docs" / "results.md"
    text = doc.read_text()
    m = next(D.BLOCK.finditer(text))
    edited = text[: m.start("body")] + m.group("body").replace("±", "+-", 1) + text[m.end("body"):]
    doc.write_text(edited)
    (diff,) = D.drift(root)
    assert "docs/results.md" in diff and "+-" in diff
    doc.write_text(D.regenerate(edited, root))
    assert D.drift(root) == []
    # a re-run reproduction: its summary changes, the doc must follow
    summary = root / m.group("source")
    summary.write_text(summary.read_text().replace("| ", "| 9", 1))
    assert len(D.drift(root)) == 1


def _result(tmp_path: Path, algorithm: str, seed: int, acc: float, **change) -> Path:
    cfg = {**ExperimentConfig().to_dict(), "algorithm": algorithm, "seed": seed, "num-nodes": 2, **change}  # -1 as simulate resolves it
    res = {"status": "ok", "config": cfg, "final_round": cfg["num-rounds"], "seconds": 100.0 + seed,
           "final": {"accuracy-before": 0.5, "accuracy-after": acc, "accuracy-after-std": 0.07, "accuracy-after-p10": acc - 0.08,
                     "loss-before": 1.0, "loss-after": 0.3},
           "provenance": {"git": {"commit": "0123456789abcdef", "dirty": False}, "versions": {"fedmeta": "0.1.0"}, "python": "3.11.7",
                          "cpu": {"model": "CPU", "cores": 2}, "gpus": [], "started": "2026-12-04T20:00:00+00:00"}}
    path = tmp_path / f"{algorithm}-seed{seed}.json"
    path.write_text(json.dumps(res))
    return path


def _usage(tmp_path: Path, seed: int, wall: float, runs: list[str] | None = None) -> Path:
    path = tmp_path / f"usage-local-moml-seed{seed}.json"
    path.write_text(json.dumps({"runs": runs or [f"local-moml-seed{seed}.json", f"per-fedavg-seed{seed}.json"], "wall_s": wall,
                                "client_steps": 40000, "client_steps_per_s": 40000 / wall, "busy_cores": 1.2 + seed / 10, "cores": 2}))
    return path


def test_the_default_run_table_gives_seed_0_as_make_run_prints_it_and_the_spread_over_seeds(tmp_path):
    paths = [_result(tmp_path, a, s, acc) for s, accs in enumerate([(0.90, 0.91), (0.88, 0.92), (0.86, 0.90)])
             for a, acc in zip(("per-fedavg", "local-moml"), accs)]
    usages = [_usage(tmp_path, s, w) for s, w in ((2, 130.0), (0, 118.4), (1, 125.0))]
    summary = D.ingest_default_run([*paths, *usages])
    assert [(r["seed"], r["config"]["algorithm"]) for r in summary["runs"]][:2] == [(0, "local-moml"), (0, "per-fedavg")]
    assert [i["seed"] for i in summary["invocations"]] == [0, 1, 2]
    (root := tmp_path / "repo" / Path(D.DEFAULT_RUN).parent).mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps(summary))
    text = D.render(D.DEFAULT_RUN, tmp_path / "repo")
    seed0 = text.split("```")[1]
    assert "local-moml      500      0.5000         0.9100 +- 0.0700  0.8300    100.0" in seed0
    assert "per-fedavg      500      0.5000         0.9000 +- 0.0700  0.8200    100.0" in seed0
    assert "| per-fedavg | 500 | 0.5000 ± 0.0000 | 0.8800 ± 0.0200 | 0.0700 ± 0.0000 | 0.8000 ± 0.0200 | 101.0 ± 1.0 |" in text
    assert "| local-moml | 500 | 0.5000 ± 0.0000 | 0.9100 ± 0.0100 |" in text
    assert "Seeds 0, 1 and 2: mean ± std over the 3 seeds" in text
    assert ("Wall time of `make run` (both algorithms), seeds 0, 1 and 2: 1 min 58 s, 2 min 5 s and 2 min 10 s (338, 320 and 308 "
            "client-steps/s; 1.20-1.40 of 2 cores busy; 2 multi-client nodes), as fedmeta-sim's last line gives it") in text
    assert text.rstrip().endswith("Runs: commit 0123456 (clean tree), 2026-12-04; fedmeta 0.1.0; Python 3.11.7; CPU, 2 cores, no GPU.")


def test_ingesting_refuses_what_is_not_the_default_run(tmp_path):
    ok = [_result(tmp_path, "local-moml", 0, 0.9), _result(tmp_path, "per-fedavg", 0, 0.9)]
    with pytest.raises(ValueError, match=r"not the default run; these settings differ \(run, default\): \{'num-rounds': \(100, 500\)\}"):
        D.ingest_default_run([ok[0], _result(tmp_path, "per-fedavg", 1, 0.9, **{"num-rounds": 100})])
    failed = _result(tmp_path, "per-fedavg", 1, 0.9)
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed"}))
    with pytest.raises(ValueError, match="status 'failed', not 'ok'"):
        D.ingest_default_run([*ok, failed])
    with pytest.raises(ValueError, match="every algorithm needs every seed"):
        D.ingest_default_run([*ok, _result(tmp_path, "local-moml", 1, 0.9)])
    with pytest.raises(ValueError, match="two results files for the same algorithm and seed"):
        D.ingest_default_run([*ok, ok[0]])
    with pytest.raises(ValueError, match="names runs .* that are not among the results files given"):
        D.ingest_default_run([*ok, _usage(tmp_path, 0, 100.0, runs=["local-moml-seed0.json", "local-moml-seed7.json"])])
    with pytest.raises(ValueError, match=r"settings differ \(run, default\): \{'num-nodes': \(0, -1\)\}"):  # one client per node
        D.ingest_default_run([ok[0], _result(tmp_path, "per-fedavg", 0, 0.9, **{"num-nodes": 0})])


def test_a_quick_or_smoke_benchmark_report_is_not_kept(tmp_path):
    for name, flag in (("scale", "quick"), ("default-run", "smoke"), ("peers", "smoke"), ("peers", "quick")):
        report = tmp_path / f"{name}.json"
        report.write_text(json.dumps({flag: True, "provenance": {}}))
        with pytest.raises(SystemExit, match="a --quick or --smoke run is not kept"):
            D.main(["ingest-bench", name, str(report)])


def test_a_section_block_is_the_summarys_line_and_the_list_after_it(tmp_path):
    summary = tmp_path / "docs" / "results" / "x" / "summary.md"
    summary.parent.mkdir(parents=True)
    summary.write_text("| a |\n|---|\n\nVerdicts (by seed):\n\n- one\n- two\n  continued\n\nOther text.\n- not this\n")
    assert D.render("docs/results/x/summary.md#Verdicts", tmp_path) == "Verdicts (by seed):\n\n- one\n- two\n  continued\n"
    with pytest.raises(ValueError, match="no line starting with 'Nothing'"):
        D.render("docs/results/x/summary.md#Nothing", tmp_path)


def test_the_peer_benchmark_block_is_its_reports_table_with_the_provenance(tmp_path):
    """From a ``bench_peers.py --smoke`` report (tests/golden): the table that run printed, its per-core ratios, the
    labelled ratio to PFLlib's quoted figure and the run's provenance; before any report is kept, how to make one."""
    from fedmeta.provenance import describe

    assert D.render(D.BENCH_PEERS, tmp_path).startswith("No full run's report is kept yet: run `make bench-peers`")
    report = json.loads((ROOT / "tests" / "golden" / "bench_peers_smoke.json").read_text())
    (tmp_path / D.BENCH_PEERS).parent.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "golden" / "bench_peers_smoke.json", tmp_path / D.BENCH_PEERS)
    text = D.render(D.BENCH_PEERS, tmp_path)
    assert text.startswith("```text\nfedmeta peer benchmark, ") and f"total wall time {report['wall_s']:.0f} s\n```" in text
    assert text.rstrip().endswith(f"Run: {describe(report['provenance'])}; pfl-research 0.6.0 "
                                  f"(torch {report['repeats'][0]['pfl']['versions']['torch']}).")
    rep, labels = report["repeats"][0], D._load_module("bench_peers", ROOT / "bench" / "bench_peers.py").LABELS
    for key in ("fedavg_multi", "fedavg_single"):
        fed, pfl = rep[key], rep["pfl"]
        per_core = (fed["client_steps_per_s"] / fed["steady_busy_cores"]) / (pfl["client_steps_per_s"] / pfl["steady_busy_cores"])
        row = next(ln for ln in text.splitlines() if ln.startswith("  1 ") and labels[key] in ln)
        assert row.split()[-2:] == [f"{fed['client_steps_per_s'] / pfl['client_steps_per_s']:.2f}x", f"{per_core:.2f}x"]
    for name, run in report["pfl_probe"].items():
        assert f"{run['client_steps_per_s']:.0f}/s  {run['busy_cores']:.2f} busy" in text and f"loss {run['final_train_loss']:.6f}" in text
    quoted = report["pfllib_reference"]["client_meta_steps_per_s"]
    assert f"Per-FedAvg FO / PFLlib (quoted figure, {quoted:.0f}/s on {report['pfllib_reference']['date']}, not run)" in text
    assert f"{rep['per_fedavg_fo']['client_steps_per_s'] / quoted:.2f}x  (target >= 3x" in text
