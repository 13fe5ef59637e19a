"""Flower Datasets (flwr-datasets) partitions feeding fedmeta clients: the ``flwr:<Partitioner>`` setting, its
validation, :func:`fedmeta.clients.flwr_datasets_data`, how flwr-datasets' Dirichlet split relates to fedmeta's, the
missing extra, and a Ray run of a Dirichlet and a Pathological split on Fashion-MNIST."""

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from fakes import doc_snippet
from fedmeta import config as C
from fedmeta import data as D
from fedmeta import flwr_partitions as F
from fedmeta.class_plans import _largest_remainder, dirichlet_plans
from fedmeta.clients import flwr_datasets_data
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.preflight import InputError, check_inputs

ROOT = Path(__file__).resolve().parents[1]
PAGE = "docs/flwr-datasets.md"


@pytest.fixture(scope="module")
def fmnist():
    """Fashion-MNIST's train split, from the local files (scripts/provision_data.py provides them)."""
    try:
        x, y, _, _ = D.load_fashion_mnist()
    except FileNotFoundError as err:
        pytest.fail(f"Fashion-MNIST is required (run .venv/bin/python scripts/provision_data.py): {err}")
    return x, y


def flwr_cfg(partition: str = "flwr:DirichletPartitioner", args: str = "alpha=0.5", **kw) -> ExperimentConfig:
    return ExperimentConfig(partition=partition, partition_args=args, **{"num_clients": 10, **kw})


# --- partition-args and validation, before any data ---------------------------------------------


def test_partition_args_as_pairs_or_json_give_the_same_arguments():
    pairs = F.parse_partition_args("alpha=0.5, min_partition_size=20,self_balancing=true,alpha_list=[0.5, 1],mode=random")
    assert pairs == {"alpha": 0.5, "min_partition_size": 20, "self_balancing": True, "alpha_list": [0.5, 1], "mode": "random"}
    assert F.parse_partition_args(json.dumps(pairs)) == pairs
    assert F.parse_partition_args("shuffle=False") == {"shuffle": False}
    assert F.canonical_args("b=1,a=2") == F.canonical_args('{"a": 2, "b": 1}')
    for bad, named in [("alpha", "'alpha'"), ("alpha=1,,", "''"), ("a=1,a=2", "'a' twice"), ("{alpha: 1}", "JSON object"),
                       ("[1, 2]", "'[1, 2]'"), ("1x=2", "'1x=2'")]:
        with pytest.raises(ValueError, match=rf"^partition-args .*{re.escape(named)}"):
            F.parse_partition_args(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(partition="flwr:Dirichlet"), r"^partition must be 'flwr:<name>' with a Flower Datasets partitioner among .*DirichletPartitioner.*"
                                        r"PathologicalPartitioner.*; got 'flwr:Dirichlet'; did you mean 'flwr:DirichletPartitioner'\?$"),
    (dict(partition="flwr:VerticalSizePartitioner"), r"got 'flwr:VerticalSizePartitioner' \(splits columns, not samples\)$"),
    (dict(args="alpha=0.5,alpah=1"), r"^partition-args: DirichletPartitioner has no argument 'alpah' \(its arguments: partition_by, "
                                     r"alpha, min_partition_size, self_balancing, shuffle\)$"),
    (dict(args=""), r"^partition-args: DirichletPartitioner needs alpha \(e\.g\. --partition-args 'alpha=\.\.\.'\)$"),
    (dict(args="alpha=-1"), r"^partition-args: DirichletPartitioner\(alpha=-1,.*\) fails: Alpha values should be strictly greater"),
    (dict(args="alpha=0.5,num_partitions=7"), r"^partition-args: num_partitions is set by fedmeta from num-clients \+ num-new-clients \(10\)"),
    (dict(args="alpha=0.5,seed=3"), r"^partition-args: seed is set by fedmeta from the experiment's seed \(0\); leave it out, got seed=3$"),
    (dict(args="alpha=0.5,partition_by=row"), r"^partition-args: partition_by must be 'label' .*got 'row'$"),
    (dict(partition="dirichlet", args="alpha=0.5"), r"^partition-args must be empty unless partition is flwr:<Partitioner> "
                                                    r"\(partition='dirichlet'\), got 'alpha=0.5'$"),
    (dict(test_fraction=1.0), r"^test-fraction must be a number in \(0, 1\), got 1.0$"),
    (dict(partition="flwr"), r"^partition must be one of \['fallah', 'dirichlet', 'pathological'\] or 'flwr:<Partitioner>'"),
])
def test_a_bad_flwr_partition_is_one_error_naming_the_field_before_any_data(kwargs, message, monkeypatch):
    monkeypatch.setattr(D, "_load_dataset", None)  # no data is read
    kw = {"partition": "flwr:DirichletPartitioner", "args": "alpha=0.5", **kwargs}
    with pytest.raises(ValueError, match=message):
        flwr_cfg(kw.pop("partition"), kw.pop("args"), **kw)


