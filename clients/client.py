"""The meta-learning client: what one client does with the meta-model it receives.

:class:`MetaClient` is Flower-free on purpose: it takes parameter dicts and returns parameter dicts
and plain numbers; the ``ClientApp`` in :mod:`fedmeta.clients.app` only unpacks and packs messages
around it. The memory stores, which speak ``context.state`` or the node's disk, live in
:mod:`fedmeta.clients.memory` (``ContextMemory`` is re-exported here for older imports).
"""

from __future__ import annotations

import dataclasses
import logging
import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from fedmeta import algorithms, batched, fast, meta, personalize
from fedmeta import config as C
from fedmeta.algorithms.executor import STEP_IMPLS, RoundStats, local_round, local_rounds, resolve_step_impl
from fedmeta.clients.memory import ContextMemory, ParamSpec  # noqa: F401  (ContextMemory: re-exported)
from fedmeta.config import EvalConfig
from fedmeta.data import ClientData
from fedmeta.meta import Params

logger = logging.getLogger("fedmeta")

AlgorithmConfig = Any
"""A registered algorithm's config (:data:`fedmeta.algorithms.REGISTRY`): ``FedAvgConfig``, ``PerFedAvgConfig``, ..."""

STEP_IMPL = "auto"
"""How :meth:`MetaClient.train` computes its steps unless the client was built with ``step_impl``:
``auto`` (plain autograd, :mod:`fedmeta.fast`, where the algorithm and estimator have it, else
``torch.func``), ``fast`` (an error where there is no fast path) or ``func`` (always the ``torch.func``
path of :mod:`fedmeta.meta`). See :data:`fedmeta.algorithms.executor.STEP_IMPLS`."""


