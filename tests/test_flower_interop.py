"""fedmeta with other people's Flower code, on Flower's Ray simulation engine: the snippets of docs/flower.md
("Using fedmeta with your Flower code") and the README's "With your Flower code", executed as written, with 6
Fashion-MNIST clients.

Stock FedAvg / FedAdam drive fedmeta clients; fedmeta's strategies drive a quickstart-style ClientApp
and a ClientApp written from the docs' message contract (neither imports fedmeta); Flower's DP wrappers
around PerFedAvg run in fedmeta's checkpointed loop, with resume, and client-side clipping goes through
``make_client_app(train_mods=...)``."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from fakes import doc_snippet

from fedmeta import config as C
from fedmeta.clients import fashion_mnist_data, make_client_app
from fedmeta.models import mlp_40_40
from fedmeta.simulations.engine import run_on_ray
from fedmeta.strategies import LocalMOML, TrainingStopped, start

pytestmark = pytest.mark.ray

N = 6  # clients in every snippet


@pytest.fixture(autouse=True)
def _quiet_flower():
    logging.getLogger("flwr").setLevel(logging.ERROR)


FLOWER_PAGE = "docs/flower.md"


def run_snippets(*names: str, namespace: dict | None = None, client_app: ClientApp | None = None, page: str = FLOWER_PAGE) -> dict:
    """Execute the snippets of ``page`` in one namespace, then run its ``server_app`` against its ``client_app``
    (or ``client_app``: the user's own) on Ray; the namespace (with ``results``) is returned."""
    ns = dict(namespace or {})
    for name in names:
        exec(compile(doc_snippet(name, page=page), f"{page}:{name}", "exec"), ns)  # noqa: S102 (the docs' own code)
    run_on_ray(ns["server_app"], client_app or ns["client_app"], num_supernodes=N)
    return ns


def _accuracy(result, rnd: int, key: str = C.ACC_AFTER) -> float:
    return float(result.evaluate_metrics_clientapp[rnd][key])


@pytest.mark.parametrize("page, snippets", [(FLOWER_PAGE, ("stock-fedavg",)), (FLOWER_PAGE, ("stock-fedavg", "stock-fedadam")),
                                            ("README.md", ("readme-flower-strategy",))], ids=["FedAvg", "FedAdam", "FedAvg (README)"])
def test_stock_strategies_drive_fedmeta_clients_through_the_helper(ray_runner, page, snippets):
    torch.manual_seed(0)  # the snippet's mlp_40_40() draws its initial weights from torch's global generator
    ns = run_snippets(*snippets, page=page)
    [result] = ns["results"]
    assert type(ns["server_app"]) is ServerApp
    first, last = _accuracy(result, 1), _accuracy(result, 10)
    print(f"{snippets[-1]}: accuracy after adaptation round 1 {first:.3f} -> round 10 {last:.3f}")
    assert last > first + 0.1, (first, last)
    for rnd in range(1, 11):
        train = result.train_metrics_clientapp[rnd]
        assert C.TRAIN_LOSS in train and C.NUM_SAMPLES in train
        assert not {C.PARTITION_ID, C.MEMORY_ROUND, C.MEMORY_DIGEST} & set(train)  # identifiers are not averaged
        assert C.PARTITION_ID not in result.evaluate_metrics_clientapp[rnd]


def test_a_serverapp_of_your_own_with_a_fedmeta_strategy_and_client(ray_runner):
    torch.manual_seed(0)
    [result] = run_snippets("own-serverapp")["results"]
    assert sorted(result.evaluate_metrics_clientapp) == [5, 10]  # evaluate_every=5
    last = result.evaluate_metrics_clientapp[10]
    assert last[C.ACC_AFTER] > last[C.ACC_BEFORE] + 0.05, last  # the personalization step helps


def test_stock_fedavg_with_no_fedmeta_config_stops_early_with_the_clear_line(ray_runner, caplog):
    app = ServerApp()
    box: dict = {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            start(FedAvg(min_available_nodes=N), grid, ArrayRecord(mlp_40_40().state_dict()), num_rounds=30)
        except TrainingStopped as stop:
            box["stop"] = stop

    with caplog.at_level(logging.INFO, logger="fedmeta"):
        run_on_ray(app, make_client_app(mlp_40_40, fashion_mnist_data(num_clients=N)), num_supernodes=N)
    stop = box["stop"]
    assert stop.last_round == 3  # max_failed_rounds' default, not 30 rounds
    assert "first: ValueError: no fedmeta training settings" in str(stop)
    lines = [r.getMessage() for r in caplog.records if "no fedmeta training settings" in r.getMessage()]
    assert len([ln for ln in lines if "new client error" in ln]) == 1  # said once, not once per reply


# --- ordinary Flower clients under fedmeta strategies ---------------------------------------------

def quickstart_client_app() -> tuple[ClientApp, type]:
    """A ClientApp in the style of Flower's quickstart-pytorch (its Net, train and test loops, its metric
    names; no query handler). It uses fedmeta only to load the same Fashion-MNIST partitions."""
    data_fn = fashion_mnist_data(num_clients=N)

    class Net(torch.nn.Sequential):
        def __init__(self):
            super().__init__(torch.nn.Flatten(), torch.nn.Linear(784, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = data_fn(int(context.node_config["partition-id"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=msg.content["config"]["lr"])
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        metrics = MetricRecord({"train_loss": total / len(loader), "num-examples": len(loader.dataset)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = data_fn(int(context.node_config["partition-id"]))
        with torch.no_grad():
            out = model(data.x_test)
        loss = torch.nn.functional.cross_entropy(out, data.y_test).item()
        acc = (out.argmax(1) == data.y_test).float().mean().item()
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(data.y_test)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app, Net


@pytest.mark.parametrize("strategy", ["PerFedAvg (docs)", "PerFedAvg (README)", "LocalMOML"])
def test_fedmeta_strategies_drive_a_quickstart_style_client(ray_runner, strategy, caplog):
    client_app, net = quickstart_client_app()
    with caplog.at_level(logging.INFO, logger="fedmeta"):
        if strategy == "LocalMOML":
            app, results = ServerApp(), []

            @app.main()
            def main(grid: Grid, context: Context) -> None:
                s = LocalMOML(num_clients=N, clients_per_round=3, inner_lr=0.01, lr=0.05, local_steps=4, evaluate_every=1)
                results.append(s.start(grid, ArrayRecord(net().state_dict()), num_rounds=5, train_config=ConfigRecord({"lr": 0.01})))

            run_on_ray(app, client_app, num_supernodes=N)
        elif strategy == "PerFedAvg (README)":
            results = run_snippets("readme-fedmeta-strategy", namespace={"Net": net}, client_app=client_app, page="README.md")["results"]
        else:
            results = run_snippets("stock-fedavg", "your-client", namespace={"Net": net}, client_app=client_app)["results"]
    [result] = results
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3, 4, 5]
    for rnd in range(1, 6):
        ev = result.evaluate_metrics_clientapp[rnd]
        assert ev["num-clients"] == N and 0 <= ev["eval_acc"] <= 1 and "eval_acc-std" in ev and "eval_loss-p10" in ev
        assert result.train_metrics_clientapp[rnd]["num-accepted"] >= 3
    # Flower's no-query-handler error (and its traceback per node) is not logged; fedmeta's one warning says what it did
    warnings = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "partition-keyed sampling is off" in warnings[0], warnings
    assert "Traceback" not in caplog.text and "No query function registered" in warnings[0]


def contract_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))


def contract_client_app() -> ClientApp:
    """A ClientApp written from the message contract table of docs/flower.md alone: no fedmeta import. It answers the
    query with its partition, trains with ``local-steps`` plain SGD steps at ``inner-lr`` on a toy
    linear task of its own, and reports personalized evaluation (one step on its train split)."""
    app = ClientApp()

    def task(pid: int):
        g = torch.Generator().manual_seed(100 + pid)
        x = torch.randn(40, 1, 28, 28, generator=g)
        y = (x.flatten(1)[:, pid] > 0).long()  # each client's own rule
        return x[:30], y[:30], x[30:], y[30:]

    def model(msg: Message) -> torch.nn.Module:
        net = contract_net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return net

    def sgd(net, x, y, lr, steps):
        for _ in range(steps):
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= lr * p.grad
        return torch.nn.functional.cross_entropy(net(x), y).item()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, pid = msg.content["config"], int(context.node_config["partition-id"])
        net, (x, y, _, _) = model(msg), task(pid)
        loss = sgd(net, x, y, float(cfg["inner-lr"]), int(cfg["local-steps"]))
        metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
        info = ConfigRecord({"partition-id": pid})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics, "client-info": info}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, pid = msg.content["config"], int(context.node_config["partition-id"])
        net, (x, y, xt, yt) = model(msg), task(pid)
        scores = {}
        for when in ("before", "after"):
            if when == "after":
                sgd(net, x, y, float(cfg["inner-lr"]), int(cfg["eval-steps"]))
            with torch.no_grad():
                out = net(xt)
            scores[f"loss-{when}"] = torch.nn.functional.cross_entropy(out, yt).item()
            scores[f"accuracy-{when}"] = (out.argmax(1) == yt).float().mean().item()
        metrics = MetricRecord({"num-examples": len(yt), **scores})
        return Message(RecordDict({"metrics": metrics, "client-info": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    return app


@pytest.mark.parametrize("name", ["PerFedAvg", "LocalMOML"])
def test_a_client_honoring_the_readme_contract_runs_under_both_strategies(ray_runner, name, caplog):
    from fedmeta.strategies import PerFedAvg

    cls = {"PerFedAvg": PerFedAvg, "LocalMOML": LocalMOML}[name]
    app, box = ServerApp(), {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = cls(num_clients=N, clients_per_round=4, inner_lr=0.05, local_steps=3, evaluate_every=2)
        box["result"] = strategy.start(grid, ArrayRecord(contract_net().state_dict()), num_rounds=4)
        box["strategy"] = strategy

    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        run_on_ray(app, contract_client_app(), num_supernodes=N)
    result, strategy = box["result"], box["strategy"]
    assert sorted(result.evaluate_metrics_clientapp) == [2, 4]
    assert all(result.train_metrics_clientapp[r]["num-accepted"] == 4 for r in range(1, 5))
    assert all(sorted(strategy.client_train[r]) == strategy.sample(r) for r in range(1, 5))  # partition-keyed sampling
    assert result.evaluate_metrics_clientapp[4]["num-clients"] == N and C.ACC_AFTER in result.evaluate_metrics_clientapp[4]
    assert not [r for r in caplog.records if "rejected" in r.getMessage() or "partition-keyed" in r.getMessage()]


# --- Flower's DP wrappers and mods ----------------------------------------------------------------


def _arrays(result) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in result.arrays.items()}


def test_dp_wrapped_per_fedavg_checkpoints_and_resumes_to_the_uninterrupted_model(ray_runner, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    shared = {}
    exec(compile(doc_snippet("stock-fedavg", page=FLOWER_PAGE), "stock-fedavg", "exec"), shared)  # imports and the model
    # uninterrupted
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="fedmeta"):
        whole = run_snippets("dp-server-side", namespace=dict(shared))["results"][0]
    assert sorted(whole.evaluate_metrics_clientapp) == [4, 6]  # evaluate_every=4 and the last round
    rounds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 6/6: personalized accuracy")]
    assert rounds, "the wrapped strategy's log says round k/N"
    # the server dies before round 4 ...
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    real = DifferentialPrivacyServerSideFixedClipping.configure_train

    def dies_in_round_4(self, server_round, *args, **kwargs):
        if server_round == 4:
            raise RuntimeError("killed before round 4")
        return real(self, server_round, *args, **kwargs)

    monkeypatch.setattr(DifferentialPrivacyServerSideFixedClipping, "configure_train", dies_in_round_4)
    with pytest.raises(RuntimeError, match="killed before round 4"):
        run_snippets("dp-server-side", namespace=dict(shared))
    monkeypatch.setattr(DifferentialPrivacyServerSideFixedClipping, "configure_train", real)
    # ... and the same snippet, run again, resumes from its checkpoint after round 3
    resumed = run_snippets("dp-server-side", namespace=dict(shared))["results"][0]
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3, 4, 5, 6]
    for k, v in _arrays(whole).items():
        np.testing.assert_array_equal(_arrays(resumed)[k], v)


def test_client_side_clipping_mod_through_make_client_app(ray_runner):
    torch.manual_seed(0)
    ns = run_snippets("stock-fedavg", "dp-server-side", "dp-client-side")
    [result] = ns["results"]
    w0 = {k: v.detach().numpy() for k, v in ns["model"].state_dict().items()}
    moved = math.sqrt(sum(float(((result.arrays[k].numpy() - v).astype(np.float64) ** 2).sum()) for k, v in w0.items()))
    # 3 rounds, each the average of updates clipped to 0.01 (noise 0): at most 0.03 in all
    assert 0 < moved <= 3 * 0.01 * (1 + 1e-5), moved
    assert all(result.train_metrics_clientapp[r]["num-accepted"] == N for r in (1, 2, 3))
