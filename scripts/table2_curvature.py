"""Why localmoml Table 2's setting diverges here: train one centralized run, then print the final
meta-model's test loss after 0..10 adaptation steps on unseen tasks and alpha * lambda_max(H) of the
loss on three support batches (docs/results.md, section localmoml-table2).

    python scripts/table2_curvature.py --k 5 --algorithm maml --optimizer adam --lr 0.001 --iterations 2500
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedmeta import meta
from fedmeta.centralized import train
from fedmeta.tasks import TASKS, FewShotSet
from fedmeta.simulations import reproduce_table2 as t2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--algorithm", default="maml", choices=["maml", "moml"])
    p.add_argument("--protocol", default="paper", choices=sorted(t2.PROTOCOLS))
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--meta-gradient", default="exact")
    p.add_argument("--iterations", type=int, default=4000)
    args = p.parse_args()
    torch.set_num_threads(1)
    label = {alg: label for label, alg in t2.ALGORITHMS.items()}[args.algorithm]
    cfg = t2.config(t2.PROTOCOLS[args.protocol], args.k, label, t2.BUDGETS["full"], args.lr)
    cfg = cfg.replace(outer_optimizer=args.optimizer, meta_gradient=args.meta_gradient, iterations=args.iterations,
                      eval_every=max(1, args.iterations // 4), eval_tasks=100, eval_seed=t2.VALIDATION_SEED, eval_protocol="few-shot")
    run = train(cfg)
    print(f"test error every {cfg.eval_every} iterations: {[round(x, 3) for x in run.meta_loss]} (diverged at {run.diverged_at})")
    f, w = TASKS[cfg.task].loss, run.params
    tasks = FewShotSet.draw(20, torch.Generator().manual_seed(5))
    losses = []
    for t in range(20):
        support, (tx, ty) = (tasks.support[0][t], tasks.support[1][t]), (tasks.test[0][t], tasks.test[1][t])
        v, row = w, [float(f(w, tx, ty))]
        for _ in range(10):
            v = meta.adapt(f, v, support, 0.01)
            row.append(float(f(v, tx, ty)))
        losses.append(row)
    losses = np.array(losses)
    print("test loss after 0..10 steps, median over 20 tasks:", np.round(np.median(losses, 0), 3))
    print("                                mean:", np.round(losses.mean(0), 2))
    names = list(w)
    flat = torch.cat([w[n].reshape(-1) for n in names])

    def unflat(z: torch.Tensor) -> meta.Params:
        out, o = {}, 0
        for n in names:
            out[n] = z[o:o + w[n].numel()].reshape(w[n].shape)
            o += w[n].numel()
        return out

    for t in range(3):
        sx, sy = tasks.support[0][t], tasks.support[1][t]
        eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda z: f(unflat(z), sx, sy), flat))
        print(f"support batch {t}: lambda_max(H) = {float(eig[-1]):.1f}, alpha * lambda_max = {0.01 * float(eig[-1]):.2f}")


if __name__ == "__main__":
    main()
