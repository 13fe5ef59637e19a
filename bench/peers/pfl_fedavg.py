"""Peer benchmark: pfl-research 0.6.0 FederatedAveraging (PyTorch, CPU) on a given client split.

Measures the wall time of every central iteration (round) of pfl's own FedAvg loop and the
client-step throughput of the steady rounds. Runs in a venv with ``pfl[pytorch]==0.6.0``; imports
only numpy, torch, pfl and the standard library.

Set-up (as in pfl-research's benchmarks/image_classification/pytorch/train.py): MLP 784-100-10 with
cross-entropy as a ``PyTorchModel``; local ``torch.optim.SGD`` (no momentum); central
``torch.optim.SGD(lr=1.0)`` on the averaged model difference, i.e. the new model is the plain
average of the clients' models (``WeightByUser``: every client weighs 1). ``FederatedDataset``
with the ``minimize_reuse`` sampler (a cycle over the user ids), cohort = all clients, so every
client trains exactly once per round. ``SimulatedBackend`` with its default ``SumAggregator``; no
DP, no central evaluation. pfl always evaluates the clients locally (one full-batch forward before
and after training) in iteration 0, whatever ``evaluation_frequency`` is; that lands in round 1,
the warm-up; later rounds do none.

Workers (``--workers N``, N > 1): pfl's own distributed simulation on this machine, as its guide
``simulation_distributed`` describes: N processes, each told the workers' addresses
(``PFL_WORKER_ADDRESSES``, all on 127.0.0.1, free ports) and its rank (``PFL_WORKER_RANK``); pfl
starts a ``torch.distributed`` (gloo) group over them, hands every worker its share of each cohort
(``FederatedDataset``: cohort position i goes to worker i mod N) and sums the workers' statistics
with an all-reduce, so every worker ends each round with the same central model. This process is
rank 0: it starts ranks 1..N-1 as its children (so their CPU is part of its process tree), writes
the out JSON, and stops every child by pid on any exit; a child whose parent dies ends itself (its
end of a pipe from the parent closes). ``GLOO_SOCKET_IFNAME=lo`` keeps gloo on the loopback.

Timing: a ``TrainingProcessCallback`` takes ``time.perf_counter()`` at ``on_train_begin`` and at
every ``after_central_iteration`` (rank 0's marks: a round ends for it after the all-reduce, i.e.
when the slowest worker is done); round r is the gap between marks r-1 and r. One client-step is
one local SGD step on one batch: a round is sum_i epochs * ceil(n_i / batch_size). Every worker
counts what pfl really did in each round (calls of ``loss`` and the user ids it built datasets
for); after training, rank 0 gathers the counts and stops unless, in every round, the workers
together trained each user exactly once and did that many steps. Every worker also notes its CPU
time at each mark: ``steady_busy_cores`` is all workers' CPU over rounds 2..R / those rounds' wall
time. The final training loss is evaluated after the timed rounds (by rank 0: all workers hold the
same model).

    python pfl_fedavg.py --split S.npz --rounds R --threads T [--workers N] --lr 0.05 --batch-size 10 \
        --local-epochs 1 --seed 0 --out OUT.json
"""
import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

