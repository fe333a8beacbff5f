"""torch.library glue: fake implementations of the C++ ops, and the Triton kernels as custom ops.

Every backend exposes the same primitives (see pykernels/reference for their meaning):
delta_topk_thresholds, delta_l1_norms, fused_merge.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from . import _backend
from .reference import merging as ref_merging
from .reference import selection as ref_selection


def _fake_thresholds(base, tensors, ks):
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.int64)


def _fake_norms(base, tensors, sparsifier, thresholds, keep_probs, seed):
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.float64)


def _fake_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source, consensus,
                divisor, normalize, lambda_, out_dtype):
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


def _register_cpp_fakes() -> None:
    torch.library.register_fake("pykernels::delta_topk_thresholds")(_fake_thresholds)
    torch.library.register_fake("pykernels::delta_l1_norms")(_fake_norms)
    torch.library.register_fake("pykernels::fused_merge")(_fake_merge)
    torch.library.register_fake("pykernels::philox_uniform")(
        lambda seed, offset, n: torch.empty((n,), dtype=torch.float32))


# --- Triton ops (torch.library.custom_op: triton_op does not run under the interpreter) ------------------

@torch.library.custom_op("pykernels::triton_delta_topk_thresholds", mutates_args=())
def triton_delta_topk_thresholds(base: Optional[Tensor], tensors: List[Tensor], ks: List[int]) -> Tensor:
    from .kernels import merging as k

    return k.delta_topk_thresholds(base, tensors, ks)


@torch.library.custom_op("pykernels::triton_delta_l1_norms", mutates_args=())
def triton_delta_l1_norms(base: Optional[Tensor], tensors: List[Tensor], sparsifier: int, thresholds: Tensor,
                          keep_probs: List[float], seed: int) -> Tensor:
    from .kernels import merging as k

    return k.delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)


@torch.library.custom_op("pykernels::triton_fused_merge", mutates_args=())
def triton_fused_merge(base: Optional[Tensor], tensors: List[Tensor], sparsifier: int, thresholds: Tensor,
                       keep_probs: List[float], seed: int, scales: Tensor, weights: List[float], sign_source: int,
                       consensus: int, divisor: int, normalize: bool, lambda_: float,
                       out_dtype: torch.dtype) -> Tensor:
    from .kernels import merging as k

    return k.fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source,
                         consensus, divisor, normalize, lambda_, out_dtype)


triton_delta_topk_thresholds.register_fake(_fake_thresholds)
triton_delta_l1_norms.register_fake(_fake_norms)
triton_fused_merge.register_fake(_fake_merge)

if _backend.cpp_available():
    _register_cpp_fakes()


class Primitives(NamedTuple):
    delta_topk_thresholds: Callable
    delta_l1_norms: Callable
    fused_merge: Callable


# Built once at import so torch.compile sees plain globals.
_PRIMITIVES = {
    "reference": Primitives(ref_selection.delta_topk_thresholds, ref_merging.delta_l1_norms, ref_merging.fused_merge),
    "triton": Primitives(triton_delta_topk_thresholds, triton_delta_l1_norms, triton_fused_merge),
}
if _backend.cpp_available():
    _PRIMITIVES["cpp"] = _PRIMITIVES["cuda"] = Primitives(
        torch.ops.pykernels.delta_topk_thresholds, torch.ops.pykernels.delta_l1_norms, torch.ops.pykernels.fused_merge)


def primitives(backend: str) -> Primitives:
    """The merge primitives of a resolved backend name."""
    return _PRIMITIVES[backend]
