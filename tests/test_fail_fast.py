"""Issue 13: a run that cannot work stops early, says why once, and exits non-zero.

- Missing or broken inputs are found in the driver, before Ray starts (:mod:`fedmeta.simulations.preflight`).
- A run in which no client can train stops after ``max-failed-rounds`` rounds; the results say failed.
- Client errors are summarised once; the full text is in the run's log file.
- The progress display is a bar on a terminal and plain lines in a pipe.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch import nn

from fedmeta import models
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.preflight import InputError, check_inputs
from fedmeta.simulations.processes import descendants
from fedmeta.strategies.checkpoint import CheckpointDir, check_can_start
from fedmeta.strategies.failures import ClientFailures, parse_reason
from fixtures_data import write_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "simulated failure of every client"

# A ClientApp whose train handler always raises (query and evaluate are fedmeta's), run through the
# real `fedmeta-sim` main. The message is built at run time so the traceback's source line does not
# repeat it: the test counts how often the message is printed.
FAIL_ALL = f"""
import sys
from flwr.clientapp import ClientApp
import fedmeta.simulations.run as run
from fedmeta.simulations import apps

def broken(cfg):
    inner = apps.build_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        raise RuntimeError(" ".join({MESSAGE.split()!r}))

    app.query()(lambda msg, context: inner(msg, context))
    app.evaluate()(lambda msg, context: inner(msg, context))
    return app

run.build_client_app = broken
sys.exit(run.main(sys.argv[1:]))
"""

SINE = ["--dataset", "sinewave", "--num-clients", "4", "--clients-per-round", "0", "--local-steps", "1"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A first-run environment: no data anywhere fedmeta looks, an empty cache, no download."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMETA_")}
    return {**env, "FEDMETA_DATA": str(empty), "FEDMETA_CACHE": str(tmp_path / "cache"), "FEDMETA_SYSTEM_DATA": str(empty),
            "PYTHONUNBUFFERED": "1", **extra}


# --- inputs, checked in the driver ------------------------------------------------------------------


@pytest.mark.subprocess
def test_missing_dataset_exits_2_with_one_line_and_no_ray_process(tmp_path):
    """`fedmeta-sim` on a machine without the data: exit 2, one line on stderr naming the data set and
    the fix, and no Ray process (raylet, gcs_server) ever started under it."""
    proc = subprocess.Popen([sys.executable, "-m", "fedmeta.simulations.run", "--num-rounds", "2", "--results-dir", str(tmp_path / "r")],
                            env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(descendants(proc.pid))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=300)  # a hang guard; the run takes seconds
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedmeta-sim: error: dataset: fashion-mnist not found")
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "FEDMETA_DATA" in lines[0] and "--download true" in lines[0]
    assert "Traceback" not in out + err and not list((tmp_path / "r").glob("*.json"))
    ray_like = {p: n for p, n in seen.items() if "ray" in n or "gcs" in n}
    assert not ray_like, f"Ray processes started: {ray_like}"
    print(f"exit 2 after {seconds:.1f} s")  # reported, not asserted (timing is the benchmarks' job)


def test_model_that_cannot_take_the_inputs_is_refused_by_name(capsys):
    from fedmeta.simulations.run import main

    assert main(["--dataset", "sinewave", "--model", "cnn", "--num-rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedmeta-sim: error: model") and "sinewave" in err[0]


def test_check_inputs_runs_the_model_on_the_data(monkeypatch):
    """A model that does not fit the data's shape is caught by one forward pass, naming the model."""
    monkeypatch.setitem(models.MODELS, "tiny-linear", lambda shape, n: nn.Sequential(nn.Linear(3, n)))
    cfg = ExperimentConfig(dataset="sinewave", model="tiny-linear", num_clients=2, clients_per_round=0)
    with pytest.raises(InputError, match=r"^model: 'tiny-linear' does not fit dataset 'sinewave' \(inputs \(1,\), 1 outputs\)"):
        check_inputs(cfg)
    ok = check_inputs(cfg.replace(model="sine-mlp"))
    assert "client 0" in ok and "sine-mlp fits" in ok


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere fedmeta looks."""
    for key, value in _env(tmp_path).items():
        if key.startswith("FEDMETA_"):
            monkeypatch.setenv(key, value)
    return tmp_path


def test_fedmeta_reproduce_checks_the_data_before_its_first_simulation(no_data, capsys):
    from fedmeta.simulations.reproduce import main

    assert main(["per-fedavg-fig1", "--quick", "--out", str(no_data / "out"), "--runs", str(no_data / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedmeta-reproduce: error: dataset: fashion-mnist not found")
    assert not list((no_data / "runs").rglob("*.json"))


@pytest.mark.subprocess
def test_fedmeta_deploy_local_checks_the_data_before_starting_any_process(no_data, capsys):
    from fedmeta.simulations import deploy

    started = []
    real = deploy.LocalDeployment.start
    deploy.LocalDeployment.start = lambda self: started.append(self) or real(self)
    try:
        code = deploy.main(["--nodes", "2", "--workdir", str(no_data / "deploy"), "--num-rounds", "1"])
    finally:
        deploy.LocalDeployment.start = real
    assert code == 2 and not started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedmeta-deploy-local: error: dataset: fashion-mnist not found")


def test_the_flwr_run_serverapp_checks_the_data_before_its_first_message(no_data):
    """`flwr run .`'s ServerApp main raises the one-line error before it touches the grid."""
    from flwr.app import Context, RecordDict

    from fedmeta.simulations import apps
    from fedmeta.simulations.deploy import app_config

    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the ServerApp used the grid ({name}) before checking its inputs")

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**app_config(ROOT), "results-dir": str(no_data / "r")})
    with pytest.raises(InputError, match="^dataset: fashion-mnist not found"):
        apps._main(NoGrid(), context)
    off = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={**app_config(ROOT), "check-data": False,
                                                                                "results-dir": str(no_data / "r")})
    with pytest.raises(AssertionError, match="used the grid"):  # check-data=false: no check, straight to the strategy
        apps._main(NoGrid(), off)


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_SYSTEM_DATA", str(tmp_path / "no-system-data"))
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMETA_DATA", raising=False)
    return tmp_path


