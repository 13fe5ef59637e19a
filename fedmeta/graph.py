"""Graphs and combination matrices of decentralized learning (dif-maml.txt Section 2, Assumption 6).

K agents on an undirected graph; agent k combines its neighbours' intermediate states with the
weights of column k of a combination matrix ``A = [a_lk]`` (eq. 6b: ``w_k = sum_l a_lk phi_l``).
Dif-MAML's analysis needs A doubly stochastic (columns and rows sum to 1), non-negative, supported
on the graph's edges and the diagonal, and primitive (a connected graph with a positive diagonal
entry). :func:`check_combination` checks all of that before any work and returns the mixing rate
``lambda_2 = rho(A^T - 11^T / K)``, which Theorem 1's disagreement bound depends on.

Topologies: :func:`ring`, :func:`complete`, :func:`ring_chords` (the stand-in for the paper's
Figure 2a, whose edges the text does not give), :func:`erdos_renyi` (redrawn until connected),
:func:`from_edges`, and :func:`none` (no edges: A = I, the non-cooperative baseline only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from fedmeta import validation as V

TOPOLOGIES = ("ring", "ring-chords", "complete", "erdos-renyi", "edges", "none")
"""Values of the ``topology`` setting (:func:`graph`)."""
COMBINATIONS = ("metropolis", "uniform")
"""Values of the ``combination`` setting: :func:`metropolis` weights on any graph; ``uniform``
(``11^T / K``, the centralized solution) on the complete graph only."""
TOLERANCE = 1e-9
"""How far row and column sums may be from 1."""


@dataclass(frozen=True)
class Graph:
    """An undirected graph on agents ``0 .. num_agents - 1``: ``edges`` are pairs ``(l, k)``, ``l < k``, sorted."""

    num_agents: int
    edges: tuple[tuple[int, int], ...]
    name: str = "edges"

    def __post_init__(self) -> None:
        V.positive_int("num_agents (K)", self.num_agents)
        for l, k in self.edges:
            V.check("edges", V.is_int(l) and V.is_int(k) and 0 <= l < k < self.num_agents,
                    f"pairs (l, k) of distinct agents in 0..{self.num_agents - 1} with l < k", (l, k))
        V.check("edges", len(set(self.edges)) == len(self.edges) and list(self.edges) == sorted(self.edges),
                "sorted and without repeats", self.edges)

    @cached_property
    def adjacency(self) -> tuple[tuple[int, ...], ...]:
        """Every agent's neighbours, sorted (built once from ``edges``)."""
        out: list[list[int]] = [[] for _ in range(self.num_agents)]
        for l, k in self.edges:
            out[l].append(k)
            out[k].append(l)
        return tuple(tuple(sorted(n)) for n in out)

    def neighbours(self, k: int) -> tuple[int, ...]:
        """The agents linked to k (k itself not included)."""
        return self.adjacency[k]

    def degree(self, k: int) -> int:
        """n_k: the size of k's neighbourhood, k itself counted (dif-maml's Metropolis rule)."""
        return len(self.neighbours(k)) + 1

    def components(self) -> list[list[int]]:
        """The connected components, each sorted, in order of their smallest agent."""
        seen: set[int] = set()
        parts = []
        for start in range(self.num_agents):
            if start in seen:
                continue
            part, todo = {start}, [start]
            while todo:
                for l in self.neighbours(todo.pop()):
                    if l not in part:
                        part.add(l)
                        todo.append(l)
            seen |= part
            parts.append(sorted(part))
        return parts

    @property
    def connected(self) -> bool:
        return len(self.components()) == 1


def _edges(pairs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted({(min(l, k), max(l, k)) for l, k in pairs if l != k}))


def ring(num_agents: int) -> Graph:
    """Agent k linked to k - 1 and k + 1 (mod K)."""
    V.positive_int("num_agents (K)", num_agents)
    return Graph(num_agents, _edges((k, (k + 1) % num_agents) for k in range(num_agents)), "ring")


