"""Permuted block-sparse attention (PBS-Attn) for causal prefill (DESIGN.md section 5).

Keys are permuted inside segments of ``segment_size`` tokens so that the keys the last queries attend to most
come first; key blocks of the permuted order are then selected per query block by pooled attention mass, and a
block-sparse flash attention reads K and V through the permutation. Queries are never permuted, so the output
is in token order and needs no un-permutation.

Two steps, each usable alone: ``pbs_plan`` (permutation + per-query-block lists of key blocks) and
``block_sparse_attention`` (the attention of a plan); ``pbs_attention`` runs both.

Peak extra memory: the plan (int32 permutation (B, Hkv, N), int32 block lists, int64 offsets) plus, while it is
built, float64 scores of one block of queries against the keys of one head, and float32 (B, Hq, N)
log-sum-exps; the attention itself needs per-thread tiles only.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from . import _backend, _ops
from .reference.attention import num_blocks

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


class PBSPlan(NamedTuple):
    """What ``block_sparse_attention`` computes.

    perm:    int32 (B, Hkv, N); perm[b, h, c] is the token whose key and value sit at permuted position c.
    offsets: int64 (B * Hq * nb + 1,); query block i of head h in batch b (row (b * Hq + h) * nb + i) attends
             to the key blocks ``indices[offsets[row]:offsets[row + 1]]`` (ascending) of the permuted order.
    indices: int32 (nnz,), key block numbers in [0, nb), nb = ceil(N / block_size).
    density: computed block pairs / block pairs of the dense plan (threshold 1.0) of the same permutation.
    """
    perm: torch.Tensor
    offsets: torch.Tensor
    indices: torch.Tensor
    density: float
    block_size: int
    segment_size: int

    def counts(self) -> torch.Tensor:
        """int64 (B, Hq, nb): how many key blocks each query block attends to."""
        batch, _, n = self.perm.shape
        return self.offsets.diff().view(batch, -1, num_blocks(n, self.block_size))

    def block_mask(self) -> torch.Tensor:
        """bool (B, Hq, nb, nb): mask[b, h, i, j] iff query block i attends to permuted key block j."""
        counts = self.counts()
        nb = counts.shape[-1]
        mask = torch.zeros(counts.numel(), nb, dtype=torch.bool, device=self.indices.device)
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts.flatten())
        mask[rows, self.indices.long()] = True
        return mask.view(*counts.shape, nb)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int, perm: Optional[torch.Tensor] = None,
                        segment_size: int = 0) -> "PBSPlan":
        """A plan from a dense bool (B, Hq, nb, nb) mask and an optional permutation (default: identity)."""
        if block_mask.dtype != torch.bool or block_mask.dim() != 4 or block_mask.shape[2] != block_mask.shape[3]:
            raise ValueError(f"block_mask must be bool (B, Hq, nb, nb), got {block_mask.dtype} {tuple(block_mask.shape)}")
        if perm is None:
            raise ValueError("from_block_mask needs perm (int32 (B, Hkv, N)); use torch.arange(N) for no permutation")
        counts = block_mask.sum(-1)
        offsets = torch.cat([counts.new_zeros(1), counts.flatten().cumsum(0)])
        indices = torch.nonzero(block_mask.reshape(-1, block_mask.shape[-1]))[:, 1].to(torch.int32)
        return cls(perm.to(torch.int32), offsets, indices, float("nan"), int(block_size), int(segment_size))


def _check_qkv(q, k, v=None) -> None:
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device, got q on {q.device} and {name} on {t.device}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    (batch, hq, n, d), (kb, hkv, kn, kd) = q.shape, k.shape
    if (kb, kn, kd) != (batch, n, d):
        raise ValueError(f"k must be (B={batch}, Hkv, N={n}, D={d}) for q of shape {tuple(q.shape)} (causal prefill: "
                         f"as many keys as queries), got {tuple(k.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads Hq={hq} must be a multiple of the key/value heads Hkv={hkv}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")


def _check_blocks(block_size, segment_size) -> None:
    if not isinstance(block_size, numbers.Integral) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if not isinstance(segment_size, numbers.Integral) or segment_size <= 0 or segment_size % block_size:
        raise ValueError(f"segment_size must be a positive multiple of block_size={block_size}, got {segment_size!r}")


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # kernels take any batch/head/token strides; only a strided head_dim needs a copy
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense_pairs(perm: torch.Tensor, hq: int, block_size: int, segment_size: int) -> int:
    """Block pairs of the threshold-1.0 plan: every earlier-segment block plus the own-segment blocks that hold a
    key at or before the query block's last row (summed over batch and query heads)."""
    batch, hkv, n = perm.shape
    nb = num_blocks(n, block_size)
    if nb == 0 or batch == 0:
        return 0
    pad = nb * block_size - n
    first_key = torch.nn.functional.pad(perm.long(), (0, pad), value=n).view(batch, hkv, nb, block_size).amin(-1)
    blocks = torch.arange(nb, device=perm.device)
    segment = blocks * block_size // segment_size
    last_row = torch.clamp((blocks + 1) * block_size, max=n) - 1
    same = segment.view(-1, 1) == segment.view(1, -1)
    own = (same & (first_key.unsqueeze(-2) <= last_row.view(-1, 1))).sum(-1)      # (B, Hkv, nb)
    earlier = segment * (segment_size // block_size)
    return int((own + earlier).sum()) * (hq // hkv)


def _backend_ops(backend, device):
    return _ops.primitives(_backend.resolve(backend, device))


def pbs_plan(q, k, *, block_size: int = 128, segment_size: int = 256, threshold: float = 0.9,
             force_first_block: bool = True, causal: bool = True, scale: Optional[float] = None,
             backend: Optional[str] = None) -> PBSPlan:
    """The PBS-Attn plan of q (B, Hq, N, D) against k (B, Hkv, N, D): key permutation and key-block lists.

    1. Keys of each full segment are sorted by their mean softmax probability under the last ``block_size``
       queries of the KV head's query group (float64, descending, ties by index); the remainder segment, and
       the whole sequence when N <= segment_size, keep their order.
    2. Per query head and query block: the mean-pooled query block scores the mean-pooled permuted key blocks
       of strictly earlier segments (partial blocks pooled by their true length); of their softmax, the
       smallest set of largest scores whose sum reaches ``threshold`` is kept (``threshold >= 1.0`` keeps every
       candidate, 0.0 none). Always kept: the own segment's key blocks holding a key at or before the query
       block's last row, and the block holding token 0 when ``force_first_block``.

    Args:
        q, k: float32 / bfloat16 / float16, one dtype and device; Hq a multiple of Hkv; D in (64, 80, 96, 128, 256).
        block_size: power of two >= 16. segment_size: a multiple of block_size.
        threshold: pooled-attention mass to keep, in [0, 1].
        causal: must be True (non-causal PBS-Attn is not supported yet).
        scale: softmax scale, default 1 / sqrt(D).
        backend: "reference", "cpp", "triton", "cuda" (plan by the Triton kernels) or None.
    """
    _check_qkv(q, k)
    _check_blocks(block_size, segment_size)
    if not causal:
        raise NotImplementedError("pbs_plan: only causal attention is supported (causal=True)")
    if not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    scale = _scale(scale, q.shape[-1])
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    ops = _backend_ops(backend, q.device)
    if q.numel() == 0:
        return _empty_plan(q, k, block_size, segment_size)
    perm = ops.pbs_permutation(q, k, block_size, segment_size, scale)
    counts, padded = ops.pbs_select_blocks(q, k, perm, block_size, segment_size, float(threshold),
                                           bool(force_first_block), scale)
    offsets = torch.cat([counts.new_zeros(1, dtype=torch.int64), counts.flatten().cumsum(0)])
    nb = padded.shape[-1]
    listed = torch.arange(nb, device=padded.device) < counts.unsqueeze(-1)
    indices = padded[listed]
    dense = _dense_pairs(perm, q.shape[1], block_size, segment_size)
    density = indices.numel() / dense if dense else 1.0
    return PBSPlan(perm, offsets, indices, density, block_size, segment_size)


def _empty_plan(q, k, block_size: int, segment_size: int) -> PBSPlan:
    batch, hq, n, _ = q.shape
    perm = torch.arange(n, dtype=torch.int32, device=q.device).repeat(batch, k.shape[1], 1)
    offsets = torch.zeros(batch * hq * num_blocks(n, block_size) + 1, dtype=torch.int64, device=q.device)
    return PBSPlan(perm, offsets, torch.zeros(0, dtype=torch.int32, device=q.device), 1.0, block_size, segment_size)


def _check_plan(q, k, plan: PBSPlan) -> None:
    if not isinstance(plan, PBSPlan):
        raise TypeError(f"plan must be a PBSPlan (from pbs_plan or PBSPlan.from_block_mask), got {type(plan).__name__}")
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    _check_blocks(plan.block_size, max(plan.segment_size, plan.block_size))
    rows = batch * hq * num_blocks(n, plan.block_size)
    if plan.perm.shape != (batch, hkv, n) or plan.perm.dtype != torch.int32:
        raise ValueError(f"plan.perm must be int32 {(batch, hkv, n)}, got {plan.perm.dtype} {tuple(plan.perm.shape)}")
    if plan.offsets.shape != (rows + 1,) or plan.offsets.dtype != torch.int64:
        raise ValueError(f"plan.offsets must be int64 ({rows + 1},), got {plan.offsets.dtype} {tuple(plan.offsets.shape)}")
    if plan.indices.dim() != 1 or plan.indices.dtype != torch.int32:
        raise ValueError(f"plan.indices must be 1-D int32, got {plan.indices.dtype} {tuple(plan.indices.shape)}")
    for name, t in (("perm", plan.perm), ("offsets", plan.offsets), ("indices", plan.indices)):
        if t.device != q.device:
            raise ValueError(f"plan.{name} is on {t.device}, q on {q.device}")
    if int(plan.offsets[0]) != 0 or int(plan.offsets[-1]) != plan.indices.numel() or bool((plan.offsets.diff() < 0).any()):
        raise ValueError("plan.offsets must start at 0, never decrease, and end at len(plan.indices)")
    nb = num_blocks(n, plan.block_size)
    if plan.indices.numel() and (int(plan.indices.min()) < 0 or int(plan.indices.max()) >= nb):
        raise ValueError(f"plan.indices must be key block numbers in [0, {nb})")
    if n and not torch.equal(torch.sort(plan.perm.long(), dim=-1).values,
                             torch.arange(n, device=q.device).expand(batch, hkv, n)):
        raise ValueError("plan.perm must be a permutation of 0..N-1 for every (batch, kv head)")


def block_sparse_attention(q, k, v, plan: PBSPlan, *, scale: Optional[float] = None, return_lse: bool = False,
                           backend: Optional[str] = None):
    """Causal attention of q (B, Hq, N, D) over k, v (B, Hkv, N, D) restricted to the key blocks of ``plan``.

    Query row r attends to the key at permuted position c (token perm[c]) iff c lies in a key block listed for
    r's query block and r >= perm[c]. K and V rows are read through the permutation (no permuted copies); the
    softmax and accumulation run in float32; the output has q's dtype. A row that sees no key gets output 0
    and log-sum-exp -inf.

    Returns:
        out (B, Hq, N, D), and with ``return_lse`` also the float32 (B, Hq, N) natural-log log-sum-exp of each
        row's scaled logits (to combine with other attention pieces).
    """
    _check_qkv(q, k, v)
    _check_plan(q, k, plan)
    scale = _scale(scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    ops = _backend_ops(backend, q.device)
    if q.numel() == 0:
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        return (out, lse) if return_lse else out
    out, lse = ops.pbs_block_attention(q, k, v, plan.perm, plan.offsets, plan.indices, plan.block_size, scale)
    return (out, lse) if return_lse else out


def pbs_attention(q, k, v, *, block_size: int = 128, segment_size: int = 256, threshold: float = 0.9,
                  force_first_block: bool = True, causal: bool = True, scale: Optional[float] = None,
                  return_plan: bool = False, return_lse: bool = False, backend: Optional[str] = None):
    """Permuted block-sparse causal attention: ``pbs_plan`` then ``block_sparse_attention``.

    With ``threshold=1.0`` the output equals dense causal attention (``scaled_dot_product_attention(q, k, v,
    is_causal=True, enable_gqa=True)``). Returns ``out``, or a tuple ``(out, lse)``, ``(out, plan)`` or
    ``(out, lse, plan)`` as asked by ``return_lse`` / ``return_plan``.
    """
    _check_qkv(q, k, v)
    plan = pbs_plan(q, k, block_size=block_size, segment_size=segment_size, threshold=threshold,
                    force_first_block=force_first_block, causal=causal, scale=scale, backend=backend)
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True, backend=backend)
    result = (out,) + ((lse,) if return_lse else ()) + ((plan,) if return_plan else ())
    return result if len(result) > 1 else out
