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
