"""How far the Hessian-free (finite-difference) meta-gradient is from the exact one, by delta.

Per-FedAvg's HF variant (per-fedavg.txt eqs. 118-119) replaces each Hessian-vector product by a
central difference of gradients. On a smooth network its error falls as ``delta^2`` until
round-off; on ReLU networks the two perturbed points can sit on different sides of a kink and
the difference is then far from ``H v``. This script measures the relative error
``||G_hf - G_exact|| / ||G_exact||`` of the whole N-step meta-gradient for a grid of delta, on
the papers' MLP shapes with tanh/ELU and ReLU activations, in float64 and float32, with random
inputs (no dataset needed). Accuracy, not speed: the numbers are deterministic for a seed.

Usage::

    .venv/bin/python bench/fd_accuracy.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from fedmeta import meta
from fedmeta.meta import MetaBatches

DELTAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def _mlp(sizes: tuple[int, ...], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


MODELS = {
    "784-40-40-10 ReLU": ((784, 40, 40, 10), nn.ReLU, "ce"),
    "784-40-40-10 tanh": ((784, 40, 40, 10), nn.Tanh, "ce"),
    "784-80-60-10 ELU": ((784, 80, 60, 10), nn.ELU, "ce"),
    "1-40-40-1 ReLU (sine)": ((1, 40, 40, 1), nn.ReLU, "mse"),
    "1-40-40-1 tanh (sine)": ((1, 40, 40, 1), nn.Tanh, "mse"),
}


def relative_errors(name: str, dtype: torch.dtype, n: int, seed: int, k: int = 10, alpha: float = 0.01) -> list[float]:
    sizes, act, loss = MODELS[name]
    with torch.random.fork_rng():  # nn.Linear initialises from the global RNG; leave it as it was
        torch.manual_seed(seed)
        model = _mlp(sizes, act).to(dtype)
    gen = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.rand(k, sizes[0], generator=gen, dtype=dtype) * (10 if loss == "mse" else 1) - (5 if loss == "mse" else 0)
        y = torch.sin(x) if loss == "mse" else torch.randint(0, sizes[-1], (k,), generator=gen)
        return x, y

    criterion = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    f = meta.make_loss(model, criterion)
    w = meta.params_of(model)
    b = MetaBatches(inner=tuple(batch() for _ in range(n)), outer=batch(), hessian=tuple(batch() for _ in range(n)))
    exact, _ = meta.maml_gradient(f, w, b, alpha, meta.meta_gradient("exact"))
    norm = sum(float((v.double() ** 2).sum()) for v in exact.values()) ** 0.5
    out = []
    for delta in DELTAS:
        fd, _ = meta.maml_gradient(f, w, b, alpha, meta.meta_gradient("hessian_free", delta=delta))
        err = sum(float(((fd[key] - exact[key]).double() ** 2).sum()) for key in w) ** 0.5
        out.append(err / norm)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="median over this many seeds (default 5)")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    print(f"relative error ||G_hf - G_exact|| / ||G_exact||, alpha=0.01, K=10, median over {args.seeds} seeds (max in brackets)\n")
    print("| model | dtype | N | " + " | ".join(f"delta={d:g}" for d in DELTAS) + " |")
    print("|---|---|---|" + "---|" * len(DELTAS))
    for name in MODELS:
        for dtype in (torch.float64, torch.float32):
            for n in args.inner_steps:
                runs = [relative_errors(name, dtype, n, s) for s in range(args.seeds)]
                cells = [f"{statistics.median(col):.1e} [{max(col):.0e}]" for col in zip(*runs)]
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
