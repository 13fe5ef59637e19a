"""Client data from Flower Datasets partitioners (``flwr-datasets``; no Flower framework import here).

Any row partitioner of ``flwr_datasets.partitioner`` splits a ``datasets.Dataset`` over the clients; each
client's partition is then split into its train and test data (:func:`split_train_test`: stratified by
label, so both have the client's class distribution), which is all that personalized evaluation and the
rest of fedmeta see (:class:`fedmeta.data.ClientData`). Two ways in:

* the ``partition`` setting ``flwr:<PartitionerName>`` with ``partition-args`` (:func:`parse_partition_args`),
  on fedmeta's image data sets: the partitioner runs on a ``datasets.Dataset`` of the train split's labels
  (built from the local files, never from the Hugging Face Hub) and yields row indices into the uint8 data
  set of :mod:`fedmeta.datasets` (:func:`partition_indices`, used by :func:`fedmeta.data.client_data`, so
  caching, preflight checks and multi-client nodes are unchanged);
* :func:`flwr_datasets_data` (also ``fedmeta.clients.flwr_datasets_data``): a ``datasets.Dataset`` and a
  partitioner object of your own.

``num_partitions`` and ``seed`` come from the experiment (num-clients + num-new-clients, seed). flwr-datasets
and ``datasets`` are the optional extra ``fedmeta[flwr-datasets]``, imported only here and only when used.

How ``flwr:DirichletPartitioner`` differs from fedmeta's ``dirichlet`` partition (``docs/flwr-datasets.md``):
fedmeta draws each *client's* class proportions ``p_i ~ Dir(alpha 1_C)`` and gives every client
``train_per_client`` + ``test_per_client`` samples; flwr-datasets draws each *class's* shares over the clients
``q_k ~ Dir(alpha 1_n)`` (after Yurochkin et al. 2019, arXiv:1905.12022) and hands out all of the class's samples, so client sizes vary (and it redraws
while a client has fewer than ``min_partition_size`` samples). Both take their draws from
``numpy.random.default_rng(seed)`` one Dirichlet vector after another: with as many clients as classes the
two splits use the very same ``n x C`` matrix, read by rows as clients (fedmeta) or as classes (flwr-datasets).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmeta.class_plans import _largest_remainder
from fedmeta.extras import need

FLWR_PREFIX = "flwr:"
"""``partition = "flwr:<PartitionerName>"`` selects a Flower Datasets partitioner."""

LABEL_COLUMN = "label"
"""The label column of the data set fedmeta builds from its image files (what ``partition_by`` names)."""

ROW_COLUMN = "row"
"""Its other column: the sample's row in the train split."""

SET_BY_FEDMETA = {"num_partitions": "num-clients + num-new-clients", "seed": "the experiment's seed"}
"""Partitioner arguments fedmeta passes itself (from these settings)."""

NOT_ROW_PARTITIONERS = {
    "Partitioner": "the abstract base class",
    "VerticalEvenPartitioner": "splits columns, not samples",
    "VerticalSizePartitioner": "splits columns, not samples",
    "IdToSizeFncPartitioner": "takes a Python function (use flwr_datasets_data)",
}
"""Partitioners of ``flwr_datasets.partitioner`` that ``flwr:<name>`` does not offer, and why."""

DEFAULT_TEST_FRACTION = 0.25
"""Share of each client's partition held out as its test data (300 / 100 is the built-in partitions' ratio)."""


def is_flwr_partition(partition: str) -> bool:
    return isinstance(partition, str) and partition.startswith(FLWR_PREFIX)


def partitioner_module(what: str = "fedmeta.flwr_partitions") -> Any:
    """``flwr_datasets.partitioner`` (which imports ``datasets``), or :class:`fedmeta.extras.MissingExtra`:
    ``<what> needs Flower Datasets: pip install 'fedmeta[flwr-datasets]'``."""
    return need("flwr-datasets", what, "flwr_datasets.partitioner")


def partitioner_names() -> list[str]:
    """The partitioners ``flwr:<name>`` accepts: every row partitioner flwr-datasets exports."""
    module = partitioner_module()
    return sorted(n for n in module.__all__ if n not in NOT_ROW_PARTITIONERS and inspect.isclass(getattr(module, n)))


# --------------------------------------------------------------------------- partition-args


