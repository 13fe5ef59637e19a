"""Models: shapes, no buffers, and exact second-order meta-gradients through the CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeta import meta
from fedmeta.models import MODELS, build_model

SIZES = [
    ("mlp-40-40", (1, 28, 28), 10, 784 * 40 + 40 + 40 * 40 + 40 + 40 * 10 + 10),
    ("mlp-100", (1, 28, 28), 10, 784 * 100 + 100 + 100 * 10 + 10),
    ("mlp-100", (3, 32, 32), 20, 3072 * 100 + 100 + 100 * 20 + 20),
    ("mlp-80-60-elu", (1, 28, 28), 10, 784 * 80 + 80 + 80 * 60 + 60 + 60 * 10 + 10),
    ("sine-mlp", (1,), 1, 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1),
    ("mlp-40-40", (3, 32, 32), 20, 3072 * 40 + 40 + 40 * 40 + 40 + 40 * 20 + 20),
    ("moml-mlp-40-40", (1, 28, 28), 10, 784 * 40 + 40 * 40 + 40 * 10),
    ("cnn", (3, 32, 32), 10, None),
]


@pytest.mark.parametrize("name, shape, classes, params", SIZES)
def test_models_have_the_papers_sizes_and_no_buffers(name, shape, classes, params):
    model = build_model(name, shape, classes)
    assert model(torch.zeros(2, *shape)).shape == (2, classes)
    assert not list(model.buffers())
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    assert set(MODELS) >= {name}


def test_every_model_is_tested():
    assert set(MODELS) == {name for name, *_ in SIZES}


def test_moml_mlp_is_the_localmoml_authors_network():
    """GitHub bokun-wang/moml, federated/models.py: Linear without bias, ELU, Xavier-normal weights (their _weights_init)."""
    torch.manual_seed(0)
    model = build_model("moml-mlp-40-40")
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ELU, nn.Linear, nn.ELU, nn.Linear]
    assert all(m.bias is None for m in model if isinstance(m, nn.Linear))
    torch.manual_seed(0)
    theirs = [nn.Linear(784, 40, bias=False), nn.Linear(40, 40, bias=False), nn.Linear(40, 10, bias=False)]
    for layer in theirs:  # nn.Module.apply(_weights_init) visits the layers in order after constructing them all
        nn.init.xavier_normal_(layer.weight)
    for m, t in zip([m for m in model if isinstance(m, nn.Linear)], theirs):
        torch.testing.assert_close(m.weight, t.weight, rtol=0, atol=0)


def test_mlp_100_is_pfllib_dnn_layout():
    model = build_model("mlp-100")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 10)]
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet")


def test_cnn_exact_meta_gradient_matches_plain_autograd_unrolling():
    torch.manual_seed(0)
    model = build_model("cnn", (3, 8, 8), 4).double()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g)

    d, d1, d2 = batch(), batch(), batch()
    w = meta.params_of(model)
    # With D'' = D the exact Per-FedAvg direction is the plain MAML gradient of f(w - alpha grad f(w; D); D').
    got = meta.per_fedavg_step(f, w, meta.MetaBatches(inner=(d,), outer=d1, hessian=(d,)), 0.1, 1.0, meta.ExactHessian())
    leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    inner = torch.autograd.grad(f(leaves, *d), list(leaves.values()), create_graph=True)
    fast = {k: v - 0.1 * gi for (k, v), gi in zip(leaves.items(), inner)}
    outer = torch.autograd.grad(f(fast, *d1), list(leaves.values()))
    for (k, v), go in zip(w.items(), outer):
        torch.testing.assert_close(got[k], v - go, atol=1e-10, rtol=1e-8)
    first_order = meta.per_fedavg_step(f, w, meta.MetaBatches(inner=(d,), outer=d1, hessian=(d2,)), 0.1, 1.0, meta.FirstOrder())
    assert max(float((got[k] - first_order[k]).abs().max()) for k in w) > 1e-6
