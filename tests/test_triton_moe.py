"""Triton MoE routing (kernels/moe.py): paths tests/test_moe.py does not reach.

Under TRITON_INTERPRET=1, against the reference (pykernels/reference/moe.py): routing with shrunken tiles (several
programs, a partial last one), padded group layouts (E and E/G not powers of two, a padded last group), both ways
of choosing the kept groups, group ties, E = 1000 with k = 32, strided and 16-bit logits, a zero renormalising
sum; the counting sort over several chunks (expert maps, block sizes, every expert mapped away); capacity
dropping across chunks; bitwise row copies of any dtype; the combine's rounding (bf16 to nearest, fp16, float64,
subnormals, absent pairs) over several programs.
"""
from __future__ import annotations

import pytest
import torch

from pykernels.reference import moe as ref

pytestmark = pytest.mark.triton

K = pytest.importorskip("pykernels.kernels.moe")


def make_logits(tokens, experts, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, experts, generator=g)
    if kind == "ties":
        x = torch.round(x * 2) / 2
    elif kind == "equal":
        x = torch.zeros(tokens, experts)
    return x


def assert_route_matches(logits, k, scoring=0, bias=None, renormalize=True, num_groups=0, topk_groups=0,
                         scaling=1.0):
    args = (logits, k, scoring, bias, renormalize, num_groups, topk_groups, scaling)
    weights, ids = K.moe_topk_route(*args)
    want_weights, want_ids = ref.moe_topk_route(*args)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)
    return weights, ids


# --- moe_topk_route -----------------------------------------------------------------------------------------

@pytest.fixture
def small_route_tiles(monkeypatch):
    """4 rows of 16 padded experts per program: E = 12 takes 10 programs for 37 tokens, the last one partial."""
    monkeypatch.setattr(K, "_INTERPRETED_ROUTE_TILE", 64)
    monkeypatch.setattr(K, "_INTERPRETED_ROUTE_MAX_ROWS", 4)


