"""Reference MoE routing (DESIGN.md section 6), plain PyTorch, for clarity (contract: docs/PRIMITIVES.md "MoE").

* ``moe_topk_route``: scores s = softmax or sigmoid of the float32 logits; the experts are chosen on a key
  (the logits themselves without a bias: softmax and sigmoid keep their order, so ties are ties of the logits;
  s + bias with a bias), in descending key order, ties to the lower expert index. Grouped routing keeps the
  ``topk_groups`` groups with the largest group score (sum of the top-2 keys of the group with a bias, the
  group's largest key without), ties to the lower group. Weights are the unbiased scores, renormalized to
  sum 1 (a zero sum is left alone) and multiplied by ``scaling``.
* ``moe_align_block_size``: vLLM's moe_align_block_size output, every expert's flattened pair indices
  t * k + j in ascending order.
* ``moe_permute`` / ``moe_unpermute``: pairs sorted by (expert, flattened index), optionally capped per expert.
"""
from __future__ import annotations

import math

import torch

SOFTMAX, SIGMOID = 0, 1


def routing_scores(logits: torch.Tensor, scoring: int) -> torch.Tensor:
    x = logits.float()
    return torch.softmax(x, dim=-1) if scoring == SOFTMAX else torch.sigmoid(x)


def _descending(keys: torch.Tensor) -> torch.Tensor:
    """Indices of keys (last dim) in descending order, ties to the lower index."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


def moe_topk_route(logits, k: int, scoring: int, bias, renormalize: bool, num_groups: int, topk_groups: int,
                   scaling: float):
    """(weights float32 (T, k), ids int32 (T, k))."""
    tokens, experts = logits.shape
    scores = routing_scores(logits, scoring)
    keys = logits.float() if bias is None else scores + bias.float()
    if num_groups > 1:
        grouped = keys.view(tokens, num_groups, experts // num_groups)
        top = torch.sort(grouped, dim=-1, descending=True).values
        group_scores = top[..., 0] if bias is None else top[..., :2].sum(-1)
        kept_groups = _descending(group_scores)[:, :topk_groups]
        allowed = torch.zeros(tokens, num_groups, dtype=torch.bool)
        allowed.scatter_(1, kept_groups, True)
        keys = keys.masked_fill(~allowed.repeat_interleave(experts // num_groups, dim=1), -math.inf)
    ids = _descending(keys)[:, :k]
    weights = torch.gather(scores, 1, ids)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    return weights * float(scaling), ids.to(torch.int32)


def moe_align_block_size(ids, num_experts: int, block_size: int, expert_map):
    """(sorted_ids int32 (capacity,), block_expert_ids int32 (capacity // block_size,), total int32 (1,)).

    capacity = T*k + E*(block_size-1) rounded up to a multiple of block_size; entries past the end of every
    expert's padded run hold the sentinel T*k, blocks past the total hold -1. With expert_map, pairs of
    experts mapped to -1 are dropped and block_expert_ids hold the mapped (local) ids."""
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    capacity = -(-(pairs + num_experts * (block_size - 1)) // block_size) * block_size
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32)
    block_expert_ids = torch.full((capacity // block_size,), -1, dtype=torch.int32)
    position = 0
    for expert in range(num_experts):
        local = expert if expert_map is None else int(expert_map[expert])
        if local < 0:
            continue
        members = torch.nonzero(flat == expert).flatten()
        if len(members) == 0:
            continue
        sorted_ids[position:position + len(members)] = members.to(torch.int32)
        padded = -(-len(members) // block_size) * block_size
        block_expert_ids[position // block_size:(position + padded) // block_size] = local
        position += padded
    return sorted_ids, block_expert_ids, torch.tensor([position], dtype=torch.int32)


def expert_capacity(capacity_factor: float, pairs: int, num_experts: int) -> int:
    """Pairs an expert may take: ceil(capacity_factor * T * k / E); <= 0 means no limit."""
    return math.ceil(capacity_factor * pairs / num_experts) if capacity_factor > 0 else pairs


def moe_permute(x, ids, weights, num_experts: int, capacity_factor: float):
    """(x_sorted (T*k, H), perm int64 (T*k,), expert_offsets int64 (E + 1,), dropped bool (T, k)).

    perm[i] = flattened pair index t*k + j of sorted row i (x_sorted[i] = x[perm[i] // k]): the kept pairs in
    (expert, flattened index) order, expert e's at rows expert_offsets[e]:expert_offsets[e+1], then the dropped
    pairs in flattened index order. With capacity_factor > 0 an expert keeps its `expert_capacity` pairs of
    largest weight (ties: lower flattened index kept); the rest are dropped."""
    tokens, k = ids.shape
    flat = ids.reshape(-1).long()
    cap = expert_capacity(capacity_factor, flat.numel(), num_experts)
    dropped = torch.zeros(flat.numel(), dtype=torch.bool)
    kept = []
    for expert in range(num_experts):
        members = torch.nonzero(flat == expert).flatten()
        if len(members) > cap:
            priority = _descending(weights.reshape(-1).float()[members])
            dropped[members[priority[cap:]]] = True
            members = members[~dropped[members]]
        kept.append(members)
    counts = torch.tensor([len(m) for m in kept], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    perm = torch.cat(kept + [torch.nonzero(dropped).flatten()])
    return x[perm // max(k, 1)], perm, offsets, dropped.view(tokens, k)


def moe_unpermute(y, perm, weights):
    """(T, H) in y's dtype: out[t] = sum over the kept pairs (t, j), in ascending j, of weights[t, j] * y[i]
    (float32 accumulation) where perm[i] = t*k + j."""
    tokens, k = weights.shape
    acc = torch.zeros(tokens, k, y.shape[1], dtype=torch.float32)
    acc.view(-1, y.shape[1])[perm] = y.float() * weights.reshape(-1).float()[perm].unsqueeze(1)
    out = torch.zeros(tokens, y.shape[1], dtype=torch.float32)
    for j in range(k):
        out = out + acc[:, j]
    return out.to(y.dtype)
