"""Peer benchmark: pfl-research 0.6.0 FederatedAveraging (PyTorch, CPU) on a given client split.

Measures the wall time of every central iteration (round) of pfl's own FedAvg loop and the
client-step throughput of the steady rounds. Runs in a venv with ``pfl[pytorch]==0.6.0``; imports
only numpy, torch, pfl and the standard library.

Set-up (as in pfl-research's benchmarks/image_classification/pytorch/train.py): MLP 784-100-10 with
cross-entropy as a ``PyTorchModel``; local ``torch.optim.SGD`` (no momentum); central
``torch.optim.SGD(lr=1.0)`` on the averaged model difference, i.e. the new model is the plain
average of the clients' models (``WeightByUser``: every client weighs 1). ``FederatedDataset``
with the ``minimize_reuse`` sampler (a cycle over the user ids), cohort = all clients, so every
client trains exactly once per round. Single-process ``SimulatedBackend`` with its default
``SumAggregator``; no DP, no central evaluation. pfl always evaluates the clients locally (one
full-batch forward before and after training) in iteration 0, whatever ``evaluation_frequency``
is; that lands in round 1, the warm-up; later rounds do none.

Timing: a ``TrainingProcessCallback`` takes ``time.perf_counter()`` at ``on_train_begin`` and at
every ``after_central_iteration``; round r is the gap between marks r-1 and r. One client-step is
one local SGD step on one batch: a round is sum_i epochs * ceil(n_i / batch_size). The script
counts what pfl really did (calls of ``loss`` and the user ids it built datasets for) and stops if a
round differs from that. The final training loss is evaluated after the timed rounds.

    python pfl_fedavg.py --split S.npz --rounds R --threads T --lr 0.05 --batch-size 10 \
        --local-epochs 1 --seed 0 --out OUT.json
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--split", required=True, help=".npz with num_clients, x_i [n_i,784] float32, y_i [n_i] int64")
ap.add_argument("--rounds", type=int, required=True)
ap.add_argument("--threads", type=int, required=True)
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--batch-size", type=int, default=10)
ap.add_argument("--local-epochs", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
args = ap.parse_args()
if args.rounds < 2 or args.threads < 1 or args.batch_size < 1 or args.local_epochs < 1:
    sys.exit("pfl_fedavg: need --rounds >= 2, --threads >= 1, --batch-size >= 1, --local-epochs >= 1")
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")  # pin pfl to the CPU (it picks CUDA/MPS if present)

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
    """Marks the time after every central iteration and checks each round's users and steps."""

    def __init__(self, net, users_seen, num_clients, expected_steps):
        self.net, self.users_seen = net, users_seen
        self.num_clients, self.expected_steps = num_clients, expected_steps
        self.marks = []

    def on_train_begin(self, *, model):
        self.marks.append(time.perf_counter())
        return super().on_train_begin(model=model)

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.marks.append(time.perf_counter())
        users, steps = sorted(self.users_seen), self.net.loss_calls
        if users != list(range(self.num_clients)) or steps != self.expected_steps:
            sys.exit(f"pfl_fedavg: round {central_iteration + 1} trained users {users} with {steps} "
                     f"steps, expected each of {self.num_clients} users once and {self.expected_steps} steps")
        self.users_seen.clear()
        self.net.loss_calls = 0
        return super().after_central_iteration(aggregate_metrics, model, central_iteration=central_iteration)


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
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[WeightByUser()])
    net = MLP()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                                         train_cohort_size=num_clients, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=args.local_epochs, local_learning_rate=args.lr,
                                      local_batch_size=args.batch_size)
    timer = RoundTimer(net, users_seen, num_clients, steps_per_round)
    FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                             model_train_params=train_params, callbacks=[timer], send_metrics_to_platform=False)

    round_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    steady = statistics.median(round_s[1:])
    final_loss = sum((model.evaluate(PyTorchTensorDataset(d))["loss"] for d in data.values()),
                     Weighted(0.0, 0)).overall_value
    result = {
        "peer": "pfl-research", "pfl_version": pfl.__version__, "torch_version": torch.__version__,
        "threads": args.threads, "rounds": args.rounds, "num_clients": num_clients,
        "batch_size": args.batch_size, "local_epochs": args.local_epochs, "lr": args.lr,
        "round_seconds": {str(r): s for r, s in enumerate(round_s, 1)},
        "client_steps_per_round": steps_per_round, "steady_median_s": steady,
        "client_steps_per_s": steps_per_round / steady, "total_s": timer.marks[-1] - timer.marks[0],
        "final_train_loss": final_loss,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"pfl-research {pfl.__version__} FedAvg: {num_clients} clients, {steps_per_round} client-steps/round, "
          f"threads={args.threads}, round 1 {round_s[0]:.2f} s, steady median {steady:.2f} s, "
          f"{result['client_steps_per_s']:.0f} client-steps/s, final train loss {final_loss:.4f}")


if __name__ == "__main__":
    main()
