"""pytest-benchmark suite for the order statistics: kth_largest / quantile beside torch.kthvalue,
torch.quantile (where it runs) and one read pass over the data; per-row rank beside argsort(argsort()).

    pytest benchmarks/test_bench_selection.py --benchmark-group-by=group
"""
import os

import pytest
import torch

from pykernels.benchmarking import (RANK_SHAPES, SELECTION_SIZES, rank_implementations,
                                    selection_implementations)

SIZE = os.environ.get("PYKERNELS_BENCH_SIZE", "default")


@pytest.mark.parametrize("impl", ["read_floor", "kth_largest", "quantile", "torch.kthvalue", "torch.quantile"])
@pytest.mark.parametrize("n", SELECTION_SIZES[SIZE])
def test_select(benchmark, n, impl):
    impls = selection_implementations(n)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {n} elements")
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"select-{n}"
    slow = impl.startswith("torch") and n > 10**7
    out = benchmark.pedantic(impls[impl], args=(x,), rounds=1 if slow else 5, warmup_rounds=1)
    assert out is not None


@pytest.mark.parametrize("impl", ["read_floor", "rank", "argsort(argsort)"])
def test_rank(benchmark, impl):
    x = torch.randn(RANK_SHAPES[SIZE], generator=torch.Generator().manual_seed(0))
    benchmark.group = "rank"
    out = benchmark.pedantic(rank_implementations()[impl], args=(x,), rounds=3, warmup_rounds=1)
    assert out.shape == () or out.shape == x.shape
