"""Every code block of the docs runs (README.md and docs/**/*.md).

Each fenced block is either output (```text) or a snippet: ``<!-- snippet: NAME -->`` on the line before it,
read by a test through ``fakes.doc_snippet(NAME, lang, page=...)``. The first test fails on a block without a
language or a marker, and on a snippet that no test file reads (its name and its page written in a test file
that calls ``doc_snippet``). The shell snippets are listed in :data:`SHELL_SNIPPETS`: every command in them goes
through its program's own parser here (fedmeta's CLIs, ``flwr run``'s run config, ``ray start``, the Makefile's
targets; SuperLink and SuperNode lines must be the launcher's own), and the ones that fit a test's budget also
run, below, with the budget flags the test appends (the docs give the full commands' times). The Python snippets
run here or in the test file that reads them (``test_flower_interop.py``, ``test_algorithm_units.py``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch  # noqa: F401  (imported first in fast tests: torch's import runs ldconfig)

from fakes import ROOT, doc_snippet

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
TESTS = Path(__file__).resolve().parent
README_MAX_LINES = 200

SHELL_SNIPPETS = {
    "README.md": ["readme-two-commands", "readme-simulation", "readme-deployment", "readme-track", "readme-tune",
                  "readme-flwr-datasets"],
    "docs/getting-started.md": ["two-commands", "make-run-sinewave", "make-test-fast"],
    "docs/simulations.md": ["fedmeta-sim-examples", "flwr-run", "many-clients"],
    "docs/deployment.md": ["deploy-local", "deploy-superlink", "deploy-supernodes", "deploy-flwr-run", "deploy-grpc",
                           "deploy-isolation", "deploy-openssl", "deploy-make-certificates", "deploy-tls", "deploy-grpc-tls"],
    "docs/cluster.md": ["cluster-head", "cluster-worker", "cluster-attach", "cluster-flwr-run", "cluster-test-commands"],
    "docs/algorithms.md": ["moml-command"],
    "docs/dif-maml.md": ["dif-maml-command", "dif-maml-flwr-run"],
    "docs/failure-handling.md": ["resume"],
    "docs/results.md": ["reproduce-commands"],
    "docs/benchmarks.md": ["bench-commands"],
    "docs/tracking.md": ["install-tracking", "track-cli", "tensorboard", "wandb-sync"],
    "docs/tuning.md": ["install-tune", "command"],
    "docs/flwr-datasets.md": ["install-flwr-datasets", "cli"],
}
"""Every shell snippet, by page: each is parsed below (:func:`test_every_shell_command_of_the_docs_parses`)."""

PLACEHOLDERS = {"[--num-gpus <gpus>]": "--num-gpus 0", "<cores for clients>": "1", "<cores>": "1", "<head-host>": "127.0.0.1",
                "<free>": "6379", "<port>": "6379", "<tmp>": "/tmp/fedmeta-docs", "<commit>": "HEAD"}
"""What a template command's placeholders stand for when it is parsed."""


class Block(NamedTuple):
    page: str
    line: int
    lang: str
    name: str | None