LIFELINE = "FMB_PFL_LIFELINE"
"""Set in a worker started by rank 0: the read end of a pipe whose write end only rank 0 holds."""

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--split", required=True, help=".npz with num_clients, x_i [n_i,784] float32, y_i [n_i] int64")
ap.add_argument("--rounds", type=int, required=True)
ap.add_argument("--threads", type=int, required=True, help="torch threads of each worker")
ap.add_argument("--workers", type=int, default=1, help="worker processes (pfl's distributed simulation on 127.0.0.1)")
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--batch-size", type=int, default=10)
ap.add_argument("--local-epochs", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
args = ap.parse_args()
if args.rounds < 2 or args.threads < 1 or args.workers < 1 or args.batch_size < 1 or args.local_epochs < 1:
    sys.exit("pfl_fedavg: need --rounds >= 2, --threads >= 1, --workers >= 1, --batch-size >= 1, --local-epochs >= 1")
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")  # pin pfl to the CPU (it picks CUDA/MPS if present)


def free_ports(n):
    """``n`` distinct ports free on 127.0.0.1 now (the OS picks them; all held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Workers:
    """Ranks 1..N-1 as children of this process (rank 0); each stopped by pid when this process leaves."""

    def __init__(self, n):
        addresses = ",".join(f"127.0.0.1:{p}" for p in free_ports(n))
        os.environ.update(PFL_WORKER_ADDRESSES=addresses, PFL_WORKER_RANK="0")  # read when pfl is imported
        if "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        read, self._lifeline = os.pipe()
        self.procs, self._ending = [], threading.Event()
        try:
            for rank in range(1, n):
                env = {**os.environ, "PFL_WORKER_RANK": str(rank), LIFELINE: str(read)}
                self.procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env,
                                                   pass_fds=(read,)))
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(read)
        for p in self.procs:
            threading.Thread(target=self._watch, args=(p,), daemon=True).start()

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def _watch(self, proc):
        """A worker that fails ends the run: rank 0 would otherwise wait in the all-reduce for ever."""
        code = proc.wait()
        if code != 0 and not self._ending.is_set():
            print(f"pfl_fedavg: worker pid {proc.pid} exited with {code}; stopping", file=sys.stderr, flush=True)
            self.stop()
            os._exit(1)

    def join(self, timeout=120.0):
        """Wait for every worker to exit by itself (after the last collective), then stop what is left."""
        self._ending.set()
        try:
            for p in self.procs:
                p.wait(timeout)
        finally:
            self.stop()
        return [p.returncode for p in self.procs]

    def stop(self):
        self._ending.set()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def follow_parent(fd):
    """In a worker: end this process as soon as rank 0 is gone (the pipe's write end closes with it)."""
    def wait():
        os.read(fd, 1)  # blocks; returns b"" at end of file
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, daemon=True).start()


workers = None
if LIFELINE in os.environ:
    follow_parent(int(os.environ[LIFELINE]))
elif args.workers > 1:
    workers = Workers(args.workers)

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)

import pfl  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByUser  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.pytorch import PyTorchTensorDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNTrainHyperParams  # noqa: E402
from pfl.internal.ops.selector import get_default_framework_module  # noqa: E402
from pfl.metrics import Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402


def load_split(path):
    """{client id: (x, y) tensors}; exits with a one-line message on a bad file."""
    try:
        f = np.load(path)
        num_clients = int(f["num_clients"])
        data = {i: (torch.from_numpy(np.asarray(f[f"x_{i}"], np.float32)),
                    torch.from_numpy(np.asarray(f[f"y_{i}"], np.int64))) for i in range(num_clients)}
    except Exception as e:  # missing file, not an npz, missing key, unconvertible array
        sys.exit(f"pfl_fedavg: bad split {path!r}: {type(e).__name__}: {e}")
    if num_clients < 1:
        sys.exit(f"pfl_fedavg: bad split {path!r}: num_clients = {num_clients}")
    for i, (x, y) in data.items():
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            sys.exit(f"pfl_fedavg: bad split {path!r}: client {i} has x {tuple(x.shape)}, y {tuple(y.shape)}")
        if y.min() < 0 or y.max() > 9:
            sys.exit(f"pfl_fedavg: bad split {path!r}: client {i} has labels outside 0..9")
    return data


