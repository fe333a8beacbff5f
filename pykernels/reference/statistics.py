"""Reference element-wise statistics across N tensors (docs/PRIMITIVES.md), plain PyTorch, for clarity.

For every element j, the N task-vector values v_i[j] = float32(tensors[i][j]) - float32(base[j]) (or
float32(tensors[i][j]) without a base) are reduced to one value:

* ``trimmed_mean``: sort the N values ascending, drop ``trim`` from each end and average the rest, summing in
  ascending order in float32 starting from the smallest kept value, then dividing by float32(N - 2 * trim).
  Any NaN among the N values gives NaN. The ascending order is IEEE totalOrder on the non-NaN values, i.e. the
  numerical order with -0.0 placed before +0.0: then the sorted sequence of bit patterns is unique, so which
  zero is "the median" (and every sum) is the same for every backend and any sorting algorithm.
  The median is trim = (N - 1) // 2 (the mean of the two middle values for even N).
* ``sign_count``: int8 sum of sign(v_i) with sign(0) = sign(NaN) = 0 (|result| <= N <= 64).

Every NaN result is the canonical quiet NaN (bits 0x7FC00000 before the conversion to out_dtype), so results
do not depend on the NaN payloads a CPU or GPU produces (e.g. for inf + -inf).
"""
from __future__ import annotations

import torch


def task_vectors(base, tensors) -> torch.Tensor:
    """float32 (N, *shape): v_i = tensors[i] - base (tensors[i] without a base)."""
    v = torch.stack([t.float() for t in tensors])
    return v if base is None else v - base.float()


def total_order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 values x (totalOrder: -0 < +0; NaN at the ends); an involution."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def from_total_order_keys(keys: torch.Tensor) -> torch.Tensor:
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def trimmed_mean(base, tensors, trim, out_dtype):
    """Element-wise mean of the N task-vector values without the `trim` smallest and `trim` largest."""
    n, trim = len(tensors), int(trim)
    if not 0 <= 2 * trim < n:
        raise ValueError(f"trimmed_mean: trim must satisfy 0 <= 2 * trim < N = {n}, got {trim}")
    v = task_vectors(base, tensors)
    ascending = from_total_order_keys(torch.sort(total_order_keys(v), dim=0).values)
    kept = ascending[trim:n - trim]
    acc = kept[0].clone()
    for value in kept[1:]:
        acc = acc + value
    out = acc / torch.tensor(float(n - 2 * trim), dtype=torch.float32)
    out = torch.where(torch.isnan(v).any(0) | torch.isnan(out), torch.tensor(float("nan")), out)
    return out.to(out_dtype)


def sign_count(base, tensors):
    """int8: number of positive minus number of negative task-vector values per element (NaN and 0 count 0)."""
    v = task_vectors(base, tensors)
    return ((v > 0).sum(0) - (v < 0).sum(0)).to(torch.int8)
