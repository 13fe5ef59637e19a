"""Benchmark: the floor a multi-client node's step is measured against, hand-batched tensor code (one core).

The floor runs the local steps of C clients as plain batched tensor code: the clients' weights stacked
``[C, out, in]``, one ``baddbmm`` / ``bmm`` chain per layer over the clients, the cross-entropy's
gradient, the backward pass and the ReLU masks written by hand, the SGD update fused into the
weight-gradient ``baddbmm_`` in place. No autograd, no ``torch.func``, no ``vmap``. Per-FedAvg's exact
Hessian-vector product is Pearlmutter's R-operator, also by hand (forward-over-reverse: ReLU's second
derivative is zero, so it is the double backward's ``H v`` to round-off). A second floor,
``autograd floor``, runs the same stacked tensors through ``torch.autograd`` (double backward for the HVP).

Measured per (algorithm, C), single-threaded (``torch.set_num_threads(1)``: per core), on the default
model (MLP 784-40-40-10, ReLU) and real Fashion-MNIST batches of the default split, in client-steps/s:

* ``floor``: the hand-batched step (above); the other cells are reported as fractions of it;
* ``autograd floor``: the same stacked tensors through ``torch.autograd``;
* ``vmap node step``: fedmeta's vmapped step, the call the executor makes for a node's clients
  (:func:`fedmeta.algorithms.executor.local_rounds`: ``vmap`` of ``Algorithm.step`` on
  ``fedmeta.fast.make_loss``), its result detached, as in the round;
* ``compiled node step``: the same call under ``torch.compile`` (``vectorize="compile"``,
  :func:`fedmeta.algorithms.plan.compiled_step`);
* ``fast step x C``: the single-client fast step (``Algorithm.fast_step``, plain autograd, in place), C times;
* ``node round``: the node's whole local round end to end as a node runs it by default
  (``local_rounds(...)`` with ``vectorize="auto"``, one chunk of C clients, ``local_steps`` steps): batch draws,
  stacking, the steps as ``auto`` chose them (reported: ``auto``), the check, the losses.

``default node step`` is the step cell of what ``auto`` chose (vmap, compiled or the loop of fast steps).

Workloads (``--workload``): ``default`` is the default model (MLP 784-40-40-10) and split with 4 local steps
per round; ``peers`` is ``bench_peers.py``'s (MLP 784-100-10, pathological 2-class split, one local epoch:
FedAvg 262 SGD steps of K=10, Per-FedAvg 131 meta-steps of K=10).

Cells (a)-(d) step from the same batches (drawn once per client); the round draws its own. Before timing,
every (algorithm, C) checks that the floor's step equals fedmeta's vmapped and fast steps from the same
weights and batches (the update agrees to float32 round-off, :func:`check_same_step`): otherwise the floor
would not be the same work. Timings are interleaved repeat by repeat, alternating the order, medians reported.

``default`` workload: FedAvg batch K=10, lr 0.05; Per-FedAvg (eq. 9, N = 1): D, D', D'' of K=5, alpha 0.01, beta 0.05.

Usage::

    .venv/bin/python bench/bench_floor.py [--quick] [--clients 1 10 50] [--workload default|peers] [--out PATH]
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

import timing  # bench/timing.py (the script's folder is on sys.path)
from measure import environment
from fedmeta import algorithms, fast
from fedmeta import config as C
from fedmeta.algorithms import FedAvgConfig, PerFedAvgConfig, plan
from fedmeta.algorithms.executor import local_rounds
from fedmeta.batched import stack_batches
from fedmeta.meta import Params

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_floor.json"
FLOOR = "floor"
CELLS = (FLOOR, "autograd floor", "vmap node step", "compiled node step", "fast step x C", "node round")
STEP_CELLS = {"vmap": "vmap node step", "compile": "compiled node step", "loop": "fast step x C"}
"""The cell of each of ``auto``'s choices (:mod:`fedmeta.algorithms.plan`)."""
WORKLOADS = ("default", "peers")
UPDATE_RTOL = 1e-4
"""The floor's update (new weights minus old) must match fedmeta's to this fraction of its largest entry."""


@dataclass(frozen=True)
class Case:
    """One algorithm setting of the bench: its registry name, hyper-parameters and which floor step it is."""

    label: str
    algorithm: str
    hp: Any
    floor: str  # "sgd", "first_order" or "exact"