def test_num_partitions_equal_to_the_clients_is_accepted_and_new_clients_count():
    flwr_cfg(args="alpha=0.5,num_partitions=10")
    with pytest.raises(ValueError, match=r"\(12\); leave it out, got num_partitions=10"):
        flwr_cfg(args="alpha=0.5,num_partitions=10", num_new_clients=2)


def test_fedmeta_sim_refuses_a_bad_partition_in_one_line_before_any_work(tmp_path, capsys):
    code = sim_run.main(["--partition", "flwr:DirichletPartitioner", "--partition-args", "alpha=0.5,min_size=3",
                         "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fedmeta-sim: error: partition-args: DirichletPartitioner has no argument 'min_size' (its arguments: ")
    assert not any(tmp_path.iterdir())


def test_a_partitioner_making_another_number_of_partitions_fails_the_preflight(fmnist):
    """NaturalIdPartitioner over the label makes one partition per class (10): with 6 clients, one clear error before Ray."""
    with pytest.raises(InputError, match=r"^dataset: fashion-mnist in .*: NaturalIdPartitioner makes 10 partitions but there are 6 "
                                         r"clients \(num-clients \+ num-new-clients\): make them agree$"):
        check_inputs(flwr_cfg("flwr:NaturalIdPartitioner", "", num_clients=6, clients_per_round=3))
    one_class_each = [D.client_data("fashion-mnist", i, **flwr_cfg("flwr:NaturalIdPartitioner", "").data_kwargs()) for i in range(10)]
    assert sorted(int(c.y_train.unique().item()) for c in one_class_each) == list(range(10))


# --- the flwr: partition of fedmeta's data sets ---------------------------------------------------


def test_flwr_clients_split_their_partition_into_train_and_test_with_its_class_distribution(fmnist):
    _, y = fmnist
    cfg = flwr_cfg(args="alpha=0.3,min_partition_size=0", test_fraction=0.2, seed=3)
    kw = cfg.data_kwargs()
    train_idx, test_idx = F.partition_indices(cfg.partition, y.numpy(), 10, 3, partition_args="alpha=0.3,min_partition_size=0",
                                              test_fraction=0.2)
    rows = [np.concatenate([tr, te]) for tr, te in zip(train_idx, test_idx)]
    assert sum(map(len, rows)) == 60000 and len(np.unique(np.concatenate(rows))) == 60000  # every train-split row, once
    # the partitioner ran with fedmeta's seed: its partitions are these clients' rows
    partitioner = DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.3, min_partition_size=0, seed=3)
    partitioner.dataset = datasets.Dataset.from_dict({"label": y.numpy()})
    sizes = [partitioner.load_partition(i).num_rows for i in range(10)]
    assert [len(r) for r in rows] == sizes
    labels = y.numpy()
    for i, (tr, te) in enumerate(zip(train_idx, test_idx)):
        client = D.client_data("fashion-mnist", i, **kw)
        assert torch.equal(client.y_train, y[torch.from_numpy(tr)]) and torch.equal(client.y_test, y[torch.from_numpy(te)])
        assert len(te) == round(0.2 * len(rows[i])) and not set(tr) & set(te)
        n_c = np.bincount(labels[rows[i]], minlength=10)
        assert np.all(np.abs(np.bincount(labels[te], minlength=10) - 0.2 * n_c) < 1 + 1e-9)  # stratified
        assert client.x_train.dtype == torch.float32 and client.x_train.shape[1:] == (1, 28, 28)
    assert D.client_data("fashion-mnist", 4, **kw) is D.client_data("fashion-mnist", 4, **kw)  # cached like the built-ins


