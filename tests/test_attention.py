"""PBS-Attn: every backend against dense attention, the published algorithm and the reference (DESIGN.md s5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pykernels import _ops
from pykernels.attention import PBSPlan, block_sparse_attention, pbs_attention, pbs_plan
from pykernels.reference import attention as ref

from conftest import backend_params

BACKENDS = backend_params()
KERNELS = backend_params(include_reference=False)


def make_qkv(batch, hq, hkv, n, d, dtype=torch.float32, seed=0, clusters=0):
    """Random q, k, v; with `clusters`, keys and queries gather around a few directions and token 0 is strong."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g)
    k = torch.randn(batch, hkv, n, d, generator=g)
    v = torch.randn(batch, hkv, n, d, generator=g)
    if clusters:
        centers = 3 * torch.randn(clusters, d, generator=g)
        q += centers[torch.randint(clusters, (batch, hq, n), generator=g)]
        k += centers[torch.randint(clusters, (batch, hkv, n), generator=g)]
        k[:, :, 0] = 4 * centers[0]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa(q, k, v, dtype=None):
    dtype = dtype or q.dtype
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, enable_gqa=True)


# --- a direct implementation of the published algorithm (dense masks, materialised permuted K/V) ------------

def published_pbs(q, k, v, bs, seg, threshold, force_first_block):
    """(output, bool block mask (B, Hq, nb, nb), perm): the method's step-by-step in dense float64 tensors."""
    batch, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = 1 / math.sqrt(d)
    kr, vr = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    qd = q.double()
    perm = torch.arange(n).repeat(batch, hq, 1)
    if n > seg:
        full = n // seg * seg
        probs = torch.softmax(qd[:, :, -bs:] @ kr[:, :, :full].transpose(-1, -2) * scale, dim=-1).mean(-2)
        probs = probs.view(batch, -1, group, full).mean(2).repeat_interleave(group, 1)   # one order per kv head
        order = torch.sort(probs.view(batch, hq, -1, seg), dim=-1, descending=True, stable=True).indices
        perm[:, :, :full] = (order + torch.arange(0, full, seg).view(-1, 1)).flatten(2)
    kp = torch.gather(kr, 2, perm.unsqueeze(-1).expand(-1, -1, -1, d))
    vp = torch.gather(vr, 2, perm.unsqueeze(-1).expand(-1, -1, -1, d))
    nb = -(-n // bs)
    pad = nb * bs - n
    lengths = torch.full((nb,), float(bs), dtype=torch.float64)
    lengths[-1] = bs - pad
    pq = F.pad(qd, (0, 0, 0, pad)).view(batch, hq, nb, bs, d).sum(3) / lengths.view(-1, 1)
    pk = F.pad(kp, (0, 0, 0, pad)).view(batch, hq, nb, bs, d).sum(3) / lengths.view(-1, 1)
    blocks = torch.arange(nb)
    segment = blocks * bs // seg
    candidate = segment.view(1, -1) < segment.view(-1, 1)
    scores = (pq @ pk.transpose(-1, -2) * scale).masked_fill(~candidate, -math.inf)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    if threshold >= 1.0:
        mask = candidate.expand(batch, hq, nb, nb).clone()
    else:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        reached = torch.cumsum(sorted_p, dim=-1) >= threshold
        first = torch.where(reached.any(-1), reached.int().argmax(-1), nb - 1)
        keep_sorted = torch.arange(nb) <= first.unsqueeze(-1)
        if threshold <= 0:
            keep_sorted[:] = False
        mask = torch.zeros_like(candidate.expand(batch, hq, nb, nb)).scatter(-1, idx, keep_sorted) & candidate
    if force_first_block:
        first_block = torch.nonzero(perm[..., :] == 0)[:, 2].view(batch, hq) // bs
        mask[torch.arange(batch).view(-1, 1), torch.arange(hq), :, first_block] = True
    mask |= segment.view(-1, 1) == segment.view(1, -1)                      # own segment always computed
    rows = torch.arange(n)
    allowed = mask.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :n, :n] & (rows.view(-1, 1) >= perm.unsqueeze(-2))
    logits = (qd @ kp.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    out = torch.softmax(logits, dim=-1) @ vp
    return out.float(), mask, perm


# --- exactness --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv,n,d", [(2, 2, 97, 64), (4, 2, 130, 80), (4, 1, 77, 96), (2, 1, 64, 128),
                                        (2, 2, 1, 64), (3, 3, 33, 64)])