def _image_cfg(data_dir: Path, **kw) -> ExperimentConfig:
    return ExperimentConfig(dataset="mnist", partition="pathological", num_clients=4, clients_per_round=0, train_per_client=10,
                            test_per_client=5, data_dir=str(data_dir), **kw)


def test_check_inputs_accepts_good_files_and_names_missing_corrupt_and_misplaced_data(data_env):
    good = data_env / "good"
    write_idx_dataset(good / "MNIST" / "raw", per_class_train=12, per_class_test=6)
    assert re.search(r"^mnist in .*good: client 0 has 10 train / \d+ test samples; mlp-40-40 fits$", check_inputs(_image_cfg(good)))

    with pytest.raises(InputError, match=r"^dataset: mnist not found: .*download"):
        check_inputs(_image_cfg(data_env / "nothing-here"))

    corrupt = data_env / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (corrupt / f"{name}.gz").write_bytes(b"not a gzip file")
    with pytest.raises(InputError, match=r"^dataset: the mnist files .* are corrupt or incomplete"):
        check_inputs(_image_cfg(corrupt))

    truncated = data_env / "truncated"
    write_idx_dataset(truncated / "MNIST" / "raw", per_class_train=12, per_class_test=6)
    images = truncated / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"^dataset: .*corrupt or incomplete"):
        check_inputs(_image_cfg(truncated))

    a_file = data_env / "a-file"
    a_file.write_text("x")
    with pytest.raises(InputError, match=r"^data-dir: .* is not a directory"):
        check_inputs(_image_cfg(a_file))


# --- a run in which no client can train ---------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, _session_ray):
    """`fedmeta-sim` with a ClientApp that raises in every train call, 50 rounds asked, output piped; it attaches
    to the session's Ray (``RAY_ADDRESS``, as ``ray_runner`` does for in-process runs)."""
    tmp = tmp_path_factory.mktemp("fail-all")
    script = tmp / "fail_all.py"
    script.write_text(FAIL_ALL)
    results = tmp / "results"
    proc = subprocess.run([sys.executable, str(script), "--algorithms", "local-moml", *SINE, "--num-rounds", "50",
                           "--evaluate-every", "10", "--max-failed-rounds", "3", "--results-dir", str(results)],
                          env=_env(tmp, RAY_ADDRESS=_session_ray.address), cwd=tmp, capture_output=True, text=True, timeout=600)
    return proc, results


