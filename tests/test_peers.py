"""The reference against mergekit's and peft's own functions on continuous data (no ties).

DARE draws its mask from torch.bernoulli in both peers; the tests substitute our counter-based masks for
those draws, so the comparison checks everything except which elements the generator drops.
"""
from __future__ import annotations

import pytest
import torch

import pykernels as pk
from conftest import make_models
from pykernels.reference.merging import random_keep

WEIGHTS = [0.5, 0.3, 0.7]
DENSITIES = [0.5, 0.4, 0.3]


class BernoulliFromOurStream:
    """Stands in for torch.bernoulli: returns model m's counter-based mask on its m-th call."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, probs, *args, **kwargs):
        p = float(probs.reshape(-1)[0])
        mask = random_keep(probs.numel(), p, self.seed, self.calls).reshape(probs.shape)
        self.calls += 1
        return mask.to(probs.dtype)


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