def code_blocks(page: str) -> list[Block]:
    """The fenced code blocks of ``page``: language, and the snippet name on the line before (if any)."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, inside = [], False
    for i, line in enumerate(lines):
        m = re.match(r"^[ \t]*```(\S*)\s*$", line)
        if not m:
            continue
        if inside:
            inside = False
            continue
        inside = True
        marker = re.match(r"^[ \t]*<!-- snippet: ([\w-]+) -->$", lines[i - 1]) if i else None
        blocks.append(Block(page, i + 1, m.group(1), marker.group(1) if marker else None))
    assert not inside, f"{page}: a code block is not closed"
    return blocks


def test_every_code_block_is_a_snippet_that_a_test_reads():
    blocks = [b for page in PAGES for b in code_blocks(page)]
    problems = [f"{b.page}:{b.line}: no language (```text for output)" for b in blocks if not b.lang]
    problems += [f"{b.page}:{b.line}: a ```{b.lang} block without a snippet marker: no test runs it" for b in blocks
                 if b.lang != "text" and b.name is None]
    names = [b.name for b in blocks if b.name]
    problems += [f"snippet {n!r} is defined twice" for n in sorted({n for n in names if names.count(n) > 1})]
    readers = {p.name: p.read_text() for p in TESTS.glob("test_*.py")}
    readers = {f: t for f, t in readers.items() if "doc_snippet(" in t or "readme_snippet(" in t}
    for b in blocks:
        if b.name is None:
            continue
        if not any(f'"{b.name}"' in text and f'"{b.page}"' in text for text in readers.values()):
            problems.append(f"{b.page}:{b.line}: snippet {b.name!r} is read by no test (its name and page in a test that calls doc_snippet)")
        if b.lang == "sh" and b.name not in SHELL_SNIPPETS.get(b.page, []):
            problems.append(f"{b.page}:{b.line}: shell snippet {b.name!r} is not in SHELL_SNIPPETS, so no test parses it")
    assert not problems, "\n".join(problems)
    listed = {(page, n) for page, ns in SHELL_SNIPPETS.items() for n in ns}
    assert listed <= {(b.page, b.name) for b in blocks if b.lang == "sh"}, "SHELL_SNIPPETS names a block the docs no longer have"


def test_the_readme_is_short_and_has_no_project_history():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for page in PAGES:
        prose = re.sub(r"<!-- docs-results: .*?<!-- /docs-results -->", "", (ROOT / page).read_text(), flags=re.S)  # generated
        prose = re.sub(r"^Runs: .*$", "", prose, flags=re.M)  # a reproduction's provenance: the code its numbers came from
        assert not re.search(r"\b(issue|PR) #?\d+", prose), f"{page} names an issue"
        commits = [c for c in re.findall(r"\b(?:commit|on|at) ([0-9a-f]{7,40})\b", prose) if re.search(r"\d", c)]
        assert not commits, f"{page} names commits {commits}"


def test_the_api_reference_documents_every_module():
    listed = set(re.findall(r"^::: ([\w.]+)$", "".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")), re.M))
    folders = {"fedmeta": ROOT / "fedmeta", "fedmeta.algorithms": ROOT / "fedmeta" / "algorithms", "fedmeta.strategies": ROOT / "strategies",
               "fedmeta.clients": ROOT / "clients", "fedmeta.simulations": ROOT / "simulations"}
    modules = {pkg if p.stem == "__init__" else f"{pkg}.{p.stem}" for pkg, folder in folders.items() for p in folder.glob("*.py")}
    assert modules - listed == set(), "add these modules to a page of docs/api/"


def test_the_docs_site_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?([\w/.-]+\.md)$", config, re.M))
    pages = {p[len("docs/"):] for p in PAGES if p.startswith("docs/") and not p.startswith("docs/results/")}
    assert pages == nav


# --- shell commands: parsed by their own programs ------------------------------------------------------


def shell_commands(script: str) -> list[tuple[str, list[str]]]:
    """``(line, argv)`` for every command of a shell snippet: continued lines joined, comments dropped, ``;`` and
    ``&&`` split, the leading ``VAR=value`` assignments kept in ``line`` and dropped from ``argv``."""
    out = []
    for line in re.sub(r"[ \t]*\\\n[ \t]*", " ", script).splitlines():
        for k, v in PLACEHOLDERS.items():
            line = line.replace(k, v)
        words = shlex.split(line, comments=True)
        while words:
            cut = next((i for i, w in enumerate(words) if w in (";", "&&")), len(words))
            argv, words = words[:cut], words[cut + 1:]
            while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                argv = argv[1:]
            if argv:
                out.append((line.split(" #")[0].strip(), argv))
    return out


@functools.cache
def _launcher_lines() -> frozenset[str]:
    """The SuperLink, SuperNode, executor and ``flwr run`` lines the launcher runs for the deployment guide's layout,
    every transport, TLS and isolation mode (tests/test_deploy.py runs the launcher)."""
    from test_deploy import _guide_commands

    from fedmeta.simulations import flwr_processes

    return frozenset(line for t in (flwr_processes.HTTP, flwr_processes.GRPC_RERE) for tls in (False, True)
            for iso in ("subprocess", "process") for line in _guide_commands(t, tls, iso))


def _parse_with(main, argv: list[str]):
    """The namespace ``main``'s own argparse parser makes of ``argv``, stopping before any work."""
    import argparse

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse
    try:
        main(argv)
    except Parsed as done:
        return done.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{main} did not parse its arguments")


def _check_fedmeta_sim(args: list[str]) -> None:
    from fedmeta.simulations import run
    from fedmeta.simulations.config import ExperimentConfig, parse_cli

    ns = parse_cli(run._parser(), args)
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k not in ("algorithms", "verbose")}
    for algorithm in ns.algorithms.split(","):
        ExperimentConfig.from_mapping({**overrides, "algorithm": algorithm})  # raises on a bad value


