"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020), per-fedavg.txt Algorithm 1."""

from __future__ import annotations

from fedmeta.config import PerFedAvgConfig
from fedmeta.strategies.base import MetaStrategy


class PerFedAvg(MetaStrategy):
    """Per-FedAvg as a Flower Message-API strategy.

    Each sampled client runs tau local steps of eq. (8) with the stochastic meta-gradient (9),

        ``w <- w - beta (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D); D')``,

    and the server averages the returned models uniformly (eq. 10).

    Keys sent in the train ``ConfigRecord`` (the client must honor all of them):

    ``algorithm`` = ``"per-fedavg"``; ``inner-lr`` (alpha); ``meta-lr`` (Per-FedAvg's beta);
    ``local-steps`` (tau); ``batch-size`` (|D| = |D'| = |D''|, three independent batches per step);
    ``hessian-mode`` (``exact``: Hessian-vector product; ``first_order``: drop ``alpha H``, eq. 23);
    ``seed`` and ``server-round`` (for reproducible batch sampling).

    Hyper-parameters are keyword arguments named as the fields of
    :class:`fedmeta.config.PerFedAvgConfig` (``inner_lr``, ``meta_lr``, ``local_steps``,
    ``batch_size``, ``hessian_mode``); sampling and evaluation arguments are those of
    :class:`fedmeta.strategies.base.MetaStrategy`.

    Example
    -------
    >>> strategy = PerFedAvg(num_clients=50, clients_per_round=10, inner_lr=0.01, meta_lr=0.001)
    """

    hparams_cls = PerFedAvgConfig