def _value(text: str) -> Any:
    """``0.5`` -> 0.5, ``true`` -> True, ``[1, 2]`` -> [1, 2], ``label`` -> "label" (JSON, else the bare text)."""
    text = text.strip()
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_partition_args(args: str | Mapping[str, Any]) -> dict[str, Any]:
    """The partitioner's keyword arguments from ``partition-args``.

    Two forms: ``key=value`` pairs separated by commas (``alpha=0.5,min_partition_size=5``; a value is JSON
    when it parses as JSON, ``true``/``True`` and lists included, else the bare text), or a JSON object
    (``{"alpha": 0.5}``). A mapping is returned as a dict. ValueError naming the malformed part.
    """
    if isinstance(args, Mapping):
        return dict(args)
    text = args.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as err:
            raise ValueError(f"partition-args must be key=value pairs or a JSON object, got {args!r} ({err})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"partition-args must be key=value pairs or a JSON object, got {args!r}")
        return parsed
    out: dict[str, Any] = {}
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text + ","):  # commas inside [...] / {...} belong to the value
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"partition-args must be key=value pairs separated by commas (or a JSON object), "
                             f"got {part.strip()!r}" + (f" in {args!r}" if part.strip() != text else ""))
        if key in out:
            raise ValueError(f"partition-args gives {key!r} twice in {args!r}")
        out[key] = _value(value)
    return out


def canonical_args(args: str | Mapping[str, Any]) -> str:
    """``partition-args`` as one canonical JSON string (the cache key of a split)."""
    return json.dumps(parse_partition_args(args), sort_keys=True)


def flwr_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A ``flwr:`` partition's parameters for :func:`fedmeta.data.client_data`, completed and canonical:
    ``partition_args`` (:func:`canonical_args`) and ``test_fraction`` (in (0, 1))."""
    allowed = ("partition_args", "test_fraction")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} of a flwr: partition; allowed: {', '.join(allowed)}")
    fraction = params.get("test_fraction", DEFAULT_TEST_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1) (share of each client's partition held out for "
                         f"testing), got {fraction!r}")
    return {"partition_args": canonical_args(params.get("partition_args", "")), "test_fraction": float(fraction)}


# --------------------------------------------------------------------------- the partitioner


def make_partitioner(partition: str, args: str | Mapping[str, Any], num_partitions: int, seed: int,
                     label: str = LABEL_COLUMN) -> Any:
    """The partitioner ``flwr:<Name>`` with ``args``, ``num_partitions`` and ``seed`` (when it takes them) and
    ``partition_by = label`` by default. Checked without data: an unknown name lists the available ones, an
    unknown or missing argument is named with the partitioner's parameters, an argument the partitioner
    rejects is reported with its message. Raises :class:`fedmeta.extras.MissingExtra` or ValueError."""
    name = partition[len(FLWR_PREFIX):] if is_flwr_partition(partition) else partition
    module = partitioner_module(f"partition {partition!r}")
    names = partitioner_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        why = f" ({NOT_ROW_PARTITIONERS[name]})" if name in NOT_ROW_PARTITIONERS else ""
        why += f"; did you mean '{FLWR_PREFIX}{near[0]}'?" if near and not why else ""
        raise ValueError(f"partition must be 'flwr:<name>' with a Flower Datasets partitioner among {', '.join(names)}; "
                         f"got {partition!r}{why}")
    cls = getattr(module, name)
    params = {p: v for p, v in inspect.signature(cls.__init__).parameters.items() if p != "self"}
    kwargs = parse_partition_args(args)
    for key in kwargs:
        if key in SET_BY_FEDMETA and key in params:
            if key == "num_partitions" and kwargs[key] == num_partitions:
                continue
            raise ValueError(f"partition-args: {key} is set by fedmeta from {SET_BY_FEDMETA[key]} "
                             f"({num_partitions if key == 'num_partitions' else seed}); leave it out, got {key}={kwargs[key]!r}")
        if key not in params:
            allowed = ", ".join(p for p in params if p not in SET_BY_FEDMETA) or "none"
            raise ValueError(f"partition-args: {name} has no argument {key!r} (its arguments: {allowed})")
    if "partition_by" in params:
        kwargs.setdefault("partition_by", label)
    for key, value in (("num_partitions", num_partitions), ("seed", seed)):
        if key in params:
            kwargs[key] = value
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs
               and v.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        raise ValueError(f"partition-args: {name} needs {', '.join(missing)} (e.g. --partition-args "
                         f"'{','.join(f'{m}=...' for m in missing)}')")
    shown = ",".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"partition-args: {name}({shown}) fails: {' '.join(str(err).split())}") from None


def check_flwr_partition(partition: str, args: str | Mapping[str, Any], num_partitions: int, seed: int) -> None:
    """Validate a ``flwr:`` partition before any data is read (:func:`make_partitioner`; remembered per process),
    including that ``partition_by`` names the label column, the only column fedmeta's image data sets have."""
    partitioner_module(f"partition {partition!r}")
    _check(partition, canonical_args(args), num_partitions, seed)


