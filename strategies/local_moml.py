"""LocalMOML (memory-based MAML with local updates), localmoml Algorithm 3."""

from __future__ import annotations

from typing import Any, Iterable

from fedmeta.algorithms import LocalMOMLConfig
from fedmeta.strategies.base import MetaStrategy
from fedmeta.strategies.validation import check_strategy_kwargs


class LocalMOML(MetaStrategy):
    """LocalMOML as a Flower Message-API strategy.

    Each sampled client keeps a personalized model u (its memory) and runs H local steps of

        ``u <- (1 - beta) u + beta (w - alpha grad f(w; S1))``        (eq. 7)
        ``w <- w - eta (I - alpha H(w; S2)) grad f(u; S3)``          (eq. 8, Algorithm 3 line 11)

    and the server averages the returned meta-models uniformly (line 15). With ``inner_steps`` N > 1
    the adapted model in (7) is the N-step inner loop ``w_N(w; S1_0..S1_{N-1})`` (multistep-maml-ggs
    eq. 6) and the Hessian factor of (8) is ``prod_j (I - alpha H(w_j; S2_j))``, estimated as
    ``meta_gradient`` says (as for :class:`PerFedAvg`).

    Keys sent in the train ``ConfigRecord`` (the client must honor all of them):

    ``algorithm`` = ``"local-moml"``; ``inner-lr`` (alpha); ``lr`` (eta); ``momentum`` (LocalMOML's
    beta, in (0, 1]); ``local-steps`` (H); ``batch-size`` (K, for each of S1, S2, S3);
    ``init-batch-size`` (K0, for S0); ``inner-steps``, ``meta-gradient``, ``delta``,
    ``num-directions``, ``outer-batch-size`` (of S3), ``batch-draws`` (as for :class:`PerFedAvg`); ``memory-policy``
    (``keep``: start the round from the u the client ended its last participating round with,
    line 7; ``reset``: start from ``w - alpha grad f(w; S0)``, line 5 -- also a client's first
    round under ``keep``);
    ``seed`` and ``server-round``.

    ``memory_policy`` defaults to ``keep`` for cross-silo and ``reset`` for cross-device
    (Section 5.1). Other hyper-parameters are the fields of :class:`fedmeta.algorithms.LocalMOMLConfig`.

    Example
    -------
    >>> strategy = LocalMOML(num_clients=50, clients_per_round=10, inner_lr=0.01, lr=0.05, momentum=0.5)
    """

    hparams_cls = LocalMOMLConfig

    def __init__(
        self,
        *,
        num_clients: int,
        clients_per_round: int | None = None,
        new_clients: Iterable[int] = (),
        memory_policy: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_strategy_kwargs(type(self), locals())
        new_clients = tuple(new_clients)
        if memory_policy is None:
            num_train = num_clients - len(set(new_clients))
            cross_device = clients_per_round is not None and clients_per_round * kwargs.get("sampling_groups", 1) < num_train
            memory_policy = "reset" if cross_device else "keep"
        super().__init__(
            num_clients=num_clients, clients_per_round=clients_per_round, new_clients=new_clients, memory_policy=memory_policy, **kwargs
        )