@pytest.mark.ray
def test_a_run_where_every_client_raises_stops_after_max_failed_rounds(failed_run):
    proc, results = failed_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # the distinct error once, with its first traceback, and named again in the last line (the cause)
    assert out.count(MESSAGE) == 2 and proc.stderr.strip().splitlines()[-1].count(MESSAGE) == 1, out
    assert "Traceback (most recent call last)" in out and "ClientAppException" not in out and "ray::" not in out
    replies = 3 * min(os.cpu_count() or 1, 4)  # 3 rounds x the default's nodes (one per actor slot), each one error reply
    assert re.search(rf"raised {replies} times by 4 clients \(0-3\) in train of rounds 1-3", out), out
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmeta-sim: error: local-moml: stopped after round 3: no valid train reply in 3 consecutive rounds")
    res = json.loads((results / "local-moml-sinewave-n4-seed0.json").read_text())
    assert res["status"] == "failed" and res["failure"].startswith("stopped after round 3")
    assert sorted(res["train"], key=int) == ["1", "2", "3"] and all(m["kept-global-model"] == 1 for m in res["train"].values())
    [error] = res["client_errors"]
    assert error["error"] == f"RuntimeError: {MESSAGE}" and error["clients"] == [0, 1, 2, 3] and error["rounds"] == [1, 2, 3]
    assert error["replies"] == replies and error["traceback"].rstrip().endswith(f"RuntimeError: {MESSAGE}")
    # The full text of every error reply is in the run's log, named in the last line.
    log = results / "logs" / "local-moml-sinewave-n4-seed0.log"
    assert str(log) in last and log.read_text().count(MESSAGE) >= replies


@pytest.mark.ray
def test_a_stopped_run_can_be_replaced_by_a_fresh_one_or_resumed(failed_run):
    _, results = failed_run
    ckpt = CheckpointDir(results / "checkpoints" / "local-moml-sinewave-n4-seed0")
    assert ckpt.stopped()["round"] == 3 and ckpt.load().round == 2  # the stopped round was not committed
    assert check_can_start(ckpt.path, resume=False) is None  # a fresh run may replace it
    assert check_can_start(ckpt.path, resume=True).round == 2


@pytest.mark.ray
def test_piped_output_shows_plain_round_lines(failed_run):
    proc, _ = failed_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("local-moml round ")]
    assert [ln.split(" | ")[0] for ln in lines] == [f"local-moml round {r}/50" for r in (1, 2, 3)]
    assert all(re.search(r"\| elapsed \d\d:\d\d \| eta \d\d:\d\d \| acc - \| failures \d+$", ln) for ln in lines), lines
    assert lines[-1].endswith(f"failures {3 * min(os.cpu_count() or 1, 4)}")  # error replies: 3 rounds x the default's nodes
    assert "\x1b[" not in proc.stdout and "━" not in proc.stdout


@pytest.mark.ray
def test_progress_on_a_terminal_is_a_bar(ray_runner, tmp_path):
    """The same CLI on a pseudo-terminal: rich's bar (round k/N, bar, elapsed, ETA, score, failures)."""
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "fedmeta.simulations.run", "--algorithms", "per-fedavg", *SINE, "--num-rounds", "4",
            "--evaluate-every", "4", "--results-dir", str(tmp_path / "r")]
    proc = subprocess.Popen(argv, env=_env(tmp_path, COLUMNS="120"), cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 600  # a hang guard
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "━" in screen and "\x1b[" in screen  # a drawn bar
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert re.search(r"per-fedavg round\s+4/4", plain) and "failures 0" in plain and re.search(r"loss \d\.\d{4}", plain)
    assert not re.search(r"per-fedavg round 4/4 \| elapsed", plain)  # no plain lines on a terminal


NO_EVAL = FAIL_ALL.replace("    @app.train()\n    def train(msg, context):", "    @app.evaluate()\n    def evaluate(msg, context):").replace(
    "    app.evaluate()(lambda msg, context: inner(msg, context))", "    app.train()(lambda msg, context: inner(msg, context))")


@pytest.mark.ray
def test_a_run_whose_final_evaluation_never_happened_exits_non_zero(ray_runner, tmp_path):
    """Training works, every evaluate call raises: the run finishes its rounds, says failed, exits 1."""
    assert "@app.evaluate()\n    def evaluate" in NO_EVAL and "app.train()(lambda" in NO_EVAL
    script = tmp_path / "no_eval.py"
    script.write_text(NO_EVAL)
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(script), "--algorithms", "per-fedavg", *SINE, "--num-rounds", "2",
                           "--evaluate-every", "2", "--results-dir", str(results)],
                          env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads((results / "per-fedavg-sinewave-n4-seed0.json").read_text())
    assert res["status"] == "failed" and res["failure"].startswith("the final evaluation (round 2) did not happen")
    assert sorted(res["train"], key=int) == ["1", "2"] and all(m["num-clients"] == 4 for m in res["train"].values())
    assert [e["stages"] for e in res["client_errors"]] == [["evaluate"]]
    assert "the final evaluation (round 2) did not happen" in proc.stderr.strip().splitlines()[-1]
    assert (proc.stdout + proc.stderr).count(MESSAGE) == 1