class MLP(torch.nn.Sequential):
    """784-100-10 MLP with the ``loss``/``metrics`` methods PyTorchModel requires; counts steps."""

    def __init__(self):
        super().__init__(torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
        self.loss_calls = 0  # pfl calls loss() once per local SGD step (metrics() for evaluation)

    def loss(self, x, y, eval=False):
        self.loss_calls += 1
        return torch.nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        loss_sum = torch.nn.functional.cross_entropy(self(x), y, reduction="sum").item()
        return {"loss": Weighted(loss_sum, len(y))}


class RoundTimer(TrainingProcessCallback):
    """Marks the time (and this worker's CPU time) after every central iteration; notes each round's users and steps."""

    def __init__(self, net, users_seen):
        self.net, self.users_seen = net, users_seen
        self.marks, self.cpu_marks, self.rounds = [], [], []

    def _mark(self):
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def on_train_begin(self, *, model):
        self._mark()
        return super().on_train_begin(model=model)

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self._mark()
        self.rounds.append({"users": sorted(self.users_seen), "steps": self.net.loss_calls})
        self.users_seen.clear()
        self.net.loss_calls = 0
        return super().after_central_iteration(aggregate_metrics, model, central_iteration=central_iteration)


def check_rounds(per_worker, num_clients, expected_steps):
    """Exit unless, in every round, the workers together trained each user once and did ``expected_steps`` steps."""
    for r, rounds in enumerate(zip(*per_worker), 1):
        users = sorted(u for w in rounds for u in w["users"])
        steps = sum(w["steps"] for w in rounds)
        if users != list(range(num_clients)) or steps != expected_steps:
            sys.exit(f"pfl_fedavg: round {r}: the workers trained users {[w['users'] for w in rounds]} with "
                     f"{[w['steps'] for w in rounds]} steps, expected each of {num_clients} users once and "
                     f"{expected_steps} steps in all")


def main():
    data = load_split(args.split)
    num_clients = len(data)
    steps_per_round = sum(args.local_epochs * math.ceil(len(y) / args.batch_size) for _, y in data.values())
    np.random.seed(args.seed)  # pfl seeds its algorithm/dataset RandomStates from np.random
    torch.manual_seed(args.seed)

    users_seen = []

    def make_user_dataset(user_id):
        users_seen.append(user_id)
        return PyTorchTensorDataset(data[user_id], user_id=user_id)

    train_data = FederatedDataset(make_user_dataset, get_user_sampler("minimize_reuse", list(range(num_clients))))
    dist = get_default_framework_module().distributed  # pfl's group, started on import from PFL_WORKER_* (or none)
    if dist.world_size != args.workers:
        sys.exit(f"pfl_fedavg: pfl runs {dist.world_size} worker(s), expected --workers {args.workers}")
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[WeightByUser()])
    net = MLP()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                                         train_cohort_size=num_clients, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=args.local_epochs, local_learning_rate=args.lr,
                                      local_batch_size=args.batch_size)
    timer = RoundTimer(net, users_seen)
    FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                             model_train_params=train_params, callbacks=[timer], send_metrics_to_platform=False)

    mine = {"rank": dist.global_rank, "pid": os.getpid(), "rounds": timer.rounds, "cpu_marks": timer.cpu_marks}
    if dist.world_size > 1:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, mine)  # on the group pfl started
        torch.distributed.destroy_process_group()
    else:
        gathered = [mine]
    if dist.global_rank != 0:
        # Done: leave without the interpreter's teardown, where a thread of the process group still joinable at
        # exit aborts the process now and then ("terminate called without an active exception", SIGABRT).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if len(gathered) != args.workers or any(len(w["rounds"]) != args.rounds for w in gathered):
        sys.exit(f"pfl_fedavg: expected {args.workers} worker(s) of {args.rounds} rounds each, got "
                 f"{[len(w['rounds']) for w in gathered]}")
    check_rounds([w["rounds"] for w in gathered], num_clients, steps_per_round)

    round_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    steady = statistics.median(round_s[1:])
    steady_wall = timer.marks[-1] - timer.marks[1]
    steady_cpu = sum(w["cpu_marks"][-1] - w["cpu_marks"][1] for w in gathered)
    final_loss = sum((model.evaluate(PyTorchTensorDataset(d))["loss"] for d in data.values()),
                     Weighted(0.0, 0)).overall_value
    result = {
        "peer": "pfl-research", "pfl_version": pfl.__version__, "torch_version": torch.__version__,
        "threads": args.threads, "workers": args.workers, "worker_pids": [w["pid"] for w in gathered],
        "rounds": args.rounds, "num_clients": num_clients,
        "batch_size": args.batch_size, "local_epochs": args.local_epochs, "lr": args.lr,
        "round_seconds": {str(r): s for r, s in enumerate(round_s, 1)},
        "client_steps_per_round": steps_per_round, "steady_median_s": steady,
        "client_steps_per_s": steps_per_round / steady, "total_s": timer.marks[-1] - timer.marks[0],
        "steady_busy_cores": steady_cpu / steady_wall,
        "users_per_worker": [len(w["rounds"][0]["users"]) for w in gathered],
        "final_train_loss": final_loss,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"pfl-research {pfl.__version__} FedAvg: {num_clients} clients, {steps_per_round} client-steps/round, "
          f"{args.workers} worker(s) x {args.threads} thread(s), round 1 {round_s[0]:.2f} s, steady median {steady:.2f} s, "
          f"{result['client_steps_per_s']:.0f} client-steps/s, {result['steady_busy_cores']:.2f} busy cores in rounds 2..R, "
          f"final train loss {final_loss:.4f}")


if __name__ == "__main__":
    done = False
    try:
        main()
        done = True
    finally:
        if workers is not None and not done:
            workers.stop()  # rank 0 failed: its workers may wait in a collective for ever
    if workers is not None:
        if any(codes := workers.join()):
            sys.exit(f"pfl_fedavg: worker exit codes {codes}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as the workers: no interpreter teardown with the process group's threads about