def test_threshold_one_equals_dense_causal(backend, hq, hkv, n, d):
    q, k, v = make_qkv(2, hq, hkv, n, d, seed=n + d)
    out, lse, plan = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=1.0, return_lse=True,
                                   return_plan=True, backend=backend)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=2e-5, rtol=2e-5)
    logits = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=2e-5, rtol=2e-5)
    assert plan.density == 1.0


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("hq,hkv,n", [(4, 2, 203), (2, 2, 160), (2, 1, 96)])
def test_reference_equals_published_algorithm(threshold, hq, hkv, n):
    q, k, v = make_qkv(2, hq, hkv, n, 64, seed=n, clusters=3)
    out, plan = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=threshold, return_plan=True,
                              backend="reference")
    expected, mask, perm = published_pbs(q, k, v, 16, 32, threshold, True)
    group = hq // hkv
    assert torch.equal(plan.perm.long().repeat_interleave(group, 1), perm)
    # the plan drops own-segment blocks that hold no key at or before the block's last row: they add nothing
    nb = mask.shape[-1]
    first_key = F.pad(perm, (0, nb * 16 - n), value=n).view(*perm.shape[:2], nb, 16).amin(-1)
    last_row = (torch.arange(nb) + 1).mul(16).clamp(max=n) - 1
    reachable = first_key.unsqueeze(-2) <= last_row.view(-1, 1)
    assert torch.equal(plan.block_mask(), mask & reachable)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)      # float32 attention vs a float64 oracle


# --- the plan ----------------------------------------------------------------------------------------------

def check_plan_rules(q, k, plan, threshold):
    """The plan's rules, checked from their definitions (plan built with force_first_block=False)."""
    batch, hq, n, d = q.shape
    bs, seg = plan.block_size, plan.segment_size
    group = hq // k.shape[1]
    full = n // seg * seg if n > seg else 0
    for perm in plan.perm.long().flatten(0, 1):
        for start in range(0, full, seg):
            assert torch.equal(torch.sort(perm[start:start + seg]).values, torch.arange(start, start + seg))
        assert torch.equal(perm[full:], torch.arange(full, n))        # remainder (or everything if N <= S) in order
    mask = plan.block_mask()
    nb = mask.shape[-1]
    for b in range(batch):
        for h in range(hq):
            perm = plan.perm[b, h // group].long()
            pooled_q = q[b, h].double()
            pooled_k = k[b, h // group, perm].double()
            for i in range(nb):
                s = i * bs // seg
                seg_first, seg_end = s * seg // bs, min(nb, (s + 1) * seg // bs)
                last_row = min((i + 1) * bs, n) - 1
                for j in range(seg_first, seg_end):                    # own segment: every block with a visible key
                    assert mask[b, h, i, j] == bool(perm[j * bs:(j + 1) * bs].min() <= last_row)
                assert not mask[b, h, i, seg_end:].any()
                if seg_first == 0:
                    continue
                pq = pooled_q[i * bs:(i + 1) * bs].mean(0)           # true length of a partial block
                pk = torch.stack([pooled_k[j * bs:(j + 1) * bs].mean(0) for j in range(seg_first)])
                probs = torch.softmax(pq @ pk.T / math.sqrt(d), dim=-1)
                kept = mask[b, h, i, :seg_first]
                if threshold >= 1.0 or threshold <= 0.0:
                    assert bool(kept.all()) if threshold >= 1.0 else not kept.any()
                    continue
                assert probs[kept].sum() >= threshold                  # the kept blocks reach the threshold,
                assert not (~kept).any() or probs[kept].min() >= probs[~kept].max()   # they are the largest,
                assert probs[kept].sum() - probs[kept].min() < threshold    # and none of them is superfluous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0])
def test_plan_rules(backend, threshold):
    q, k, _ = make_qkv(2, 4, 2, 181, 64, seed=3, clusters=4)
    plan = pbs_plan(q, k, block_size=16, segment_size=48, threshold=threshold, force_first_block=False,
                    backend=backend)
    check_plan_rules(q, k, plan, threshold)
    forced = pbs_plan(q, k, block_size=16, segment_size=48, threshold=threshold, backend=backend)
    first_block = torch.argmin(plan.perm, dim=-1).repeat_interleave(2, 1) // 16     # block holding token 0
    expected = plan.block_mask()
    expected[torch.arange(2).view(-1, 1), torch.arange(4), :, first_block] = True
    assert torch.equal(forced.block_mask(), expected)
    assert torch.equal(forced.perm, plan.perm)


def test_threshold_one_survives_round_off():
    # many near-equal candidates: their float64 softmax sums to slightly less than 1.0
    q = torch.zeros(1, 1, 1024, 64)
    k = torch.zeros(1, 1, 1024, 64)
    k[..., 0] = torch.linspace(0, 1e-3, 1024)
    plan = pbs_plan(q, k, block_size=16, segment_size=16, threshold=1.0, backend="reference")
    assert plan.density == 1.0
    assert plan.counts()[0, 0, -1] == 64


def test_partial_block_pooled_by_true_length():
    q, k, _ = make_qkv(1, 1, 1, 70, 64, seed=5)
    pooled = ref._pooled(k[0, 0], 16)
    torch.testing.assert_close(pooled[-1], k[0, 0, 64:].double().mean(0))


# --- backends against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("hq,hkv,n,d,bs,seg", [(4, 2, 203, 64, 16, 32), (2, 2, 150, 80, 16, 48), (4, 1, 96, 96, 32, 32),
                                               (2, 1, 130, 128, 16, 64), (2, 2, 40, 64, 16, 64)])
