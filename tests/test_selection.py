"""The merge engine's radix-select primitive: exact magnitude top-k thresholds equal sorting, on every backend."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pykernels as pk
from conftest import backend_params
from pykernels.reference.selection import KEEP_NONE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sorted_kth_magnitude(x: torch.Tensor, k: int) -> float:
    """The k-th largest |x| by a full sort (the oracle)."""
    return torch.sort(x.float().abs().reshape(-1), descending=True).values[k - 1].item()


@st.composite
def tensors_and_k(draw):
    numel = draw(st.integers(1, 3000))
    dtype = draw(st.sampled_from(DTYPES))
    distinct = draw(st.sampled_from([3, 50, None]))  # few levels -> many ties
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if distinct is None:
        x = torch.randn(numel, generator=g)
    else:
        x = torch.randint(-distinct, distinct + 1, (numel,), generator=g).float() / 7
    k = draw(st.integers(0, numel))
    return x.to(dtype), k


def check_threshold(x, k, backend):
    (key, cutoff), = pk.delta_topk_thresholds(None, [x], [k], backend=backend).tolist()
    mask = pk.topk_mask(x, k, backend=backend)
    assert int(mask.sum()) == k
    if k == 0:
        assert (key, cutoff) == (KEEP_NONE, -1)
        return
    kth = sorted_kth_magnitude(x, k)
    threshold = torch.tensor([key], dtype=torch.int32).view(torch.float32).item()
    assert threshold == kth
    mags = x.float().abs().reshape(-1)
    assert bool((mags[mask.reshape(-1)] >= kth).all()) and bool((mags[~mask.reshape(-1)] <= kth).all())
    tied = (mags == kth).nonzero().reshape(-1)
    kept_ties = int((mask.reshape(-1) & (mags == kth)).sum())
    assert cutoff == int(tied[kept_ties - 1])  # ties are kept in ascending index order


@pytest.mark.parametrize("backend", backend_params())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tensors_and_k())
def test_kth_equals_sorted(backend, case):
    x, k = case
    check_threshold(x, k, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(backend, dtype):
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 2.0, 1e-40, -1e-40, 0.5]).to(dtype)
    for k in range(x.numel() + 1):
        check_threshold(x, k, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_ranks_above_inf(backend):
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("nan"), 3.0])
    mask = pk.topk_mask(x, 2, nan="largest", backend=backend)
    assert mask.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="contains NaN"):
        pk.topk_mask(x, 2, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_many_models_one_pass(backend):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(501, generator=g)
    tensors = [base + torch.randn(501, generator=g) * (i + 1) for i in range(9)]
    ks = [0, 1, 17, 250, 500, 501, 3, 99, 400]
    got = pk.delta_topk_thresholds(base, tensors, ks, backend=backend)
    assert torch.equal(got, pk.delta_topk_thresholds(base, tensors, ks, backend="reference"))


def test_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"ks\[0\] must lie in \[0, 4\]"):
        pk.delta_topk_thresholds(None, [torch.ones(4)], [5])
