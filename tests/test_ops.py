"""The merge primitives are real PyTorch operators: opcheck and torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import pykernels as pk
from conftest import backend_params, make_models
from pykernels import _ops


def primitive_calls(backend):
    ops = _ops.primitives(backend)
    base, tensors = make_models((37, 5), 3, [torch.float32, torch.bfloat16, torch.float16, torch.float32])
    ks = [20, 0, 185]
    thresholds = pk.delta_topk_thresholds(base, tensors, ks, backend="reference")
    scales = torch.tensor([1.0, 2.0, 0.5])
    merge_args = (base, tensors, 1, thresholds, [0.5, 0.5, 0.5], 3, scales, [0.3, 0.3, 0.4], 0, 1, 0, True, 0.9,
                  torch.bfloat16)
    return [
        (ops.delta_topk_thresholds, (base, tensors, ks)),
        (ops.delta_topk_thresholds, (None, tensors, ks)),
        (ops.delta_l1_norms, (base, tensors, 2, thresholds, [0.3, 0.6, 1.0], 5)),
        (ops.fused_merge, merge_args),
        (ops.fused_merge, (None,) + merge_args[1:]),
        (ops.fused_merge_l1, (base, tensors, 2, thresholds, [0.3, 0.6, 1.0], 5) + merge_args[7:]),
        (ops.fused_merge_l1, (None, tensors, 1, thresholds, [], 0) + merge_args[7:]),
    ]


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_opcheck(backend):
    for op, args in primitive_calls(backend):
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not pk._backend.cpp_available(), reason="pykernels._C not built")
def test_opcheck_philox():
    torch.library.opcheck(torch.ops.pykernels.philox_uniform.default, (12345, 2**32 - 3, 10))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_compile_fullgraph(backend):
    base, tensors = make_models((33, 7), 2, torch.float32)

    def f(b, t1, t2):
        return pk.dare_ties(b, [t1, t2], densities=[0.5, 0.4], seed=3, backend=backend) + \
            pk.ties(b, [t1, t2], densities=0.3, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(base, *tensors), f(base, *tensors))
