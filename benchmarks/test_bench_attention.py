"""pytest-benchmark suite for PBS-Attn: pbs_attention (cpp, plan included) beside dense causal SDPA and the
reference, on structured long-context inputs (pykernels.benchmarking.topic_qkv) and random ones.

    pytest benchmarks/test_bench_attention.py --benchmark-group-by=group
"""
import os

import pytest
import torch

from pykernels.benchmarking import ATTENTION_SIZES, attention_implementations, random_qkv, topic_qkv

SIZE = os.environ.get("PYKERNELS_BENCH_SIZE", "default")


@pytest.mark.parametrize("impl", ["sdpa", "cpp", "reference"])
@pytest.mark.parametrize("threshold", [0.9, 1.0])
@pytest.mark.parametrize("inputs", ["topics", "random"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", ATTENTION_SIZES[SIZE])
def test_attention(benchmark, n, dtype, inputs, threshold, impl):
    if impl == "reference" and n > 8192:
        pytest.skip("the reference takes minutes beyond 8192 tokens")
    q, k, v = (topic_qkv if inputs == "topics" else random_qkv)(n, getattr(torch, dtype))
    benchmark.group = f"attention-{n}-{dtype}-{inputs}-{threshold}"
    fn = attention_implementations(threshold)[impl]
    out = benchmark.pedantic(fn, args=(q, k, v), rounds=1 if impl == "reference" else 3, warmup_rounds=1)
    assert out.shape == q.shape and torch.isfinite(out).all()
