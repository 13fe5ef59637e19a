"""Centralized multi-step MAML in the resampling setting (multistep-maml-ggs.txt Algorithms 1-2).

No Flower here: one process plays every task. Each meta-iteration ``k``

1. samples ``B`` tasks and, for each, fresh batches ``S_0..S_{N-1}`` (inner), ``T`` (outer) and
   ``D_0..D_{N-1}`` (Hessian), independent of each other (Section 2.2);
2. computes every task's meta-gradient ``G_i`` with :func:`fedmeta.meta.maml_gradient` -- eq. (8)
   with the estimator chosen by ``meta_gradient`` (eq. 19 for ``ggs``, eq. 17 inside eq. 8 for
   ``zeroth_order``), or FO-MuML's ``grad f(z_s)`` (fo-muml Algorithm 3) for ``fo_muml``;
3. averages them over the tasks and hands the average to the outer optimizer: with SGD this is
   eq. (7) / (19), ``w <- w - beta/B sum_i G_i``; with Adam, Adam on the same average.

The tasks of one iteration are processed together with ``torch.func.vmap`` (``randomness=
"different"``: every task draws its own Gaussian directions from the directions generator).

**Meta-loss.** Every ``eval_every`` iterations the runner records the meta-objective of eq. (2),
``L(w) = E_i l_i(w_N^i(w))``, estimated on ``eval_tasks`` held-out tasks drawn once per seed from
their own generator: N plain SGD steps (eq. 6) on fresh inner batches, then the loss on a fresh
test batch -- the paper's "meta loss (i.e. test loss)". Every estimator, FO-MuML included, is
scored with this same eq. (6) inner loop, so their curves are comparable.

**Randomness.** One ``seed`` feeds four independent ``torch.Generator`` s: the initial model, the
training tasks and batches, the Gaussian directions, and the evaluation tasks. The estimator does
not change how many tasks and batches are drawn, so for one seed all estimators see the same
tasks, the same initial model and the same evaluation set. Nothing touches the global RNG.

Two task families of multistep-maml-ggs Section 5 (:data:`fedmeta.tasks.TASKS`): ``matrix-factorization``
(5.1) and ``sine`` / ``sine-1x200`` (5.2); ``quadratic`` (closed forms, for tests) and
``sine-table2`` (localmoml Section 6.1). One iteration's batches, memories and meta-gradients are in
:mod:`fedmeta.centralized_iteration`; this module holds the settings, the run and the command line.

**MOML** (``algorithm="moml"``, localmoml-memory-based-maml.txt Algorithm 1, MOMLv1, eqs. v1 and 3)
and **LocalMOML run centrally** (``algorithm="local-moml"``, Algorithm 3) work on a fixed set of
``num_tasks`` tasks, B distinct ones sampled per iteration, with every task's memory kept stacked
(:class:`~fedmeta.centralized_iteration.TaskMemory`); see :func:`train`. ``eval_protocol="few-shot"`` is localmoml Table 2's test
error (:func:`fedmeta.tasks.few_shot_error`).

Command line: ``python -m fedmeta.centralized --task sine --meta-gradient ggs --delta 1e-2``;
every field of :class:`CentralizedConfig` is a flag. FO-MuML is ``--meta-gradient fo_muml``, with
``--inner-steps`` as its number of anchored steps ``s``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import vmap

from fedmeta import meta
from fedmeta import settings as S
from fedmeta.config import HP
from fedmeta.centralized_iteration import (
    Streams, TaskMemory, draw_batches, draw_task_batches, local_moml_models, memory_age_counts, meta_loss, moml_iteration, stack_tasks,
    task_meta_gradients,
)
from fedmeta.meta import Params
from fedmeta.provenance import command_parser, provenance, run_command
from fedmeta.tracking import NONE, TRACKING_DIR, Tracker, Trackers, open_tracker, require
from fedmeta.tasks import TASKS, FewShotSet, TaskFamily, few_shot_error, few_shot_errors, grid_tasks


ALGORITHMS = ("maml", "moml", "local-moml")
"""Values of the ``algorithm`` setting."""

EVAL_PROTOCOLS = ("meta-loss", "few-shot", "few-shot-fixed")
"""Values of the ``eval_protocol`` setting."""

OUTER_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
"""Values of ``outer_optimizer``: plain SGD is eq. (7) / (19); the paper uses Adam for sine regression."""


# ----------------------------------------------------------------------------------------------
# Configuration


_seed_or_derived = S.int_at_least(-1)
EVAL_PROTOCOL_HELP = """meta-loss: eq. (2) on held-out tasks. few-shot (localmoml Section 6.1): eval_tasks unseen sine tasks
A ~ U(1, 5), phi ~ U(pi/5, pi) per seed; 10 steps of gradient descent at lr 0.01 on 10 points, then the MSE on 100 more
(fedmeta.tasks.few_shot_error). few-shot-fixed: the same on the authors' fixed test set (FewShotSet.authors)."""
TASK_SAMPLING_HELP = """how a fixed task set's B tasks of an iteration are drawn: distinct (the first B of a permutation) or
with-replacement (B uniform draws, as the localmoml authors' sinewave/src code does; MOML visits a task drawn twice in turn)."""
MEMORY_INIT_HELP = """MOML's memories before training: first-visit (a task's first visit takes v_i itself; the paper is silent)
or initial-model (one inner loop from the initial model on a fresh batch: the authors' sinewave/src/moml.py, MOML.__init__)."""
MEMORY_GRADIENT_HELP = """what MOML and LocalMOML step along: direction, eq. (3) / eq. (8) as written, (I - alpha H) grad L(u; S3);
or through-memory, the gradient of L(u(w); S3) through the memory update with the old memory fixed, beta (I - alpha H)
grad L(u; S3) (the authors' sinewave/src/moml.py lines 82-99, lcmoml.py lines 50-63)."""


