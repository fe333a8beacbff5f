"""The reference against mergekit's and peft's own functions on continuous data (no ties).

DARE draws its mask from torch.bernoulli in both peers; the tests substitute our counter-based masks for
those draws, so the comparison checks everything except which elements the generator drops.
"""
from __future__ import annotations

import pytest
import torch

import pykernels as pk
from conftest import BernoulliFromOurStream, backend_params, make_models

WEIGHTS = [0.5, 0.3, 0.7]
DENSITIES = [0.5, 0.4, 0.3]


@pytest.fixture
def merge_tensors():
    api = pytest.importorskip("mergekit.merge_methods.api")
    return api.merge_tensors


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "lambda": 0.7}], ids=["defaults", "normalize"])
def test_reference_equals_mergekit(merge_tensors, monkeypatch, method, extra):
    base, tensors = make_models((64, 37), 3, torch.float32, seed=1)
    monkeypatch.setattr(torch, "bernoulli", BernoulliFromOurStream(seed=11))
    params = {"weight": WEIGHTS, **extra}
    ours = {"weights": WEIGHTS, "seed": 11}
    if "normalize" in extra:
        ours.update(normalize=True, lambda_=extra["lambda"])
    if method in ("ties", "dare_ties", "dare_linear"):
        params["density"], ours["densities"] = DENSITIES, DENSITIES
        ours["k_rule"] = "at_least_one"
    if method == "linear":
        if extra:
            pytest.skip("linear has no lambda")
        expected = merge_tensors(tensors, "linear", parameters=params)
        got = pk.merge(None, tensors, "linear", backend="reference", **ours)
    else:
        expected = merge_tensors([base] + tensors, method, parameters=params, base_index=0)
        got = pk.merge(base, tensors, method, backend="reference", **ours)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


GAMMAS = [0.05, 0.2, 0.01]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "lambda": 0.7}, {"rescale": True}],
                         ids=["defaults", "normalize", "rescale"])
def test_breadcrumbs_equals_mergekit(merge_tensors, method, extra, backend):
    base, tensors = make_models((64, 37), 3, torch.float32, seed=3)
    params = {"weight": WEIGHTS, "density": DENSITIES, "gamma": GAMMAS, **extra}
    ours = {"weights": WEIGHTS, "densities": DENSITIES, "gammas": GAMMAS, "k_rule": "floor"}
    if "normalize" in extra:
        ours.update(normalize=True, lambda_=extra["lambda"])
    if "rescale" in extra:
        ours.update(rescale=True)
    expected = merge_tensors([base] + tensors, method, parameters=params, base_index=0)
    got = pk.merge(base, tensors, method, backend=backend, **ours)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_breadcrumbs_mergekit_default_gamma(merge_tensors):
    """Without gamma both tools use 0.01; without density both keep everything."""
    base, tensors = make_models((50, 41), 2, torch.float32, seed=4)
    for params, ours in [({"weight": [1.0, 0.5], "density": [0.4, 0.7]}, {"densities": [0.4, 0.7]}),
                         ({"weight": [1.0, 0.5]}, {})]:
        expected = merge_tensors([base] + tensors, "breadcrumbs_ties", parameters=params, base_index=0)
        got = pk.merge(base, tensors, "breadcrumbs_ties", weights=[1.0, 0.5], k_rule="floor", backend="reference",
                       **ours)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", [(64, 37), (1000,), (3,)])
def test_magnitude_outliers_equals_mergekit(rescale, shape):
    sparsify_mod = pytest.importorskip("mergekit.sparsify")
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(shape, generator=g)
    norm = sparsify_mod.RescaleNorm.l1 if rescale else None
    for density, gamma in [(0.1, 0.01), (0.3, 0.05), (0.5, 0.0), (0.8, 0.3), (0.4, 0.9), (1.0, 0.1), (0.0, 0.2),
                           (0.99, 0.01)]:
        expected = sparsify_mod.magnitude_outliers(delta, density, rescale_norm=norm, gamma=gamma)
        got = pk.sparsify(delta, "magnitude_outliers", density, gamma=gamma, rescale=rescale, k_rule="floor",
                          backend="reference")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6, msg=f"density {density}, gamma {gamma}")


@pytest.fixture
def peft_merge():
    return pytest.importorskip("peft.utils.merge_utils")


def peft_preset(method):
    presets = {
        "task_arithmetic": dict(method="task_arithmetic"),
        "magnitude_prune": dict(method="ties", consensus="none", normalize=False),
        "ties": dict(method="ties"),
        "dare_linear": dict(method="dare_linear", rescale="inverse"),
        "dare_ties": dict(method="dare_ties", rescale="inverse", normalize=True),
    }[method]
    return dict(presets, sign_source="unweighted", divisor="count", k_rule="floor")


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_reference_equals_peft(peft_merge, monkeypatch, method):
    _, deltas = make_models((64, 37), 3, torch.float32, seed=2, scale=1.0)
    weights = torch.tensor(WEIGHTS)
    density = 0.35
    monkeypatch.setattr(torch, "bernoulli", BernoulliFromOurStream(seed=5))
    fn = getattr(peft_merge, method)
    expected = fn(deltas, weights) if method == "task_arithmetic" else fn(deltas, weights, density)
    args = peft_preset(method)
    name = args.pop("method")
    kwargs = {} if name == "task_arithmetic" else dict(densities=density, seed=5)
    got = pk.merge(None, deltas, name, weights=WEIGHTS, backend="reference", **args, **kwargs)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_sce_equals_mergekit(merge_tensors, backend, density):
    base, tensors = make_models((48, 29), 3, torch.float32, seed=6)
    expected = merge_tensors([base] + tensors, "sce", parameters={"select_topk": density}, base_index=0)
    got = pk.sce(base, tensors, density=density, backend=backend)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


class DellaBernoulli:
    """Stands in for torch.bernoulli inside mergekit's della_magprune: our keep rule from its probabilities."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, probs, *args, **kwargs):
        from pykernels.reference.merging import model_seed, philox_uniform

        u = philox_uniform(model_seed(self.seed, self.calls), torch.arange(probs.numel())).reshape(probs.shape)
        self.calls += 1
        return (u < probs.float()).to(probs.dtype)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equals_mergekit(merge_tensors, monkeypatch, method):
    base, tensors = make_models((40, 33), 3, torch.float32, seed=8)
    monkeypatch.setattr(torch, "bernoulli", DellaBernoulli(seed=4))
    params = {"weight": WEIGHTS, "density": DENSITIES, "epsilon": [0.1, 0.2, 0.05]}
    expected = merge_tensors([base] + tensors, method, parameters=params, base_index=0)
    got = pk.merge(base, tensors, method, weights=WEIGHTS, densities=DENSITIES, epsilons=[0.1, 0.2, 0.05], seed=4,
                   backend="reference")
    # mergekit computes p from float32 ranks, ours as lo + step*(r - 1): equal here (a last-bit difference could
    # flip a keep decision only if a uniform fell exactly between the two).
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)