@pytest.mark.parametrize("threshold", [0.6, 0.95])
def test_backend_matches_reference(backend, hq, hkv, n, d, bs, seg, threshold):
    q, k, v = make_qkv(2, hq, hkv, n, d, seed=n * d, clusters=3)
    out, lse, plan = pbs_attention(q, k, v, block_size=bs, segment_size=seg, threshold=threshold, return_lse=True,
                                   return_plan=True, backend=backend)
    ref_out, ref_lse, ref_plan = pbs_attention(q, k, v, block_size=bs, segment_size=seg, threshold=threshold,
                                               return_lse=True, return_plan=True, backend="reference")
    assert torch.equal(plan.perm, ref_plan.perm)
    assert torch.equal(plan.offsets, ref_plan.offsets)
    assert torch.equal(plan.indices, ref_plan.indices)
    assert plan.density == ref_plan.density
    # clustered inputs give logits of 100-300: one float32 rounding of a logit is already ~3e-5
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
def test_attention_of_any_plan(backend):
    # unsorted lists, an empty list (rows with no key: out 0, lse -inf) and a permutation across segments
    q, k, v = make_qkv(1, 2, 1, 50, 64, seed=11)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(50, generator=g).to(torch.int32).view(1, 1, 50)
    mask = torch.rand(1, 2, 4, 4, generator=g) < 0.6
    mask[0, 1, 2] = False
    plan = PBSPlan.from_block_mask(mask, 16, perm)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    ref_out, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert (out[0, 1, 32:48] == 0).all() and torch.isneginf(lse[0, 1, 32:48]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # q, k, v as a model makes them: (B, N, H, D) transposed to (B, H, N, D)
    q, k, v = make_qkv(2, 4, 2, 75, 64, seed=2)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    out = pbs_attention(qt, kt, vt, block_size=16, segment_size=32, threshold=0.8, backend=backend)
    expected = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=0.8, backend="reference")
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    q, k, v = make_qkv(2, 2, 1, 0, 64)
    out, lse, plan = pbs_attention(q, k, v, block_size=16, segment_size=32, return_lse=True, return_plan=True,
                                   backend=backend)
    assert out.shape == q.shape and lse.shape == (2, 2, 0) and plan.indices.numel() == 0


# --- low precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_sdpa(backend, dtype):
    q, k, v = make_qkv(1, 4, 2, 160, 64, dtype=dtype, seed=7)
    out = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=1.0, backend=backend)
    assert out.dtype == dtype
    exact = sdpa(q.float(), k.float(), v.float())
    ours = (out.float() - exact).abs().max().item()
    theirs = (sdpa(q, k, v).float() - exact).abs().max().item()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


# --- errors -----------------------------------------------------------------------------------------------

def test_errors():
    q, k, v = make_qkv(1, 4, 2, 64, 64)
    with pytest.raises(NotImplementedError, match="causal"):
        pbs_attention(q, k, v, causal=False)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        pbs_attention(q, k[:, :1].expand(1, 3, 64, 64), v[:, :1].expand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="segment_size"):
        pbs_attention(q, k, v, block_size=32, segment_size=48)
    with pytest.raises(ValueError, match="block_size"):
        pbs_attention(q, k, v, block_size=24, segment_size=48)
    with pytest.raises(ValueError, match="head_dim"):
        pbs_attention(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(TypeError, match="one dtype"):
        pbs_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v must have"):
        pbs_attention(q, k, v[:, :, :32])
    with pytest.raises(ValueError, match="as many keys"):
        pbs_attention(q, k[:, :, :32], v[:, :, :32])
    with pytest.raises(ValueError, match="threshold"):
        pbs_attention(q, k, v, threshold=1.5)
    with pytest.raises(ValueError, match="scale"):
        pbs_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="4-D"):
        pbs_attention(q[0], k[0], v[0])
    plan = pbs_plan(q, k, block_size=16, segment_size=32, backend="reference")
    with pytest.raises(ValueError, match="permutation"):
        block_sparse_attention(q, k, v, plan._replace(perm=torch.zeros_like(plan.perm)))
    with pytest.raises(ValueError, match="indices"):
        block_sparse_attention(q, k, v, plan._replace(indices=plan.indices + 100))
    with pytest.raises(ValueError, match="offsets"):
        block_sparse_attention(q, k, v, plan._replace(offsets=plan.offsets[:-1]))


# --- torch.library -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    ops = _ops.primitives(backend)
    q, k, v = make_qkv(1, 2, 1, 70, 64, seed=4)
    perm = ops.pbs_permutation(q, k, 16, 32, 0.125)
    torch.library.opcheck(ops.pbs_permutation, (q, k, 16, 32, 0.125))
    torch.library.opcheck(ops.pbs_select_blocks, (q, k, perm, 16, 32, 0.9, True, 0.125))
    plan = pbs_plan(q, k, block_size=16, segment_size=32, backend=backend)
    torch.library.opcheck(ops.pbs_block_attention, (q, k, v, plan.perm, plan.offsets, plan.indices, 16, 0.125))