def _check_run_config(args: list[str]) -> None:
    """``flwr run . [federation] [--run-config ...] [--federation-config ...] [--stream]``: the run config's keys are the
    app's (pyproject.toml), and the merged config is a valid experiment (or Dif-MAML) config."""
    from flwr.common.config import flatten_dict, parse_config_args

    from fedmeta.dif_maml import DifMAMLConfig
    from fedmeta.simulations.config import ExperimentConfig

    assert args[:2] == ["run", "."], args
    app = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    rest, run_config, federation = args[2:], [], []
    while rest:
        word = rest.pop(0)
        if word == "--run-config":
            run_config.append(rest.pop(0))
        elif word == "--federation-config":
            federation.append(rest.pop(0))
        else:
            assert word in ("--stream", "fedmeta-local"), word
    overrides = parse_config_args(run_config)
    assert set(overrides) <= set(app), set(overrides) - set(app)
    assert set(parse_config_args(federation)) <= {"num-supernodes"}
    merged = {**app, **overrides}
    if merged["algorithm"] == "dif-maml":
        DifMAMLConfig.from_mapping({k.removeprefix("dif-maml."): v for k, v in merged.items() if k.startswith("dif-maml.")})
    else:
        ExperimentConfig.from_mapping({k: v for k, v in merged.items() if not k.startswith("dif-maml.")})


def check_command(line: str, argv: list[str], launcher: set[str]) -> None:
    prog, args = Path(argv[0]).name, argv[1:]
    if prog.startswith("python") and args[:1] == ["-m"]:
        prog, args = args[1], args[2:]
    if prog.startswith("python") and args[:1] == ["-c"]:
        compile(args[1], "<python -c>", "exec")
    elif prog in ("fedmeta-sim", "fedmeta.simulations.run"):
        _check_fedmeta_sim(args)
    elif prog == "fedmeta-reproduce":
        from fedmeta.simulations import reproduce

        _parse_with(reproduce.main, args)
    elif prog == "fedmeta-tune":
        from fedmeta.simulations import tune

        tune._parser().parse_args(args)
    elif prog == "pip":
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert args[0] == "install" and args[1:], args
        for requirement in args[1:]:
            m = re.fullmatch(r"fedmeta\[([\w,-]+)\]", requirement)
            assert m and set(m.group(1).split(",")) <= set(extras), f"{requirement}: not one of fedmeta's extras {sorted(extras)}"
    elif prog == "tensorboard":  # the directory the trackers write to by default
        from fedmeta.simulations.config import ExperimentConfig

        assert args == ["--logdir", str(ExperimentConfig().tracking_path)], args
    elif prog == "wandb":  # an offline run of the W&B tracker, under the default tracking directory
        from fedmeta.simulations.config import ExperimentConfig

        assert args[0] == "sync" and args[1].startswith(f"{ExperimentConfig().tracking_path}/wandb/offline-run-"), args
    elif prog == "fedmeta-deploy-local":
        from fedmeta.simulations import deploy

        deploy._parser().parse_args(args)
    elif prog in ("fedmeta.centralized", "fedmeta.dif_maml"):
        import importlib

        from fedmeta.provenance import run_command

        module = importlib.import_module(prog)
        config_cls = module.CentralizedConfig if prog == "fedmeta.centralized" else module.DifMAMLConfig
        parser = module._parser() if hasattr(module, "_parser") else None
        ns = parser.parse_args(args) if parser else _parse_with(module.main, args)
        config_cls.from_mapping({k: v for k, v in vars(ns).items() if v is not None and k != "json_path"})
        assert run_command  # the command's own path from parse to config
    elif prog == "pytest":
        files = [a for a in args if a.endswith(".py")]
        assert files and all((ROOT / f).is_file() for f in files), files
        if "-m" in args:
            from conftest import SLOW_MARKERS

            assert args[args.index("-m") + 1] in SLOW_MARKERS
    elif prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        targets = [a for a in args if "=" not in a]
        assert targets and all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in targets), targets
        for a in args:
            if a.startswith("ARGS=") and targets == ["run"]:
                _check_fedmeta_sim(shlex.split(a[len("ARGS="):]))
    elif prog == "flwr":
        _check_run_config(args)
        if "fedmeta-local" in args:
            assert line in launcher, f"not what the launcher runs:\n{line}"
    elif prog in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert line in launcher, f"not what the launcher runs:\n{line}"
    elif prog == "ray":
        from ray.scripts.scripts import start

        assert args[0] == "start"
        start.make_context("ray start", args[1:])  # click parses the flags, nothing starts
    elif prog == "unshare":
        inner = args[args.index("-c") + 1]
        for sub_line, sub in shell_commands(inner.split("&&", 1)[1].replace("exec ", "", 1)):
            check_command(sub_line, sub, launcher)
    else:
        raise AssertionError(f"no check for the command {prog!r}: add one, or run the snippet in a test")