@functools.lru_cache(maxsize=64)
def _check(partition: str, args: str, num_partitions: int, seed: int) -> None:
    make_partitioner(partition, args, num_partitions, seed)
    by = parse_partition_args(args).get("partition_by", LABEL_COLUMN)
    if by != LABEL_COLUMN:
        raise ValueError(f"partition-args: partition_by must be {LABEL_COLUMN!r} (the label column of fedmeta's image "
                         f"data sets), got {by!r}")


def partition_rows(partitioner: Any, num_clients: int) -> list[np.ndarray]:
    """Every partition's ``row`` column (the partitioner's ``dataset`` has one), checking that it makes
    ``num_clients`` partitions."""
    made = int(partitioner.num_partitions)
    if made != num_clients:
        raise ValueError(f"{type(partitioner).__name__} makes {made} partitions but there are {num_clients} clients "
                         f"(num-clients + num-new-clients): make them agree")
    return [np.asarray(partitioner.load_partition(i)[ROW_COLUMN], dtype=np.int64) for i in range(made)]


def split_train_test(labels: np.ndarray, test_fraction: float, rng: np.random.Generator,
                     client: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples into train and test positions, stratified by label.

    ``T = round(test_fraction * N)`` test samples, dealt to the classes by the largest-remainder method, so
    class ``c`` has ``T n_c / N`` test samples up to rounding: the test data has the client's class
    distribution (as fedmeta's own partitions). Each class's samples are shuffled by ``rng`` first; both
    outputs are shuffled. ValueError when a split would be empty.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        int64 positions into ``labels`` of the train and of the test samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    total = int(round(test_fraction * n))
    if not 1 <= total <= n - 1:
        who = f"client {client}" if client is not None else "a client"
        raise ValueError(f"{who} has {n} samples, too few to hold out test-fraction={test_fraction} of them and keep "
                         f"one to train on: change the partitioner's arguments (e.g. min_partition_size) or test-fraction")
    classes, counts = np.unique(labels, return_counts=True)
    test_counts = _largest_remainder(counts.astype(np.float64), total)
    train, test = [], []
    for c, k in zip(classes, test_counts):
        pos = rng.permutation(np.flatnonzero(labels == c))
        test.append(pos[:k])
        train.append(pos[k:])
    return rng.permutation(np.concatenate(train)).astype(np.int64), rng.permutation(np.concatenate(test)).astype(np.int64)


def client_rng(seed: int, client: int) -> np.random.Generator:
    """The generator of client ``client``'s train/test split: independent of the other clients and of the order."""
    return np.random.default_rng((seed, client))


def partition_indices(partition: str, y_train: np.ndarray, num_clients: int, seed: int, partition_args: str = "",
                      test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's train and test indices, both into the *train* split (``y_train``), under ``flwr:<Name>``.

    The partitioner (:func:`make_partitioner`) runs on ``datasets.Dataset.from_dict({"label": y_train, "row":
    0..N-1})`` (arrow format, which the partitioners read as fast numpy arrays; built in memory, no download);
    each partition's rows are split by :func:`split_train_test` with :func:`client_rng`.
    """
    import datasets

    check_flwr_partition(partition, partition_args, num_clients, seed)
    partitioner = make_partitioner(partition, partition_args, num_clients, seed)
    y = np.asarray(y_train, dtype=np.int64)
    partitioner.dataset = datasets.Dataset.from_dict({LABEL_COLUMN: y, ROW_COLUMN: np.arange(len(y))}).with_format("arrow")
    train, test = [], []
    for i, rows in enumerate(partition_rows(partitioner, num_clients)):
        tr, te = split_train_test(y[rows], test_fraction, client_rng(seed, i), client=i)
        train.append(rows[tr])
        test.append(rows[te])
    return train, test


# --------------------------------------------------------------------------- your own Dataset


def column_array(ds: Any, name: str) -> np.ndarray:
    """Column ``name`` of a ``datasets.Dataset`` as one numpy array ``[N, ...]``.

    Fixed-shape nested lists of numbers (what ``Dataset.from_dict`` makes of a numpy array, or ``Array2D``) are
    read straight from arrow, keeping their dtype (uint8 images stay uint8); other columns (``Image``, ...) go
    through the ``numpy`` format."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[:].column(name).combine_chunks()
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    shape = [len(col)]
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False)) if len(col) else np.array([0])
        if col.null_count or len(lengths) != 1:
            shape = []
            break
        shape.append(int(lengths[0]))
        col = col.flatten()
    if shape and not col.null_count and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                                         or pa.types.is_boolean(col.type)):
        return col.to_numpy(zero_copy_only=False).reshape(shape)
    return np.asarray(ds.with_format("numpy")[:][name])


