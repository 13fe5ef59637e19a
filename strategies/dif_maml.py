"""Dif-MAML (dif-maml.txt Algorithm 1) on Flower: the server as a relay between the agents of a graph.

Flower has no peer-to-peer channel, so the server stands in for the graph's links: it keeps every agent's
latest intermediate state ``phi_l`` and, each round, sends agent k the states of its neighbourhood and its
column of the combination matrix A. The agent combines (eq. 6b) and adapts (eq. 6a) itself
(:func:`fedmeta.clients.make_dif_maml_client_app`) and replies with its new ``phi_k``. The server never
averages models: it stores the replies.
"""

from __future__ import annotations

import json
import logging
import time
from logging import INFO
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmeta import config as C
from fedmeta import graph as G
from fedmeta import validation as V
from fedmeta.dif_maml import DifMAMLConfig
from fedmeta.strategies.failures import ClientFailures
from fedmeta.strategies.nodes import PartitionNodes
from fedmeta.strategies.screening import NUM_ACCEPTED, NUM_MISSING, NUM_REJECTED, reply_view, screen_reply

logger = logging.getLogger("fedmeta")


def wire_config(cfg: DifMAMLConfig) -> dict[str, Any]:
    """``cfg`` as ConfigRecord values: kebab-case field names; ``edges`` as a JSON string (a ConfigRecord
    holds no nested lists); :meth:`DifMAMLConfig.from_mapping` reads them back."""
    out = {}
    for name, value in cfg.to_dict().items():
        out[name.replace("_", "-")] = json.dumps(value) if name == "edges" else value
    return out


def relay_weights(a: np.ndarray, neighbourhood: Iterable[int], agent: int, fresh: Iterable[int]) -> tuple[list[int], list[float]]:
    """The states agent k combines and their weights (eq. 6b over what the relay can send).

    ``neighbourhood``: k and its neighbours on the graph. A neighbour l is included only when it is in
    ``fresh`` (its last reply passed screening); k itself always is (its own latest valid state). The
    weights are column k of A on the included agents, renormalised to sum to 1; when all of them are 0
    (``a_kk = 0`` and every neighbour excluded), k keeps its own state (weight 1)."""
    fresh = set(fresh)
    included = [l for l in sorted(neighbourhood) if l == agent or l in fresh]
    total = float(sum(a[l, agent] for l in included))
    if total <= 0.0:
        return [agent], [1.0]
    return included, [float(a[l, agent]) / total for l in included]


def stack_states(phi: dict[int, ArrayRecord]) -> ArrayRecord:
    """The agents' states as one ArrayRecord: per parameter name an array ``[K, ...]`` (agent order),
    the layout of :attr:`fedmeta.dif_maml.DifResult.phi`. A stack, not an average."""
    agents = sorted(phi)
    names = list(phi[agents[0]].keys())
    return ArrayRecord({n: Array(np.stack([phi[l][n].numpy() for l in agents])) for n in names})


