"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020), per-fedavg.txt Algorithm 1."""

from __future__ import annotations

from fedmeta.algorithms import PerFedAvgConfig
from fedmeta.strategies.base import MetaStrategy


class PerFedAvg(MetaStrategy):
    """Per-FedAvg as a Flower Message-API strategy.

    Each sampled client runs tau local steps of eq. (8) with the stochastic meta-gradient (9),

        ``w <- w - beta (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D); D')``,

    generalised to N inner steps (multistep-maml-ggs eqs. 6, 8),

        ``w <- w - beta prod_{j<N} (I - alpha H(w_j; D_j)) grad f(w_N; T)``,

    with the ``(I - alpha H)`` factors computed by the chosen ``meta_gradient`` estimator, and the
    server averages the returned models uniformly (eq. 10).

    Keys sent in the train ``ConfigRecord`` (the client must honor all of them):

    ``algorithm`` = ``"per-fedavg"``; ``inner-lr`` (alpha); ``meta-lr`` (Per-FedAvg's beta);
    ``local-steps`` (tau); ``batch-size`` (the size of each of the 2N + 1 independent batches
    per step: S_0..S_{N-1}, T, D_0..D_{N-1}; for N = 1 these are D, D', D''); ``inner-steps`` (N);
    ``meta-gradient`` (``exact``: Hessian-vector products; ``first_order``: drop ``alpha H``,
    eq. 23; ``hessian_free``: finite differences, eq. 119; ``ggs``; ``zeroth_order``;
    ``fo_muml``: FO-MuML's anchored inner loop, fo-muml Algorithm 3); ``delta``
    (finite-difference step / smoothing radius); ``num-directions`` (U);
    ``outer-batch-size`` (size of D', 0: ``batch-size``); ``batch-draws`` (``per-step`` or ``per-round``); ``seed`` and
    ``server-round`` (for reproducible batch sampling).

    Hyper-parameters are keyword arguments named as the fields of
    :class:`fedmeta.algorithms.PerFedAvgConfig` (``inner_lr``, ``meta_lr``, ``local_steps``,
    ``batch_size``, ``inner_steps``, ``meta_gradient``, ``delta``,
    ``num_directions``); sampling and evaluation arguments are those of
    :class:`fedmeta.strategies.base.MetaStrategy`.

    Example
    -------
    >>> strategy = PerFedAvg(num_clients=50, clients_per_round=10, inner_lr=0.01, meta_lr=0.001)
    >>> ggs = PerFedAvg(num_clients=50, inner_steps=3, meta_gradient="ggs", delta=1e-5, num_directions=10)
    """

    hparams_cls = PerFedAvgConfig