def test_dirichlet_partitioner_uses_fedmeta_s_draws_transposed_so_sizes_differ(fmnist):
    """The comparison docs/flwr-datasets.md states. With as many clients as classes (10) and the same seed, fedmeta's
    ``dirichlet`` and flwr-datasets' DirichletPartitioner use the same Dirichlet matrix M (one row after another from
    ``default_rng(seed)``): fedmeta reads row i as client i's class proportions and gives every client 300 + 100 samples;
    flwr-datasets reads row k as class k's shares over the clients and hands out all 6,000 of its samples (floors of the
    cumulative shares), so client i gets about ``sum_k M[k, i] * 6000`` samples: sizes vary and sum to 60,000."""
    _, y = fmnist
    n = num_classes = 10
    for seed in (0, 7):
        m = np.random.default_rng(seed).dirichlet(np.full(num_classes, 0.5), size=n)
        train_plan, test_plan = dirichlet_plans(n, np.random.default_rng(seed), num_classes, alpha=0.5)
        for i in range(n):
            assert train_plan[i] == {c: k for c, k in enumerate(_largest_remainder(m[i], 300).tolist()) if k}
        assert {sum(p.values()) for p in train_plan} == {300} and {sum(p.values()) for p in test_plan} == {100}

        cfg = flwr_cfg(args="alpha=0.5,min_partition_size=0", seed=seed)
        clients = [D.client_data("fashion-mnist", i, **cfg.data_kwargs()) for i in range(n)]
        counts = np.array([np.bincount(torch.cat([c.y_train, c.y_test]).numpy(), minlength=10) for c in clients])  # [client, class]
        for k in range(num_classes):
            per_class = int((y == k).sum())
            cuts = np.concatenate([[0], (np.cumsum(m[k]) * per_class).astype(int)[:-1], [per_class]])
            assert counts[:, k].tolist() == np.diff(cuts).tolist()  # column i of class k's row of M
        sizes = counts.sum(1)
        assert sizes.sum() == 60000 and sizes.max() > 1.5 * sizes.min()
        # fedmeta's client i leans to the classes of row i; flwr-datasets' client i to those of column i
        assert np.array_equal(np.argmax(m, axis=1), [max(p, key=p.get) for p in train_plan])
        assert np.array_equal(np.argmax(counts / counts.sum(0), axis=0), np.argmax(m, axis=1))


def test_flwr_datasets_data_feeds_clients_from_your_own_dataset_and_partitioner(fmnist):
    x, y = fmnist
    n = 3000
    ds = datasets.Dataset.from_dict({"pixels": x[:n, 0].numpy(), "y": y[:n].numpy()})
    data_fn = flwr_datasets_data(PathologicalPartitioner(num_partitions=5, partition_by="y", num_classes_per_partition=2,
                                                         class_assignment_mode="deterministic"),
                                 ds, features="pixels", label="y", test_fraction=0.3, seed=2)  # 0-1, 1-2, ..., 4-5
    total = sum(a + b for a, b in data_fn.sizes())
    assert data_fn.num_clients == 5 and total == int(np.isin(y[:n], list(range(6))).sum())  # the 5 clients' 6 classes
    images = {bytes(row): int(label) for row, label in zip(x[:n].numpy(), y[:n].numpy())}
    seen = 0
    for i in range(5):
        c = data_fn(i)
        assert c.x_train.shape[1:] == (1, 28, 28) and c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64
        assert len(c.y_train.unique()) <= 2 and set(c.y_test.tolist()) <= set(c.y_train.tolist())
        for xs, ys in ((c.x_train, c.y_train), (c.x_test, c.y_test)):  # each sample is a row of the data set, with its label
            raw = (xs * 255).round().to(torch.uint8).numpy()
            assert all(images[bytes(r)] == int(label) for r, label in zip(raw, ys))
            seen += len(ys)
    assert seen == total
    assert data_fn(0) is data_fn(0)
    copy = pickle.loads(pickle.dumps(data_fn))  # what a Ray worker receives: the partitions, fixed
    assert copy._built == {} and torch.equal(copy(3).x_test, data_fn(3).x_test)


def test_a_partitioner_without_a_seed_is_split_once_for_every_process(fmnist):
    x, y = fmnist
    ds = datasets.Dataset.from_dict({"image": x[:600, 0].numpy(), "label": y[:600].numpy()})
    partitioner = DirichletPartitioner(num_partitions=3, partition_by="label", alpha=1.0, seed=None)
    data_fn = flwr_datasets_data(partitioner, ds)
    copies = [pickle.loads(pickle.dumps(data_fn)) for _ in range(2)]
    assert all(torch.equal(c(1).y_train, data_fn(1).y_train) for c in copies)
    with pytest.raises(ValueError, match="^the partitioner already has a dataset"):
        flwr_datasets_data(partitioner, ds)
    with pytest.raises(ValueError, match=r"^features must be a column of the dataset \(image, label\), got 'img'$"):
        flwr_datasets_data(IidPartitioner(3), ds, features="img")
    with pytest.raises(ValueError, match=r"^client 0 has 2 samples, too few to hold out test-fraction=0.25"):
        flwr_datasets_data(IidPartitioner(3), ds.select(range(5)))