# --- summarising client errors ----------------------------------------------------------------------


def test_error_reasons_from_a_deployment_and_a_third_party_client_are_keyed_by_their_message():
    assert parse_reason("<class 'FileNotFoundError'>:<'fashion-mnist not found: missing x'>") == (
        "FileNotFoundError: fashion-mnist not found: missing x", "FileNotFoundError: fashion-mnist not found: missing x")
    assert parse_reason("something went wrong") == ("something went wrong", "something went wrong")
    failures = ClientFailures()
    for rnd, client in ((1, 0), (1, 1), (2, 0)):
        failures.record(rnd, "train", [client], "<class 'ValueError'>:<'bad'>")
    failures.record(2, "evaluate", [3], "<class 'KeyError'>:<'x'>")
    assert [e["error"] for e in failures.to_list()] == ["ValueError: bad", "KeyError: x"]
    assert failures.total == 4
    report = failures.report()
    assert report.count("ValueError: bad") == 1 and "raised 3 times by 2 clients (0-1) in train of rounds 1-2" in report



@pytest.mark.ray
@pytest.mark.parametrize("trigger, presses", [("local-moml round ", 1), ("== per-fedavg", 1), ("local-moml round ", 2)],
                         ids=["mid-round", "second-run-starting", "mid-round-twice"])
