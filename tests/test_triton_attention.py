"""Triton PBS-Attn kernels (kernels/attention.py): paths tests/test_attention.py does not reach.

Under TRITON_INTERPRET=1, against the reference (pykernels/reference/attention.py): the plan kernels with
shrunken tiles (several row and key tiles per head, several score tiles, the selection in several chunks),
ties in the permutation and the block selection, bf16 inputs with subnormals, D = 256, 16-bit inputs, different
K and V strides, and rows that see no key (out 0, lse -inf, no NaN).
"""
from __future__ import annotations

import math

import pytest
import torch

from pykernels.attention import PBSPlan
from pykernels.reference import attention as ref

pytestmark = pytest.mark.triton

K = pytest.importorskip("pykernels.kernels.attention")


def make_qkv(batch, hq, hkv, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


def plan_of(q, k, perm, bs, seg, threshold, force_first_block=True):
    """Reference block lists of perm as the flat (offsets, indices) the attention op takes."""
    scale = 1 / math.sqrt(q.shape[-1])
    counts, padded = ref.pbs_select_blocks(q, k, perm, bs, seg, threshold, force_first_block, scale)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.flatten().cumsum(0)])
    listed = torch.arange(padded.shape[-1]) < counts.unsqueeze(-1)
    return offsets, padded[listed]


def assert_plan_equal(q, k, bs, seg, threshold, force_first_block=True):
    scale = 1 / math.sqrt(q.shape[-1])
    perm = K.pbs_permutation(q, k, bs, seg, scale)
    assert perm.dtype == torch.int32
    assert torch.equal(perm, ref.pbs_permutation(q, k, bs, seg, scale))
    counts, indices = K.pbs_select_blocks(q, k, perm, bs, seg, threshold, force_first_block, scale)
    ref_counts, ref_indices = ref.pbs_select_blocks(q, k, perm, bs, seg, threshold, force_first_block, scale)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, ref_counts) and torch.equal(indices, ref_indices)
    return perm


def assert_attention_close(q, k, v, perm, offsets, indices, bs, tol):
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = K.pbs_block_attention(q, k, v, perm, offsets, indices, bs, scale)
    ref_out, ref_lse = ref.pbs_block_attention(q, k, v, perm, offsets, indices, bs, scale)
    assert out.dtype == q.dtype and out.is_contiguous() and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    return out, lse


F32_TOL = dict(atol=2e-5, rtol=2e-5)


# --- the plan --------------------------------------------------------------------------------------------

def test_plan_with_small_tiles(monkeypatch):
    # group 4 x bs 16 = 64 last queries in 4 row tiles; 96 keys of full segments in 6 key tiles; 13 query blocks
    # in 4 score tiles of 4, candidates in tiles of 16; the selection in chunks of 3 rows (not a divisor)
    for name, value in (("_PLAN_ROWS", 16), ("_PLAN_KEYS", 16), ("_SCORE_ROWS", 4), ("_SCORE_COLS", 16),
                        ("_SELECT_ELEMENTS", 3 * 13)):
        monkeypatch.setattr(K, name, value)
    q, k, _ = make_qkv(1, 4, 1, 200, 64, seed=1)
    for threshold in (0.0, 0.5, 0.9, 1.0):
        assert_plan_equal(q, k, 16, 48, threshold, force_first_block=threshold < 0.7)


def test_plan_ties_keep_the_lower_index():
    # every key identical and small-integer data (every float64 sum exact in any order): all masses tie, so
    # the permutation keeps token order, and all pooled scores tie, so the lower candidate blocks are kept
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-3, 4, (1, 2, 128, 64), generator=g).float()
    k = torch.randint(-3, 4, (1, 1, 1, 64), generator=g).float().expand(1, 1, 128, 64).contiguous()
    perm = assert_plan_equal(q, k, 16, 32, 0.4, force_first_block=False)
    assert torch.equal(perm, torch.arange(128, dtype=torch.int32).view(1, 1, -1))
    counts, indices = K.pbs_select_blocks(q, k, perm, 16, 32, 0.4, False, 0.125)
    assert indices[0, 0, -1, :5].tolist() == [0, 1, 2, 6, 7]   # 3 of the 6 equal candidates, then its segment


