"""Triton kernels of permuted block-sparse attention (PBS-Attn), plus launchers.

The launchers ``pbs_permutation``, ``pbs_select_blocks`` and ``pbs_block_attention`` have the signatures and
results of ``pykernels.reference.attention`` (contract: docs/PRIMITIVES.md, "Attention"). The bf16 load and the
rounding output cast are those of ``kernels/merging.py``.

Design
------
* Loads: inputs may have any batch/head/token strides (the last dim is contiguous); every kernel takes the
  strides, computes int64 offsets and masks the head dim d < D inside a power-of-two BLOCK_D (D = 80, 96 are
  not powers of two). Values are converted exactly: bf16 from its bits (the interpreter's bf16 cast flushes
  subnormals), fp16 and fp32 by a cast.
* Plan scores are float64 (products and sums from the exactly converted inputs, ``tl.dot`` on float64 tiles),
  so plans equal the reference's up to float64 round-off (~1e-16, far below the gaps of real data). The scale
  reaches the plan kernels as a float64 tensor: a Python float argument would be rounded to float32.
* pbs_permutation: two kernels per (batch, kv head) over the group*bs last queries R:
    1. ``_row_stats_kernel`` (one program per tile of rows of R): online max and sum of exp over the keys of
       the full segments;
    2. ``_key_mass_kernel`` (one program per tile of keys): mass[j] = sum over R of exp(l - max) / sum,
       divided by |R| (the mean of the rows' softmax).
  The stable descending sort inside each segment is ``torch.sort(stable=True)`` on the device.
* pbs_select_blocks: ``_pool_kernel`` (float64 block means of q, and of k read through perm, true lengths),
  ``_block_scores_kernel`` (pooled q . pooled k * scale, only for the candidate blocks of earlier segments),
  then the per-row selection in vectorised torch on the device (masked softmax, stable descending sort,
  cumulative sum, first position reaching the threshold, own-segment rule, forced first-token block), in
  chunks of rows so that its temporaries stay bounded.
* pbs_block_attention: ``_block_attention_kernel``, one program per plan row (query block i of head h, batch
  b), later query blocks first (they hold the most keys). It loads its query block once and walks only the
  listed key blocks, gathering K and V rows through perm (``k_ptr + perm[c] * stride``). Logits in float32
  (q . k, then * scale), causal rule r >= perm[c] (c < N), online softmax with exp(logit - running max) and
  float32 accumulation; a row that sees no key ends with out 0 and lse -inf. exp, not exp2 of logits
  pre-scaled by log2(e): rounding a large scaled logit before the max is subtracted costs ~1e-5 relative on
  logits of a few hundred. fp32 inputs use ``tl.dot`` with input_precision="ieee" (no tf32): on a GPU one
  fused multiply-add chain over d per logit, in order. K is loaded as a (D, BS) tile, which under the
  interpreter makes ``tl.dot`` (np.matmul) an sgemm with that same order, the order of the CPU reference's
  sgemm on blocks of 8 or more rows: large logits then round identically. bf16/fp16 inputs on a GPU feed the
  matrix units in their own dtype (p rounded to it for p.v, float32 accumulation, like flash attention);
  under the interpreter, whose 16-bit arithmetic is not faithful, they are converted to float32 first.

Peak extra memory: pbs_permutation: 2 x B x Hkv x group*bs float64 row statistics and B x Hkv x N float64
masses; pbs_select_blocks: pooled q and k (float64, (B x Hq + B x Hkv) x nb x D), float64 scores
(B, Hq, nb, nb) and selection temporaries for at most ``_SELECT_ELEMENTS`` scores at a time;
pbs_block_attention: none besides its outputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .merging import _bf16_bits_to_f32, _cast_out

# ----------------------------------------------------------------------------------------------------------
# Fixed sizes (module constants; tests may shrink them to exercise multi-tile paths).
# ----------------------------------------------------------------------------------------------------------
_PLAN_ROWS = 32  # rows of the last queries per permutation tile
_PLAN_KEYS = 32  # keys per permutation tile
_POOL_ROWS = 16  # rows summed per step of a block mean
_SCORE_ROWS = 16  # query blocks per score program
_SCORE_COLS = 32  # key blocks per score tile
_SELECT_ELEMENTS = 1 << 22  # scores selected per torch step (bounds the selection temporaries)
_PLAN_WARPS = 4


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_f32(base_ptr, offs, mask):
    """float32 of x[offs] (0 where masked), exact: bf16 from its bits, fp16/fp32 by a cast."""
    if base_ptr.dtype.element_ty == tl.bfloat16:
        x = _bf16_bits_to_f32(tl.load(base_ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0))
    else:
        x = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _load_f64(base_ptr, offs, mask):
    return _load_f32(base_ptr, offs, mask).to(tl.float64)


@triton.jit
def _last_queries(q_ptr, b, kvh, r0, n, group, sqb, sqh, sqn, D, BS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """float64 (BLOCK_R, BLOCK_D) rows r0.. of R (row r: query head kvh*group + r // BS, token N - BS + r % BS),
    and the mask of the rows that exist."""
    r = r0 + tl.arange(0, BLOCK_R)
    row_ok = r < group * BS
    head = (kvh * group + r // BS).to(tl.int64)
    token = (n - BS + r % BS).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    offs = b * sqb + head[:, None] * sqh + token[:, None] * sqn + d[None, :]
    return _load_f64(q_ptr, offs, row_ok[:, None] & (d < D)[None, :]), row_ok


@triton.jit
def _key_rows(k_ptr, base, c0, limit, skn, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """float64 (BLOCK_K, BLOCK_D) key rows c0.. (token order) below `limit`, and their mask."""
    c = c0 + tl.arange(0, BLOCK_K)
    ok = c < limit
    d = tl.arange(0, BLOCK_D)
    offs = base + c.to(tl.int64)[:, None] * skn + d[None, :]
    return _load_f64(k_ptr, offs, ok[:, None] & (d < D)[None, :]), ok


@triton.jit
def _logits_f64(qt, kt, scale):
    return tl.dot(qt, tl.trans(kt), input_precision="ieee") * scale


# ----------------------------------------------------------------------------------------------------------
# pbs_permutation
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, scale_ptr, max_ptr, sum_ptr, n, full, hkv, group, sqb, sqh, sqn, skb, skh, skn,
                      D, BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """max[bh, r], sum[bh, r]: max and sum of exp(l - max) of row r of R over the keys j < full (float64)."""
    tiles = tl.cdiv(group * BS, BLOCK_R)
    pid = tl.program_id(0)
    bh = pid // tiles  # b * Hkv + kv head
    r0 = (pid % tiles) * BLOCK_R
    b = (bh // hkv).to(tl.int64)
    kvh = bh % hkv
    qt, row_ok = _last_queries(q_ptr, b, kvh, r0, n, group, sqb, sqh, sqn, D, BS, BLOCK_R, BLOCK_D)
    scale = tl.load(scale_ptr)
    k_base = b * skb + kvh.to(tl.int64) * skh
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float64)
    run_sum = tl.zeros((BLOCK_R,), tl.float64)
    for c0 in range(0, full, BLOCK_K):
        kt, key_ok = _key_rows(k_ptr, k_base, c0, full, skn, D, BLOCK_K, BLOCK_D)
        logits = tl.where(key_ok[None, :], _logits_f64(qt, kt, scale), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))  # finite: every tile holds a key
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        run_max = new_max
    r = bh.to(tl.int64) * group * BS + r0 + tl.arange(0, BLOCK_R)
    tl.store(max_ptr + r, run_max, mask=row_ok)
    tl.store(sum_ptr + r, run_sum, mask=row_ok)


@triton.jit
def _key_mass_kernel(q_ptr, k_ptr, scale_ptr, max_ptr, sum_ptr, mass_ptr, n, full, hkv, group, sqb, sqh, sqn, skb,
                     skh, skn, D, BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """mass[bh, j] = mean over the rows of R of softmax(row)[j], for the keys j < full (float64)."""
    tiles = tl.cdiv(full, BLOCK_K)
    pid = tl.program_id(0)
    bh = pid // tiles
    c0 = (pid % tiles) * BLOCK_K
    b = (bh // hkv).to(tl.int64)
    kvh = bh % hkv
    kt, key_ok = _key_rows(k_ptr, b * skb + kvh.to(tl.int64) * skh, c0, full, skn, D, BLOCK_K, BLOCK_D)
    scale = tl.load(scale_ptr)
    rows = group * BS
    stats = bh.to(tl.int64) * rows
    mass = tl.zeros((BLOCK_K,), tl.float64)
    for r0 in range(0, rows, BLOCK_R):
        qt, row_ok = _last_queries(q_ptr, b, kvh, r0, n, group, sqb, sqh, sqn, D, BS, BLOCK_R, BLOCK_D)
        r = stats + r0 + tl.arange(0, BLOCK_R)
        row_max = tl.load(max_ptr + r, mask=row_ok, other=0.0)
        row_sum = tl.load(sum_ptr + r, mask=row_ok, other=1.0)
        probs = tl.exp(_logits_f64(qt, kt, scale) - row_max[:, None]) / row_sum[:, None]
        mass += tl.sum(tl.where(row_ok[:, None], probs, 0.0), 0)
    c = c0 + tl.arange(0, BLOCK_K)
    tl.store(mass_ptr + bh.to(tl.int64) * full + c, mass / rows, mask=key_ok)


def _scale_tensor(scale: float, device) -> torch.Tensor:
    return torch.tensor([float(scale)], dtype=torch.float64, device=device)


def _key_mass(q, k, block_size: int, full: int, scale: float) -> torch.Tensor:
    """float64 (B, Hkv, full): mean softmax probability of each key under the group*bs last queries."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    rows = group * block_size
    row_max = torch.empty((batch * hkv, rows), dtype=torch.float64, device=q.device)
    row_sum = torch.empty_like(row_max)
    mass = torch.empty((batch, hkv, full), dtype=torch.float64, device=q.device)
    scale_t = _scale_tensor(scale, q.device)
    common = dict(D=d, BS=block_size, BLOCK_R=_PLAN_ROWS, BLOCK_K=_PLAN_KEYS, BLOCK_D=triton.next_power_of_2(d),
                  num_warps=_PLAN_WARPS)
    strides = (*q.stride()[:3], *k.stride()[:3])
    _row_stats_kernel[(batch * hkv * triton.cdiv(rows, _PLAN_ROWS),)](
        q, k, scale_t, row_max, row_sum, n, full, hkv, group, *strides, **common)
    _key_mass_kernel[(batch * hkv * triton.cdiv(full, _PLAN_KEYS),)](
        q, k, scale_t, row_max, row_sum, mass, n, full, hkv, group, *strides, **common)
    return mass


def pbs_permutation(q, k, block_size: int, segment_size: int, scale: float) -> torch.Tensor:
    """int32 (B, Hkv, N): perm[b, h, c] = original index of the key at permuted position c."""
    batch, _, n, _ = q.shape
    hkv = k.shape[1]
    perm = torch.arange(n, dtype=torch.int32, device=q.device).repeat(batch, hkv, 1)
    if n <= segment_size or batch * hkv == 0:
        return perm
    full = n // segment_size * segment_size
    mass = _key_mass(q, k, block_size, full, scale)
    order = torch.sort(mass.view(batch, hkv, -1, segment_size), dim=-1, descending=True, stable=True).indices
    starts = torch.arange(0, full, segment_size, device=q.device).view(-1, 1)
    perm[..., :full] = (order + starts).flatten(2).to(torch.int32)
    return perm


# ----------------------------------------------------------------------------------------------------------
# pbs_select_blocks
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(x_ptr, perm_ptr, out_ptr, n, nb, heads, sxb, sxh, sxn, D, GATHER: tl.constexpr,
                 BS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[bh, j] = float64 mean of the rows of block j of x[b, h] (rows x[perm[b, h, c]] when GATHER),
    divided by the block's true length."""
    pid = tl.program_id(0)
    bh = (pid // nb).to(tl.int64)
    j = pid % nb
    base = (bh // heads) * sxb + (bh % heads) * sxh
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    total = tl.zeros((BLOCK_D,), tl.float64)
    for r0 in range(0, BS, ROWS):
        c = j * BS + r0 + tl.arange(0, ROWS)
        ok = c < n
        if GATHER:
            token = tl.load(perm_ptr + bh * n + c, mask=ok, other=0)
        else:
            token = c
        x = _load_f64(x_ptr, base + token.to(tl.int64)[:, None] * sxn + d[None, :], ok[:, None] & d_ok[None, :])
        total += tl.sum(x, 0)
    length = tl.minimum(BS, n - j * BS).to(tl.float64)
    tl.store(out_ptr + (bh * nb + j) * D + d, total / length, mask=d_ok)


@triton.jit
def _block_scores_kernel(pq_ptr, pk_ptr, scale_ptr, out_ptr, nb, group, D, SEG_BLOCKS: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[bh, i, j] = pooled_q[bh, i] . pooled_k[bh // group, j] * scale (float64) for the candidates
    j < first block of i's segment; other entries are left unwritten."""
    tiles = tl.cdiv(nb, BLOCK_I)
    pid = tl.program_id(0)
    bh = (pid // tiles).to(tl.int64)  # b * Hq + h; its kv row b * Hkv + h // group is bh // group
    i0 = (pid % tiles) * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    i_ok = i < nb
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pq = tl.load(pq_ptr + (bh * nb + i)[:, None] * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    scale = tl.load(scale_ptr)
    last = tl.minimum(i0 + BLOCK_I, nb) - 1
    end = last // SEG_BLOCKS * SEG_BLOCKS  # candidates of the tile's last (latest-segment) block
    kv = bh // group
    for j0 in range(0, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < end
        pk = tl.load(pk_ptr + (kv * nb + j)[:, None] * D + d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                     other=0.0)
        scores = _logits_f64(pq, pk, scale)
        tl.store(out_ptr + (bh * nb + i)[:, None] * nb + j[None, :], scores, mask=i_ok[:, None] & j_ok[None, :])


def _pooled(x, perm, block_size: int) -> torch.Tensor:
    """float64 (B * H * nb, D) block means of x (B, H, N, D); blocks of x[perm] when perm is given."""
    batch, heads, n, d = x.shape
    nb = triton.cdiv(n, block_size)
    out = torch.empty((batch * heads * nb, d), dtype=torch.float64, device=x.device)
    gather = perm is not None
    _pool_kernel[(batch * heads * nb,)](x, perm if gather else x, out, n, nb, heads, *x.stride()[:3], d,
                                        GATHER=gather, BS=block_size, ROWS=min(_POOL_ROWS, block_size),
                                        BLOCK_D=triton.next_power_of_2(d), num_warps=_PLAN_WARPS)
    return out


def _block_scores(q, k, perm, block_size: int, segment_size: int, scale: float) -> torch.Tensor:
    """float64 (B * Hq * nb, nb) pooled scores; only the candidate entries (earlier segments) are defined."""
    batch, hq, n, d = q.shape
    nb = triton.cdiv(n, block_size)
    pooled_q = _pooled(q, None, block_size)
    pooled_k = _pooled(k, perm, block_size)
    scores = torch.empty((batch * hq * nb, nb), dtype=torch.float64, device=q.device)
    grid = (batch * hq * triton.cdiv(nb, _SCORE_ROWS),)
    _block_scores_kernel[grid](pooled_q, pooled_k, _scale_tensor(scale, q.device), scores, nb, hq // k.shape[1], d,
                               SEG_BLOCKS=segment_size // block_size, BLOCK_I=_SCORE_ROWS, BLOCK_J=_SCORE_COLS,
                               BLOCK_D=triton.next_power_of_2(d), num_warps=_PLAN_WARPS)
    return scores


def _keep_by_mass(scores, candidate, threshold: float) -> torch.Tensor:
    """bool (rows, nb): per row, the shortest prefix of the candidates in descending softmax order (ties: lower
    block first) whose running sum reaches threshold (all candidates if round-off keeps it short)."""
    if threshold <= 0.0:
        return torch.zeros_like(candidate)
    if threshold >= 1.0:
        return candidate.clone()
    # non-candidates get probability 0 and sort after every candidate (ties keep the index order, and the
    # candidates are the lowest blocks); a row without candidates (all -inf) gives NaN, set to 0
    probs = torch.softmax(scores.masked_fill(~candidate, float("-inf")), dim=-1).nan_to_num_(0.0)
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    reached = ordered.cumsum(dim=-1) >= threshold
    count = torch.where(reached.any(-1), reached.to(torch.int8).argmax(-1) + 1, candidate.sum(-1))
    kept = torch.arange(candidate.shape[-1], device=scores.device) < count.unsqueeze(-1)
    return torch.zeros_like(candidate).scatter_(-1, order, kept) & candidate


def _kv_block_facts(perm, block_size: int):
    """(first key (B * Hkv, nb): smallest token of each permuted key block, first block (B * Hkv,): the block
    holding token 0)."""
    batch, hkv, n = perm.shape
    nb = triton.cdiv(n, block_size)
    flat = perm.reshape(batch * hkv, n).long()
    padded = torch.nn.functional.pad(flat, (0, nb * block_size - n), value=n)
    return padded.view(-1, nb, block_size).amin(-1), flat.argmin(-1) // block_size


def _select_rows(scores, rows, n: int, group: int, first_key, first_block, block_size: int, segment_size: int,
                 threshold: float, force_first_block: bool) -> torch.Tensor:
    """bool (len(rows), nb) kept key blocks of the plan rows `rows` (row = (b * Hq + h) * nb + i)."""
    nb = scores.shape[-1]
    blocks = torch.arange(nb, device=scores.device)
    segment = blocks // (segment_size // block_size)
    seg_first = segment * (segment_size // block_size)
    i = rows % nb
    kv = rows // nb // group
    keep = _keep_by_mass(scores, blocks < seg_first[i].unsqueeze(-1), threshold)
    last_row = torch.clamp((i + 1) * block_size, max=n) - 1
    keep |= (segment == segment[i].unsqueeze(-1)) & (first_key[kv] <= last_row.unsqueeze(-1))
    if force_first_block:
        keep[torch.arange(len(rows), device=scores.device), first_block[kv]] = True
    return keep


def _listed(keep):
    """(counts int32, indices int32): the kept blocks of each row in ascending order, then -1 padding."""
    counts = keep.sum(-1)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept blocks first, ascending
    listed = torch.arange(keep.shape[-1], device=keep.device) < counts.unsqueeze(-1)
    return counts.to(torch.int32), torch.where(listed, order, -1).to(torch.int32)


def pbs_select_blocks(q, k, perm, block_size: int, segment_size: int, threshold: float, force_first_block: bool,
                      scale: float):
    """(counts int32 (B, Hq, nb), indices int32 (B, Hq, nb, nb)): row [b, h, i] lists counts[b, h, i] key blocks
    in ascending order, then -1 padding."""
    batch, hq, n, _ = q.shape
    nb = triton.cdiv(n, block_size)
    counts = torch.zeros((batch, hq, nb), dtype=torch.int32, device=q.device)
    indices = torch.full((batch, hq, nb, nb), -1, dtype=torch.int32, device=q.device)
    total = batch * hq * nb
    if total == 0:
        return counts, indices
    perm = perm.contiguous()
    scores = _block_scores(q, k, perm, block_size, segment_size, scale)
    first_key, first_block = _kv_block_facts(perm, block_size)
    flat_counts, flat_indices = counts.view(total), indices.view(total, nb)
    step = max(1, _SELECT_ELEMENTS // nb)
    for r0 in range(0, total, step):  # chunks of rows bound the selection temporaries
        rows = torch.arange(r0, min(total, r0 + step), device=q.device)
        keep = _select_rows(scores[r0:r0 + len(rows)], rows, n, hq // k.shape[1], first_key, first_block,
                            block_size, segment_size, float(threshold), bool(force_first_block))
        flat_counts[r0:r0 + len(rows)], flat_indices[r0:r0 + len(rows)] = _listed(keep)
    return counts, indices


# ----------------------------------------------------------------------------------------------------------
# pbs_block_attention
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_operand(base_ptr, offs, mask, NATIVE: tl.constexpr):
    """A matrix operand: in its own dtype (NATIVE, 16-bit inputs on a GPU) or as exact float32."""
    if NATIVE:
        x = tl.load(base_ptr + offs, mask=mask, other=0.0)
    else:
        x = _load_f32(base_ptr, offs, mask)
    return x


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr):
    """float32 a @ b: 16-bit matrix units (NATIVE), else full float32 products (no tf32)."""
    if NATIVE:
        c = tl.dot(a, b)
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def _block_attention_kernel(q_ptr, k_ptr, v_ptr, perm_ptr, offsets_ptr, indices_ptr, out_ptr, lse_ptr, n, nb, hq,
                            hkv, scale, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, D,
                            BS: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr):
    """out, lse of query block i of head h, batch b over the listed key blocks (K, V read through perm)."""
    pid = tl.program_id(0)
    bh = (pid // nb).to(tl.int64)  # b * Hq + h
    i = nb - 1 - pid % nb  # later query blocks list more keys: start them first
    b = bh // hq
    kvh = (bh % hq) // (hq // hkv)
    rows = i * BS + tl.arange(0, BS)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_offs = b * sqb + (bh % hq) * sqh + rows.to(tl.int64)[:, None] * sqn + d[None, :]
    q = _load_operand(q_ptr, q_offs, row_ok[:, None] & d_ok[None, :], NATIVE)
    perm_row = perm_ptr + (b * hkv + kvh) * n
    k_base = b * skb + kvh * skh
    v_base = b * svb + kvh * svh
    run_max = tl.full((BS,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BS,), tl.float32)
    acc = tl.zeros((BS, BLOCK_D), tl.float32)
    plan_row = bh * nb + i
    start = tl.load(offsets_ptr + plan_row)
    end = tl.load(offsets_ptr + plan_row + 1)
    for t in range(start, end):
        c = tl.load(indices_ptr + t) * BS + tl.arange(0, BS)
        key_ok = c < n
        token = tl.load(perm_row + c, mask=key_ok, other=0)
        # K^T as a (BLOCK_D, BS) tile: under the interpreter a contiguous right operand makes np.matmul an
        # sgemm summing over d in order, as the GPU's FMA dot and the reference's sgemm do (module docstring)
        k_offs = k_base + token.to(tl.int64)[None, :] * skn + d[:, None]
        k_t = _load_operand(k_ptr, k_offs, d_ok[:, None] & key_ok[None, :], NATIVE)
        logits = _dot(q, k_t, NATIVE)
        allowed = (rows[:, None] >= token[None, :]) & key_ok[None, :]
        logits = tl.where(allowed, logits * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: exp(-inf - 0) = 0, never NaN
        alpha = tl.exp(run_max - pivot)
        p = tl.exp(logits - pivot[:, None])
        run_sum = run_sum * alpha + tl.sum(p, 1)
        vt = _load_operand(v_ptr, v_base + token.to(tl.int64)[:, None] * svn + d[None, :],
                           key_ok[:, None] & d_ok[None, :], NATIVE)
        if NATIVE:
            p = p.to(vt.dtype)  # p rounded to the input dtype for the matrix units, like flash attention
        acc = acc * alpha[:, None] + _dot(p, vt, NATIVE)
        run_max = new_max
    seen = run_sum > 0.0
    lse = tl.where(seen, run_max + tl.log(tl.where(seen, run_sum, 1.0)), float("-inf"))
    out = acc / tl.where(seen, run_sum, 1.0)[:, None]  # acc is 0 on rows without keys
    out_offs = (bh * n + rows)[:, None] * D + d[None, :]
    tl.store(out_ptr + out_offs, _cast_out(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * n + rows, lse, mask=row_ok)


def pbs_block_attention(q, k, v, perm, offsets, indices, block_size: int, scale: float):
    """(out (B, Hq, N, D) in q's dtype, lse float32 (B, Hq, N)); a row that sees no key gets out 0, lse -inf."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((batch, hq, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, n), dtype=torch.float32, device=q.device)
    nb = triton.cdiv(n, block_size)
    if batch * hq * nb == 0:
        return out, lse
    native = q.dtype != torch.float32 and not _interpreted()
    _block_attention_kernel[(batch * hq * nb,)](
        q, k, v, perm.contiguous(), offsets.contiguous(), indices.contiguous(), out, lse, n, nb, hq, hkv,
        float(scale), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], d, BS=block_size,
        BLOCK_D=triton.next_power_of_2(d), NATIVE=native, num_warps=4 if block_size <= 64 else 8)
    return out, lse