@dataclass(frozen=True)
class CentralizedConfig(S.Settings):
    """One centralized meta-training run. Defaults: multistep-maml-ggs Section 5.1 (matrix factorization). Every
    field is a :class:`fedmeta.settings.Setting` (a ``--flag`` of the command line); the ones the federated configs
    share (alpha, N, the estimator's, beta, H) are their declarations (:class:`fedmeta.config.HP`)."""

    task: str = S.choice(lambda: sorted(TASKS), help="task family (fedmeta.tasks.TASKS)").field("matrix-factorization")
    meta_gradient: str = HP.meta_gradient.field()
    inner_steps: int = HP.inner_steps.field(3, help="inner SGD steps (eq. 6); for fo_muml, s: the anchored steps of fo-muml Algorithm 3")
    inner_lr: float = HP.inner_lr.field(help="inner step size")
    meta_lr: float = HP.meta_lr.field(0.003, symbol="beta", help="outer (meta) step size, eq. (7) / (19); Adam's learning rate "
                                                                 "with outer_optimizer=adam")
    outer_optimizer: str = S.choice(lambda: sorted(OUTER_OPTIMIZERS), help="sgd (eq. 7 / 19) or adam").field("sgd")
    tasks_per_iteration: int = S.int_at_least(1, symbol="B", help="tasks per meta-iteration").field(10)
    batch_size: int = HP.batch_size.field(1, symbol="S = D", help="samples in each inner batch S_j and each Hessian batch D_j "
                                                                  "(1 for matrix factorization: g_i)")
    test_batch_size: int = S.int_at_least(1, symbol="T", help="samples in the outer batch T of grad f(w_N; T) and in the "
                                                              "evaluation's test batches").field(1)
    delta: float = HP.delta.field(1e-2)
    num_directions: int = HP.num_directions.field()
    iterations: int = S.int_at_least(1, symbol="K", help="meta-iterations").field(2000)
    eval_every: int = S.int_at_least(1, help="record the meta-loss every this many iterations (and before the first and after "
                                             "the last)").field(50)
    eval_tasks: int = S.int_at_least(1, help="held-out tasks of the meta-loss estimate (drawn once per seed)").field(500)
    seed: int = HP.seed.field(help="seeds the initial model, the training tasks and batches, the directions and the evaluation tasks")
    algorithm: str = S.choice(lambda: ALGORITHMS, help="maml (multistep-maml-ggs Algorithms 1-2), moml (localmoml Algorithm 1, "
                                                       "MOMLv1: a memory per task) or local-moml (localmoml Algorithm 3 run "
                                                       "centrally: every sampled task runs local_steps LocalMOML steps from a fresh "
                                                       "memory and w becomes their average)").field("maml")
    num_tasks: int = S.int_at_least(0, " (0: resample tasks)", symbol="n",
                                    help="a fixed set of training tasks, B of them sampled per iteration; 0: a fresh task from "
                                         "p(T) every time (the resampling setting); moml and local-moml need n >= B").field(0)
    task_set: str = S.choice(lambda: ("random", "grid"), help="random: the n tasks are drawn once from p(T); grid (sine, n = 25): "
                                                             "localmoml Section 6.1's A sin(phi + x), A in {1..5}, phi = i pi / 5").field("random")
    momentum: float = HP.momentum.field(1.0, symbol="beta", help="MOML's memory update (eq. v1) and LocalMOML's (eq. 7); 1 makes "
                                                                 "MOML MAML")
    local_steps: int = HP.local_steps.field(5, symbol="H", help="LocalMOML's local steps per sampled task and iteration")
    init_batch_size: int = S.int_at_least(0, symbol="K0", help="LocalMOML's samples per memory-reset batch S0; 0: 2 x batch_size "
                                                               "(localmoml Section 6.1)").field(0)
    decay_at: float = S.fraction(help="divide the outer step size by 10 from iteration floor(decay_at * iterations) on "
                                      "(localmoml Section 6.1: 0.75); 1: never").field(1.0)
    eval_protocol: str = S.choice(lambda: EVAL_PROTOCOLS, help=EVAL_PROTOCOL_HELP).field("meta-loss")
    eval_seed: int = _seed_or_derived.field(-1, help="seed of the evaluation tasks; -1: derived from seed")
    task_sampling: str = S.choice(lambda: ("distinct", "with-replacement"), help=TASK_SAMPLING_HELP).field("distinct")
    memory_init: str = S.choice(lambda: ("first-visit", "initial-model"), help=MEMORY_INIT_HELP).field("first-visit")
    memory_gradient: str = S.choice(lambda: ("direction", "through-memory"), help=MEMORY_GRADIENT_HELP).field("direction")
    init_seed: int = _seed_or_derived.field(-1, help="-1: the initial model is drawn from seed; >= 0: from this seed alone "
                                                     "(the authors' Model(seed=1234) for every seed)")
    track: str = HP.track.field()
    tracking_dir: str = HP.tracking_dir.field()

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.algorithm != "maml" and self.num_tasks < self.tasks_per_iteration:
            raise bad("num_tasks", f"an integer >= tasks_per_iteration={self.tasks_per_iteration} for {self.algorithm} (a memory per task)")
        if self.task_set == "grid" and (not self.task.startswith("sine") or self.num_tasks != 25):
            raise bad("task_set", "'grid' only for a sine task with num_tasks=25")
        if self.algorithm == "local-moml" and (self.outer_optimizer != "sgd" or self.meta_gradient == "fo_muml"):
            raise bad("algorithm", "local-moml with outer_optimizer='sgd' and a meta_gradient other than fo_muml")
        if self.eval_protocol != "meta-loss" and not self.task.startswith("sine"):
            raise bad("eval_protocol", f"{self.eval_protocol!r} only for a sine task")

    @property
    def family(self) -> TaskFamily:
        return TASKS[self.task]

    @property
    def run_name(self) -> str:
        """The run's name in a tracker: ``centralized-<algorithm>-<task>-<meta-gradient>-seed<seed>``."""
        return f"centralized-{self.algorithm}-{self.task}-{self.meta_gradient}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# A run


