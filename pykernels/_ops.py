"""torch.library glue: fake implementations of the C++ ops, and the Triton kernels as custom ops.

Every backend exposes the same primitives (Primitives below; see pykernels/reference for their meaning and
docs/PRIMITIVES.md for the order-statistics, statistics and DELLA ones).
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from .reference import attention as ref_attention
from .reference import della as ref_della
from .reference import moe as ref_moe
from .reference import merging as ref_merging
from .reference import selection as ref_selection
from .reference import statistics as ref_statistics


def _fake_thresholds(base, tensors, ks):
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.int64)


def _fake_norms(base, tensors, sparsifier, thresholds, keep_probs, seed):
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.float64)


def _fake_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source, consensus,
                divisor, normalize, lambda_, out_dtype):
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


def _fake_merge_l1(base, tensors, sparsifier, thresholds, keep_probs, seed, weights, sign_source, consensus, divisor,
                   normalize, lambda_, out_dtype):
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


def _fake_key_histogram(x, magnitude, buckets):
    shape = (len(buckets), 1 << 16) if len(buckets) else (1 << 16,)
    return x.new_empty(shape, dtype=torch.int64)


def _fake_key_mask(x, magnitude, key, ties):
    return x.new_empty(x.shape, dtype=torch.bool)


def _fake_key_find(x, magnitude, key, rank):
    return x.new_empty((), dtype=torch.int64)


def _fake_row_select(x, magnitude, ks):
    return x.new_empty((x.shape[0], len(ks)), dtype=torch.int64)


def _fake_row_topk_mask(x, magnitude, k):
    return x.new_empty(x.shape, dtype=torch.bool)


def _fake_row_rank(x, magnitude):
    return x.new_empty(x.shape, dtype=torch.int64)


def _fake_trimmed_mean(base, tensors, trim, out_dtype):
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


def _fake_sign_count(base, tensors):
    return tensors[0].new_empty(tensors[0].shape, dtype=torch.int8)


def _fake_della_norms(base, tensors, densities, epsilons, seed):
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.float64)


def _fake_della_merge(base, tensors, densities, epsilons, seed, inverse, scales, weights, sign_source, consensus,
                      divisor, normalize, lambda_, out_dtype):
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


def _fake_pbs_permutation(q, k, block_size, segment_size, scale):
    return k.new_empty(k.shape[:3], dtype=torch.int32)


def _fake_pbs_select_blocks(q, k, perm, block_size, segment_size, threshold, force_first_block, scale):
    nb = -(-q.shape[2] // block_size)
    return (q.new_empty((*q.shape[:2], nb), dtype=torch.int32),
            q.new_empty((*q.shape[:2], nb, nb), dtype=torch.int32))


def _fake_pbs_block_attention(q, k, v, perm, offsets, indices, block_size, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fake_moe_topk_route(logits, k, scoring, bias, renormalize, num_groups, topk_groups, scaling):
    tokens = logits.shape[0]
    return (logits.new_empty((tokens, k), dtype=torch.float32), logits.new_empty((tokens, k), dtype=torch.int32))


def _fake_moe_align_block_size(ids, num_experts, block_size, expert_map):
    capacity = -(-(ids.numel() + num_experts * (block_size - 1)) // block_size) * block_size
    return (ids.new_empty((capacity,), dtype=torch.int32), ids.new_empty((capacity // block_size,), dtype=torch.int32),
            ids.new_empty((1,), dtype=torch.int32))


def _fake_moe_permute(x, ids, weights, num_experts, capacity_factor):
    pairs = ids.numel()
    return (x.new_empty((pairs, x.shape[1])), ids.new_empty((pairs,), dtype=torch.int64),
            ids.new_empty((num_experts + 1,), dtype=torch.int64), ids.new_empty(ids.shape, dtype=torch.bool))


def _fake_moe_unpermute(y, perm, weights):
    return y.new_empty((weights.shape[0], y.shape[1]))


_FAKES = {
    "delta_topk_thresholds": _fake_thresholds,
    "delta_l1_norms": _fake_norms,
    "fused_merge": _fake_merge,
    "fused_merge_l1": _fake_merge_l1,
    "key_histogram": _fake_key_histogram,
    "key_mask": _fake_key_mask,
    "key_find": _fake_key_find,
    "row_select": _fake_row_select,
    "row_topk_mask": _fake_row_topk_mask,
    "row_rank": _fake_row_rank,
    "trimmed_mean": _fake_trimmed_mean,
    "sign_count": _fake_sign_count,
    "della_l1_norms": _fake_della_norms,
    "della_merge": _fake_della_merge,
    "pbs_permutation": _fake_pbs_permutation,
    "pbs_select_blocks": _fake_pbs_select_blocks,
    "pbs_block_attention": _fake_pbs_block_attention,
    "moe_topk_route": _fake_moe_topk_route,
    "moe_align_block_size": _fake_moe_align_block_size,
    "moe_permute": _fake_moe_permute,
    "moe_unpermute": _fake_moe_unpermute,
}


def _register_cpp_fakes() -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"pykernels::{name}")(fake)
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


@torch.library.custom_op("pykernels::triton_fused_merge_l1", mutates_args=())
def triton_fused_merge_l1(base: Optional[Tensor], tensors: List[Tensor], sparsifier: int, thresholds: Tensor,
                          keep_probs: List[float], seed: int, weights: List[float], sign_source: int, consensus: int,
                          divisor: int, normalize: bool, lambda_: float, out_dtype: torch.dtype) -> Tensor:
    from .kernels import merging as k

    return _merge_with_l1_scales(k.delta_l1_norms, k.fused_merge, base, tensors, sparsifier, thresholds, keep_probs,
                                 seed, weights, sign_source, consensus, divisor, normalize, lambda_, out_dtype)


def _merge_with_l1_scales(delta_l1_norms, fused_merge, base, tensors, sparsifier, thresholds, keep_probs, seed,
                          *combination) -> Tensor:
    """fused_merge_l1 from a backend's delta_l1_norms and fused_merge (masks drawn in both passes: on a GPU the
    draws are cheap next to the memory traffic)."""
    norms = delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)
    scales = ref_merging.l1_ratio(norms)
    return fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, *combination)


@torch.library.custom_op("pykernels::triton_key_histogram", mutates_args=())
def triton_key_histogram(x: Tensor, magnitude: bool, buckets: List[int]) -> Tensor:
    from .kernels import selection as k

    return k.key_histogram(x, magnitude, buckets)


@torch.library.custom_op("pykernels::triton_key_mask", mutates_args=())
def triton_key_mask(x: Tensor, magnitude: bool, key: int, ties: int) -> Tensor:
    from .kernels import selection as k

    return k.key_mask(x, magnitude, key, ties)


@torch.library.custom_op("pykernels::triton_key_find", mutates_args=())
def triton_key_find(x: Tensor, magnitude: bool, key: int, rank: int) -> Tensor:
    from .kernels import selection as k

    return k.key_find(x, magnitude, key, rank)


@torch.library.custom_op("pykernels::triton_row_select", mutates_args=())
def triton_row_select(x: Tensor, magnitude: bool, ks: List[int]) -> Tensor:
    from .kernels import selection as k

    return k.row_select(x, magnitude, ks)


@torch.library.custom_op("pykernels::triton_row_topk_mask", mutates_args=())
def triton_row_topk_mask(x: Tensor, magnitude: bool, k: int) -> Tensor:
    from .kernels import selection as kern

    return kern.row_topk_mask(x, magnitude, k)


@torch.library.custom_op("pykernels::triton_row_rank", mutates_args=())
def triton_row_rank(x: Tensor, magnitude: bool) -> Tensor:
    from .kernels import selection as k

    return k.row_rank(x, magnitude)


@torch.library.custom_op("pykernels::triton_trimmed_mean", mutates_args=())
def triton_trimmed_mean(base: Optional[Tensor], tensors: List[Tensor], trim: int, out_dtype: torch.dtype) -> Tensor:
    from .kernels import statistics as k

    return k.trimmed_mean(base, tensors, trim, out_dtype)


@torch.library.custom_op("pykernels::triton_sign_count", mutates_args=())
def triton_sign_count(base: Optional[Tensor], tensors: List[Tensor]) -> Tensor:
    from .kernels import statistics as k

    return k.sign_count(base, tensors)


@torch.library.custom_op("pykernels::triton_della_l1_norms", mutates_args=())
def triton_della_l1_norms(base: Optional[Tensor], tensors: List[Tensor], densities: List[float],
                          epsilons: List[float], seed: int) -> Tensor:
    from .kernels import della as k

    return k.della_l1_norms(base, tensors, densities, epsilons, seed)


@torch.library.custom_op("pykernels::triton_della_merge", mutates_args=())
def triton_della_merge(base: Optional[Tensor], tensors: List[Tensor], densities: List[float], epsilons: List[float],
                       seed: int, inverse: bool, scales: Tensor, weights: List[float], sign_source: int,
                       consensus: int, divisor: int, normalize: bool, lambda_: float,
                       out_dtype: torch.dtype) -> Tensor:
    from .kernels import della as k

    return k.della_merge(base, tensors, densities, epsilons, seed, inverse, scales, weights, sign_source, consensus,
                         divisor, normalize, lambda_, out_dtype)


@torch.library.custom_op("pykernels::triton_pbs_permutation", mutates_args=())
def triton_pbs_permutation(q: Tensor, k: Tensor, block_size: int, segment_size: int, scale: float) -> Tensor:
    from .kernels import attention as k_

    return k_.pbs_permutation(q, k, block_size, segment_size, scale)


@torch.library.custom_op("pykernels::triton_pbs_select_blocks", mutates_args=())
def triton_pbs_select_blocks(q: Tensor, k: Tensor, perm: Tensor, block_size: int, segment_size: int, threshold: float,
                             force_first_block: bool, scale: float) -> Tuple[Tensor, Tensor]:
    from .kernels import attention as k_

    return k_.pbs_select_blocks(q, k, perm, block_size, segment_size, threshold, force_first_block, scale)


@torch.library.custom_op("pykernels::triton_pbs_block_attention", mutates_args=())
def triton_pbs_block_attention(q: Tensor, k: Tensor, v: Tensor, perm: Tensor, offsets: Tensor, indices: Tensor,
                               block_size: int, scale: float) -> Tuple[Tensor, Tensor]:
    from .kernels import attention as k_

    return k_.pbs_block_attention(q, k, v, perm, offsets, indices, block_size, scale)


@torch.library.custom_op("pykernels::triton_moe_topk_route", mutates_args=())
def triton_moe_topk_route(logits: Tensor, k: int, scoring: int, bias: Optional[Tensor], renormalize: bool,
                          num_groups: int, topk_groups: int, scaling: float) -> Tuple[Tensor, Tensor]:
    from .kernels import moe as k_

    return k_.moe_topk_route(logits, k, scoring, bias, renormalize, num_groups, topk_groups, scaling)


@torch.library.custom_op("pykernels::triton_moe_align_block_size", mutates_args=())
def triton_moe_align_block_size(ids: Tensor, num_experts: int, block_size: int,
                                expert_map: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from .kernels import moe as k_

    return k_.moe_align_block_size(ids, num_experts, block_size, expert_map)


@torch.library.custom_op("pykernels::triton_moe_permute", mutates_args=())
def triton_moe_permute(x: Tensor, ids: Tensor, weights: Optional[Tensor], num_experts: int,
                       capacity_factor: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .kernels import moe as k_

    return k_.moe_permute(x, ids, weights, num_experts, capacity_factor)


@torch.library.custom_op("pykernels::triton_moe_unpermute", mutates_args=())
def triton_moe_unpermute(y: Tensor, perm: Tensor, weights: Tensor) -> Tensor:
    from .kernels import moe as k_

    return k_.moe_unpermute(y, perm, weights)


_TRITON_OPS = {name: globals()[f"triton_{name}"] for name in _FAKES}
for _name, _op in _TRITON_OPS.items():
    _op.register_fake(_FAKES[_name])

if _backend.cpp_available():
    _register_cpp_fakes()


class Primitives(NamedTuple):
    delta_topk_thresholds: Callable
    delta_l1_norms: Callable
    fused_merge: Callable
    fused_merge_l1: Callable
    key_histogram: Callable
    key_mask: Callable
    key_find: Callable
    row_select: Callable
    row_topk_mask: Callable
    row_rank: Callable
    trimmed_mean: Callable
    sign_count: Callable
    della_l1_norms: Callable
    della_merge: Callable
    pbs_permutation: Callable
    pbs_select_blocks: Callable
    pbs_block_attention: Callable
    moe_topk_route: Callable
    moe_align_block_size: Callable
    moe_permute: Callable
    moe_unpermute: Callable


_REFERENCE_MODULES = (ref_selection, ref_merging, ref_statistics, ref_della, ref_attention, ref_moe)


def _reference_op(name: str) -> Callable:
    return next(getattr(m, name) for m in _REFERENCE_MODULES if hasattr(m, name))


# Built once at import so torch.compile sees plain globals.
_PRIMITIVES = {
    "reference": Primitives(**{name: _reference_op(name) for name in Primitives._fields}),
    "triton": Primitives(**_TRITON_OPS),
}
if _backend.cpp_available():
    _PRIMITIVES["cpp"] = Primitives(**{name: getattr(torch.ops.pykernels, name) for name in Primitives._fields})
    # The CUDA build has a kernel for every op but the attention plan and the MoE permute / combine, which run
    # in the Triton kernels, and fused_merge_l1, composed from the CUDA norm and merge kernels.
    _PRIMITIVES["cuda"] = _PRIMITIVES["cpp"]._replace(
        pbs_permutation=triton_pbs_permutation, pbs_select_blocks=triton_pbs_select_blocks,
        moe_permute=triton_moe_permute, moe_unpermute=triton_moe_unpermute,
        fused_merge_l1=functools.partial(_merge_with_l1_scales, torch.ops.pykernels.delta_l1_norms,
                                         torch.ops.pykernels.fused_merge))


def primitives(backend: str) -> Primitives:
    """The merge primitives of a resolved backend name."""
    return _PRIMITIVES[backend]
