"""Exact order statistics by radix select (DESIGN.md section 4).

The backends find the k-th largest magnitude key with a histogram of its top 16 bits, then a histogram of
the low 16 bits inside the one bucket that holds rank k, then (only when ties at the exact key must be cut)
a count of ties per fixed chunk to locate the last kept index: two or three reads, never a sort.
Peak extra memory: per-thread 2^16-bin histograms per tensor, plus O(N) scalars.
"""
from __future__ import annotations

import torch

from . import _backend, _ops
from .merging import _check_tensors
from .reference.selection import KEEP_NONE, keep_mask, magnitude_keys


def delta_topk_thresholds(base: torch.Tensor | None, tensors, ks, *, backend: str | None = None) -> torch.Tensor:
    """Exact magnitude top-k of each task vector d_i = tensors[i] - base (or tensors[i] when base is None).

    Returns int64 (N, 2) rows (key, cutoff): element j of d_i is among its k_i largest magnitudes (ties in
    ascending index order) iff mkey(d_ij) > key or (mkey(d_ij) == key and j <= cutoff), where mkey is the
    bit pattern of |d_ij| (NaN ranks above +inf). k_i == 0 gives (2**32, -1).
    """
    tensors = _check_tensors(base, tensors)
    ks = [int(k) for k in ks]
    if len(ks) != len(tensors):
        raise ValueError(f"ks has {len(ks)} entries but there are {len(tensors)} tensors")
    numel = tensors[0].numel()
    for i, k in enumerate(ks):
        if not 0 <= k <= numel:
            raise ValueError(f"ks[{i}] must lie in [0, {numel}], got {k}")
    ref = base if base is not None else tensors[0]
    return _ops.primitives(_backend.resolve(backend, ref.device)).delta_topk_thresholds(base, tensors, ks)


def topk_mask(x: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Boolean mask of exactly the k largest |x| (ties kept in ascending flat-index order)."""
    key, cutoff = delta_topk_thresholds(None, [x], [k], backend=backend)[0].tolist()
    if key == KEEP_NONE:
        return torch.zeros_like(x, dtype=torch.bool)
    return keep_mask(magnitude_keys(x.float()), key, cutoff).reshape(x.shape)