def _shell_cases():
    """Every shell snippet but the openssl one (run below); the deployment guide's need the launcher's commands, whose
    flwr version it asks a process for."""
    return [pytest.param(p, n, marks=[pytest.mark.subprocess] if p == "docs/deployment.md" else [])
            for p, ns in SHELL_SNIPPETS.items() for n in ns if n != "deploy-openssl"]


@pytest.mark.parametrize("page, name", _shell_cases())
def test_every_shell_command_of_the_docs_parses(page, name):
    commands = shell_commands(doc_snippet(name, "sh", page=page))
    assert commands
    launcher = _launcher_lines() if page == "docs/deployment.md" else set()
    for line, argv in commands:
        check_command(line, argv, launcher)


def test_the_deployment_guides_connection_files_are_the_launchers():
    from fedmeta.simulations import deploy

    certs = deploy.Certificates(Path("/srv/fedmeta/certs/ca.pem"), Path("-"), Path("-"))
    assert doc_snippet("deploy-connection", "toml", page="docs/deployment.md") == deploy.connection_toml("127.0.0.1:9091", None)
    assert doc_snippet("deploy-tls-connection", "toml", page="docs/deployment.md") == deploy.connection_toml("127.0.0.1:9091", certs)


def test_the_make_certificates_one_liner_writes_the_three_files(tmp_path):
    [(_, argv)] = shell_commands(doc_snippet("deploy-make-certificates", "sh", page="docs/deployment.md"))
    exec(argv[argv.index("-c") + 1].replace("/srv/fedmeta/certs", str(tmp_path)), {})  # noqa: S102 (the docs' own code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600


# --- the examples, run -----------------------------------------------------------------------------------


def test_the_centralized_moml_example_learns():
    ns: dict = {}
    exec(compile(doc_snippet("moml-centralized", page="docs/algorithms.md"), "moml-centralized", "exec"), ns)  # noqa: S102
    result = ns["result"]
    assert result.diverged_at is None and result.meta_loss[-1] < result.meta_loss[0] * 0.8, result.meta_loss
    assert result.memory is not None


def test_the_dif_maml_simulator_example_learns():
    ns: dict = {}
    exec(compile(doc_snippet("dif-maml-simulate", page="docs/dif-maml.md"), "dif-maml-simulate", "exec"), ns)  # noqa: S102
    run = ns["run"]
    assert run.diverged_at is None and run.test_loss[-1] < run.test_loss[0] * 0.9, run.test_loss


@pytest.mark.ray
def test_the_dif_maml_flower_example_runs_the_relay(ray_runner):
    from fedmeta.dif_maml import simulate
    from fedmeta.simulations.engine import run_on_ray

    ns: dict = {}
    exec(compile(doc_snippet("dif-maml-flower", page="docs/dif-maml.md"), "dif-maml-flower", "exec"), ns)  # noqa: S102
    run_on_ray(ns["server_app"], ns["client_app"], num_supernodes=ns["cfg"].num_agents)
    [result] = ns["results"]
    alone = simulate(ns["cfg"].replace(iterations=20), record=False)  # the docs: the relay computes the simulator's states
    for name, stacked in alone.phi.items():
        torch.testing.assert_close(torch.from_numpy(result.arrays[name].numpy()), stacked, atol=1e-6, rtol=0)


def _run(argv: list[str], tmp_path: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    argv = [str(Path(venv_bin) / argv[0][len(".venv/bin/"):]) if argv[0].startswith(".venv/bin/") else argv[0], *argv[1:]]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", **env})
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.subprocess
def test_the_readme_simulation_runs(tmp_path):
    """The README's command, 3 of its 30 rounds (the whole command takes about a minute on 2 cores)."""
    [(_, argv)] = shell_commands(doc_snippet("readme-simulation", "sh", page="README.md"))
    proc = _run([*argv, "--num-rounds", "3", "--results-dir", str(tmp_path)], tmp_path)
    assert "acc before" in proc.stdout
    for algorithm in ("per-fedavg", "local-moml"):
        res = json.loads((tmp_path / f"{algorithm}-sinewave-n1000-seed0.json").read_text())
        assert res["config"]["num-clients"] == 1000 and res["config"]["clients-per-round"] == 100 and res["status"] != "failed"


@pytest.mark.subprocess
def test_make_run_on_the_sine_tasks_runs(tmp_path):
    """``make run ARGS=...`` as the docs give it, with 2 rounds of 10 clients appended to ARGS (``-o`` keeps make from
    re-installing the venv when pyproject.toml is newer than its stamp)."""
    [(_, argv)] = shell_commands(doc_snippet("make-run-sinewave", "sh", page="docs/getting-started.md"))
    assert argv[:2] == ["make", "run"]
    args = argv[2].removeprefix("ARGS=") + f" --num-rounds 2 --num-clients 10 --clients-per-round 5 --results-dir {tmp_path}"
    proc = _run(["make", "-o", ".venv/.fedmeta-installed", "run", f"ARGS={args}", f"PY={sys.executable}"], tmp_path)
    assert "local-moml" in proc.stdout and "per-fedavg" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("*.json") if not p.name.startswith("usage")) == [
        "local-moml-sinewave-n10-seed0.json", "per-fedavg-sinewave-n10-seed0.json"]


