"""Triton kernels of MoE routing, plus launchers.

The launchers ``moe_topk_route``, ``moe_align_block_size``, ``moe_permute`` and ``moe_unpermute`` have the
signatures and results of ``pykernels.reference.moe`` (contract: docs/PRIMITIVES.md, "MoE routing"): ids, sorted
pair lists, offsets and masks are equal to the reference, combine outputs bit-identical, routing weights within
float32 round-off. Values are loaded exactly (bf16 from its bits) and computed in float32; bf16 outputs are
rounded to nearest even by integer arithmetic (``_cast_out``), as the interpreter's cast truncates.

Design
------
* moe_topk_route: ``_route_kernel``, one program per tile of token rows x padded experts. Slot g * BLOCK_GS + c
  of a row holds expert g * group_size + c (ungrouped routing: one group of all E experts), each of the two
  padded to a power of two, so a reshape to (rows, groups, group size) makes group scores plain reductions over
  the last axis for any E and group count, and slots ascend with the experts. Scores (softmax: exp(x - max) /
  sum; sigmoid: 1 / (1 + exp(-x))), selection keys (the logits, or score + bias), then, for grouped routing, the
  kept groups: rounds of "largest group score, lowest group" (or, when that takes fewer rounds, of dropping
  "smallest, highest group"), and the keys of the other groups set to -inf. Then k rounds of argmax: the
  largest key and the lowest slot attaining it (``tl.max`` with tie-break-left indices), its unbiased score,
  the key masked out. Keys are finite and k never exceeds the experts of the kept groups (the API checks
  both), so a round never picks a padded or excluded expert. The renormalising sum is accumulated in the ids'
  order; divisions are IEEE (``div_rn``). Under the interpreter, whose cost is per operation rather than per
  element, tiles are larger (``_INTERPRETED_ROUTE_*``); the kernel is the same.
* Counting sort (align and permute): each pair p = t * k + j gets a bucket (its expert; permute: the bucket E
  for a dropped pair; align: none for an expert mapped to -1). ``_chunk_rank_kernel`` (one program per
  ``_SORT_CHUNK`` pairs) computes each pair's rank among the earlier pairs of its chunk with the same bucket
  (a chunk x chunk comparison, no atomics) and the chunk's count per bucket. On the device in torch: a cumulative
  sum over the chunks gives every (chunk, bucket) its first output position; ``_scatter_kernel`` then writes
  each pair to base[chunk, bucket] + rank. Every position is a pure function of the ids, so the result is
  deterministic and each bucket's pairs come out in ascending p, as the reference's.
* moe_align_block_size: buckets are experts, starts are the expert runs padded to block_size (cumsum);
  ``_block_experts_kernel`` finds the expert of every block by a branch-free binary search over the run ends.
* moe_permute: without capacity one counting sort over E + 1 buckets (dropped pairs would go to bucket E, after
  every kept one, in ascending p). With capacity, the counts of a first pass show the experts over capacity;
  for their pairs only, torch on the device chooses the dropped ones (a stable sort by descending float32
  weight, then a stable sort by expert: each expert's pairs by weight, ties by ascending p; the ones ranked
  >= cap drop), and a second pass sorts with the drops in bucket E. ``_gather_rows_kernel`` copies the rows of
  x as raw integers of x's element size (any dtype, bitwise).
* moe_unpermute: ``_inverse_kernel`` scatters row i to its pair perm[i] (pairs absent from perm keep -1);
  ``_combine_kernel`` (one program per tile of tokens x columns) adds the products w[t, j] * y[row] in
  ascending j to a float32 zero, each product rounded on its own (launched with ``enable_fp_fusion=False``),
  and an absent pair adding +0.0, exactly as the reference's accumulation.

All element offsets are int64. Peak extra memory: route: none; align / permute: int32 ranks (P,), int32 chunk
counts and int64 bases (P / _SORT_CHUNK, buckets), permute with capacity: torch sort temporaries of the pairs
of over-capacity experts; unpermute: int64 inverse map (T * k,).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .attention import _load_f32
from .merging import _cast_out

# ----------------------------------------------------------------------------------------------------------
# Fixed sizes (module constants; tests may shrink them to exercise multi-program paths).
# ----------------------------------------------------------------------------------------------------------
_ROUTE_TILE = 4096  # logits per routing program (rows x padded experts)
_ROUTE_MAX_ROWS = 64  # token rows per routing program
# Under the interpreter a program costs per operation, hardly per element: far fewer, larger tiles.
_INTERPRETED_ROUTE_TILE = 1 << 16
_INTERPRETED_ROUTE_MAX_ROWS = 512
_SORT_CHUNK = 128  # pairs per counting-sort program (a chunk x chunk comparison)
_BLOCK = 1024  # elements per program of the elementwise kernels
_COMBINE_ROWS = 16  # tokens per combine program
_COMBINE_COLS = 128  # columns per combine / gather program
_NUM_WARPS = 4


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# moe_topk_route
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _scores(x, SCORING: tl.constexpr):
    """float32 softmax of each row or sigmoid; padded experts (x = -inf) get 0."""
    if SCORING == 0:
        e = tl.exp(x - tl.max(x, 1)[:, None])
        s = tl.math.div_rn(e, tl.sum(e, 1)[:, None])
    else:
        s = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
    return s


@triton.jit
def _group_scores(key, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_GS: tl.constexpr):
    """(rows, groups): the largest key of each group, or (with a bias) the sum of its two largest keys."""
    grouped = tl.reshape(key, (BLOCK_T, BLOCK_G, BLOCK_GS))
    if HAS_BIAS:
        top, first = tl.max(grouped, 2, return_indices=True, return_indices_tie_break_left=True)
        c = tl.arange(0, BLOCK_GS)[None, None, :]
        second = tl.max(tl.where(c == first[:, :, None], float("-inf"), grouped), 2)
        # keys are finite: second is -inf only for a group of one expert, which scores its key alone
        top = tl.where(second == float("-inf"), top, top + second)
    else:
        top = tl.max(grouped, 2)
    return top


@triton.jit
def _kept_groups(score, num_groups, topk_groups, DROP: tl.constexpr, BLOCK_G: tl.constexpr):
    """bool (rows, groups): the topk_groups groups of largest score, ties to the lower group. Takes the cheaper
    of topk_groups rounds of picking the best group or num_groups - topk_groups rounds of dropping the worst
    one (ties: the higher group drops first; the same set)."""
    g = tl.arange(0, BLOCK_G)[None, :]
    if DROP:
        kept = (tl.zeros_like(score) == 0.0) & (g < num_groups)
        for _ in range(num_groups - topk_groups):
            candidates = tl.where(kept, score, float("inf"))
            worst = tl.min(candidates, 1)
            last = tl.max(tl.where(candidates == worst[:, None], g, -1), 1)
            kept = kept & (g != last[:, None])
    else:
        kept = tl.zeros_like(score) != 0.0
        available = score  # padded groups score -inf and real ones are finite: never picked
        for _ in range(topk_groups):
            _, best = tl.max(available, 1, return_indices=True, return_indices_tie_break_left=True)
            kept = kept | (g == best[:, None])
            available = tl.where(g == best[:, None], float("-inf"), available)
    return kept


@triton.jit
def _keep_groups(key, num_groups, topk_groups, HAS_BIAS: tl.constexpr, DROP: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr):
    """key with the experts outside the kept groups set to -inf."""
    score = _group_scores(key, HAS_BIAS, BLOCK_T, BLOCK_G, BLOCK_GS)
    kept = _kept_groups(score, num_groups, topk_groups, DROP, BLOCK_G)
    kept = tl.reshape(tl.broadcast_to(kept[:, :, None], (BLOCK_T, BLOCK_G, BLOCK_GS)), (BLOCK_T, BLOCK_G * BLOCK_GS))
    return tl.where(kept, key, float("-inf"))


@triton.jit
def _select_topk(key, s, k, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(weights (rows, BLOCK_K) float32, slots (rows, BLOCK_K) int32, the weights' sum in slot order): k rounds
    of the largest key, ties to the lowest slot (slots ascend with the experts); the weight is the unbiased
    score."""
    slot = tl.arange(0, BLOCK_E)[None, :]
    out = tl.arange(0, BLOCK_K)[None, :]
    weights = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    for j in range(k):
        _, best = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
        is_best = slot == best[:, None]
        score = tl.max(tl.where(is_best, s, float("-inf")), 1)
        key = tl.where(is_best, float("-inf"), key)
        weights = tl.where(out == j, score[:, None], weights)
        chosen = tl.where(out == j, best[:, None], chosen)
        total += score
    return weights, chosen, total


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, k, group_size, num_groups, topk_groups, scaling,
                  stride_t, stride_e, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
                  GROUPED: tl.constexpr, DROP_GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """weights[t, :k], ids[t, :k] of the token rows of one tile (contract: moe_topk_route). A row's slot
    g * BLOCK_GS + c holds expert g * group_size + c (one group of all experts when ungrouped)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    slot = tl.arange(0, BLOCK_G * BLOCK_GS)
    expert = (slot // BLOCK_GS) * group_size + slot % BLOCK_GS
    exists = (slot // BLOCK_GS < num_groups) & (slot % BLOCK_GS < group_size)
    offs = rows.to(tl.int64)[:, None] * stride_t + expert.to(tl.int64)[None, :] * stride_e
    # rows past T load zeros (not -inf): no NaN from their softmax
    x = _load_f32(logits_ptr, offs, row_ok[:, None] & exists[None, :])
    x = tl.where(exists[None, :], x, float("-inf"))
    s = _scores(x, SCORING)
    if HAS_BIAS:
        key = tl.where(exists[None, :], s + _load_f32(bias_ptr, expert, exists)[None, :], float("-inf"))
    else:
        key = x  # softmax and sigmoid keep the logits' order, ties included
    if GROUPED:
        key = _keep_groups(key, num_groups, topk_groups, HAS_BIAS, DROP_GROUPS, BLOCK_T, BLOCK_G, BLOCK_GS)
    weights, chosen, total = _select_topk(key, s, k, BLOCK_T, BLOCK_G * BLOCK_GS, BLOCK_K)
    if RENORMALIZE:
        weights = tl.math.div_rn(weights, tl.where(total == 0.0, 1.0, total)[:, None])
    weights = weights * scaling
    out = tl.arange(0, BLOCK_K)[None, :]
    offs = rows.to(tl.int64)[:, None] * k + out
    mask = row_ok[:, None] & (out < k)
    tl.store(weights_ptr + offs, weights, mask=mask)
    tl.store(ids_ptr + offs, (chosen // BLOCK_GS) * group_size + chosen % BLOCK_GS, mask=mask)


def _route_layout(experts: int, num_groups: int, topk_groups: int):
    """(groups, group size, grouped): grouped routing only when it can exclude an expert."""
    if num_groups > 1 and topk_groups < num_groups:
        return num_groups, experts // num_groups, True
    return 1, experts, False


def moe_topk_route(logits, k: int, scoring: int, bias, renormalize: bool, num_groups: int, topk_groups: int,
                   scaling: float):
    """(weights float32 (T, k), ids int32 (T, k))."""
    tokens, experts = logits.shape
    weights = torch.empty((tokens, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, k), dtype=torch.int32, device=logits.device)
    if tokens == 0:
        return weights, ids
    groups, group_size, grouped = _route_layout(experts, num_groups, topk_groups)
    block_g, block_gs = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
    tile, max_rows = (_INTERPRETED_ROUTE_TILE, _INTERPRETED_ROUTE_MAX_ROWS) if _interpreted() else \
        (_ROUTE_TILE, _ROUTE_MAX_ROWS)
    block_t = max(1, min(max_rows, tile // (block_g * block_gs), triton.next_power_of_2(tokens)))
    has_bias = bias is not None
    _route_kernel[(triton.cdiv(tokens, block_t),)](
        logits, bias.contiguous() if has_bias else logits, weights, ids, tokens, k, group_size, groups, topk_groups,
        float(scaling), logits.stride(0), logits.stride(1), SCORING=int(scoring), HAS_BIAS=has_bias,
        RENORMALIZE=bool(renormalize), GROUPED=grouped, DROP_GROUPS=2 * topk_groups > groups, BLOCK_T=block_t,
        BLOCK_G=block_g, BLOCK_GS=block_gs, BLOCK_K=triton.next_power_of_2(k), num_warps=_NUM_WARPS)
    return weights, ids


# ----------------------------------------------------------------------------------------------------------
# Counting sort of (token, expert) pairs (align and permute)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _buckets(ids_ptr, map_ptr, drop_ptr, p, ok, num_experts, HAS_MAP: tl.constexpr, HAS_DROP: tl.constexpr):
    """Bucket of each pair p (int32; -1 for none): its expert; -1 if the map sends that expert to -1; the bucket
    num_experts if the pair is dropped."""
    expert = tl.load(ids_ptr + p, mask=ok, other=0).to(tl.int32)
    if HAS_MAP:
        ok = ok & (tl.load(map_ptr + expert, mask=ok, other=-1) >= 0)
    if HAS_DROP:
        expert = tl.where(tl.load(drop_ptr + p, mask=ok, other=0) != 0, num_experts, expert)
    return tl.where(ok, expert, -1)


@triton.jit
def _chunk_rank_kernel(ids_ptr, map_ptr, drop_ptr, rank_ptr, count_ptr, pairs, num_experts, num_buckets,
                       HAS_MAP: tl.constexpr, HAS_DROP: tl.constexpr, CHUNK: tl.constexpr):
    """rank[p] = earlier pairs of p's chunk in p's bucket; count[chunk, b] = pairs of the chunk in bucket b."""
    chunk = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    p = chunk.to(tl.int64) * CHUNK + i
    ok = p < pairs
    bucket = _buckets(ids_ptr, map_ptr, drop_ptr, p, ok, num_experts, HAS_MAP, HAS_DROP)
    same = bucket[:, None] == bucket[None, :]
    rank = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), 1)
    in_bucket = tl.sum(same.to(tl.int32), 1)
    counted = bucket >= 0
    tl.store(rank_ptr + p, rank, mask=counted)
    # the bucket's last pair of the chunk writes the count: one writer per (chunk, bucket), no atomics
    last = counted & (rank + 1 == in_bucket)
    tl.store(count_ptr + chunk.to(tl.int64) * num_buckets + bucket, in_bucket, mask=last)


@triton.jit
def _scatter_kernel(ids_ptr, map_ptr, drop_ptr, rank_ptr, base_ptr, out_ptr, pairs, num_experts, num_buckets,
                    HAS_MAP: tl.constexpr, HAS_DROP: tl.constexpr, CHUNK: tl.constexpr):
    """out[base[chunk, bucket] + rank[p]] = p for every pair with a bucket."""
    chunk = tl.program_id(0)
    p = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    bucket = _buckets(ids_ptr, map_ptr, drop_ptr, p, p < pairs, num_experts, HAS_MAP, HAS_DROP)
    counted = bucket >= 0
    rank = tl.load(rank_ptr + p, mask=counted, other=0)
    base = tl.load(base_ptr + chunk.to(tl.int64) * num_buckets + bucket, mask=counted, other=0)
    tl.store(out_ptr + base + rank, p.to(out_ptr.dtype.element_ty), mask=counted)


class _PairSort:
    """The counting sort of the flattened pairs into buckets: ranks and per-chunk counts (first kernel), then a
    scatter to bucket starts chosen by the caller (second kernel)."""

    def __init__(self, flat_ids, num_experts: int, num_buckets: int, expert_map=None, dropped=None):
        self.ids, self.num_experts, self.num_buckets = flat_ids, num_experts, num_buckets
        self.map, self.dropped = expert_map, dropped
        self.pairs = flat_ids.numel()
        self.chunks = triton.cdiv(self.pairs, _SORT_CHUNK)
        device = flat_ids.device
        self.rank = torch.empty(self.pairs, dtype=torch.int32, device=device)
        self.chunk_counts = torch.zeros((self.chunks, num_buckets), dtype=torch.int32, device=device)
        if self.chunks:
            _chunk_rank_kernel[(self.chunks,)](*self._inputs(), self.rank, self.chunk_counts, self.pairs,
                                               num_experts, num_buckets, **self._flags())

    def _inputs(self):
        return (self.ids, self.ids if self.map is None else self.map,
                self.ids if self.dropped is None else self.dropped.view(torch.uint8))

    def _flags(self):
        return dict(HAS_MAP=self.map is not None, HAS_DROP=self.dropped is not None, CHUNK=_SORT_CHUNK,
                    num_warps=_NUM_WARPS)

    def counts(self) -> torch.Tensor:
        """int64 (buckets,): pairs per bucket."""
        return self.chunk_counts.sum(0, dtype=torch.int64)

    def scatter(self, starts, out) -> None:
        """out[starts[b] + (position of the pair among bucket b's pairs, ascending p)] = p."""
        if not self.chunks:
            return
        cumulative = self.chunk_counts.cumsum(0, dtype=torch.int64)
        base = cumulative - self.chunk_counts + starts.unsqueeze(0)  # the chunk's first position in each bucket
        _scatter_kernel[(self.chunks,)](*self._inputs(), self.rank, base, out, self.pairs, self.num_experts,
                                        self.num_buckets, **self._flags())


def _exclusive_cumsum(counts) -> torch.Tensor:
    """int64 (n + 1,): 0, counts[0], counts[0] + counts[1], ..."""
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0))