def ring_chords(num_agents: int) -> Graph:
    """A ring plus the chords ``k -- k + K // 2`` (for K = 6: every agent has 3 neighbours, 9 edges). The
    stand-in for dif-maml Figure 2a, a sparse connected graph whose edges the paper does not list."""
    g = ring(num_agents)
    half = num_agents // 2
    chords = [(k, k + half) for k in range(half)] if num_agents >= 4 else []
    return Graph(num_agents, _edges([*g.edges, *chords]), "ring-chords")


def complete(num_agents: int) -> Graph:
    """Every pair of agents linked."""
    V.positive_int("num_agents (K)", num_agents)
    return Graph(num_agents, tuple((l, k) for l in range(num_agents) for k in range(l + 1, num_agents)), "complete")


def none(num_agents: int) -> Graph:
    """No edges: every agent alone (A = I, the non-cooperative baseline)."""
    V.positive_int("num_agents (K)", num_agents)
    return Graph(num_agents, (), "none")


def erdos_renyi(num_agents: int, edge_prob: float, seed: int, max_draws: int = 1000) -> Graph:
    """Every pair linked with probability ``edge_prob``, redrawn (same seed stream) until connected."""
    V.positive_int("num_agents (K)", num_agents)
    V.check("edge_prob", V.is_finite(edge_prob) and 0 < edge_prob <= 1, "a number in (0, 1]", edge_prob)
    V.nonneg_int("graph_seed", seed)
    rng = np.random.default_rng(seed)
    pairs = [(l, k) for l in range(num_agents) for k in range(l + 1, num_agents)]
    for _ in range(max_draws):
        keep = rng.random(len(pairs)) < edge_prob
        g = Graph(num_agents, tuple(p for p, on in zip(pairs, keep) if on), f"erdos-renyi(p={edge_prob:g}, seed={seed})")
        if g.connected:
            return g
    raise ValueError(f"edge_prob must make a connected graph likely: {max_draws} Erdos-Renyi draws with K = {num_agents}, "
                     f"p = {edge_prob:g} were all disconnected; raise edge_prob")


def from_edges(num_agents: int, edges: Sequence[Sequence[int]]) -> Graph:
    """An explicit edge list (pairs in either order; self-loops are dropped: every agent keeps its own state)."""
    V.positive_int("num_agents (K)", num_agents)
    for e in edges:
        V.check("edges", len(e) == 2 and all(V.is_int(a) and 0 <= a < num_agents for a in e),
                f"pairs of agent ids in 0..{num_agents - 1}", list(e))
    return Graph(num_agents, _edges((int(a), int(b)) for a, b in edges), "edges")


def graph(topology: str, num_agents: int, *, edge_prob: float = 0.5, seed: int = 0, edges: Sequence[Sequence[int]] = ()) -> Graph:
    """The graph named by the ``topology`` setting (one of :data:`TOPOLOGIES`)."""
    V.check_choice("topology", topology, TOPOLOGIES)
    if topology == "erdos-renyi":
        return erdos_renyi(num_agents, edge_prob, seed)
    if topology == "edges":
        V.check("edges", len(edges) > 0, "a non-empty list of pairs with topology='edges'", list(edges))
        return from_edges(num_agents, edges)
    return {"ring": ring, "ring-chords": ring_chords, "complete": complete, "none": none}[topology](num_agents)


def metropolis(g: Graph) -> np.ndarray:
    """The Metropolis rule: ``a_lk = 1 / max(n_k, n_l)`` on an edge (degrees count the agent itself),
    ``a_kk = 1 - sum_{l != k} a_lk``, 0 elsewhere. Symmetric, hence doubly stochastic."""
    K = g.num_agents
    a = np.zeros((K, K))
    for l, k in g.edges:
        a[l, k] = a[k, l] = 1.0 / max(g.degree(l), g.degree(k))
    a[np.diag_indices(K)] = 1.0 - a.sum(axis=0)
    return a


def uniform(num_agents: int) -> np.ndarray:
    """``11^T / K``: every agent averages all intermediate states (the centralized solution; complete graph)."""
    return np.full((num_agents, num_agents), 1.0 / num_agents)


