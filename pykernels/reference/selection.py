"""Reference order statistics: plain sorting, written to be obviously right, never fast.

Magnitude key: the bits of |x| as an unsigned integer (``bits(x) & 0x7FFFFFFF``), with every NaN mapped to
one key just above +inf (``0x7F800001``). It orders non-negative floats exactly like their values, treats
-0.0 and +0.0 as equal, ranks NaN above +inf (a NaN is never silently dropped by a top-k), and does not
depend on NaN payloads, which differ between CPUs and GPUs.
"""
from __future__ import annotations

import torch

KEEP_NONE = 1 << 32  # a key above every magnitude key: "keep nothing"
NAN_KEY = 0x7F800001


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 magnitude keys of a float32 tensor (flattened)."""
    assert x.dtype == torch.float32
    return (x.reshape(-1).view(torch.int32).to(torch.int64) & 0x7FFFFFFF).clamp(max=NAN_KEY)


def topk_threshold(keys: torch.Tensor, k: int) -> tuple[int, int]:
    """(key, cutoff) selecting exactly the k largest keys, ties kept in ascending index order.

    Element j is kept iff keys[j] > key or (keys[j] == key and j <= cutoff).
    """
    if k == 0:
        return KEEP_NONE, -1
    # A stable descending sort keeps equal keys in ascending index order, so the k-th entry of the order is
    # both the threshold and the last tie we keep.
    order = torch.sort(keys, descending=True, stable=True).indices
    last = int(order[k - 1])
    return int(keys[last]), last


def keep_mask(keys: torch.Tensor, key: int, cutoff: int) -> torch.Tensor:
    index = torch.arange(keys.numel(), dtype=torch.int64, device=keys.device)
    return (keys > key) | ((keys == key) & (index <= cutoff))


def task_vector(base: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    """d = tensor - base in float32, flattened in logical (row-major) order."""
    d = tensor.float().reshape(-1)
    return d if base is None else d - base.float().reshape(-1)


def delta_topk_thresholds(base, tensors, ks) -> torch.Tensor:
    """int64 (N, 2): the (key, cutoff) of the exact magnitude top-k of each task vector."""
    rows = [topk_threshold(magnitude_keys(task_vector(base, t)), int(k)) for t, k in zip(tensors, ks)]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(tensors), 2)


# --- order statistics on order-preserving keys (docs/PRIMITIVES.md) ----------------------------------

ORDER_NAN_KEY = 0xFFFFFFFF  # every NaN: above +inf, in its own top bucket
SIGNED_ZERO_KEY = 0x80000000
BUCKETS = 1 << 16


def order_keys(x: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """int64 order-preserving uint32 keys of x (any float dtype), flattened row-major."""
    f = x.reshape(-1).float()
    bits = f.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if magnitude:
        keys = bits & 0x7FFFFFFF
    else:
        negative = bits >= SIGNED_ZERO_KEY
        keys = torch.where(negative, bits ^ 0xFFFFFFFF, bits | SIGNED_ZERO_KEY)
        keys = torch.where(f == 0, SIGNED_ZERO_KEY, keys)
    return torch.where(torch.isnan(f), ORDER_NAN_KEY, keys)


def key_histogram(x, magnitude, buckets) -> torch.Tensor:
    keys = order_keys(x, magnitude)
    if len(buckets) == 0:
        return torch.bincount(keys >> 16, minlength=BUCKETS)
    rows = [torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=BUCKETS) for b in buckets]
    return torch.stack(rows)


def key_mask(x, magnitude, key, ties) -> torch.Tensor:
    keys = order_keys(x, magnitude)
    tie = keys == key
    tie_position = torch.cumsum(tie.to(torch.int64), 0) - 1  # among the ties, in index order
    return ((keys > key) | (tie & (tie_position < ties))).reshape(x.shape)


def key_find(x, magnitude, key, rank) -> torch.Tensor:
    hits = torch.nonzero(order_keys(x, magnitude) == key).reshape(-1)
    return hits[rank - 1] if 1 <= rank <= hits.numel() else torch.tensor(-1, dtype=torch.int64)


def _descending_order(x: torch.Tensor, magnitude: bool) -> torch.Tensor:
    keys = order_keys(x, magnitude).reshape(x.shape)
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


def row_select(x, magnitude, ks) -> torch.Tensor:
    order = _descending_order(x, magnitude)
    return order[:, [k - 1 for k in ks]].reshape(x.shape[0], len(ks))


def row_topk_mask(x, magnitude, k) -> torch.Tensor:
    order = _descending_order(x, magnitude)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    return mask.scatter_(1, order[:, :k], True)


def row_rank(x, magnitude) -> torch.Tensor:
    keys = order_keys(x, magnitude).reshape(x.shape)
    order = torch.sort(keys, dim=-1, stable=True).indices
    positions = torch.arange(1, x.shape[1] + 1, dtype=torch.int64).expand(x.shape)
    return torch.empty(x.shape, dtype=torch.int64).scatter_(1, order, positions)