# ----------------------------------------------------------------------------------------------------------
# moe_align_block_size
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _block_experts_kernel(ends_ptr, map_ptr, out_ptr, num_blocks, num_experts, block_size, HAS_MAP: tl.constexpr,
                          STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = expert (mapped) whose padded run holds block b, -1 past the filled blocks. The expert is the
    number of runs ending at or before the block's first entry (ends ascend): a branch-free binary search."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = b < num_blocks
    start = b.to(tl.int64) * block_size
    expert = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(STEPS):  # steps 2^(STEPS-1), ..., 2, 1 reach any count in [0, num_experts]
        candidate = expert + (1 << (STEPS - 1 - i))
        inside = candidate <= num_experts
        end = tl.load(ends_ptr + candidate - 1, mask=inside, other=0)
        expert = tl.where(inside & (end <= start), candidate, expert)
    filled = start < tl.load(ends_ptr + num_experts - 1)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=filled & ok, other=-1)
    tl.store(out_ptr + b, tl.where(filled, expert, -1), mask=ok)


def _block_experts(ends, expert_map, num_blocks: int, block_size: int):
    out = torch.empty(num_blocks, dtype=torch.int32, device=ends.device)
    experts = ends.numel()
    _block_experts_kernel[(triton.cdiv(num_blocks, _BLOCK),)](
        ends, ends if expert_map is None else expert_map, out, num_blocks, experts, block_size,
        HAS_MAP=expert_map is not None, STEPS=experts.bit_length(), BLOCK=_BLOCK,
        num_warps=_NUM_WARPS)
    return out


