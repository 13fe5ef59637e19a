"""Dif-MAML (dif-maml.txt Algorithm 1): decentralized meta-learning over a graph, and its vmapped simulator.

K agents, each with its own task distribution T_k and its own launch model ``w_k``. Every iteration
i, every agent

* **adapts** (eq. 6a): ``phi_k,i = w_k,i-1 - mu grad Q_k(w_k,i-1)``, with the MAML stochastic gradient
  of eq. (4) over a batch S_k,i of i.i.d. tasks: per task an inner step ``w - alpha grad Q(w; x_in)``,
  the outer gradient on a second batch x_o, and the Hessian factor ``(I - alpha H(w; x_in))`` on the
  *inner* batch, as eq. (4) writes it (any of fedmeta's estimators); ``optimizer="adam"`` replaces
  the plain step by Adam on the same gradient (dif-maml Appendix D.1: each agent its own moments);
* **combines** (eq. 6b): ``w_k,i = sum_l a_lk phi_l,i`` over its neighbourhood, with a doubly
  stochastic, primitive A (:mod:`fedmeta.graph`).

This module is the math and the simulator (:func:`simulate`: agents stacked, the adaptation vmapped,
the combination one ``einsum`` with A). The Flower relay (``fedmeta.strategies.DifMAML``) calls the
same per-agent pieces (:func:`agent_batches`, :func:`agent_round`, :func:`combine`), so a few rounds
on Flower equal the simulator with the same seeds.

Choices where the paper is silent: all agents start from one initial model (PyTorch's default
initialization of the 1-40-40-1 network, seeded); every agent's batches at iteration i come from a
generator seeded by ``(seed, agent, i)``, so any process can redraw them; the test tasks (amplitude
in [0.1, 5], phase in [0, pi], the union of the agents' distributions) are adapted with ``eval_shots``
points and scored on ``eval_query`` more (100).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from fedmeta import graph as G
from fedmeta import meta
from fedmeta import settings as S
from fedmeta import validation as V
from fedmeta.config import HP
from fedmeta.tasks import SineRegression
from fedmeta.meta import Params
from fedmeta.personalize import adapt_and_score
from fedmeta.provenance import command_parser, provenance, run_command
from fedmeta.tracking import NONE, TRACKING_DIR, Tracker, Trackers, open_tracker, require

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    pairs = (json.loads(value) if value.strip() else []) if isinstance(value, str) else value
    return tuple(tuple(int(a) for a in e) for e in pairs)


def _interval(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))


def _ordered(pair: tuple[float, ...]) -> bool:
    return len(pair) == 2 and all(V.is_finite(v) for v in pair) and pair[0] < pair[1]


_interval_setting = S.Setting(tuple, "an interval (low, high) with low < high", _ordered, from_text=_interval)
_count = S.int_at_least(1)


@dataclass(frozen=True)
class DifMAMLConfig(S.Settings):
    """One Dif-MAML run. Defaults: dif-maml Section 5 and Appendix D.1 (sine regression, Adam). Every field is a
    :class:`fedmeta.settings.Setting` (a ``--flag``, a key of ``[tool.flwr.app.config.dif-maml]``)."""

    num_agents: int = S.int_at_least(1, symbol="K", help="agents on the graph").field(6)
    topology: str = S.choice(lambda: G.TOPOLOGIES, help="the graph (fedmeta.graph.TOPOLOGIES); complete with combination=uniform is "
                                                        "the centralized solution, none (A = I) the non-cooperative baseline").field("ring-chords")
    edge_prob: float = S.Setting(float, "a number in [0, 1]", lambda v: 0 <= v <= 1, help="erdos-renyi: the probability of each "
                                                                                        "edge").field(0.5)
    graph_seed: int = S.int_at_least(0, help="erdos-renyi: the seed of the graph draw (redrawn until connected)").field(0)
    edges: tuple[tuple[int, int], ...] = S.Setting(tuple, "a JSON list of pairs of agents", from_text=_pairs,
                                                    help="topology edges: the explicit edge list").field(())
    combination: str = S.choice(lambda: G.COMBINATIONS, help="metropolis (a_lk = 1 / max(n_k, n_l)) or uniform (11^T / K; complete "
                                                             "graph only)").field("metropolis")
    inner_lr: float = HP.inner_lr.field(help="the inner step of eq. (4)")
    step_size: float = S.number_above(0, symbol="mu", help="the adaptation step of eq. (6a) (Adam's learning rate with "
                                                           "optimizer=adam)").field(0.001)
    optimizer: str = S.choice(lambda: OPTIMIZERS, help="adam (Appendix D.1, mu = 0.001) or sgd (eq. 6a as written; Figure 6: "
                                                       "mu = 0.005)").field("adam")
    tasks_per_agent: int = _count.field(1, symbol="|S_k,i|", help="tasks per agent and iteration (D.1: 4,000 tasks x 6 epochs = "
                                                                   "24,000 iterations, so 1)")
    shots: int = _count.field(10, help="samples in each of x_in and x_o (10-shot)")
    meta_gradient: str = HP.meta_gradient.field(help="the estimator of eq. (4)'s Hessian factor (fedmeta.meta.meta_gradient)")
    iterations: int = _count.field(24_000, symbol="i", help="iterations (each agent adapts and combines once per iteration)")
    eval_every: int = _count.field(200, help="test all agents every this many iterations (and at 0 and at the end)")
    eval_tasks: int = _count.field(1000, help="test tasks, the same for every agent and every test")
    eval_shots: int = _count.field(10, help="support points of a test task (one adaptation step at alpha)")
    eval_query: int = _count.field(100, help="query points of a test task (the reported MSE)")
    eval_steps: int = HP.eval_steps.field(10, help="after training: the test loss after 0 .. eval_steps adaptation steps (Figure 2c)")
    amplitude: tuple[float, float] = _interval_setting.field((0.1, 5.0), help="the amplitude range, split evenly into K intervals, "
                                                                               "one per agent")
    phase: tuple[float, float] = _interval_setting.field((0.0, math.pi), help="every agent's phase range")
    seed: int = HP.seed.field(help="seeds the initial model, every agent's batches and the test tasks")
    track: str = HP.track.field()
    tracking_dir: str = HP.tracking_dir.field()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["edges"] = [list(e) for e in self.edges]
        d["amplitude"], d["phase"] = list(self.amplitude), list(self.phase)
        return d

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "DifMAMLConfig":
        return super().from_mapping(values, what="Dif-MAML setting")

    # --- derived

    @property
    def run_name(self) -> str:
        """The run's name in a tracker: ``dif-maml-<topology>-K<num_agents>-seed<seed>``."""
        return f"dif-maml-{self.topology}-K{self.num_agents}-seed{self.seed}"

    def graph(self) -> G.Graph:
        return G.graph(self.topology, self.num_agents, edge_prob=self.edge_prob, seed=self.graph_seed, edges=self.edges)

    def combination_matrix(self) -> tuple[G.Graph, np.ndarray, float]:
        """The graph, A and lambda_2, checked (Assumption 6) — raises before any work on a bad choice."""
        g = self.graph()
        a = np.eye(self.num_agents) if g.name == "none" else G.combination(g, self.combination)
        return g, a, G.check_combination(a, g)

    def family(self, agent: int) -> SineRegression:
        """Agent k's task distribution: amplitudes in the k-th of K equal intervals of ``amplitude``."""
        lo, hi = self.amplitude
        width = (hi - lo) / self.num_agents
        return SineRegression(amplitude=(lo + agent * width, lo + (agent + 1) * width), phase=self.phase, init="torch")

    def test_family(self) -> SineRegression:
        return SineRegression(amplitude=self.amplitude, phase=self.phase, init="torch")

    def estimator(self) -> meta.MetaGradient:
        return meta.meta_gradient(self.meta_gradient)


