"""The algorithm-units refactor (issue 14) changed how local rounds are executed, not what they compute.

``tests/golden/rounds-v1.pt`` holds the final arrays of small local rounds computed by the code
*before* that refactor (committed in ec4a692, ``MetaClient.train`` / ``ClientGroup.train``, CPU,
float32, sinewave tasks). On the CPUs the suite ran on until 2026-12-04 the per-client (loop) path
reproduces them bit for bit. Float32 results are bit-for-bit only on one kind of CPU: on an AMD EPYC
with AVX-512 (torch's CPU capability AVX512, MKL), 41 of the 74 loop arrays differ from them by at most
4.2e-7 (a few ulps), also with ATEN_CPU_CAPABILITY=avx2 and MKL_CBWR=AVX2. So the loop path must equal
them bit for bit or, on a CPU whose kernels round differently, to rtol 1e-5 / atol 1e-6 (a changed
batch or step moves them by about 1e-3), and must be bit-identical when computed twice; the vmapped
multi-client path must equal them to the tolerances of tests/test_batched.py. Regenerate only for an
intended change of the math: ``python tests/test_golden_rounds.py --write``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedmeta.clients.client import ClientGroup, MetaClient, round_generator
from fedmeta.config import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig
from fedmeta.data import sinewave_task
from fedmeta.models import sine_mlp

GOLDEN = Path(__file__).parent / "golden" / "rounds-v1.pt"
NUM_TASKS, SEED = 6, 11

CASES = {
    "fedavg": FedAvgConfig(lr=0.01, local_steps=3, batch_size=5),
    "per-fedavg-exact": PerFedAvgConfig(inner_lr=0.01, meta_lr=0.005, local_steps=3, batch_size=5),
    "per-fedavg-n2-first-order": PerFedAvgConfig(inner_lr=0.01, meta_lr=0.005, local_steps=2, inner_steps=2, meta_gradient="first_order"),
    "per-fedavg-hessian-free": PerFedAvgConfig(inner_lr=0.01, meta_lr=0.005, local_steps=2, meta_gradient="hessian_free", delta=1e-3),
    "per-fedavg-ggs": PerFedAvgConfig(inner_lr=0.01, meta_lr=0.005, local_steps=2, meta_gradient="ggs", num_directions=3, delta=1e-3),
    "local-moml-keep": LocalMOMLConfig(inner_lr=0.01, lr=0.005, momentum=0.5, local_steps=3, memory_policy="keep"),
    "local-moml-reset-n2": LocalMOMLConfig(inner_lr=0.01, lr=0.005, momentum=0.7, local_steps=2, inner_steps=2, init_batch_size=4,
                                           memory_policy="reset"),
    "local-moml-fo-muml": LocalMOMLConfig(inner_lr=0.01, lr=0.005, momentum=0.5, local_steps=2, inner_steps=2, meta_gradient="fo_muml",
                                          memory_policy="keep"),
}


def _model():
    torch.manual_seed(SEED)
    return sine_mlp()


def _data(c: int):
    return sinewave_task(c, NUM_TASKS, SEED)


def compute() -> dict[str, torch.Tensor]:
    """Every case: one client's round (loop path), twice for a kept memory; and the group's round (vmap path)."""
    model = _model()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for name, hp in CASES.items():
        client = MetaClient(model, torch.nn.functional.mse_loss, _data(1), torch.device("cpu"))
        first = client.train(w0, hp, None, round_generator(SEED, 1, 1, 0))
        u = first.personalized_model if getattr(hp, "memory_policy", "") == "keep" else None
        second = client.train(first.meta_model, hp, u, round_generator(SEED, 1, 2, 0))
        for k, v in second.meta_model.items():
            out[f"{name}/loop/w/{k}"] = v.clone()
        for k, v in (second.personalized_model or {}).items():
            out[f"{name}/loop/u/{k}"] = v.clone()
        out[f"{name}/loop/loss"] = torch.tensor(second.stats.last_loss, dtype=torch.float64)
        group = ClientGroup(model, torch.nn.functional.mse_loss, _data, torch.device("cpu"), chunk_size=2)
        ids = [0, 2, 3]
        res = group.train(w0, hp, ids, SEED, 1)
        for k, v in res.meta_models.items():
            out[f"{name}/group/w/{k}"] = v.clone()
        for k, v in (res.personalized_models or {}).items():
            out[f"{name}/group/u/{k}"] = v.clone()
    return out


def test_loop_rounds_equal_the_pre_refactor_arrays_bit_for_bit_and_vmap_to_round_off():
    golden = torch.load(GOLDEN, weights_only=True)
    now = compute()
    assert sorted(now) == sorted(golden)
    loop = [k for k in golden if "/loop/" in k]
    again = compute()
    assert [k for k in now if not torch.equal(now[k], again[k])] == []  # deterministic on this machine
    unequal = [k for k in loop if not torch.equal(now[k], golden[k])]
    for k in unequal:  # a CPU whose kernels round differently from the one that wrote the file: round-off only
        torch.testing.assert_close(now[k], golden[k], rtol=1e-5, atol=1e-6, msg=f"loop path differs from the pre-refactor code in {k}")
    for k in (k for k in golden if "/group/" in k):
        torch.testing.assert_close(now[k], golden[k], rtol=1e-5, atol=2e-6, msg=k)


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(compute(), GOLDEN)
    print(f"wrote {GOLDEN}")
