"""FedAvg (McMahan et al. 2017), the baseline of per-fedavg.txt Section 5, with fedmeta's sampling
and personalized evaluation, so its numbers compare with Per-FedAvg and LocalMOML."""

from __future__ import annotations

from fedmeta.algorithms import FedAvgConfig
from fedmeta.strategies.base import MetaStrategy


class FedAvg(MetaStrategy):
    """FedAvg as a fedmeta strategy: tau local SGD steps per sampled client, uniform average.

    Personalized evaluation reports both baselines of per-fedavg.txt Section 5 from one run:
    ``accuracy-before`` is **FedAvg** (the common model, no adaptation) and ``accuracy-after`` is
    **FedAvg + fine-tune** (the same model adapted with the evaluation protocol, on the client's
    train split).

    Train ``ConfigRecord`` keys: ``algorithm`` = ``"fedavg"``; ``lr`` (SGD step size);
    ``local-steps`` (tau); ``batch-size``; ``inner-lr`` (alpha, used by evaluation only);
    ``seed``; ``server-round``.

    Example
    -------
    >>> strategy = FedAvg(num_clients=50, clients_per_round=10, lr=0.05, local_steps=4)
    """

    hparams_cls = FedAvgConfig