# ----------------------------------------------------------------------------------------------
# One agent: draws, eq. (4), eq. (6a), eq. (6b)


def loss_fn(cfg: DifMAMLConfig) -> meta.LossFn:
    """The MSE of the 1-40-40-1 ReLU network (every agent's loss; only the task distributions differ)."""
    family = cfg.test_family()
    family.network  # built here, outside any vmap (its construction draws nn.Linear's own initialization)
    return family.loss


def initial_model(cfg: DifMAMLConfig) -> Params:
    """The launch model every agent starts from (``w_k,0``; PyTorch's default initialization, seeded)."""
    return cfg.test_family().init_params(torch.Generator().manual_seed(cfg.seed))


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def agent_batches(cfg: DifMAMLConfig, agent: int, iteration: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Agent k's draws of iteration i (>= 1): |S_k,i| tasks from T_k, then per task x_in and x_o of
    ``shots`` points: ``(x_in, y_in, x_o, y_o)``, each ``[|S|, shots, 1]``. A pure function of
    ``(seed, agent, iteration)``: the simulator and a Flower client draw the same batches."""
    gen = _generator(cfg.seed, 1, agent, iteration)
    family = cfg.family(agent)
    tasks = family.sample_tasks(cfg.tasks_per_agent, gen)
    x_in, y_in = family.sample(tasks, cfg.shots, gen)
    x_o, y_o = family.sample(tasks, cfg.shots, gen)
    return x_in, y_in, x_o, y_o


def agent_gradient(f: meta.LossFn, w: Params, batches: tuple[Tensor, ...], inner_lr: float, estimator: meta.MetaGradient,
                   gen: torch.Generator | None = None) -> Params:
    """grad Q_k(w) of eq. (4): the mean over the agent's tasks of ``(I - alpha H(w; x_in)) grad Q(w - alpha grad Q(w; x_in); x_o)``
    (the Hessian on the inner batch, as eq. (4) writes it)."""
    x_in, y_in, x_o, y_o = batches

    def one(xi: Tensor, yi: Tensor, xo: Tensor, yo: Tensor) -> Params:
        g, _ = meta.maml_gradient(f, w, meta.MetaBatches(inner=((xi, yi),), outer=(xo, yo), hessian=((xi, yi),)), inner_lr, estimator, gen)
        return g

    if estimator.vmappable:
        per_task = vmap(one)(x_in, y_in, x_o, y_o)
        return {k: v.mean(0) for k, v in per_task.items()}
    grads = [one(x_in[t], y_in[t], x_o[t], y_o[t]) for t in range(x_in.shape[0])]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in w}


def init_optimizer_state(w: Params, cfg: DifMAMLConfig) -> Params:
    """An agent's optimizer state: Adam's first and second moments (zeros); none for SGD."""
    if cfg.optimizer == "sgd":
        return {}
    return {**{f"m.{k}": torch.zeros_like(v) for k, v in w.items()}, **{f"v.{k}": torch.zeros_like(v) for k, v in w.items()}}


def adapt(w: Params, g: Params, state: Params, cfg: DifMAMLConfig, iteration: int) -> tuple[Params, Params]:
    """Eq. (6a): ``phi = w - mu g`` (SGD), or Adam's step on g with the agent's own moments (Kingma & Ba
    Algorithm 1, bias-corrected, step count = ``iteration``). Element-wise: stacked agents work too."""
    if cfg.optimizer == "sgd":
        return {k: w[k] - cfg.step_size * g[k] for k in w}, state
    b1, b2 = ADAM_BETAS
    m = {k: b1 * state[f"m.{k}"] + (1 - b1) * g[k] for k in w}
    v = {k: b2 * state[f"v.{k}"] + (1 - b2) * g[k] * g[k] for k in w}
    c1, c2 = 1 - b1**iteration, 1 - b2**iteration
    phi = {k: w[k] - cfg.step_size * (m[k] / c1) / ((v[k] / c2).sqrt() + ADAM_EPS) for k in w}
    return phi, {**{f"m.{k}": m[k] for k in w}, **{f"v.{k}": v[k] for k in w}}


def agent_round(cfg: DifMAMLConfig, agent: int, iteration: int, w: Params, state: Params,
                f: meta.LossFn | None = None) -> tuple[Params, Params]:
    """What agent k does in iteration i after combining: draw, eq. (4), eq. (6a). Returns ``phi_k,i`` and its optimizer state."""
    f = f or loss_fn(cfg)
    gen = _generator(cfg.seed, 2, agent, iteration)  # directions of the stochastic estimators
    g = agent_gradient(f, w, agent_batches(cfg, agent, iteration), cfg.inner_lr, cfg.estimator(), gen)
    return adapt(w, g, state, cfg, iteration)


def combine(phis: Sequence[Params], weights: Sequence[float]) -> Params:
    """Eq. (6b) for one agent: ``sum_l a_lk phi_l`` over its neighbourhood (``weights``: column k of A on it)."""
    return {k: sum(float(a) * phi[k] for a, phi in zip(weights, phis)) for k in phis[0]}


def combine_all(a: Tensor, phi: Params) -> Params:
    """Eq. (6b) for all agents at once: ``w_k = sum_l a_lk phi_l`` as one einsum over the stacked states."""
    return {k: torch.einsum("lk,l...->k...", a, v) for k, v in phi.items()}


def disagreement(w: Params) -> float:
    """The network disagreement ``(1/K) sum_k ||w_k - w_c||^2`` of stacked models (w_c: their mean)."""
    return float(sum(((v - v.mean(0, keepdim=True)) ** 2).flatten(1).sum(1) for v in w.values()).mean())


# ----------------------------------------------------------------------------------------------
# Testing: every agent on the same tasks


@dataclass(frozen=True)
class TestSet:
    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]

    @classmethod
    def draw(cls, cfg: DifMAMLConfig) -> "TestSet":
        gen, family = _generator(cfg.seed, 3), cfg.test_family()
        tasks = family.sample_tasks(cfg.eval_tasks, gen)
        return cls(family.sample(tasks, cfg.eval_shots, gen), family.sample(tasks, cfg.eval_query, gen))


def test_losses(f: meta.LossFn, w: Params, tests: TestSet, inner_lr: float, steps: int) -> Tensor:
    """Per agent (stacked ``w``) and per adaptation step 0..steps: the mean query MSE over the test
    tasks after that many gradient steps at alpha on each task's support points (dif-maml.txt Section 5,
    Figure 2c). ``[K, steps + 1]``: :func:`fedmeta.personalize.adapt_and_score` vmapped over tasks and agents."""

    def task(wk: Params, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]) -> Tensor:
        return adapt_and_score(f, wk, support, query, inner_lr, steps, at=range(steps + 1)).loss

    def agent(wk: Params) -> Tensor:
        return vmap(task, in_dims=(None, 0, 0))(wk, tests.support, tests.query).mean(0)

    return vmap(agent)(w)


# ----------------------------------------------------------------------------------------------
# The simulator


@dataclass
class DifResult:
    """The record of one simulated run."""

    config: DifMAMLConfig
    graph_name: str
    lambda_2: float
    iterations: tuple[int, ...]
    test_loss: tuple[float, ...]
    """Mean over agents of the test loss after one adaptation step, at ``iterations``."""
    agent_test_loss: tuple[tuple[float, ...], ...]
    """Per recorded iteration, every agent's test loss after one step."""
    disagreement: tuple[float, ...]
    """``(1/K) sum ||w_k - w_c||^2`` at ``iterations``."""
    adaptation_curve: tuple[float, ...]
    """After training: mean over agents of the test loss after 0 .. eval_steps adaptation steps (Figure 2c)."""
    seconds: float
    train_seconds: float
    messages_up: int
    """Models an agent sends per iteration in the Flower relay, summed: K per iteration."""
    messages_down: int
    """Models sent to agents per iteration in the Flower relay: K + 2|E| per iteration (own model and a neighbour's per edge end)."""
    diverged_at: int | None = None
    w: Params | None = dataclasses.field(default=None, compare=False)
    """The final launch models, stacked ``[K, ...]`` (not serialized)."""
    phi: Params | None = dataclasses.field(default=None, compare=False)
    """The last intermediate states phi_k,i, stacked (not serialized)."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("w", "phi", "config")}
        d["agent_test_loss"] = [list(r) for r in self.agent_test_loss]
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DifResult":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "config"}
        kw["agent_test_loss"] = tuple(tuple(r) for r in d["agent_test_loss"])
        return cls(config=DifMAMLConfig.from_mapping(d["config"]), **kw)


def simulate(cfg: DifMAMLConfig, *, log: Callable[[str], None] | None = None, record: bool = True,
             trackers: Sequence[Tracker] = ()) -> DifResult:
    """Run Algorithm 1 for ``cfg.iterations`` iterations with all K agents stacked: the adaptation (6a)
    vmapped over agents, the combination (6b) one einsum with A. ``record=False`` skips the tests.

    Tracking: the tracker of ``cfg.track`` (:func:`fedmeta.tracking.open_tracker`, under ``cfg.tracking_dir``,
    default ``./tracking``; the provenance block as its config) and ``trackers`` receive, at every tested iteration
    ``i``, its values under the :class:`DifResult` names: ``test_loss``, ``disagreement`` and ``agent_test_loss/<k>``
    for every agent k. Every tracker is closed when the run ends, however it ends; an exception from a tracker's
    ``log`` stops the run there and propagates."""
    with Trackers(trackers) as sinks:
        require(cfg.track)
        config = provenance(cfg.to_dict(), started=time.time()) if cfg.track != NONE else None
        sinks.trackers.insert(0, open_tracker(cfg.track, cfg.run_name, cfg.tracking_dir or TRACKING_DIR, config=config))
        return _simulate(cfg, log=log, record=record, on_test=sinks.log)


def _simulate(cfg: DifMAMLConfig, *, log: Callable[[str], None] | None, record: bool,
              on_test: Callable[[int, dict[str, float]], None]) -> DifResult:
    t0 = time.perf_counter()
    g, a_np, lam = cfg.combination_matrix()  # Assumption 6, before any work
    K, f, estimator = cfg.num_agents, loss_fn(cfg), cfg.estimator()
    a = torch.tensor(a_np, dtype=torch.float32)
    w0 = initial_model(cfg)
    w = {k: v.unsqueeze(0).repeat(K, *([1] * v.dim())) for k, v in w0.items()}
    state = init_optimizer_state(w, cfg)
    tests = TestSet.draw(cfg) if record else None
    iters, losses, agents, dis = [], [], [], []

    def test(i: int) -> None:
        per_agent = test_losses(f, w, tests, cfg.inner_lr, 1)[:, 1]
        iters.append(i), losses.append(float(per_agent.mean())), agents.append(tuple(float(x) for x in per_agent))
        dis.append(disagreement(w))
        if log:
            log(f"dif-maml {g.name} iteration {i}: test loss {losses[-1]:.4f}, disagreement {dis[-1]:.3g}")
        on_test(i, {"test_loss": losses[-1], "disagreement": dis[-1], **{f"agent_test_loss/{k}": x for k, x in enumerate(agents[-1])}})

    if record:
        test(0)
    train_seconds, diverged, phi = 0.0, None, w
    for i in range(1, cfg.iterations + 1):
        t = time.perf_counter()
        draws = [agent_batches(cfg, k, i) for k in range(K)]
        batches = tuple(torch.stack([d[j] for d in draws]) for j in range(4))
        if estimator.vmappable:
            grads = vmap(lambda wk, *b: agent_gradient(f, wk, b, cfg.inner_lr, estimator))(w, *batches)
        else:
            per = [agent_gradient(f, {n: v[k] for n, v in w.items()}, tuple(b[k] for b in batches), cfg.inner_lr, estimator,
                                  _generator(cfg.seed, 2, k, i)) for k in range(K)]
            grads = {n: torch.stack([p[n] for p in per]) for n in w}
        phi, state = adapt(w, grads, state, cfg, i)  # eq. (6a), all agents
        w = combine_all(a, phi)  # eq. (6b)
        train_seconds += time.perf_counter() - t
        if not all(bool(torch.isfinite(v).all()) for v in w.values()):
            diverged = i
            break
        if record and (i % cfg.eval_every == 0 or i == cfg.iterations):
            test(i)
    curve = tuple(float(x) for x in test_losses(f, w, tests, cfg.inner_lr, cfg.eval_steps).mean(0)) if record and diverged is None else ()
    done = diverged or cfg.iterations
    return DifResult(config=cfg, graph_name=g.name, lambda_2=lam, iterations=tuple(iters), test_loss=tuple(losses),
                     agent_test_loss=tuple(agents), disagreement=tuple(dis), adaptation_curve=curve,
                     seconds=time.perf_counter() - t0, train_seconds=train_seconds, messages_up=K * done,
                     messages_down=(K + 2 * len(g.edges)) * done, diverged_at=diverged, w=w, phi=phi)


# ----------------------------------------------------------------------------------------------
# Command line


def _summary(cfg: DifMAMLConfig, res: DifResult) -> str:
    state = f"diverged at iteration {res.diverged_at}" if res.diverged_at else f"final test loss {res.test_loss[-1]:.4f}"
    return (f"dif-maml on {res.graph_name} (lambda_2 = {res.lambda_2:.4f}): {state}; {res.train_seconds:.1f} s training, "
            f"{res.seconds:.1f} s in all; {res.messages_up} models up, {res.messages_down} down")


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(DifMAMLConfig, prog="python -m fedmeta.dif_maml", doc=__doc__)
    return run_command(parser, DifMAMLConfig, argv, simulate, _summary, check=DifMAMLConfig.combination_matrix)


if __name__ == "__main__":
    sys.exit(main())