def cases(local_steps: int = 4, workload: str = "default") -> list[Case]:
    if workload == "peers":
        import bench_peers

        configs = bench_peers.fedmeta_configs(bench_peers.FULL)
        fo = configs["per_fedavg_fo"].algorithm_config()
        return [Case("FedAvg", C.FEDAVG, configs["fedavg_multi"].algorithm_config(), "sgd"),
                Case("Per-FedAvg FO", C.PER_FEDAVG, fo, "first_order"),
                Case("Per-FedAvg exact", C.PER_FEDAVG, dataclasses.replace(fo, meta_gradient="exact"), "exact")]
    pfa = functools.partial(PerFedAvgConfig, inner_lr=0.01, meta_lr=0.05, local_steps=local_steps, batch_size=5)
    return [
        Case("FedAvg", C.FEDAVG, FedAvgConfig(lr=0.05, local_steps=local_steps, batch_size=10), "sgd"),
        Case("Per-FedAvg FO", C.PER_FEDAVG, pfa(meta_gradient="first_order"), "first_order"),
        Case("Per-FedAvg exact", C.PER_FEDAVG, pfa(meta_gradient="exact"), "exact"),
    ]


# ----------------------------------------------------------------------------------------------
# The hand-batched floor: a ReLU MLP's layers as stacked [C, out, in] weights and [C, out] biases


Layers = list[tuple[Tensor, Tensor]]


def linear_keys(model: nn.Module) -> list[tuple[str, str]]:
    """The (weight, bias) keys of a ``Flatten``, ``Linear``, ``ReLU``, ..., ``Linear`` MLP (the floor's model)."""
    kinds = [type(m) for m in model]
    linears = [(f"{name}.weight", f"{name}.bias") for name, m in model.named_children() if isinstance(m, nn.Linear)]
    expected = [nn.Flatten] + [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear]
    if kinds != expected or any(m.bias is None for m in model if isinstance(m, nn.Linear)):
        raise ValueError(f"the floor runs a Flatten/Linear/ReLU/.../Linear MLP with biases, got {kinds}")
    return linears


def to_layers(stacked: Params, keys: list[tuple[str, str]]) -> Layers:
    return [(stacked[w], stacked[b]) for w, b in keys]