def moe_align_block_size(ids, num_experts: int, block_size: int, expert_map):
    """(sorted_ids int32 (capacity,), block_expert_ids int32 (capacity // block_size,), total int32 (1,))."""
    flat = ids.reshape(-1).contiguous()
    pairs = flat.numel()
    capacity = triton.cdiv(pairs + num_experts * (block_size - 1), block_size) * block_size
    if expert_map is not None:
        expert_map = expert_map.to(device=ids.device, dtype=torch.int32).contiguous()
    pair_sort = _PairSort(flat, num_experts, num_experts, expert_map=expert_map)
    padded = (pair_sort.counts() + block_size - 1) // block_size * block_size
    starts = _exclusive_cumsum(padded)
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=ids.device)
    pair_sort.scatter(starts[:-1], sorted_ids)
    block_expert_ids = _block_experts(starts[1:].contiguous(), expert_map, capacity // block_size, block_size)
    return sorted_ids, block_expert_ids, starts[-1:].to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# moe_permute
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _gather_rows_kernel(x_ptr, perm_ptr, out_ptr, rows, width, k, stride_r, stride_c, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """out[i, :] = x[perm[i] // k, :] (raw integer elements: a bitwise copy)."""
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_ok = i < rows
    token = tl.load(perm_ptr + i, mask=i_ok, other=0) // k
    mask = i_ok[:, None] & (col < width)[None, :]
    values = tl.load(x_ptr + token[:, None] * stride_r + col.to(tl.int64)[None, :] * stride_c, mask=mask)
    tl.store(out_ptr + i.to(tl.int64)[:, None] * width + col[None, :], values, mask=mask)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(x):
    """x (R, C) as a 2-D integer tensor holding its bytes (a view when its element size has an integer type)."""
    size = x.element_size()
    if size in _BITS:
        return x.view(_BITS[size])
    return x.contiguous().view(torch.int8)  # e.g. complex128: rows of raw bytes


def _gather_rows(x, perm, k: int):
    out = torch.empty((perm.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    src, dst = _as_bits(x), _as_bits(out)
    if dst.numel():
        grid = (triton.cdiv(dst.shape[0], _COMBINE_ROWS), triton.cdiv(dst.shape[1], _COMBINE_COLS))
        _gather_rows_kernel[grid](src, perm, dst, dst.shape[0], dst.shape[1], k, src.stride(0), src.stride(1),
                                  BLOCK_R=_COMBINE_ROWS, BLOCK_C=_COMBINE_COLS, num_warps=_NUM_WARPS)
    return out


def _capacity_drops(flat, weights, counts, cap: int):
    """bool (P,): pairs dropped by experts over capacity, each keeping its cap pairs of largest float32 weight
    (ties: lower p). Only those experts' pairs are sorted (torch, on the device)."""
    dropped = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    crowded = torch.nonzero(counts[flat] > cap).flatten()  # ascending p
    by_weight = torch.sort(weights.reshape(-1).float()[crowded], descending=True, stable=True).indices
    order = by_weight[torch.sort(flat[crowded][by_weight], stable=True).indices]  # by expert, then weight, then p
    experts = flat[crowded][order].contiguous()
    rank = torch.arange(order.numel(), device=flat.device) - torch.searchsorted(experts, experts)
    dropped[crowded[order[rank >= cap]]] = True
    return dropped


def moe_permute(x, ids, weights, num_experts: int, capacity_factor: float):
    """(x_sorted (P, H), perm int64 (P,), expert_offsets int64 (E + 1,), dropped bool (T, k))."""
    tokens, k = ids.shape
    flat = ids.reshape(-1).contiguous()
    pairs = flat.numel()
    # bucket E holds the dropped pairs, after every kept one
    pair_sort = _PairSort(flat, num_experts, num_experts + 1)
    dropped = torch.zeros(pairs, dtype=torch.bool, device=ids.device)
    if capacity_factor > 0:
        cap = math.ceil(capacity_factor * pairs / num_experts)
        counts = pair_sort.counts()[:num_experts]
        if bool((counts > cap).any()):
            dropped = _capacity_drops(flat.long(), weights, counts, cap)
            pair_sort = _PairSort(flat, num_experts, num_experts + 1, dropped=dropped)
    offsets = _exclusive_cumsum(pair_sort.counts())
    perm = torch.empty(pairs, dtype=torch.int64, device=ids.device)
    pair_sort.scatter(offsets[:-1], perm)
    return _gather_rows(x, perm, max(k, 1)), perm, offsets[:-1], dropped.view(tokens, k)


# ----------------------------------------------------------------------------------------------------------
# moe_unpermute
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _inverse_kernel(perm_ptr, inverse_ptr, rows, BLOCK: tl.constexpr):
    """inverse[perm[i]] = i."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < rows
    tl.store(inverse_ptr + tl.load(perm_ptr + i, mask=ok, other=0), i, mask=ok)


@triton.jit
def _combine_kernel(y_ptr, inverse_ptr, w_ptr, out_ptr, T, H, k, stride_yr, stride_yc, stride_wt, stride_wk,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = 0 + w[t, 0] * y[row(t, 0)] + w[t, 1] * y[row(t, 1)] + ... (float32, ascending j, absent pairs
    adding +0.0), in out's dtype."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    h_ok = h < H
    t64 = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for j in range(k):
        row = tl.load(inverse_ptr + t64 * k + j, mask=t_ok, other=-1)
        present = (row >= 0)[:, None]
        w = _load_f32(w_ptr, t64 * stride_wt + j * stride_wk, t_ok)
        y = _load_f32(y_ptr, row[:, None] * stride_yr + h.to(tl.int64)[None, :] * stride_yc, present & h_ok[None, :])
        product = w[:, None] * y  # rounded on its own: the launch disables FMA contraction
        acc = acc + tl.where(present, product, 0.0)
    offs = t64[:, None] * H + h[None, :]
    tl.store(out_ptr + offs, _cast_out(acc, out_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])


def _inverse(perm, pairs: int):
    """int64 (pairs,): the row of each pair, -1 for pairs absent from perm."""
    inverse = torch.full((pairs,), -1, dtype=torch.int64, device=perm.device)
    rows = perm.numel()
    if rows:
        _inverse_kernel[(triton.cdiv(rows, _BLOCK),)](perm.contiguous(), inverse, rows, BLOCK=_BLOCK,
                                                      num_warps=_NUM_WARPS)
    return inverse


def moe_unpermute(y, perm, weights):
    """(T, H) in y's dtype: the weighted sum of each token's rows, float32 accumulation in ascending j."""
    tokens, k = weights.shape
    width = y.shape[1]
    out = torch.empty((tokens, width), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    inverse = _inverse(perm, tokens * k)
    grid = (triton.cdiv(tokens, _COMBINE_ROWS), triton.cdiv(width, _COMBINE_COLS))
    _combine_kernel[grid](y, inverse, weights, out, tokens, width, k, y.stride(0), y.stride(1), weights.stride(0),
                          weights.stride(1), BLOCK_T=_COMBINE_ROWS, BLOCK_H=_COMBINE_COLS, num_warps=_NUM_WARPS,
                          enable_fp_fusion=False)
    return out
