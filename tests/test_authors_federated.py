"""The localmoml authors' federated settings (GitHub ``bokun-wang/moml``, ``federated/train.py``) as fedmeta settings.

Their local round, restated here from their code with plain ``torch.autograd`` on a ``nn.Module``
(one task, H steps, first order, the same 5 support and 10 query points in every step, the memory
rebuilt every round from one step on its own support batch), must equal fedmeta's
:func:`~fedmeta.algorithms.executor.local_round` under ``batch_draws="per-round"``,
``outer_batch_size=10``, ``meta_gradient="first_order"``, ``memory_policy="reset"``; with beta = 1
(their Per-FedAvg) it must equal fedmeta's Per-FedAvg. Their step-size schedule and fine-tuning step
size are strategy settings.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta import meta
from fedmeta.algorithms import LocalMOMLConfig, PerFedAvgConfig
from fedmeta.algorithms.executor import local_round, local_rounds
from fedmeta.strategies import LocalMOML, PerFedAvg

H, K_SPT, K_QRY = 4, 5, 10
ALPHA, ETA = 0.01, 0.05


class Recording:
    """A client's sampler that also keeps every batch it hands out, in order."""

    def __init__(self, seed: int, n: int = 60, d: int = 6, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
        self.gen = torch.Generator().manual_seed(100 + seed)
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, k: int):
        idx = torch.randperm(len(self.x), generator=self.gen)[:k]
        self.drawn.append((self.x[idx], self.y[idx]))
        return self.drawn[-1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ELU(), nn.Linear(8, 3))


def authors_round(model: nn.Module, w: dict, s0, spt, qry, beta: float) -> dict:
    """``federated/train.py``'s loop for one task (their lines, with ``model.parameters()`` as the weights)."""
    model = copy.deepcopy(model)
    model.load_state_dict(w)
    grads = torch.autograd.grad(F.cross_entropy(model(s0[0]), s0[1]), model.parameters())
    u_weights = [p.data - ALPHA * g.data for p, g in zip(model.parameters(), grads)]
    for _ in range(H):
        grads = torch.autograd.grad(F.cross_entropy(model(spt[0]), spt[1]), model.parameters())
        fast_weights = [p.data - ALPHA * g.data for p, g in zip(model.parameters(), grads)]
        u_weights = [u * (1 - beta) + beta * fw for u, fw in zip(u_weights, fast_weights)]
        w_copy = copy.deepcopy(model.state_dict())
        for p, u in zip(model.parameters(), u_weights):
            p.data = u.data
        grads_q = torch.autograd.grad(F.cross_entropy(model(qry[0]), qry[1]), model.parameters())
        for name, p in model.named_parameters():
            p.data = w_copy[name].data
        for p, g in zip(model.parameters(), grads_q):
            p.data = p.data - ETA * g.data
    return {k: v.detach() for k, v in model.state_dict().items()}


AUTHORS = dict(inner_lr=ALPHA, local_steps=H, batch_size=K_SPT, outer_batch_size=K_QRY, batch_draws="per-round",
               meta_gradient="first_order")


def test_their_local_moml_round_is_fedmeta_s_under_their_settings(model):
    f, w = meta.make_loss(model, F.cross_entropy), meta.params_of(model)
    hp = LocalMOMLConfig(lr=ETA, momentum=0.7, init_batch_size=K_SPT, memory_policy="reset", **AUTHORS)
    sample = Recording(0)
    r = local_round("local-moml", f, w, sample, hp, step_impl="func")
    s0, spt, _hessian, qry = sample.drawn  # S0, then one draw: S1 (support), S2 (unused, first order), S3 (query)
    assert (len(s0[0]), len(spt[0]), len(qry[0])) == (K_SPT, K_SPT, K_QRY)
    assert r.stats.num_samples == sum(len(b[0]) for b in sample.drawn) == 3 * K_SPT + K_QRY
    expected = authors_round(model, w, s0, spt, qry, beta=0.7)
    for k in w:
        torch.testing.assert_close(r.meta_model[k], expected[k], rtol=1e-6, atol=1e-7)
    fast = local_round("local-moml", f, w, Recording(0), hp, step_impl="fast")  # the plain-autograd path too
    for k in w:
        torch.testing.assert_close(fast.meta_model[k], expected[k], rtol=1e-6, atol=1e-7)