def select_device(override: str | None = None) -> torch.device:
    """The best device available (CUDA when present, else CPU) unless ``override`` names one."""
    if override:
        return torch.device(override)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def round_generator(seed: int, partition_id: int, server_round: int, purpose: int) -> torch.Generator:
    """A CPU generator for one client, round and purpose (0 = train, 1 = evaluate), independent of
    which process or node serves the client: batches are reproducible by partition."""
    state = np.random.SeedSequence([seed, partition_id, server_round, purpose]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def directions_generator(gen: torch.Generator) -> torch.Generator:
    """A generator for the random directions of ``ggs`` / ``zeroth_order``, derived from the batch
    generator's seed without drawing from it, so that switching estimators leaves the batches alone."""
    state = np.random.SeedSequence([gen.initial_seed(), 2]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def params_from(state: dict[str, Tensor], spec: ParamSpec, device: torch.device) -> Params:
    """Received arrays moved to ``device``, after checking their names and shapes against ``spec``."""
    if set(state) != set(spec):
        raise ValueError(f"received arrays {sorted(state)} do not match the model's parameters {sorted(spec)}")
    out = {}
    for k, (shape, dtype) in spec.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"received array {k!r} has shape {tuple(state[k].shape)}, the model expects {shape}")
        out[k] = state[k].to(device=device, dtype=dtype)
    return out


@dataclass(frozen=True)
class TrainResult:
    meta_model: Params
    personalized_model: Params | None
    stats: RoundStats

    def check_finite(self) -> "TrainResult":
        """Refuse to hand back a diverged model: the caller's memory and the global model stay as they were."""
        for name, params in (("meta-model", self.meta_model), ("personalized model", self.personalized_model or {})):
            bad = [k for k, v in params.items() if not bool(torch.isfinite(v).all())]
            if bad:
                raise FloatingPointError(
                    f"local training diverged: the {name} has non-finite values in {bad} "
                    f"(last loss {self.stats.last_loss}); lower lr / meta-lr / inner-lr"
                )
        return self


class MetaClient:
    """One client's local meta-learning on its own data.

    Parameters
    ----------
    model
        The architecture (its parameter values are ignored: the meta-model arrives each round).
    criterion
        Per-batch loss ``criterion(outputs, targets)``.
    data
        The client's train/test data (moved to ``device`` once, here).
    device
        Where the computation runs.
    step_impl
        ``auto`` / ``fast`` / ``func``: how :meth:`train` computes its steps (:data:`STEP_IMPL`, read at
        each call, when ``None``). One client alone takes the plain-autograd fast path by default; the
        multi-client nodes (:class:`ClientGroup`) keep the vmapped ``torch.func`` path.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Tensor, Tensor], Tensor],
        data: ClientData,
        device: torch.device,
        *,
        step_impl: str | None = None,
    ) -> None:
        if step_impl is not None and step_impl not in STEP_IMPLS:
            raise ValueError(f"step_impl must be one of {list(STEP_IMPLS)}, got {step_impl!r}")
        self.step_impl = step_impl
        self.model = model.to(device)
        self.criterion = criterion
        self.loss = meta.make_loss(self.model, criterion)
        """``criterion(functional_call(model, params, (x,)), y)``: the ``func`` path's loss and evaluation's."""
        self.fast_loss = fast.make_loss(self.model, criterion)
        """The same loss without ``functional_call`` where the model allows it (the fast path's)."""
        self.data = data.to(device)
        self.device = device
        self.param_spec: ParamSpec = {k: (tuple(v.shape), v.dtype) for k, v in self.model.named_parameters()}
        """Name -> (shape, dtype) of the model's parameters: what received arrays and a stored u must fit."""

    def params_from(self, state: dict[str, Tensor]) -> Params:
        """Move received arrays to the device, after checking names and shapes against the model."""
        return params_from(state, self.param_spec, self.device)

    def step_impl_for(self, hp: AlgorithmConfig) -> str:
        """``"fast"`` or ``"func"``: the path :meth:`train` takes for ``hp``."""
        requested = STEP_IMPL if self.step_impl is None else self.step_impl
        return resolve_step_impl(algorithms.for_config(hp), hp, requested)

    def train(self, w: Params, hp: AlgorithmConfig, u: Params | None, gen: torch.Generator) -> TrainResult:
        """One local round of the algorithm ``hp`` configures (:func:`~fedmeta.algorithms.executor.local_round`)
        from the meta-model ``w``; ``u`` is the kept state (LocalMOML's memory), if any. ``gen`` draws
        the batches; the estimators' random directions come from :func:`directions_generator`. The
        steps run on the path :meth:`step_impl_for` names (the same batches and numbers on both)."""
        impl = self.step_impl_for(hp)
        r = local_round(algorithms.for_config(hp), self.fast_loss if impl == "fast" else self.loss, w,
                        lambda k: self.data.sample(k, gen), hp, state=u, gen=directions_generator(gen), step_impl=impl)
        return TrainResult(r.meta_model, r.state, r.stats).check_finite()

    def evaluate(self, w: Params, ev: EvalConfig, gen: torch.Generator) -> dict[str, float]:
        """Personalized evaluation without leakage (per-fedavg.txt Section 5; localmoml Section 6.2's protocol
        is ``eval_steps=10, eval_shots=5``).

        Fine-tune the received meta-model ``eval_steps`` times with step size alpha on a support set
        drawn from the client's **train** split only, then score it before and after on the **test** split
        (:func:`fedmeta.personalize.adapt_and_score`, which reads the test split only after adaptation).
        """
        if ev.eval_shots:
            support = self.data.sample(ev.eval_shots, gen)
        else:
            support = (self.data.x_train, self.data.y_train)
        s = personalize.adapt_and_score(self.loss, w, support, (self.data.x_test, self.data.y_test), ev.inner_lr,
                                        ev.eval_steps, forward=personalize.model_forward(self.model),
                                        criterion=self.criterion, at=(0, ev.eval_steps))
        return score_row(s, regression=bool(torch.isnan(s.accuracy[1])))


def score_row(s: personalize.Scores, *, regression: bool) -> dict[str, float]:
    """One client's evaluate metrics from its before/after :class:`~fedmeta.personalize.Scores` (each ``[2]``)."""
    (loss_before, loss_after), (acc_before, acc_after) = s.loss.tolist(), s.accuracy.tolist()
    out = {C.LOSS_BEFORE: loss_before, C.LOSS_AFTER: loss_after}
    if not regression:
        out.update({C.ACC_BEFORE: acc_before, C.ACC_AFTER: acc_after})
    return out


# ---------------------------------------------------------------------------------------------
# Multi-client nodes


def hosted_clients(node: int, num_nodes: int, num_clients: int) -> list[int]:
    """The clients node ``node`` of ``num_nodes`` hosts: contiguous, near-equal blocks of ``0..n-1``.

    ``num_nodes == num_clients`` gives one client per node (client id = partition id).
    """
    if not (isinstance(num_clients, int) and num_clients >= 1):
        raise ValueError(f"num-clients must be an integer >= 1, got {num_clients!r}")
    if not 1 <= num_nodes <= num_clients:
        raise ValueError(f"num-partitions (nodes) must be in [1, num-clients={num_clients}], got {num_nodes}")
    if not 0 <= node < num_nodes:
        raise ValueError(f"partition-id must be in [0, {num_nodes - 1}], got {node}")
    return [int(i) for i in np.array_split(np.arange(num_clients), num_nodes)[node]]


@dataclass(frozen=True)
class GroupTrainResult:
    """A node's clients after one round: stacked models (leading client axis) and per-client stats."""

    meta_models: Params
    personalized_models: Params | None
    stats: list[RoundStats]
    num_examples: list[int]
    """Each client's training-set size (``num-examples``)."""
    diverged: list[int] = dataclasses.field(default_factory=list)
    """Indices (into the round's clients) of the clients whose training diverged (NaN/Inf): their
    rows are not to be used, and their kept memory not to be overwritten."""


class ClientGroup:
    """The clients one node hosts, trained together (:mod:`fedmeta.batched`).

    Each client keeps its own data, batches and random stream (:func:`round_generator` of its own
    id), so a client's local model is the one :class:`MetaClient` would compute alone, to float
    round-off; only the execution is shared.

    Parameters
    ----------
    model, criterion, device
        As for :class:`MetaClient`.
    data_fn
        ``client_id -> ClientData``.
    chunk_size, vectorize
        Clients per vectorized call, and ``auto`` / ``vmap`` / ``compile`` / ``loop`` (:mod:`fedmeta.batched`).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Tensor, Tensor], Tensor],
        data_fn: Callable[[int], ClientData],
        device: torch.device,
        *,
        chunk_size: int = batched.DEFAULT_CHUNK_SIZE,
        vectorize: str = "auto",
    ) -> None:
        batched.check_vectorize(vectorize, chunk_size)
        self.model = model.to(device)
        self.criterion = criterion
        self.loss = fast.make_loss(self.model, criterion)
        """The loss without ``functional_call`` where the model allows it: the same floats, vmapped or not."""
        self.data_fn = data_fn
        self.device = device
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.param_spec: ParamSpec = {k: (tuple(v.shape), v.dtype) for k, v in self.model.named_parameters()}
        self.workload = (repr(self.model), criterion, str(device))
        """What :attr:`loss` computes, the same for the group a ClientApp builds for every message: the key of the
        executor's measured plan and compiled step (``local_rounds(workload=...)``)."""

    def params_from(self, state: dict[str, Tensor]) -> Params:
        """Received arrays on the device, checked against the model (as :meth:`MetaClient.params_from`)."""
        return params_from(state, self.param_spec, self.device)

    def client(self, client_id: int) -> MetaClient:
        """One hosted client on its own (the loop path, FedAvg and evaluation)."""
        return MetaClient(self.model, self.criterion, self.data_fn(client_id), self.device)

    def train(
        self,
        w: Params,
        hp: AlgorithmConfig,
        client_ids: list[int],
        seed: int,
        server_round: int,
        u: Params | None = None,
        has_memory: list[bool] | None = None,
    ) -> GroupTrainResult:
        """One local round of every client in ``client_ids`` from the meta-model ``w``.

        ``u`` / ``has_memory``: the clients' kept LocalMOML memories, stacked, and which rows hold one.
        """
        datas = [self.data_fn(c).to(self.device) for c in client_ids]
        examples = [d.num_train for d in datas]
        gens = [round_generator(seed, c, server_round, 0) for c in client_ids]
        samplers = [functools.partial(d.sample, generator=g) for d, g in zip(datas, gens)]
        r = local_rounds(algorithms.for_config(hp), self.loss, w, samplers, gens, hp, states=u, has_state=has_memory,
                         direction_gens=[directions_generator(g) for g in gens], chunk_size=self.chunk_size,
                         vectorize=self.vectorize, workload=self.workload)
        result = GroupTrainResult(r.meta_models, r.states, r.stats, examples)
        bad = sorted(set(batched.nonfinite_rows(result.meta_models)) | set(batched.nonfinite_rows(result.personalized_models or {})))
        if len(bad) == len(client_ids):
            raise FloatingPointError(
                f"local training diverged for every client of the round {client_ids[:20]}: non-finite values; "
                "lower lr / meta-lr / inner-lr"
            )
        return dataclasses.replace(result, diverged=bad)

    def evaluate(self, w: Params, ev: EvalConfig, client_ids: list[int], seed: int, server_round: int) -> list[dict[str, float]]:
        """:meth:`MetaClient.evaluate` of every client in ``client_ids`` (each with its own support draw,
        :func:`round_generator` stream 1), batched: clients whose support and test sets have the same shapes
        are fine-tuned and scored in one ``torch.func.vmap`` call (``chunk_size`` at most), so no padding or
        masking changes a client's mean; looped with ``vectorize="loop"``, and where ``auto`` finds vmap
        cannot run the model. Equal to the looped scores to float round-off."""
        def looped() -> list[dict[str, float]]:
            return [self.client(c).evaluate(w, ev, round_generator(seed, c, server_round, 1)) for c in client_ids]

        if self.vectorize == "loop":
            return looped()
        datas = [self.data_fn(c).to(self.device) for c in client_ids]
        gens = [round_generator(seed, c, server_round, 1) for c in client_ids]
        supports = [d.sample(ev.eval_shots, g) if ev.eval_shots else (d.x_train, d.y_train) for d, g in zip(datas, gens)]
        sets = [(*s, d.x_test, d.y_test) for s, d in zip(supports, datas)]  # (xs, ys, xt, yt) per client
        shapes: dict[tuple, list[int]] = {}
        for i, tensors in enumerate(sets):
            shapes.setdefault(tuple(tuple(x.shape) for x in tensors), []).append(i)
        rows: list[dict[str, float]] = [{} for _ in client_ids]
        vscores = self._vmapped_scores(w, ev)
        try:
            for same in shapes.values():
                for start in range(0, len(same), self.chunk_size):
                    chunk = same[start:start + self.chunk_size]
                    scores = vscores(*(torch.stack([sets[i][j] for i in chunk]) for j in range(4)))
                    for n, i in enumerate(chunk):
                        rows[i] = score_row(personalize.Scores(scores.loss[n], scores.accuracy[n]), regression=sets[i][3].is_floating_point())
        except (RuntimeError, NotImplementedError) as err:  # a model vmap cannot run (auto: loop instead)
            if self.vectorize == "vmap":
                raise
            logger.debug("vmapped evaluation refused (%s); looping over the clients", err)
            return looped()  # fresh generators: the same support draws
        return rows

    def _vmapped_scores(self, w: Params, ev: EvalConfig) -> Callable[..., personalize.Scores]:
        """``(xs, ys, xt, yt) -> Scores`` of C clients stacked on the leading axis (loss and accuracy ``[C, 2]``:
        before and after), :func:`fedmeta.personalize.adapt_and_score` vmapped: ``eval_steps`` steps on the support
        set, then the loss and accuracy on the test set (accuracy NaN for regression), with the forward of
        :attr:`loss` (:func:`fedmeta.fast.sequential_forward` where the model allows it)."""
        forward = personalize.model_forward(self.model, sequential=True)

        def one(xs: Tensor, ys: Tensor, xt: Tensor, yt: Tensor) -> personalize.Scores:
            return personalize.adapt_and_score(self.loss, w, (xs, ys), (xt, yt), ev.inner_lr, ev.eval_steps,
                                               forward=forward, criterion=self.criterion, at=(0, ev.eval_steps))

        return torch.func.vmap(one)