def to_inputs(x: np.ndarray) -> Tensor:
    """Inputs as fedmeta's models take them: float32, uint8 scaled to ``[0, 1]``; images ``[N, H, W]`` get a
    channel (``[N, 1, H, W]``), channels-last ``[N, H, W, C]`` (``C`` in 1, 3, 4) become ``[N, C, H, W]``."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(torch.float32).div_(255.0) if t.dtype == torch.uint8 else t.to(torch.float32)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2).contiguous()
    return t


class FlwrDatasetsData:
    """``partition_id -> ClientData`` over a partitioner's partitions (what :func:`flwr_datasets_data` returns).

    Every partition is read once, at construction, in the calling process: the partitions are fixed before the
    object reaches other processes (Ray workers receive the arrays, not the partitioner, so a partitioner with
    ``seed=None`` cannot split differently per worker). Clients are converted to float32 on first use and kept.

    Attributes
    ----------
    num_clients
        The partitioner's number of partitions.
    """

    def __init__(self, partitioner: Any, dataset: Any = None, *, features: str = "image", label: str = LABEL_COLUMN,
                 test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0,
                 transform: Callable[[np.ndarray], Tensor] | None = None) -> None:
        partitioner_module("flwr_datasets_data")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
        if dataset is not None:
            if partitioner.is_dataset_assigned():
                raise ValueError("the partitioner already has a dataset: pass a new partitioner, or dataset=None")
            # flwr-datasets' partitioners read a label column as numpy from arrow at once, from a python-format
            # Dataset row by row (same partitions, 2-10 times slower): give them an arrow view of the data set
            fast = type(partitioner).__module__.startswith("flwr_datasets.")
            partitioner.dataset = dataset.with_format("arrow") if fast else dataset
        elif not partitioner.is_dataset_assigned():
            raise ValueError("no data: pass dataset=<a datasets.Dataset> or a partitioner whose .dataset is set")
        columns = partitioner.dataset.column_names
        for what, name in (("features", features), ("label", label)):
            if name not in columns:
                raise ValueError(f"{what} must be a column of the dataset ({', '.join(columns)}), got {name!r}")
        self.num_clients = int(partitioner.num_partitions)
        self.transform = transform
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for i in range(self.num_clients):
            part = partitioner.load_partition(i)
            x, y = column_array(part, features), column_array(part, label)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"label column {label!r} must hold integer class labels, got {y.dtype} of shape {y.shape[1:]}")
            tr, te = split_train_test(y, test_fraction, client_rng(seed, i), client=i)
            self._parts.append((x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64)))
        self._built: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": {}}  # other processes convert their own clients

    def sizes(self) -> list[tuple[int, int]]:
        """Every client's (train, test) sample counts."""
        return [(len(p[1]), len(p[3])) for p in self._parts]

    def __call__(self, partition_id: int) -> Any:
        from fedmeta.data import ClientData

        if not 0 <= int(partition_id) < self.num_clients:
            raise ValueError(f"partition_id must be in [0, {self.num_clients - 1}], got {partition_id}")
        pid = int(partition_id)
        if pid not in self._built:
            convert = self.transform or to_inputs
            x_tr, y_tr, x_te, y_te = self._parts[pid]
            self._built[pid] = ClientData(convert(x_tr), torch.from_numpy(y_tr), convert(x_te), torch.from_numpy(y_te))
        return self._built[pid]


def flwr_datasets_data(partitioner: Any, dataset: Any = None, *, features: str = "image", label: str = LABEL_COLUMN,
                       test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0,
                       transform: Callable[[np.ndarray], Tensor] | None = None) -> FlwrDatasetsData:
    """fedmeta clients from any Flower Datasets partitioner over any ``datasets.Dataset``.

    Parameters
    ----------
    partitioner
        A ``flwr_datasets.partitioner`` object (its ``num_partitions`` clients).
    dataset
        The ``datasets.Dataset`` to partition (assigned to ``partitioner.dataset``); ``None`` when the
        partitioner already has one.
    features, label
        The input column and the integer label column.
    test_fraction
        Share of each partition held out as the client's test data, stratified by label
        (:func:`split_train_test`).
    seed
        Seed of the train/test splits (the partitioner has its own).
    transform
        ``numpy array [N, ...] -> float32 Tensor`` of a client's inputs; default :func:`to_inputs`.

    Returns
    -------
    FlwrDatasetsData
        ``data_fn(partition_id) -> ClientData`` for :func:`fedmeta.clients.make_client_app`; its ``num_clients``
        is the strategy's ``num_clients``.
    """
    return FlwrDatasetsData(partitioner, dataset, features=features, label=label, test_fraction=test_fraction, seed=seed,
                            transform=transform)