def test_image_columns_are_decoded(fmnist):
    """A column of ``datasets.Image`` (what Hub image data sets hold) goes through datasets' numpy format."""
    from PIL import Image

    x, y = fmnist
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in x[:40, 0].numpy()], "label": y[:40].tolist()},
                                    features=features)
    data_fn = flwr_datasets_data(IidPartitioner(2), ds)
    c = data_fn(0)
    both = torch.cat([c.x_train, c.x_test])
    assert both.shape == (20, 1, 28, 28) and both.max() <= 1.0
    assert torch.equal((both * 255).round().to(torch.uint8).sort(0).values, x[:20].sort(0).values)


def test_the_docs_example_builds_clients_from_local_arrays(fmnist, capsys):
    exec(compile(doc_snippet("own-dataset", page=PAGE), PAGE, "exec"), {})
    out = capsys.readouterr().out
    m = re.fullmatch(r"10 clients\nclient 0: (\d+) train / (\d+) test samples of classes \[[\d, ]+\]\n", out)
    assert m, out
    train, test = map(int, m.groups())
    assert abs(test - 0.25 * (train + test)) <= 1


# --- the optional extra ---------------------------------------------------------------------------


def test_without_the_extra_each_entry_point_says_which_extra_to_install(monkeypatch, fmnist):
    x, y = fmnist
    ds = datasets.Dataset.from_dict({"image": x[:10, 0].numpy(), "label": y[:10].numpy()})
    for module in ("flwr_datasets", "flwr_datasets.partitioner"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    line = "needs Flower Datasets: pip install 'fedmeta[flwr-datasets]'"
    with pytest.raises(ValueError) as err:
        flwr_cfg()
    assert str(err.value) == f"partition 'flwr:DirichletPartitioner' {line}"
    with pytest.raises(ImportError, match=rf"^flwr_datasets_data {re.escape(line)}$"):
        flwr_datasets_data(object(), ds)
    flwr_cfg("dirichlet", "")  # the built-in partitions need nothing


@pytest.mark.subprocess
def test_the_base_install_needs_neither_and_the_flwr_partition_works_offline(fmnist):
    """pyproject's dependencies do not name flwr-datasets or datasets; fedmeta imports neither until a flwr: partition
    is used, which then builds its data set from the local files with the Hugging Face Hub offline."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "datasets" not in deps and "flwr-datasets = [\"flwr-datasets\"]" in text
    script = (
        "import sys\n"
        "import fedmeta.clients, fedmeta.simulations.run, fedmeta.flwr_partitions\n"
        "from fedmeta.simulations.config import ExperimentConfig\n"
        "from fedmeta.data import client_data\n"
        "ExperimentConfig(partition='dirichlet')\n"
        "print(sorted(m for m in ('datasets', 'flwr_datasets', 'pyarrow') if m in sys.modules))\n"
        "cfg = ExperimentConfig(num_clients=4, clients_per_round=2, partition='flwr:IidPartitioner')\n"
        "print(client_data(cfg.dataset, 3, **cfg.data_kwargs()).num_train)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent/hf"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["[]", "11250"]  # 60,000 / 4 clients, a quarter held out for testing


# --- end to end on Ray ----------------------------------------------------------------------------


SMALL = ["--algorithms", "local-moml", "--num-clients", "6", "--clients-per-round", "3", "--num-rounds", "5", "--evaluate-every", "5",
         "--local-steps", "4", "--batch-size", "20", "--init-batch-size", "20", "--lr", "0.1", "--inner-lr", "0.05", "--eval-steps", "5"]


@pytest.mark.ray
def test_dirichlet_and_pathological_partitioners_train_and_evaluate_on_ray(ray_runner, tmp_path, fmnist):
    """The docs' command (a DirichletPartitioner split), then the same run on a PathologicalPartitioner split: each
    trains, evaluates every client, and fine-tuning lifts personalized accuracy well above chance (0.1)."""
    command = shlex.split(doc_snippet("cli", "sh", page=PAGE).replace("\\\n", " "))
    assert command[:1] == ["fedmeta-sim"] and "flwr:DirichletPartitioner" in command
    runs = {"dirichlet": command[1:],
            "pathological": SMALL + ["--partition", "flwr:PathologicalPartitioner", "--partition-args", "num_classes_per_partition=2"]}
    for name, argv in runs.items():
        out = tmp_path / name
        assert sim_run.main(argv + ["--results-dir", str(out)]) == 0
        res = json.loads((out / "local-moml-fashion-mnist-n6-seed0.json").read_text())
        assert res["status"] == "ok" and res["config"]["partition"].startswith("flwr:")
        final = res["final"]
        assert len(res["clients"]) == 6
        assert final[C.ACC_AFTER] > max(0.3, final[C.ACC_BEFORE] + 0.15), final