class DifMAML(Strategy):
    """Dif-MAML as a Flower Message-API strategy: a relay, one agent per node, no server average.

    Agent k is the node whose node config has ``partition-id`` k (k = 0 .. K-1); the strategy asks every
    node with a ``query`` message (:mod:`fedmeta.strategies.nodes`). Every round r (= the paper's
    iteration r), every agent gets one train message:

    * ArrayRecords ``phi-<l>``: the stored ``phi_l,r-1`` of every l in its neighbourhood (k and its
      graph neighbours; see screening below). In round 1 every stored state is the initial model
      ``arrays`` (``w_k,0``), so round 1 combines identical models -- the identity, up to float
      rounding -- and every round costs the same K + 2|E| models down, as in
      :func:`fedmeta.dif_maml.simulate`'s count;
    * ConfigRecord ``config``: the caller's ``train_config``, then ``agent`` (k), ``server-round`` (r),
      ``neighbourhood`` (the l's sent, sorted), ``combination-weights`` (``a_lk`` for them, aligned,
      summing to 1), and every field of :class:`~fedmeta.dif_maml.DifMAMLConfig` (kebab-case;
      ``edges`` as JSON).

    The client must compute ``w_k = sum_l a_lk phi_l`` over the states it got (eq. 6b), then
    ``agent_round(cfg, k, r, w_k, opt_state)`` (eqs. 4 and 6a, with its own Adam moments kept across
    rounds), and reply with one ArrayRecord (``phi_k,r``, the names, shapes and dtypes of the model) and one
    MetricRecord (``num-examples``, optional), plus optionally a ``client-info`` ConfigRecord whose
    ``partition-id`` must be k.

    Screening and renormalisation. A reply is excluded from the relay when it is an error reply, is
    missing at the round's timeout, or fails :func:`~fedmeta.strategies.screening.screen_reply` (not
    exactly one ArrayRecord and one MetricRecord, another agent's ``partition-id``, array names / shapes
    / dtypes other than the model's, NaN or Inf values, a bad ``num-examples``). The excluded agent
    *keeps its previous phi* in the store (so it can resume, and :attr:`phi` always holds K states), but
    its neighbours do not get that stale state in the next round: they combine over the rest of their
    neighbourhood with the weights ``a_lk`` renormalised to sum to 1 (:func:`relay_weights`). The
    excluded agent itself combines its own previous phi with its fresh neighbours (same rule). An agent
    rejoins its neighbours' combinations after its next valid reply.

    Communication. ``aggregate_train`` reports ``models-up`` (replies that came back with a model, valid
    or not), ``models-down`` (phi's sent this round: K + 2|E| when every agent's last reply was valid),
    ``num-accepted``, ``num-rejected``, ``num-failures``, ``num-missing``, ``num-agents`` and, when the
    replies carry it, the mean ``train-loss``; it logs the two model counts. The relay's store is
    returned as the round's ArrayRecord, stacked ``[K, ...]`` per parameter name (:func:`stack_states`),
    so ``Result.arrays`` holds every agent's final ``phi``; an ``evaluate_fn`` receives that stack.
    There is no client-side evaluation round (``configure_evaluate`` sends nothing).

    Privacy. Every agent's intermediate model passes through the server: the server sees all of them.

    Parameters
    ----------
    config
        The run (graph, combination rule, step sizes, sampling, seed); ``iterations`` is not used by
        the strategy (``num_rounds`` of :meth:`start` is).
    combination_matrix
        A (K x K) to use instead of ``config``'s rule; checked against the graph (Assumption 6) here,
        before round 1.
    node_wait_timeout
        Seconds to wait for the K nodes to connect before the first round.
    """

    configrecord_key = "config"

    def __init__(self, config: DifMAMLConfig, *, combination_matrix: np.ndarray | None = None,
                 node_wait_timeout: float = 600.0) -> None:
        V.check("config", isinstance(config, DifMAMLConfig), "a fedmeta.dif_maml.DifMAMLConfig", type(config).__name__)
        V.check("node_wait_timeout", V.is_finite(node_wait_timeout) and node_wait_timeout > 0, "> 0 seconds", node_wait_timeout)
        g, a, lam = config.combination_matrix()  # raises on a bad topology / rule, naming the field
        if combination_matrix is not None:
            a = np.asarray(combination_matrix, dtype=float)
            lam = G.check_combination(a, g)  # "combination matrix A must ...": before round 1
        self.config = config
        self.graph = g
        self.combination = a
        """A: column k holds agent k's weights ``a_lk``."""
        self.lambda_2 = lam
        self.nodes = PartitionNodes(num_clients=config.num_agents, num_nodes=config.num_agents, node_wait_timeout=node_wait_timeout,
                                    configrecord_key=self.configrecord_key)
        """Which node runs which agent (one agent per node)."""
        self.phi: dict[int, ArrayRecord] = {}
        """The relay's store: agent -> its latest valid intermediate state ``phi_l``."""
        self.fresh: set[int] = set(range(config.num_agents))
        """Agents whose last reply passed screening (their stored phi is sent to their neighbours)."""
        self.failures = ClientFailures()
        self.rejections: dict[int, list[dict[str, Any]]] = {}
        """Per round with exclusions: ``{"agent": k, "reason": str}`` per excluded reply."""
        self.models_sent: dict[int, int] = {}
        """Per round: the phi's sent down."""
        self.round_seconds: dict[int, float] = {}
        self._sent: dict[int, int] = {}  # this round: node id -> agent
        self._round_started = 0.0

    def neighbourhood(self, agent: int) -> tuple[int, ...]:
        """k and its graph neighbours, sorted (the agents whose states k combines)."""
        return tuple(sorted({agent, *self.graph.neighbours(agent)}))

    def summary(self) -> None:
        K, E = self.config.num_agents, len(self.graph.edges)
        log(INFO, "\t├──> DifMAML relay: K=%d agents on %s (%d edges), %s combination, lambda_2=%.4f",
            K, self.graph.name, E, self.config.combination, self.lambda_2)
        log(INFO, "\t│\t├── %s, mu=%g, alpha=%g, %d tasks x %d shots per agent and round, seed %d",
            self.config.optimizer, self.config.step_size, self.config.inner_lr, self.config.tasks_per_agent,
            self.config.shots, self.config.seed)
        log(INFO, "\t│\t└── per round: %d models up, %d down; the server sees every agent's model", K, K + 2 * E)

    # --- train ---------------------------------------------------------------------------------
    def train_message(self, agent: int, server_round: int, config: ConfigRecord) -> tuple[RecordDict, int]:
        """Agent k's train content and the number of states it carries."""
        ids, weights = relay_weights(self.combination, self.neighbourhood(agent), agent, self.fresh)
        cfg = ConfigRecord({
            **dict(config),
            **wire_config(self.config),
            C.ALGORITHM: C.DIF_MAML,
            C.AGENT: agent,
            C.SERVER_ROUND: server_round,
            C.NEIGHBOURHOOD: ids,
            C.COMBINATION_WEIGHTS: weights,
        })
        content = RecordDict({**{f"{C.PHI_PREFIX}{l}": self.phi[l] for l in ids}, self.configrecord_key: cfg})
        return content, len(ids)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per agent (see the class docstring). ``arrays`` is the initial model when the store
        is empty (the first round); afterwards the store is used (Flower's loop passes back the stack
        :meth:`aggregate_train` returned, which holds the same states)."""
        self._round_started = time.perf_counter()
        if not self.phi:
            self.phi = {l: arrays for l in range(self.config.num_agents)}
        nodes = self.nodes.discover(grid)
        messages, down = [], 0
        for agent in range(self.config.num_agents):
            content, n = self.train_message(agent, server_round, config)
            down += n
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nodes[agent],
                                    group_id=str(server_round)))
        self._sent = {nodes[agent]: agent for agent in range(self.config.num_agents)}
        self.models_sent[server_round] = down
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store every valid reply's ``phi_k`` (no averaging); see the class docstring for screening."""
        replies = list(replies)
        sent = dict(self._sent)
        errors = [m for m in replies if m.has_error()]
        self.failures.record_replies(server_round, "train", errors, lambda node: (sent[node],) if node in sent else ())
        accepted: dict[int, Message] = {}
        excluded: list[dict[str, Any]] = []
        seen: set[int] = set()
        for m in replies:
            if m.has_error():
                continue
            node = m.metadata.src_node_id
            agent = sent.get(node)
            if agent is None:
                reason = f"the node was not sent a train message in round {server_round}"
            elif node in seen:
                reason = f"a second train reply from agent {agent} in round {server_round}"
            else:
                reason = screen_reply(m.content, self.phi[agent], sent=[agent], expect_ids=False)
            seen.add(node)
            if reason:
                logger.warning("round %d: excluded the reply of agent %s from the relay: %s", server_round, agent, reason)
                excluded.append({"agent": agent, "node": node, "reason": reason})
            else:
                accepted[agent] = m
        replied = {m.metadata.src_node_id for m in replies}
        missing = sorted(a for n, a in sent.items() if n not in replied)
        if missing:
            logger.warning("round %d: agents %s did not reply before the timeout", server_round, missing)
        if excluded:
            self.rejections[server_round] = excluded
        for agent, m in accepted.items():
            self.phi[agent] = next(iter(m.content.array_records.values()))
        self.fresh = set(accepted)
        up = sum(1 for m in replies if not m.has_error() and len(m.content.array_records) > 0)
        down = self.models_sent.get(server_round, 0)
        metrics = MetricRecord({
            C.MODELS_UP: up,
            C.MODELS_DOWN: down,
            "num-agents": self.config.num_agents,
            NUM_ACCEPTED: len(accepted),
            NUM_REJECTED: len(excluded),
            "num-failures": len(errors),
            NUM_MISSING: len(missing),
        })
        views = [reply_view(m.content) for m in accepted.values()]
        losses = [float(v[C.TRAIN_LOSS]) for v in views if C.TRAIN_LOSS in v]
        if losses:
            metrics[C.TRAIN_LOSS] = float(np.mean(losses))
        self.round_seconds[server_round] = time.perf_counter() - self._round_started
        log(INFO, "round %d: relayed %d models down, %d up (%d accepted, %d excluded, %d errors, %d missing)",
            server_round, down, up, len(accepted), len(excluded), len(errors), len(missing))
        return stack_states(self.phi), metrics

    # --- no client-side evaluation round -------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


__all__ = ["DifMAML", "relay_weights", "stack_states", "wire_config"]