def test_ctrl_c_stops_the_run_with_one_line_and_the_interrupted_run_resumes(tmp_path, trigger, presses):
    """SIGINT to fedmeta-sim (its own Ray, as `make run`) while a round waits for replies, or while the second
    algorithm's simulation starts (the ServerApp may still be logging its start and writing its first checkpoint),
    or twice (the second stops at once, Flower's engine threads still waiting on Ray): the process ends (exit 130)
    instead of its ServerApp thread waiting for replies up to the round timeout, prints one line naming how to
    continue, last and true to what the checkpoint holds, leaves no process, and the run resumes."""
    from fedmeta.simulations.processes import process_table

    mark = f"fedmeta-ctrl-c-{os.getpid()}-{trigger[:3]}-{presses}"
    env = {k: v for k, v in _env(tmp_path, FEDMETA_TEST_MARK=mark).items() if k != "RAY_ADDRESS"}
    flags = [*SINE, "--num-rounds", "40", "--evaluate-every", "40", "--results-dir", str(tmp_path / "r")]
    proc = subprocess.Popen([sys.executable, "-m", "fedmeta.simulations.run", "--algorithms", "local-moml,per-fedavg", *flags],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # (piped progress lines are throttled: any round after the first)
            if line.startswith(trigger) and not line.startswith("local-moml round 1/"):
                break
        else:
            pytest.fail(f"no line starting {trigger!r}: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(0.2)  # (the second press must come while the first one's stop is under way)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # a hang guard: without the fix it waited up to round-timeout (3600 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    algorithm = "local-moml" if trigger.startswith("local") else "per-fedavg"
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    started = (tmp_path / "r" / "checkpoints" / f"{algorithm}-sinewave-n4-seed0" / "checkpoint.pt").exists()
    how = (f"continue it with the same flags and --algorithms {algorithm} --resume (checkpoint " if started else
           f"run it again with the same flags and --algorithms {algorithm} (no round of it was checkpointed)")
    assert last.startswith(f"fedmeta-sim: interrupted during {algorithm}; {how}"), err
    assert last.endswith("; not started: per-fedavg") == (algorithm == "local-moml")
    assert "Traceback" not in out + err
    # nothing the run started is left (Ray's processes inherit the environment, so the mark finds them)
    deadline = time.monotonic() + 30
    while (left := [pid for pid, info in process_table().items() if mark.encode() in info[3] and info[1] != "Z"]):
        if time.monotonic() > deadline:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes left after the interrupt: {left}")
        time.sleep(0.2)
    resumed = subprocess.run([sys.executable, "-m", "fedmeta.simulations.run", "--algorithms", algorithm, *flags, *(["--resume"] * started)],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    res = json.loads((tmp_path / "r" / f"{algorithm}-sinewave-n4-seed0.json").read_text())
    assert res["status"] == "ok" and res["final_round"] == 40 and (res["resumed_from"] is not None) == started
    assert started or algorithm == "per-fedavg"  # mid-round, the checkpoint of the rounds done is there


def _ray_reason(message: str, exc: str = "FloatingPointError", line: int = 282, func: str = "train") -> str:
    """An error reply's reason as the Ray engine sends it: the client's traceback, Flower's wrapper chained after it."""
    return (f'Traceback (most recent call last):\n  File "/src/clients/app.py", line 83, in run\n    reply = handler(msg, context)\n'
            f'  File "/src/clients/client.py", line {line}, in {func}\n    raise {exc}(\n{exc}: {message}\n'
            "\nThe above exception was the direct cause of the following exception:\n\nray::ClientAppActor.run() (pid=1, ip=x)\n"
            f"flwr.clientapp.client_app.ClientAppException: Exception ClientAppException occurred. Message: {message}")


def test_errors_differing_only_in_client_ids_and_numbers_are_one_with_each_client_listed_once():
    failures = ClientFailures()
    for rnd, clients in ((1, [3]), (1, [1]), (2, [2, 0]), (3, [3])):
        failures.record(rnd, "train", clients, _ray_reason(f"diverged for every client of the round {clients}: loss {rnd * 1.5e30}"))
    failures.record(3, "train", [1], _ray_reason("diverged for every client of the round [1]: loss 2", line=290))  # another line
    failures.record(3, "train", [2], _ray_reason("diverged for every client of the round [2]: loss 2", exc="ValueError"))
    failures.record(3, "evaluate", [0], "<class 'KeyError'>:<'client 0 has no test split'>")
    failures.record(3, "evaluate", [1], "<class 'KeyError'>:<'client 1 has no test split'>")
    first, *others = failures.to_list()
    assert len(others) == 3 and [e["error"].split(":")[0] for e in others] == ["FloatingPointError", "ValueError", "KeyError"]
    assert first["error"] == "FloatingPointError: diverged for every client of the round [3]: loss 1.5e+30"  # as first raised
    assert first["clients"] == [0, 1, 2, 3] and first["replies"] == 4 and first["raised_at"] == "/src/clients/client.py:282 in train"
    assert others[-1]["clients"] == [0, 1] and others[-1]["raised_at"] == ""
    report = failures.report()
    assert report.startswith("4 distinct client errors (8 error replies):")
    assert "[1] raised 4 times by 4 clients (0-3) in train of rounds 1-3; as first raised (round 1 by client 3):" in report
    assert report.count("Traceback (most recent call last)") == 3 and report.count("raise FloatingPointError") == 2


@pytest.mark.ray
@pytest.mark.subprocess
def test_a_run_where_every_client_diverges_prints_one_traceback(tmp_path, _session_ray):
    """The issue's command: every client's FloatingPointError names its own client ids; the console shows it once."""
    proc = subprocess.run([sys.executable, "-m", "fedmeta.simulations.run", "--dataset", "sinewave", "--num-clients", "4",
                           "--clients-per-round", "2", "--meta-lr", "1e30", "--inner-lr", "1e30", "--results-dir", str(tmp_path / "r")],
                          env=_env(tmp_path, RAY_ADDRESS=_session_ray.address), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("Traceback (most recent call last)") == 1 and out.count("raise FloatingPointError") == 1, out
    # one error reply per node and round: how many depends on the nodes (one per Ray actor slot by default)
    assert re.search(r"^1 distinct client error \(\d+ error replies\):\n\[1\] raised \d+ times by 4 clients \(0-3\)", out, re.M), out