def _forward(layers: Layers, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-activations and inputs of every layer: ``h_i = a_{i-1} W_i^T + b_i``, ``a_i = relu(h_i)`` (last: logits)."""
    pre, inputs = [], []
    a = x
    for i, (w, b) in enumerate(layers):
        inputs.append(a)
        h = torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2))
        pre.append(h)
        a = h.relu() if i < len(layers) - 1 else h
    return pre, inputs


def _dlogits(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax ``p`` and the gradient of each client's mean cross-entropy in its logits, ``(p - onehot(y)) / K``."""
    p = torch.softmax(z, dim=-1)
    d = p.clone()
    d.scatter_add_(2, y.unsqueeze(2), torch.full(y.shape + (1,), -1.0, dtype=z.dtype))
    return p, d.div_(z.shape[1])


_relu_backward = torch.ops.aten.threshold_backward  # grad * (h > 0), one kernel


def backward(layers: Layers, x: Tensor, y: Tensor, on_layer: Callable[[int, Tensor, Tensor], None]) -> None:
    """Backpropagate each client's mean cross-entropy; ``on_layer(i, d_i, a_{i-1})`` gets layer i's output
    gradient and input (its weight gradient is ``d_i^T a_{i-1}``, its bias gradient ``d_i.sum(1)``), last layer
    first, after layer i's weights were used for ``d_{i-1}`` (so it may update them in place)."""
    pre, inputs = _forward(layers, x)
    _, d = _dlogits(pre[-1], y)
    for i in reversed(range(len(layers))):
        below = _relu_backward(torch.bmm(d, layers[i][0]), pre[i - 1], 0) if i else None
        on_layer(i, d, inputs[i])
        d = below


def gradient(layers: Layers, x: Tensor, y: Tensor) -> Layers:
    out: Layers = [None] * len(layers)  # type: ignore[list-item]

    def keep(i: int, d: Tensor, a: Tensor) -> None:
        out[i] = (torch.bmm(d.transpose(1, 2), a), d.sum(1))
    backward(layers, x, y, keep)
    return out


def descend_(layers: Layers, x: Tensor, y: Tensor, lr: float) -> None:
    """``w <- w - lr grad f(w; (x, y))`` in place, the update fused into the weight gradient's ``baddbmm_``."""
    def update(i: int, d: Tensor, a: Tensor) -> None:
        w, b = layers[i]
        w.baddbmm_(d.transpose(1, 2), a, alpha=-lr)
        b.sub_(d.sum(1), alpha=lr)
    backward(layers, x, y, update)


def adapted(layers: Layers, x: Tensor, y: Tensor, lr: float) -> Layers:
    """``w - lr grad f(w; (x, y))`` as new tensors (the adaptation step, per-fedavg eq. 5)."""
    out: Layers = [None] * len(layers)  # type: ignore[list-item]

    def step(i: int, d: Tensor, a: Tensor) -> None:
        w, b = layers[i]
        out[i] = (torch.baddbmm(w, d.transpose(1, 2), a, alpha=-lr), torch.sub(b, d.sum(1), alpha=lr))
    backward(layers, x, y, step)
    return out


def descend_by_correction_(layers: Layers, v: Layers, x: Tensor, y: Tensor, alpha: float, lr: float) -> None:
    """``w <- w - lr (v - alpha H(w; (x, y)) v)`` in place: per-fedavg eq. (9)'s exact step given ``v``.

    ``H v`` by Pearlmutter's R-operator: an R-forward pass of the directional derivatives ``R{h_i}`` of
    the pre-activations along ``v``, then an R-backward pass next to the ordinary one
    (``R{dz} = (p * R{z} - p <p, R{z}>) / K``, the softmax cross-entropy's Hessian in the logits; ReLU's
    second derivative is zero). ``R{grad W_i} = R{d_i}^T a_{i-1} + d_i^T R{a_{i-1}}``.
    """
    pre, inputs = _forward(layers, x)
    last = len(layers) - 1
    r_in: list[Tensor | None] = [None]  # R{a_{i-1}}, the directional derivative of layer i's input
    r_h = None
    for i, (w, _) in enumerate(layers):
        vw, vb = v[i]
        r_h = torch.baddbmm(vb.unsqueeze(1), inputs[i], vw.transpose(1, 2))
        if r_in[i] is not None:
            r_h.baddbmm_(r_in[i], w.transpose(1, 2))
        if i < last:
            r_in.append(_relu_backward(r_h, pre[i], 0))
    p, d = _dlogits(pre[-1], y)
    r_d = (p * r_h).sub_(p * (p * r_h).sum(-1, keepdim=True)).div_(y.shape[1])
    for i in reversed(range(len(layers))):
        w, b = layers[i]
        vw, vb = v[i]
        if i:
            below = _relu_backward(torch.bmm(d, w), pre[i - 1], 0)
            r_below = _relu_backward(torch.bmm(r_d, w).baddbmm_(d, vw), pre[i - 1], 0)
        # w - lr v + lr alpha (R{d}^T a + d^T R{a})
        w.sub_(vw, alpha=lr).baddbmm_(r_d.transpose(1, 2), inputs[i], alpha=lr * alpha)
        if r_in[i] is not None:
            w.baddbmm_(d.transpose(1, 2), r_in[i], alpha=lr * alpha)
        b.sub_(vb, alpha=lr).add_(r_d.sum(1), alpha=lr * alpha)
        if i:
            d, r_d = below, r_below


def floor_step_(case: Case, layers: Layers, batches: tuple) -> None:
    """One local step of every client, in place: ``batches`` as stacked for the vmapped step, inputs flattened."""
    if case.floor == "sgd":
        (x, y), = batches
        descend_(layers, x, y, case.hp.lr)
        return
    ((xi, yi),), (xo, yo), ((xh, yh),) = batches
    alpha, beta = case.hp.inner_lr, case.hp.meta_lr
    w1 = adapted(layers, xi, yi, alpha)  # per-fedavg eq. (5) on D
    if case.floor == "first_order":
        def update(i: int, d: Tensor, a: Tensor) -> None:  # w <- w - beta grad f(w1; D')
            w, b = layers[i]
            w.baddbmm_(d.transpose(1, 2), a, alpha=-beta)
            b.sub_(d.sum(1), alpha=beta)
        backward(w1, xo, yo, update)
    else:
        g = gradient(w1, xo, yo)
        descend_by_correction_(layers, g, xh, yh, alpha, beta)  # eq. (9)


# --- the same stacked tensors through torch.autograd


def _loss_sum(layers: Layers, x: Tensor, y: Tensor) -> Tensor:
    """The sum over clients of each client's mean cross-entropy (its gradient in client c's weights is c's own)."""
    pre, _ = _forward(layers, x)
    z = pre[-1]
    return nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum") / y.shape[1]


def _flat(layers: Layers) -> list[Tensor]:
    return [t for wb in layers for t in wb]


def _autograd(layers: Layers, x: Tensor, y: Tensor, create_graph: bool = False) -> list[Tensor]:
    leaves = [t.detach().requires_grad_() for t in _flat(layers)]
    with torch.enable_grad():
        pairs = list(zip(leaves[::2], leaves[1::2]))
        return list(torch.autograd.grad(_loss_sum(pairs, x, y), leaves, create_graph=create_graph)), leaves


def autograd_step_(case: Case, layers: Layers, batches: tuple) -> None:
    """:func:`floor_step_` with ``torch.autograd`` computing the gradients (double backward for ``H v``)."""
    params = _flat(layers)
    if case.floor == "sgd":
        (x, y), = batches
        g, _ = _autograd(layers, x, y)
        lr = case.hp.lr
    else:
        ((xi, yi),), (xo, yo), ((xh, yh),) = batches
        alpha, lr = case.hp.inner_lr, case.hp.meta_lr
        gi, _ = _autograd(layers, xi, yi)
        w1 = [p - alpha * gp for p, gp in zip(params, gi)]
        g, _ = _autograd(list(zip(w1[::2], w1[1::2])), xo, yo)
        if case.floor == "exact":
            with torch.enable_grad():
                gh, leaves = _autograd(layers, xh, yh, create_graph=True)
                inner = sum((a * b).sum() for a, b in zip(gh, g))
                hv = torch.autograd.grad(inner, leaves)
            g = [a - alpha * b for a, b in zip(g, hv)]
    with torch.no_grad():
        for p, gp in zip(params, g):
            p.sub_(gp, alpha=lr)


# ----------------------------------------------------------------------------------------------
# fedmeta's steps on the same data


def flat_batches(batches: Any) -> Any:
    """Stacked batches with each image flattened (``[C, K, 1, 28, 28]`` -> ``[C, K, 784]``) for the floor."""
    if isinstance(batches, Tensor):
        return batches.flatten(2) if batches.dim() > 3 else batches
    return tuple(flat_batches(b) for b in batches)


def vmapped_step(case: Case, f: Callable) -> Callable[[Params, tuple], Params]:
    """The executor's vmapped step for a stateless algorithm (``fedmeta.algorithms.executor.local_rounds``)."""
    algo = algorithms.get(case.algorithm)
    return vmap(lambda wi, b: algo.step(f, wi, None, b, case.hp)[0])


def client_batches(stacked: Any, c: int) -> Any:
    return stacked[c] if isinstance(stacked, Tensor) else tuple(client_batches(b, c) for b in stacked)


def check_same_step(case: Case, model: nn.Module, f: Callable, w: Params, stacked: tuple) -> dict[str, float]:
    """One step of every client from ``w`` on ``stacked`` batches by the floor, the autograd floor, fedmeta's
    vmapped step and its fast step; ``AssertionError`` unless each update (new minus old weights) equals the
    vmapped step's to ``UPDATE_RTOL`` of its largest entry. Returns each path's relative error."""
    keys = linear_keys(model)
    leaf = stacked
    while not isinstance(leaf, Tensor):
        leaf = leaf[0]
    clients = leaf.shape[0]
    start = {k: v.expand(clients, *v.shape).clone() for k, v in w.items()}
    reference = {k: v.detach() for k, v in vmapped_step(case, f)(start, stacked).items()}
    flat = flat_batches(stacked)
    results = {}
    for name, step in (("floor", floor_step_), ("autograd floor", autograd_step_)):
        mine = {k: v.clone() for k, v in start.items()}
        step(case, to_layers(mine, keys), flat)
        results[name] = mine
    algo = algorithms.get(case.algorithm)
    f_fast = fast.make_loss(model, nn.functional.cross_entropy)
    per_client = [algo.fast_step(f_fast, {k: v.clone() for k, v in w.items()}, None, client_batches(stacked, c), case.hp)[0]
                  for c in range(clients)]
    results["fast step"] = {k: torch.stack([p[k] for p in per_client]) for k in w}
    errors = {}
    for name, got in results.items():
        err = 0.0
        for k in w:
            ref_update, update = reference[k] - start[k], got[k] - start[k]
            err = max(err, float((update - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-30)))
        errors[name] = err
    bad = {k: e for k, e in errors.items() if not e <= UPDATE_RTOL}
    assert not bad, (f"{case.label}, {clients} clients: these steps differ from fedmeta's vmapped step by more than "
                     f"{UPDATE_RTOL} of the update: {bad}")
    return errors


# ----------------------------------------------------------------------------------------------
# The cells


def calls(case: Case, model: nn.Module, w: Params, datas: Sequence[Any], clients: int,
          seed: int = 0) -> tuple[dict[str, tuple[Callable[[], object], int]], dict[str, float], Any]:
    """name -> (one call, client-steps per call) for ``clients`` clients, the equality check's errors and the key of
    ``auto``'s plan for the node round (:func:`fedmeta.algorithms.plan.known`)."""
    from fedmeta.clients.client import round_generator

    algo = algorithms.get(case.algorithm)
    f = fast.make_loss(model, nn.functional.cross_entropy)  # what the multi-client node's executor runs
    keys = linear_keys(model)
    datas = [datas[c % len(datas)] for c in range(clients)]
    gens = [round_generator(seed, c, 1, 0) for c in range(clients)]
    stacked = stack_batches([algo.draw(functools.partial(d.sample, generator=g), case.hp) for d, g in zip(datas, gens)])
    errors = check_same_step(case, model, f, w, stacked)
    flat = flat_batches(stacked)

    floor_w = {k: v.expand(clients, *v.shape).clone() for k, v in w.items()}
    autograd_w = {k: v.clone() for k, v in floor_w.items()}
    floor_layers, autograd_layers = to_layers(floor_w, keys), to_layers(autograd_w, keys)
    vstep = vmapped_step(case, f)
    if hasattr(case.hp, "estimator"):
        case.hp.estimator()  # built before tracing, as the executor does
    cstep = torch.compile(vmapped_step(case, f), fullgraph=True)
    node = {"w": {k: v.expand(clients, *v.shape).clone() for k, v in w.items()}}
    compiled_node = {"w": {k: v.clone() for k, v in node["w"].items()}}

    def vmap_call() -> None:
        node["w"] = {k: v.detach() for k, v in vstep(node["w"], stacked).items()}

    def compiled_call() -> None:
        compiled_node["w"] = cstep(compiled_node["w"], stacked)

    own = [{k: v.clone() for k, v in w.items()} for _ in range(clients)]
    per_client = [client_batches(stacked, c) for c in range(clients)]

    def fast_call() -> None:
        for c in range(clients):
            own[c], _ = algo.fast_step(f, own[c], None, per_client[c], case.hp)

    def round_call() -> object:
        gs = [round_generator(seed, c, 2, 0) for c in range(clients)]
        samplers = [functools.partial(d.sample, generator=g) for d, g in zip(datas, gs)]
        return local_rounds(case.algorithm, f, w, samplers, gs, case.hp, chunk_size=clients)

    out = {
        FLOOR: (lambda: floor_step_(case, floor_layers, flat), clients),
        "autograd floor": (lambda: autograd_step_(case, autograd_layers, flat), clients),
        "vmap node step": (vmap_call, clients),
        "compiled node step": (compiled_call, clients),
        "fast step x C": (fast_call, clients),
        "node round": (round_call, clients * case.hp.local_steps),
    }
    return out, errors, ((case.algorithm, case.hp, f), clients)


def page_faults(fn: Callable[[], object], calls: int) -> float:
    """Minor page faults of the process per call of ``fn`` (fresh memory the allocator got from the OS and
    touched: a sign of large tensors allocated and freed every call)."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def workload_config(workload: str):
    """The model and split of ``workload`` (see the module docstring)."""
    from fedmeta.simulations.config import ExperimentConfig

    if workload == "peers":
        import bench_peers

        return bench_peers.base_config(bench_peers.FULL)
    return ExperimentConfig(num_nodes=0)


def run(quick: bool, client_counts: Sequence[int], workload: str = "default", fault_calls: int | None = None,
        only: Sequence[str] | None = None) -> dict[str, Any]:
    """The report: a row per (algorithm, clients). ``fault_calls``: calls per cell of the page-fault count (default 3 if
    ``quick``, else 50); ``only``: the algorithms (case labels) to run, default all."""
    from fedmeta.data import client_data

    env = environment()  # the load average before the runs
    torch.set_num_threads(1)
    cfg = workload_config(workload)
    torch.manual_seed(0)
    model = cfg.build_model()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    datas = [client_data(cfg.dataset, c, **cfg.data_kwargs()) for c in range(min(max(client_counts), cfg.num_clients))]
    rows = []
    for case in (c for c in cases(workload=workload) if only is None or c.label in only):
        for clients in client_counts:
            cells, errors, plan_key = calls(case, model, w, datas, clients)
            t = timing.bench_interleaved({k: fn for k, (fn, _) in cells.items()}, warmup=1 if quick else 3,
                                         repeats=2 if quick else 9, min_repeat_seconds=0.0 if quick else 0.25, alternate=True)
            rate = {k: n / (t[k].median_ms / 1e3) for k, (_, n) in cells.items()}
            calls_per_cell = fault_calls or (3 if quick else 50)
            faults = {k: page_faults(fn, calls_per_cell) / n for k, (fn, n) in cells.items()}
            rows.append({"algorithm": case.label, "clients": clients, "equality_rel_error": errors,
                         "client_steps_per_s": rate, "of_floor": {k: r / rate[FLOOR] for k, r in rate.items()},
                         "us_per_client_step_median": {k: t[k].median_ms * 1e3 / n for k, (_, n) in cells.items()},
                         "us_per_client_step_min": {k: t[k].min_ms * 1e3 / n for k, (_, n) in cells.items()},
                         "minor_page_faults_per_client_step": faults, "repeats": t[FLOOR].repeats})
            chosen = plan.known(plan_key)
            rows[-1]["auto"] = chosen.impl if chosen else None
            rows[-1]["auto_probe_ms"] = {k: v * 1e3 for k, v in chosen.seconds.items()} if chosen else {}
            rows[-1]["default_of_floor"] = rows[-1]["of_floor"][STEP_CELLS[chosen.impl]] if chosen else None
            rows[-1]["local_steps"] = case.hp.local_steps
            print(f"  {case.label}, {clients} clients: done", flush=True)
    return {"environment": env, "quick": quick, "threads": 1, "model": cfg.model_name, "dataset": cfg.dataset,
            "workload": workload, "local_steps_per_round": cases(workload=workload)[0].hp.local_steps, "rows": rows}


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"client-steps/s per core (1 thread), {report['model']} on {report['dataset']}, median of "
             f"{report['rows'][0]['repeats']} interleaved repeats, {env['date']}",
             f"torch {env['torch']}, load average at start {' '.join(env['loadavg_at_start'])}; "
             f"'/ floor' = rate over the hand-batched floor's; node round = a round of local steps (FedAvg "
             f"{report['local_steps_per_round']}) with batch draws, as vectorize='auto' runs it; auto = its choice, "
             "default = that step's fraction of the floor; faults = minor page faults per client-step",
             f"  {'algorithm':<17} {'C':>3} " + " ".join(f"{c:>18}" for c in CELLS) + f" {'auto':>8} {'default':>8}"
             + "   max update rel. error"]
    for r in report["rows"]:
        rate = r["client_steps_per_s"]
        default = r.get("default_of_floor")
        lines.append(f"  {r['algorithm']:<17} {r['clients']:>3} " + " ".join(f"{rate[c]:>18.0f}" for c in CELLS)
                     + f" {r.get('auto') or '-':>8} {'-' if default is None else format(default, '.2f'):>8}"
                     + f"   {max(r['equality_rel_error'].values()):.1e}")
        lines.append(f"  {'':<17} {'':>3} " + " ".join(f"{'/ floor ' + format(r['of_floor'][c], '.2f'):>18}" for c in CELLS))
        lines.append(f"  {'':<17} {'':>3} " + " ".join(f"{format(r['minor_page_faults_per_client_step'][c], '.1f') + ' faults':>18}"
                                                    for c in CELLS))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = timing.parser(__doc__, RESULTS_PATH, "1 and 3 clients, few repeats (the smoke test)")
    p.add_argument("--workload", choices=WORKLOADS, default="default",
                   help="default: the default MLP, 4 local steps; peers: bench_peers.py's (MLP 784-100-10, one local epoch)")
    p.add_argument("--clients", type=int, nargs="+", default=None, metavar="C",
                   help="clients per node, one column each (default: 1 10 50)")
    args = p.parse_args(argv)
    counts = args.clients or ([1, 3] if args.quick else [1, 10, 50])
    if any(c < 1 or c > 50 for c in counts):
        p.error(f"--clients: each count must be between 1 and 50 (the default split's clients), got {counts}")
    started = time.time()
    return timing.finish(run(args.quick, counts, args.workload), args, started, table)


if __name__ == "__main__":
    raise SystemExit(main())