@pytest.mark.parametrize("kind", ["random", "ties", "equal"])
@pytest.mark.parametrize("groups,topk_groups", [(0, 0), (3, 1), (3, 2), (4, 2), (12, 9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_several_programs_and_group_layouts(small_route_tiles, kind, groups, topk_groups, with_bias):
    # G = 3: groups of 4 padded to 4 groups (one all padding); G = 4: groups of 3 padded to 4 slots;
    # G = 12: groups of one expert (the top-2 group score is the key alone). topk 1 and 2 of 4 pick the
    # kept groups, 2 of 3 and 9 of 12 drop the others.
    logits = make_logits(37, 12, kind, seed=groups + topk_groups)
    bias = torch.linspace(-0.3, 0.2, 12) if with_bias else None
    scoring = 1 if with_bias else 0
    assert_route_matches(logits, 3, scoring, bias, True, groups, topk_groups, 1.5)


def test_group_ties_keep_the_lower_group():
    logits = torch.zeros(2, 8)
    logits[0, [1, 3, 5, 7]] = 1.0  # every group of two has the same score: groups 0 and 1 are kept
    logits[1, [6, 7]] = -1.0
    _, ids = assert_route_matches(logits, 3, 1, torch.zeros(8), True, 4, 2, 1.0)
    assert ids[0].tolist() == [1, 3, 0] and ids[1].tolist() == [0, 1, 2]
    _, ids = assert_route_matches(logits, 3, 0, None, True, 4, 2, 1.0)
    assert ids[0].tolist() == [1, 3, 0]


@pytest.mark.parametrize("scoring,with_bias,groups,topk_groups", [
    (0, False, 0, 0),        # 1000 experts in a 1024-slot row
    (1, True, 8, 3),         # groups of 125 in 128 slots, picked
    (1, True, 1000, 995),    # groups of one expert, 5 dropped
    (0, False, 10, 7),       # groups of 100 without a bias, 3 dropped
])
def test_route_1000_experts_k32(scoring, with_bias, groups, topk_groups):
    logits = make_logits(40, 1000, seed=groups)
    bias = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 0.05 if with_bias else None
    assert_route_matches(logits, 32, scoring, bias, True, groups, topk_groups, 2.5)


def test_route_strided_and_16_bit_logits():
    wide = make_logits(50, 96, seed=4)
    assert_route_matches(wide[:, :60], 6, 0)  # row stride 96
    assert_route_matches(wide[::2, 10:70], 6, 1, torch.linspace(-1, 1, 60), False, 6, 2, 1.0)
    for dtype in (torch.bfloat16, torch.float16):
        bias = torch.linspace(-0.5, 0.5, 60).to(dtype)
        assert_route_matches(wide[:, :60].to(dtype), 8, 1, bias, True, 0, 0, 1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(200) = inf: intended
def test_route_zero_sum_is_left_alone():
    logits = torch.full((5, 16), -200.0)  # sigmoid(-200) is 0 in float32
    logits[0, 3] = 0.0
    weights, ids = assert_route_matches(logits, 2, 1)
    assert weights[1:].eq(0).all() and not weights.isnan().any()
    assert ids[1].tolist() == [0, 1] and weights[0].tolist() == [1.0, 0.0]


# --- moe_align_block_size -----------------------------------------------------------------------------------

@pytest.fixture
def small_sort_chunks(monkeypatch):
    monkeypatch.setattr(K, "_SORT_CHUNK", 16)
    monkeypatch.setattr(K, "_BLOCK", 8)


def assert_align_matches(ids, experts, block_size, expert_map=None):
    got = K.moe_align_block_size(ids, experts, block_size, expert_map)
    want = ref.moe_align_block_size(ids, experts, block_size, expert_map)
    assert [t.dtype for t in got] == [torch.int32] * 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    return got


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("mapped", [False, True])
def test_align_several_chunks(small_sort_chunks, block_size, mapped):
    g = torch.Generator().manual_seed(block_size)
    ids = torch.randint(13, (45, 3), generator=g, dtype=torch.int32)  # repeats within a token allowed here
    ids[:20] = torch.where(ids[:20] < 6, 2, ids[:20])  # one crowded expert spanning several chunks
    expert_map = None
    if mapped:
        expert_map = torch.tensor([0, -1, 1, 2, -1, -1, 3, 4, 5, -1, 6, 7, -1], dtype=torch.int32)
    assert_align_matches(ids, 13, block_size, expert_map)


def test_align_edge_cases(small_sort_chunks):
    ids = torch.zeros(19, 2, dtype=torch.int32)
    assert_align_matches(ids, 1, 4)  # one expert
    sorted_ids, blocks, total = assert_align_matches(ids, 1, 4, torch.tensor([-1], dtype=torch.int32))
    assert int(total) == 0 and sorted_ids.eq(38).all() and blocks.eq(-1).all()  # every pair mapped away


def test_align_1024_experts():
    # E a power of two: the block search's largest step is E itself; the last expert's run ends the list
    ids = torch.tensor([[1023, 0], [512, 1023], [5, 511]], dtype=torch.int32)
    _, blocks, total = assert_align_matches(ids, 1024, 3)
    assert blocks[:5].tolist() == [0, 5, 511, 512, 1023] and int(total) == 15


# --- moe_permute / moe_unpermute ---------------------------------------------------------------------------

def assert_permute_matches(x, ids, weights, experts, capacity_factor):
    got = K.moe_permute(x, ids, weights, experts, capacity_factor)
    want = ref.moe_permute(x, ids, weights, experts, capacity_factor)
    assert got[0].dtype == x.dtype and got[1].dtype == got[2].dtype == torch.int64 and got[3].dtype == torch.bool
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, b)
    return got


def _bits(t):
    """Integers with t's bytes: NaN payloads and signed zeros compare exactly."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 1.3])
def test_permute_capacity_across_chunks(small_sort_chunks, capacity_factor):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(7, (40, 3), generator=g, dtype=torch.int32)
    ids[:25, 0] = 4  # expert 4 over capacity with pairs in several chunks
    weights = torch.round(torch.rand(40, 3, generator=g) * 4) / 4  # many weight ties
    x = torch.randn(40, 5, generator=g)
    got = assert_permute_matches(x, ids, weights, 7, capacity_factor)
    if capacity_factor in (0.5, 1.0):
        assert got[3].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64])
def test_permute_copies_rows_bitwise(small_sort_chunks, monkeypatch, dtype):
    monkeypatch.setattr(K, "_COMBINE_ROWS", 4)
    monkeypatch.setattr(K, "_COMBINE_COLS", 8)
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(-2**15, 2**15, (30, 22), generator=g, dtype=torch.int64)
    if dtype == torch.bool:
        x = raw > 0
    elif dtype.is_floating_point:
        x = raw.to(torch.int16).view(dtype)  # every bit pattern: NaN payloads, -0.0, subnormals
    elif dtype.is_complex:
        x = torch.randn(30, 11, generator=g, dtype=dtype)
    else:
        x = raw * (1 << 40)
    ids = torch.randint(5, (30, 2), generator=g, dtype=torch.int32)
    assert_permute_matches(x[:, 1:] if dtype != torch.complex64 else x, ids, None, 5, 0.0)  # strided rows


@pytest.fixture
def small_combine_tiles(monkeypatch):
    monkeypatch.setattr(K, "_COMBINE_ROWS", 4)
    monkeypatch.setattr(K, "_COMBINE_COLS", 8)
    monkeypatch.setattr(K, "_BLOCK", 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_unpermute_rounding_and_absent_pairs(small_combine_tiles, dtype):
    g = torch.Generator().manual_seed(11)
    tokens, k, width = 23, 3, 20
    y = torch.randn(tokens * k, width, generator=g)
    y[:5] *= 1e-39  # float32 subnormals (bf16 keeps them)
    y = y.to(dtype)
    weights = torch.rand(tokens, k, generator=g)
    perm = torch.randperm(tokens * k, generator=g)[:50]  # 19 pairs absent: they add nothing
    got = K.moe_unpermute(y[:50], perm, weights)
    want = ref.moe_unpermute(y[:50], perm, weights)
    assert got.dtype == dtype and got.shape == (tokens, width)
    assert torch.equal(_bits(got), _bits(want))
    if dtype == torch.bfloat16:
        # the exact float32 sums, truncated to bf16, differ from the result often: rounding is exercised
        truncated = ((_exact_sums(y[:50], perm, weights).view(torch.int32) >> 16).to(torch.int16)).view(dtype)
        assert (_bits(truncated) != _bits(got)).sum() > 50


def _exact_sums(y, perm, weights):
    acc = torch.zeros(weights.numel(), y.shape[1])
    acc[perm] = y.float() * weights.reshape(-1)[perm].unsqueeze(1)
    out = torch.zeros(weights.shape[0], y.shape[1])
    for j in range(weights.shape[1]):
        out = out + acc.view(weights.shape[0], weights.shape[1], -1)[:, j]
    return out


def test_unpermute_16_bit_strided_weights(small_combine_tiles):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(40, 9, generator=g).to(torch.bfloat16)
    weights = torch.rand(8, 10, generator=g).to(torch.bfloat16)[:, ::2]  # (8, 5), read as float32
    perm = torch.randperm(40, generator=g)
    got = K.moe_unpermute(y, perm, weights)
    assert torch.equal(_bits(got), _bits(ref.moe_unpermute(y, perm, weights)))