def test_their_per_fedavg_is_their_loop_with_beta_one_and_fedmeta_s_per_fedavg(model):
    f, w = meta.make_loss(model, F.cross_entropy), meta.params_of(model)
    sample = Recording(1)
    r = local_round("per-fedavg", f, w, sample, PerFedAvgConfig(meta_lr=ETA, **AUTHORS))
    spt, qry, _hessian = sample.drawn
    assert r.stats.num_samples == 2 * K_SPT + K_QRY
    expected = authors_round(model, w, (torch.zeros(1, 6), torch.zeros(1, dtype=torch.long)), spt, qry, beta=1.0)
    for k in w:
        torch.testing.assert_close(r.meta_model[k], expected[k], rtol=1e-6, atol=1e-7)


def test_per_round_draws_run_vmapped_as_one_by_one(model):
    f, w = meta.make_loss(model, F.cross_entropy), meta.params_of(model)
    hp = LocalMOMLConfig(lr=ETA, momentum=0.7, memory_policy="reset", **AUTHORS)
    one = [local_round("local-moml", f, w, Recording(c), hp) for c in range(3)]
    many = local_rounds("local-moml", f, w, [Recording(c) for c in range(3)], [torch.Generator() for _ in range(3)], hp,
                        vectorize="vmap")
    for i, r in enumerate(one):
        for k in w:
            torch.testing.assert_close(many.meta_models[k][i], r.meta_model[k], rtol=1e-5, atol=1e-6)
    # per-step draws are another round: the setting is not ignored
    other = local_round("local-moml", f, w, Recording(0), hp.replace(batch_draws="per-step"))
    assert not torch.equal(other.meta_model["0.weight"], one[0].meta_model["0.weight"])


@pytest.mark.parametrize("strategy, keys", [(LocalMOML, {"inner-lr": 0.01, "lr": 0.05}), (PerFedAvg, {"inner-lr": 0.01, "meta-lr": 0.05})])
def test_the_step_sizes_decay_at_their_fractions_of_the_rounds(strategy, keys):
    eta = {"lr": 0.05} if strategy is LocalMOML else {"meta_lr": 0.05}
    s = strategy(num_clients=8, clients_per_round=2, inner_lr=0.01, lr_decay_at=(0.5, 0.75), lr_decay=0.1, **eta)
    s.num_rounds = 100  # as Strategy.start sets it
    from flwr.app import ConfigRecord

    def sent(r):
        cfg = s.train_config(r, ConfigRecord({}))
        return {k: cfg[k] for k in keys}

    # their loop: the step sizes are divided at steps int(0.5 T) and int(0.75 T); round r is their step r - 1
    assert sent(1) == sent(50) == keys
    assert sent(51) == pytest.approx({k: v / 10 for k, v in keys.items()}) == sent(75)
    assert sent(76) == pytest.approx({k: v / 100 for k, v in keys.items()}) == sent(100)
    assert s.hparams.inner_lr == 0.01 and s.fingerprint()["lr_decay_at"] == [0.5, 0.75]


def test_the_evaluation_fine_tunes_at_its_own_step_size():
    s = LocalMOML(num_clients=8, inner_lr=0.01, eval_lr=0.001, eval_steps=10, eval_shots=5)
    assert s.eval_config.to_wire() == {"inner-lr": 0.001, "eval-steps": 10, "eval-shots": 5}
    assert LocalMOML(num_clients=8, inner_lr=0.01).eval_config.inner_lr == 0.01


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr_decay_at=(0.75, 0.5)), "lr_decay_at"), (dict(lr_decay_at=(1.0,)), "lr_decay_at"),
    (dict(lr_decay=0.0), "lr_decay"), (dict(lr_decay=1.5), "lr_decay"), (dict(eval_lr=-1.0), "inner_lr"),
    (dict(outer_batch_size=-1), "outer_batch_size"), (dict(batch_draws="per-epoch"), "batch_draws"),
])
def test_bad_settings_fail_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LocalMOML(num_clients=8, **kwargs)
