"""pytest-benchmark suite for MoE routing: topk_route and align_block_size + permute (cpp) beside the plain
PyTorch versions (softmax -> topk -> renormalize; stable argsort -> counts -> padding -> gather).

    pytest benchmarks/test_bench_moe.py --benchmark-group-by=group
"""
import os

import pytest
import torch

import pykernels as pk
from pykernels.benchmarking import (DEEPSEEK_V3, MOE_CASES, MOE_HIDDEN, MOE_TOKENS, moe_implementations,
                                    torch_align_permute)

SIZE = os.environ.get("PYKERNELS_BENCH_SIZE", "default")


def _inputs(tokens, experts):
    g = torch.Generator().manual_seed(tokens + experts)
    return (torch.randn(tokens, experts, generator=g), 0.1 * torch.randn(experts, generator=g),
            torch.randn(tokens, MOE_HIDDEN, generator=g).to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["route torch", "route cpp"])
@pytest.mark.parametrize("experts,k,grouped", [(e, k, False) for e, k in MOE_CASES] +
                         [(DEEPSEEK_V3["experts"], DEEPSEEK_V3["k"], True)])
@pytest.mark.parametrize("tokens", MOE_TOKENS[SIZE])
def test_route(benchmark, tokens, experts, k, grouped, impl):
    logits, bias, x = _inputs(tokens, experts)
    benchmark.group = f"route-{tokens}-{experts}-{k}{'-grouped' if grouped else ''}"
    weights, ids = benchmark(moe_implementations(experts, k, grouped)[impl], logits, bias, x)
    assert ids.shape == (tokens, k)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("experts,k", MOE_CASES)
@pytest.mark.parametrize("tokens", MOE_TOKENS[SIZE])
def test_align_permute(benchmark, tokens, experts, k, impl):
    logits, _, x = _inputs(tokens, experts)
    _, ids = pk.topk_route(logits, k, backend="reference" if tokens < 1024 else None)
    benchmark.group = f"align-permute-{tokens}-{experts}-{k}"
    if impl == "torch":
        out = benchmark(torch_align_permute, x, ids, experts, 64)
    else:
        out = benchmark(lambda: (pk.align_block_size(ids, experts, 64), pk.permute(x, ids, experts)))
    assert out is not None