@dataclass(frozen=True)
class RunResult:
    """The record of one run: the meta-loss curve and what it cost."""

    config: CentralizedConfig
    iterations: tuple[int, ...]
    """Iterations at which the meta-loss was recorded (0 = the initial model)."""
    meta_loss: tuple[float, ...]
    """The meta-loss on the held-out tasks at those iterations."""
    train_loss: tuple[float, ...]
    """Per iteration: the mean over the B training tasks of ``l_i(w_N^i; T_i)`` (what the authors' code logs)."""
    seconds: float
    """Wall time of the run, evaluation included."""
    cost: meta.Cost
    """Oracle calls of all meta-gradients (inner and outer gradients, HVPs, loss evaluations)."""
    diverged_at: int | None = None
    """The iteration whose update made the meta-parameters non-finite; the run stopped there."""
    train_seconds: float = 0.0
    """Wall time of the iterations alone (no evaluation): ``train_seconds / iterations`` is the time per iteration."""
    final_task_errors: tuple[float, ...] = ()
    """``few-shot`` evaluation: the final model's test error on each held-out task (their mean is the last meta-loss)."""
    params: Params | None = dataclasses.field(default=None, compare=False)
    """The final meta-parameters (not serialized)."""
    task_ids: tuple[tuple[int, ...], ...] = dataclasses.field(default=(), compare=False)
    """With a fixed task set: the tasks sampled in each iteration (not serialized)."""
    memory: TaskMemory | None = dataclasses.field(default=None, compare=False)
    """MOML: the final memories of all tasks (not serialized)."""
    memory_ages: tuple[int, ...] = ()
    """MOML: how old a sampled task's memory ``u_i`` was when the task came back: entry ``a - 1`` counts the
    revisits ``a`` iterations after the previous visit (:func:`memory_age_counts`; first visits not counted)."""

    @property
    def final_meta_loss(self) -> float:
        """The last recorded meta-loss; NaN for a diverged run."""
        return float("nan") if self.diverged_at is not None else self.meta_loss[-1]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("params", "task_ids", "memory")}
        d["final_task_errors"] = list(self.final_task_errors)
        d["memory_ages"] = list(self.memory_ages)
        return {**d, "config": self.config.to_dict(), "cost": dataclasses.asdict(self.cost),
                "iterations": list(self.iterations), "meta_loss": list(self.meta_loss), "train_loss": list(self.train_loss)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        return cls(
            config=CentralizedConfig.from_mapping(d["config"]),
            iterations=tuple(d["iterations"]),
            meta_loss=tuple(d["meta_loss"]),
            train_loss=tuple(d["train_loss"]),
            seconds=d["seconds"],
            cost=meta.Cost(**d["cost"]),
            diverged_at=d["diverged_at"],
            train_seconds=d.get("train_seconds", 0.0),
            final_task_errors=tuple(d.get("final_task_errors", ())),
            memory_ages=tuple(d.get("memory_ages", ())),
        )


def train(cfg: CentralizedConfig, *, log: Callable[[str], None] | None = None, trackers: Sequence[Tracker] = ()) -> RunResult:
    """Run Algorithm 1 (exact, first_order, hessian_free), Algorithm 2 (ggs), ZO-MAML or FO-MuML; with
    ``algorithm="moml"`` localmoml's MOMLv1 (Algorithm 1), with ``"local-moml"`` its Algorithm 3 centrally.

    The outer step is ``torch.optim`` on leaf tensors that no differentiated computation reads while
    they change: each iteration computes the meta-gradients on a detached view of the current
    parameters, then the optimizer steps. MOML hands the optimizer ``Delta`` of eq. (3) in place of
    MAML's average meta-gradient, so with ``momentum = 1`` (and the same draws: one seed) it is MAML
    bit for bit (localmoml lines ~461-462). A task's memory starts as its first ``v_i`` (the paper does
    not say; this is LocalMOML's reset with S1's draw). LocalMOML replaces w by the average of the
    sampled tasks' local models (outer SGD only).

    With a fixed task set (``num_tasks`` > 0) each iteration samples B task ids from the task stream
    (``task_sampling``: distinct, a permutation's first B, or with replacement), then draws their batches;
    the tasks themselves are drawn once, before the first iteration (or are the grid). ``memory_init``,
    ``memory_gradient`` and ``init_seed`` are the other choices where the localmoml authors' code and the
    paper's text part (see :class:`CentralizedConfig`).

    Tracking: the tracker of ``cfg.track`` (:func:`fedmeta.tracking.open_tracker`, under ``cfg.tracking_dir``,
    default ``./tracking``; the provenance block as its config) and ``trackers`` receive, at step ``k``, iteration
    k's values under the :class:`RunResult` names: ``train_loss`` (every iteration) and ``meta_loss`` (step 0 is the
    initial model's). Every tracker is closed when the run ends, however it ends; an exception from a tracker's
    ``log`` (a tuner's ``optuna.TrialPruned``) stops the run after that iteration and propagates."""
    with Trackers(trackers) as sinks:
        require(cfg.track)
        config = provenance(cfg.to_dict(), started=time.time()) if cfg.track != NONE else None
        sinks.trackers.insert(0, open_tracker(cfg.track, cfg.run_name, cfg.tracking_dir or TRACKING_DIR, config=config))
        return _train(cfg, log=log, on_iteration=sinks.log)


def _train(cfg: CentralizedConfig, *, log: Callable[[str], None] | None = None,
        on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """The run of :func:`train`; ``on_iteration(k, values)`` after every iteration (and at 0)."""
    t0 = time.perf_counter()
    family, streams = cfg.family, Streams.from_seed(cfg.seed)
    f = family.loss
    estimator = meta.meta_gradient(cfg.meta_gradient, delta=cfg.delta, num_directions=cfg.num_directions)
    leaves = family.init_params(streams.init if cfg.init_seed < 0 else torch.Generator().manual_seed(cfg.init_seed))
    optimizer = OUTER_OPTIMIZERS[cfg.outer_optimizer](list(leaves.values()), lr=cfg.meta_lr)
    eval_gen = streams.evaluation if cfg.eval_seed < 0 else Streams.from_seed(cfg.eval_seed).evaluation
    if cfg.eval_protocol != "meta-loss":
        few_shot = FewShotSet.draw(cfg.eval_tasks, eval_gen) if cfg.eval_protocol == "few-shot" else FewShotSet.authors(cfg.eval_tasks)

        def evaluate(w: Params) -> float:
            return few_shot_error(f, w, few_shot)
    else:
        held_out = draw_task_batches(family, cfg.eval_tasks, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size, eval_gen)

        def evaluate(w: Params) -> float:
            return meta_loss(f, w, held_out, cfg.inner_lr)

    train_tasks = None
    if cfg.num_tasks:
        train_tasks = grid_tasks() if cfg.task_set == "grid" else family.sample_tasks(cfg.num_tasks, streams.tasks)
    memory = TaskMemory.empty(cfg.num_tasks, leaves) if cfg.algorithm == "moml" else None
    if memory is not None and cfg.memory_init == "initial-model":
        first = stack_tasks([family.sample(train_tasks, cfg.batch_size, streams.tasks) for _ in range(cfg.inner_steps)])
        w0 = {k: v.detach() for k, v in leaves.items()}
        memory.scatter(torch.arange(cfg.num_tasks),
                       vmap(lambda ix, iy: meta.local_moml_init_memory(f, w0, list(zip(ix, iy)), cfg.inner_lr, estimator))(*first))
    init_size = cfg.init_batch_size or 2 * cfg.batch_size
    # through-memory: the gradient of L(u(w)) through eq. (v1) / (7) is beta times eq. (3) / (8)'s direction
    through_memory = cfg.memory_gradient == "through-memory"

    def current() -> Params:
        return {k: v.detach() for k, v in leaves.items()}

    recorded, losses, train_losses, task_ids = [0], [evaluate(current())], [], []
    if on_iteration is not None:
        on_iteration(0, {"meta_loss": losses[0]})
    diverged_at, done, train_seconds = None, 0, 0.0
    # from iteration floor(decay_at * K) on, as the localmoml authors' code decays (sinewave/src/maml.py, main_loop)
    decay_from = int(cfg.decay_at * cfg.iterations) if cfg.decay_at < 1 else cfg.iterations + 1
    for k in range(1, cfg.iterations + 1):
        t_iter = time.perf_counter()
        lr = cfg.meta_lr if k < decay_from else cfg.meta_lr / 10
        for group in optimizer.param_groups:
            group["lr"] = lr
        if train_tasks is None:
            ids = None
            batches = draw_task_batches(family, cfg.tasks_per_iteration, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size,
                                        streams.tasks)
        else:
            if cfg.task_sampling == "distinct":
                ids = torch.randperm(cfg.num_tasks, generator=streams.tasks)[: cfg.tasks_per_iteration]
            else:
                ids = torch.randint(cfg.num_tasks, (cfg.tasks_per_iteration,), generator=streams.tasks)
            task_ids.append(tuple(int(i) for i in ids))
            tasks = train_tasks.index_select(0, ids)
            if cfg.algorithm == "local-moml":
                init = stack_tasks([family.sample(tasks, init_size, streams.tasks) for _ in range(cfg.inner_steps)])
                steps = [draw_batches(family, tasks, cfg.inner_steps, cfg.batch_size, cfg.batch_size, streams.tasks)
                         for _ in range(cfg.local_steps)]
            else:
                batches = draw_batches(family, tasks, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size, streams.tasks)
        if cfg.algorithm == "maml":
            grads, outer = task_meta_gradients(f, current(), batches, cfg.inner_lr, estimator, streams.directions)
        elif cfg.algorithm == "moml":
            grads, outer = moml_iteration(f, current(), memory, ids, batches, cfg, estimator, streams.directions)
        if cfg.algorithm == "local-moml":
            step = lr * cfg.momentum if through_memory else lr
            models, outer = local_moml_models(f, current(), init, steps, cfg.inner_lr, step, cfg.momentum, estimator, streams.directions)
            with torch.no_grad():
                for name, p in leaves.items():
                    p.copy_(models[name].mean(0))  # Algorithm 3 line 14: the server's average
        else:
            for name, p in leaves.items():
                p.grad = grads[name].mean(0)  # eq. (7) / (19), or MOML's eq. (3): the average over the B tasks
            optimizer.step()
        train_seconds += time.perf_counter() - t_iter
        done = k
        train_losses.append(float(outer.mean()))
        if not all(bool(torch.isfinite(p).all()) for p in leaves.values()):
            diverged_at = k
            if on_iteration is not None:
                on_iteration(k, {"train_loss": train_losses[-1]})
            break
        values = {"train_loss": train_losses[-1]}
        if k % cfg.eval_every == 0 or k == cfg.iterations:
            recorded.append(k)
            losses.append(evaluate(current()))
            values["meta_loss"] = losses[-1]
            if log:
                log(f"{cfg.algorithm} {cfg.meta_gradient} iteration {k}: {cfg.eval_protocol} {losses[-1]:.6g}")
        if on_iteration is not None:
            on_iteration(k, values)
    per_task = estimator.cost(cfg.inner_steps) * (cfg.local_steps if cfg.algorithm == "local-moml" else 1)
    task_errors = ()
    if cfg.eval_protocol != "meta-loss" and diverged_at is None:
        task_errors = tuple(float(e) for e in few_shot_errors(f, current(), few_shot))
    return RunResult(
        config=cfg,
        iterations=tuple(recorded),
        meta_loss=tuple(losses),
        train_loss=tuple(train_losses),
        seconds=time.perf_counter() - t0,
        cost=per_task * (cfg.tasks_per_iteration * done),
        diverged_at=diverged_at,
        train_seconds=train_seconds,
        final_task_errors=task_errors,
        params=current(),
        task_ids=tuple(task_ids),
        memory=memory,
        memory_ages=memory_age_counts(task_ids, cfg.num_tasks) if cfg.algorithm == "moml" else (),
    )


# ----------------------------------------------------------------------------------------------
# Command line


def _summary(cfg: CentralizedConfig, res: RunResult) -> str:
    state = f"diverged at iteration {res.diverged_at}" if res.diverged_at is not None else f"final meta-loss {res.final_meta_loss:.6g}"
    return (f"{cfg.task}, {cfg.meta_gradient}: {state}; {res.seconds:.1f} s; "
            f"{res.cost.gradients} gradients, {res.cost.hvps} HVPs, {res.cost.loss_evals} loss evaluations")


def _parser() -> Any:
    return command_parser(CentralizedConfig, prog="python -m fedmeta.centralized", doc=__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_parser(), CentralizedConfig, argv, train, _summary)


if __name__ == "__main__":
    sys.exit(main())