def test_plan_d256_and_short_sequences():
    q, k, _ = make_qkv(1, 2, 1, 70, 256, seed=3)
    assert_plan_equal(q, k, 16, 32, 0.8)
    q, k, _ = make_qkv(1, 2, 2, 20, 64, seed=4)          # N <= S: identity, own segment only
    perm = assert_plan_equal(q, k, 16, 32, 0.8)
    assert torch.equal(perm[0, 1], torch.arange(20, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plan_of_16bit_inputs(dtype):
    q, k, _ = make_qkv(1, 4, 2, 100, 80, dtype=dtype, seed=5)
    assert_plan_equal(q, k, 16, 32, 0.7)


def test_bf16_subnormals_pooled_exactly():
    # the interpreter's bf16 -> float32 cast flushes subnormals; the kernels convert bf16 from its bits
    tiny = torch.tensor([1e-40, -3e-39, 5e-39, 2e-40], dtype=torch.bfloat16)
    assert (tiny.float().abs() < torch.finfo(torch.float32).tiny).all() and (tiny != 0).all()
    x = tiny[torch.arange(2 * 3 * 40 * 64) % 4].view(2, 3, 40, 64)
    pooled = K._pooled(x, None, 16).view(2, 3, 3, 64)
    assert torch.equal(pooled, ref._pooled(x, 16))   # sums of a few subnormals are exact in float64


# --- the attention -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hq,hkv,n,d,bs", [(3, 1, 45, 80, 16), (2, 2, 33, 256, 16), (2, 1, 64, 96, 32)])
def test_attention_of_a_permuted_plan(hq, hkv, n, d, bs):
    # GQA, D not a power of two or 256, a partial last block, a permutation across the whole sequence
    q, k, v = make_qkv(2, hq, hkv, n, d, seed=n + d)
    g = torch.Generator().manual_seed(d)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(2 * hkv)]).view(2, hkv, n).to(torch.int32)
    nb = -(-n // bs)
    mask = torch.rand(2, hq, nb, nb, generator=g) < 0.7
    plan = PBSPlan.from_block_mask(mask, bs, perm)
    assert_attention_close(q, k, v, perm, plan.offsets, plan.indices, bs, F32_TOL)


def test_attention_of_the_pbs_plan_with_different_kv_strides():
    q, k, v = make_qkv(2, 4, 2, 90, 64, seed=6)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)          # (B, N, H, D) memory, k stays (B, H, N, D)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)                # (H, B, N, D) memory
    perm = K.pbs_permutation(q, k, 16, 32, 0.125)
    offsets, indices = plan_of(q, k, perm, 16, 32, 0.8)
    assert_attention_close(q, k, v, perm, offsets, indices, 16, F32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_of_16bit_inputs(dtype):
    # under the interpreter 16-bit inputs are converted exactly and computed in float32, as the reference does:
    # the outputs differ by at most one rounding of the output dtype
    q, k, v = make_qkv(1, 2, 1, 75, 64, dtype=dtype, seed=7)
    perm = K.pbs_permutation(q, k, 16, 32, 0.125)
    offsets, indices = plan_of(q, k, perm, 16, 32, 0.9)
    eps = torch.finfo(dtype).eps
    assert_attention_close(q, k, v, perm, offsets, indices, 16, dict(atol=eps, rtol=eps))


def test_rows_without_keys():
    # permuted key blocks hold tokens 40..55 | 16..31 | 0..15 | 32..39, 56..63. Head 0: query block 0 lists
    # nothing, block 1 only key block 3 (all after its rows), block 2 key block 0 (rows 32..39 see nothing),
    # block 3 key block 2. Head 1 lists nothing.
    n, bs = 64, 16
    q, k, v = make_qkv(1, 2, 1, n, 64, seed=8)
    order = torch.cat([torch.arange(40, 56), torch.arange(16, 32), torch.arange(0, 16), torch.arange(32, 40),
                       torch.arange(56, 64)])
    perm = order.to(torch.int32).view(1, 1, n)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 3] = mask[0, 0, 2, 0] = mask[0, 0, 3, 2] = True
    plan = PBSPlan.from_block_mask(mask, bs, perm)
    out, lse = assert_attention_close(q, k, v, perm, plan.offsets, plan.indices, bs, F32_TOL)
    unseen = torch.ones(2, n, dtype=torch.bool)
    unseen[0, 40:] = False
    assert (out[0][unseen] == 0).all() and torch.isneginf(lse[0][unseen]).all()
    assert torch.isfinite(lse[0][~unseen]).all() and not out.isnan().any()


def test_empty_shapes():
    q, k, v = make_qkv(0, 2, 1, 40, 64)
    out, lse = K.pbs_block_attention(q, k, v, torch.zeros(0, 1, 40, dtype=torch.int32),
                                     torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), 16, 0.125)
    assert out.shape == q.shape and lse.shape == (0, 2, 40)
    q, k, v = make_qkv(1, 2, 1, 0, 64)
    perm = K.pbs_permutation(q, k, 16, 32, 0.125)
    counts, indices = K.pbs_select_blocks(q, k, perm, 16, 32, 0.9, True, 0.125)
    assert perm.shape == (1, 1, 0) and counts.shape == (1, 2, 0) and indices.shape == (1, 2, 0, 0)
