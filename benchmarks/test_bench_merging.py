"""pytest-benchmark suite for the fused merges: pykernels vs reference vs peers vs the bandwidth floor, on
the same inputs in one run (group = method/dtype, so the report puts them side by side). "floor" is one
torch.add (2 reads + 1 write): the bandwidth floor of a fused merge is its time x (N+2)/3.

    pytest benchmarks/test_bench_merging.py --benchmark-group-by=group
"""
import pytest
import torch

from pykernels.benchmarking import MERGE_METHODS, Workload, implementations, make_inputs

IMPLS = ["floor", "floor_fresh_output", "chained_add", "pykernels", "reference", "mergekit", "peft"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merge(benchmark, shape, method, dtype, impl):
    w = Workload(method, dtype, shape)
    impls = implementations(w)
    if impl not in impls:
        pytest.skip(f"{impl} not installed or has no {method}")
    base, tensors = make_inputs(w)
    benchmark.group = f"{method}-{dtype}"
    slow = impl in ("reference", "mergekit", "peft") and shape[0] * shape[1] > 1 << 20
    out = benchmark.pedantic(impls[impl], args=(base, tensors), rounds=1 if slow else 5, warmup_rounds=1)
    assert out.shape == base.shape and bool(torch.isfinite(out).all())
