"""Reference permuted block-sparse attention (PBS-Attn, DESIGN.md section 5), plain PyTorch, for clarity.

Three steps, each an op every backend implements (contract: docs/PRIMITIVES.md, "Attention"):

1. ``pbs_permutation``: inside each full segment of S keys, order the keys by the attention mass the last
   block of queries gives them (descending, ties by index); the remainder segment stays in order.
2. ``pbs_select_blocks``: for every query block, the key blocks (of the permuted order) it attends to: the
   smallest set of earlier-segment blocks whose pooled-attention mass reaches ``threshold``, the key blocks of
   its own segment that hold a key at or before its last row, and the block holding token 0.
3. ``pbs_block_attention``: attention of each query block over the keys of its listed blocks, read through the
   permutation, with the causal rule on original positions (query r sees original key j iff r >= j).

Plan scores (steps 1-2) are computed in float64 so that every backend orders keys and blocks the same way:
two float64 computations of the same score differ by ~1e-16, far below any gap the data can have.
Attention (step 3) computes in float32 and returns the output in q's dtype plus the float32 log-sum-exp.
"""
from __future__ import annotations

import math

import torch


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def block_segment(block: int, block_size: int, segment_size: int) -> int:
    """Segment of key/query block `block` (segments are block-aligned; the remainder segment is number N // S)."""
    return block * block_size // segment_size


def pbs_permutation(q, k, block_size: int, segment_size: int, scale: float) -> torch.Tensor:
    """int32 (B, Hkv, N): perm[b, h, c] = original index of the key at permuted position c."""
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    perm = torch.arange(n, dtype=torch.int32).repeat(batch, hkv, 1)
    if n <= segment_size:
        return perm
    full = (n // segment_size) * segment_size
    last = q[:, :, n - min(block_size, n):].double()                      # (B, Hq, R, D)
    for b in range(batch):
        for h in range(hkv):
            queries = last[b, h * group:(h + 1) * group].reshape(-1, q.shape[-1])
            logits = queries @ k[b, h, :full].double().T * scale
            mass = torch.softmax(logits, dim=-1).mean(dim=0)                # (full,)
            order = torch.sort(mass.view(-1, segment_size), dim=-1, descending=True, stable=True).indices
            starts = torch.arange(0, full, segment_size).view(-1, 1)
            perm[b, h, :full] = (order + starts).flatten().to(torch.int32)
    return perm


def _pooled(x, block_size: int) -> torch.Tensor:
    """float64 (..., nb, D): mean of each block of rows, partial last block divided by its true length."""
    n = x.shape[-2]
    sums = torch.stack([x[..., i:i + block_size, :].double().sum(-2) for i in range(0, n, block_size)], dim=-2)
    lengths = torch.tensor([min(block_size, n - i) for i in range(0, n, block_size)], dtype=torch.float64)
    return sums / lengths.view(-1, 1)


def keep_by_mass(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool mask of the smallest set of largest softmax(scores) (ties: lower index first) reaching threshold."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    if scores.numel() == 0 or threshold <= 0.0:
        return keep
    if threshold >= 1.0:
        return ~keep
    probs = torch.softmax(scores, dim=-1)
    order = torch.sort(probs, descending=True, stable=True).indices
    cumulative = torch.cumsum(probs[order], dim=0)
    reached = torch.nonzero(cumulative >= threshold)
    count = int(reached[0]) + 1 if len(reached) else len(order)   # round-off short of threshold: keep all
    keep[order[:count]] = True
    return keep


def pbs_select_blocks(q, k, perm, block_size: int, segment_size: int, threshold: float, force_first_block: bool,
                      scale: float):
    """(counts int32 (B, Hq, nb), indices int32 (B, Hq, nb, nb)): row [b, h, i] lists counts[b, h, i] key blocks
    in ascending order, then -1 padding."""
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = num_blocks(n, block_size)
    counts = torch.zeros((batch, hq, nb), dtype=torch.int32)
    indices = torch.full((batch, hq, nb, nb), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(hq):
            order = perm[b, h // group].long()
            pooled_q = _pooled(q[b, h], block_size)
            pooled_k = _pooled(k[b, h // group, order], block_size)
            scores = pooled_q @ pooled_k.T * scale
            block_first_key = [int(order[j * block_size:(j + 1) * block_size].min()) for j in range(nb)]
            first_token_block = int(torch.nonzero(order == 0)[0]) // block_size if n else 0
            for i in range(nb):
                segment = block_segment(i, block_size, segment_size)
                seg_first = segment * segment_size // block_size
                seg_end = min(nb, (segment + 1) * segment_size // block_size)
                keep = torch.zeros(nb, dtype=torch.bool)
                keep[:seg_first] = keep_by_mass(scores[i, :seg_first], threshold)
                last_row = min((i + 1) * block_size, n) - 1
                for j in range(seg_first, seg_end):
                    keep[j] = block_first_key[j] <= last_row
                if force_first_block:
                    keep[first_token_block] = True
                chosen = torch.nonzero(keep).flatten()
                counts[b, h, i] = len(chosen)
                indices[b, h, i, :len(chosen)] = chosen.to(torch.int32)
    return counts, indices


def pbs_block_attention(q, k, v, perm, offsets, indices, block_size: int, scale: float):
    """(out (B, Hq, N, D) in q's dtype, lse float32 (B, Hq, N)); a row that sees no key gets out 0, lse -inf."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = num_blocks(n, block_size)
    out = torch.zeros((batch, hq, n, d), dtype=torch.float32)
    lse = torch.full((batch, hq, n), -math.inf, dtype=torch.float32)
    for b in range(batch):
        for h in range(hq):
            for i in range(nb):
                row = (b * hq + h) * nb + i
                blocks = indices[int(offsets[row]):int(offsets[row + 1])].tolist()
                rows = torch.arange(i * block_size, min((i + 1) * block_size, n))
                cols = [c for j in blocks for c in range(j * block_size, min((j + 1) * block_size, n))]
                keys = perm[b, h // group, cols].long()
                logits = q[b, h, rows].float() @ k[b, h // group, keys].float().T * scale
                logits = logits.masked_fill(rows.view(-1, 1) < keys.view(1, -1), -math.inf)
                row_lse = torch.logsumexp(logits, dim=-1)
                seen = torch.isfinite(row_lse)
                weights = torch.where(seen.view(-1, 1), torch.exp(logits - row_lse.view(-1, 1)), 0.0)
                out[b, h, rows] = weights @ v[b, h // group, keys].float()
                lse[b, h, rows] = row_lse
    return out.to(q.dtype), lse