@pytest.mark.subprocess
@pytest.mark.parametrize("page, name", [("docs/simulations.md", "fedmeta-sim-examples"), ("docs/simulations.md", "many-clients")])
def test_the_simulation_pages_commands_run(page, name, tmp_path):
    """Each command of the block, one round (the docs' budgets take minutes)."""
    for i, (_, argv) in enumerate(shell_commands(doc_snippet(name, "sh", page=page))):
        _run([*argv, "--num-rounds", "1", "--results-dir", str(tmp_path / str(i))], tmp_path)
        assert list((tmp_path / str(i)).glob("*.json"))


@pytest.mark.subprocess
@pytest.mark.parametrize("page, name, budget", [("docs/algorithms.md", "moml-command", ["--iterations", "50", "--eval-every", "25"]),
                                                ("docs/dif-maml.md", "dif-maml-command", ["--iterations", "50", "--eval-every", "25"])])
def test_the_centralized_and_dif_maml_commands_run(page, name, budget, tmp_path):
    [(_, argv)] = shell_commands(doc_snippet(name, "sh", page=page))
    proc = _run([*argv, *budget], tmp_path)
    assert "diverged" not in proc.stdout


@pytest.mark.subprocess
def test_a_reproduction_runs_with_its_quick_budget(tmp_path):
    """``fedmeta-reproduce ggs-fig1``, from the docs' list, with ``--quick`` (under a minute) into ``tmp_path``."""
    commands = shell_commands(doc_snippet("reproduce-commands", "sh", page="docs/results.md"))
    [argv] = [a for _, a in commands if a[1] == "ggs-fig1"]
    _run([*argv, "--quick", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")], tmp_path)
    assert (tmp_path / "out" / "ggs-fig1-quick" / "summary.md").is_file() or list((tmp_path / "out").rglob("summary.md"))


@pytest.mark.subprocess
def test_the_openssl_certificates_verify(tmp_path):
    script = doc_snippet("deploy-openssl", "sh", page="docs/deployment.md").replace("/srv/fedmeta/certs", str(tmp_path))
    if subprocess.run(["sh", "-c", "command -v openssl"], capture_output=True).returncode:
        pytest.skip("openssl is not installed")
    proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "server.pem: OK" in proc.stdout, proc.stderr


@pytest.mark.deploy
def test_the_local_deployment_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(doc_snippet("deploy-python", page="docs/deployment.md"), "deploy-python", "exec"), ns)  # noqa: S102
    assert ns["results"]["config"]["partition"] == "dirichlet" and ns["results"]["final_round"] == 3


@pytest.mark.deploy
@pytest.mark.flwr139
def test_the_readme_grpc_deployment_runs(flwr139_bin, tmp_path):
    """The README's second command, with the flwr 1.39 venv the ``flwr139_bin`` fixture builds (what its first
    command, ``make build/flwr139``, builds: the same script, the same directory)."""
    [(make_line, make), (_, argv)] = shell_commands(doc_snippet("readme-deployment", "sh", page="README.md"))
    assert make == ["make", "build/flwr139"] and Path(flwr139_bin).parent == ROOT / "build" / "flwr139"
    proc = _run([*argv, "--results-dir", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")], tmp_path, timeout=900)
    assert list((tmp_path / "results").glob("*.json")), proc.stdout[-2000:]


@pytest.mark.parametrize("readme, page, name", [("readme-track", "docs/tracking.md", "track-cli"),
                                                 ("readme-tune", "docs/tuning.md", "command"),
                                                 ("readme-flwr-datasets", "docs/flwr-datasets.md", "cli")])
def test_the_readmes_integration_examples_are_the_pages_which_their_tests_run(readme, page, name):
    """The README shows the tracking, tuning and Flower Datasets examples of their pages, which test_tracking.py,
    test_tune.py and test_flwr_datasets.py run as written."""
    assert doc_snippet(readme, "sh", page="README.md") == doc_snippet(name, "sh", page=page)