def combination(g: Graph, rule: str) -> np.ndarray:
    """The matrix of the ``combination`` setting on ``g``: ``metropolis`` or ``uniform`` (complete graph only)."""
    V.check_choice("combination", rule, COMBINATIONS)
    if rule == "uniform":
        V.check("combination", len(g.edges) == g.num_agents * (g.num_agents - 1) // 2,
                "'metropolis' unless the topology is complete ('uniform' needs every pair linked)", rule)
        return uniform(g.num_agents)
    return metropolis(g)


def lambda_2(a: np.ndarray) -> float:
    """``rho(A^T - 11^T / K)``: the mixing rate of a doubly stochastic A (0 for ``11^T/K``, < 1 when primitive)."""
    K = a.shape[0]
    return float(np.max(np.abs(np.linalg.eigvals(a.T - np.full((K, K), 1.0 / K)))))


def check_combination(a: np.ndarray, g: Graph) -> float:
    """Check Assumption 6 before any work and return lambda_2: A is K x K, finite, non-negative, its
    columns (each agent's weights) and rows sum to 1, it is zero off the graph's edges and diagonal,
    and the graph is connected (the components are named if not). With the ``none`` graph only A = I
    passes (the non-cooperative baseline, lambda_2 = 1)."""
    a = np.asarray(a, dtype=float)
    K = g.num_agents
    V.check("combination matrix A", a.shape == (K, K), f"a {K} x {K} matrix (K = {K} agents)", a.shape)
    V.check("combination matrix A", bool(np.isfinite(a).all()), "finite", "non-finite entries")
    if (a < 0).any():
        l, k = map(int, np.argwhere(a < 0)[0])
        raise ValueError(f"combination matrix A must be non-negative, got a[{l}, {k}] = {a[l, k]:.6g}")
    cols, rows = a.sum(axis=0), a.sum(axis=1)
    if np.abs(cols - 1).max() > TOLERANCE:
        k = int(np.abs(cols - 1).argmax())
        raise ValueError(f"combination matrix A must have columns that sum to 1 (agent k's weights a_lk over l), "
                         f"got column {k} summing to {cols[k]:.6g}")
    if np.abs(rows - 1).max() > TOLERANCE:
        l = int(np.abs(rows - 1).argmax())
        raise ValueError(f"combination matrix A must be doubly stochastic (Assumption 6): its rows must sum to 1 as well, "
                         f"got row {l} summing to {rows[l]:.6g} (a merely column-stochastic matrix biases the network "
                         "towards some agents' objectives)")
    allowed = np.eye(K, dtype=bool)
    for l, k in g.edges:
        allowed[l, k] = allowed[k, l] = True
    if (a[~allowed] != 0).any():
        l, k = map(int, np.argwhere((a != 0) & ~allowed)[0])
        raise ValueError(f"combination matrix A must be zero off the graph's edges and diagonal, got a[{l}, {k}] = "
                         f"{a[l, k]:.6g} but agents {l} and {k} are not linked in {g.name}")
    if g.name == "none" or not g.edges:
        if not np.array_equal(a, np.eye(K)):
            raise ValueError("combination matrix A must be the identity on a graph without edges")
        if K > 1 and g.name != "none":
            raise ValueError(f"graph must be connected, got {K} separate agents (use topology='none' for the non-cooperative baseline)")
        return lambda_2(a) if K > 1 else 0.0
    parts = g.components()
    if len(parts) > 1:
        raise ValueError(f"graph must be connected (Assumption 6: A primitive), got {len(parts)} components: "
                         + "; ".join("{" + ", ".join(map(str, p)) + "}" for p in parts))
    lam = lambda_2(a)
    if not np.diag(a).any() or lam >= 1 - TOLERANCE:
        raise ValueError(f"combination matrix A must be primitive (a positive diagonal entry on a connected graph), "
                         f"got lambda_2 = {lam:.6g}")
    return lam


__all__ = ["COMBINATIONS", "Graph", "TOPOLOGIES", "check_combination", "combination", "complete", "erdos_renyi", "from_edges",
           "graph", "lambda_2", "metropolis", "none", "ring", "ring_chords", "uniform"]
