"""CPU kernels of the PBS-Attn plan (csrc/cpu/attention_plan.cpp) against the float64 reference.

pbs_permutation and pbs_select_blocks return integers; on inputs without float64 near-ties they must equal
pykernels.reference.attention exactly, for every dtype, head grouping, stride layout and block geometry.
"""
from __future__ import annotations

import math

import pytest
import torch

from pykernels import _backend
from pykernels.attention import pbs_plan
from pykernels.reference import attention as ref


def _has_plan_kernels() -> bool:
    return _backend.cpp_available() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{name}", "CPU")
        for name in ("pbs_permutation", "pbs_select_blocks"))


pytestmark = pytest.mark.skipif(not _has_plan_kernels(), reason="pykernels._C without the CPU plan kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, hq, hkv, n, d, block_size, segment_size)
SHAPES = [
    (2, 2, 2, 97, 64, 16, 32),      # MHA, odd N, partial last block
    (1, 4, 2, 203, 64, 16, 32),     # GQA
    (2, 3, 1, 77, 96, 32, 64),      # group of 3, segment 2x block
    (1, 6, 2, 130, 80, 16, 48),     # segment 3x block, group 3: R = 48 rows
    (1, 2, 1, 30, 64, 16, 32),      # N < segment: identity permutation
    (1, 2, 2, 64, 64, 32, 64),      # N == segment
    (1, 4, 2, 256, 128, 32, 64),    # N a multiple of the segment
    (1, 2, 1, 100, 64, 16, 16),     # segment == block
    (1, 6, 2, 1000, 64, 64, 128),   # R = 192 rows: a full and a partial row block; several key chunks
    (1, 2, 1, 420, 64, 16, 400),    # one full segment of 400 keys (a 4-key tail in the logits tiles)
    (1, 2, 1, 1, 64, 16, 16),       # a single token
]


def make_qk(batch, hq, hkv, n, d, dtype, seed, strided=False, clusters=True):
    """q, k in `dtype`; strided: views of (B, N, H, D) tensors; clusters: keys and queries share directions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, hq, d, generator=g)
    k = torch.randn(batch, n, hkv, d, generator=g)
    if clusters:
        centers = 2 * torch.randn(4, d, generator=g)
        q += centers[torch.randint(4, (batch, n, hq), generator=g)]
        k += centers[torch.randint(4, (batch, n, hkv), generator=g)]
    q, k = q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2)
    return (q, k) if strided else (q.contiguous(), k.contiguous())


def segment_shuffle(batch, hkv, n, segment_size, seed):
    """A random permutation inside each full segment (the remainder in order), like a pbs_permutation result."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.arange(n).repeat(batch, hkv, 1)
    full = n // segment_size * segment_size if n > segment_size else 0
    for row in perm.view(-1, n):
        for start in range(0, full, segment_size):
            row[start:start + segment_size] = start + torch.randperm(segment_size, generator=g)
    return perm.to(torch.int32)


def cpp_permutation(q, k, bs, seg, scale):
    return torch.ops.pykernels.pbs_permutation(q, k, bs, seg, scale)


def cpp_select(q, k, perm, bs, seg, threshold, force_first_block, scale):
    return torch.ops.pykernels.pbs_select_blocks(q, k, perm, bs, seg, threshold, force_first_block, scale)


def assert_selection_equal(q, k, perm, bs, seg, threshold, force_first_block, scale):
    counts, indices = cpp_select(q, k, perm, bs, seg, threshold, force_first_block, scale)
    expected_counts, expected_indices = ref.pbs_select_blocks(q, k, perm, bs, seg, threshold, force_first_block,
                                                              scale)
    assert counts.dtype == torch.int32 and indices.dtype == torch.int32
    assert torch.equal(counts, expected_counts)
    assert torch.equal(indices, expected_indices)


# --- pbs_permutation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_permutation_equals_reference(shape, dtype):
    batch, hq, hkv, n, d, bs, seg = shape
    q, k = make_qk(batch, hq, hkv, n, d, dtype, seed=n + hq, strided=dtype != torch.float32)
    scale = 1 / math.sqrt(d)
    perm = cpp_permutation(q, k, bs, seg, scale)
    assert perm.dtype == torch.int32 and perm.shape == (batch, hkv, n)
    assert torch.equal(perm, ref.pbs_permutation(q, k, bs, seg, scale))


def test_permutation_benchmark_layout():
    """Several row blocks and key chunks per head, bf16 strided input, the default block and segment sizes."""
    q, k = make_qk(1, 8, 2, 1536, 128, torch.bfloat16, seed=7, strided=True, clusters=False)
    perm = cpp_permutation(q, k, 128, 256, 0.1)
    assert torch.equal(perm, ref.pbs_permutation(q, k, 128, 256, 0.1))


def test_permutation_same_for_any_thread_count():
    q, k = make_qk(1, 4, 2, 900, 64, torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpp_permutation(q, k, 16, 64, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(cpp_permutation(q, k, 16, 64, 0.125), single)


def test_permutation_ties_go_to_the_lower_index():
    """Duplicated key rows have bit-equal masses: the lower original index comes first, right before the other."""
    q, k = make_qk(1, 4, 2, 203, 64, torch.float32, seed=11)
    k[:, :, 9] = k[:, :, 5]
    k[:, :, 40] = k[:, :, 33]
    k[:, :, 191] = k[:, :, 160]
    perm = cpp_permutation(q, k, 16, 32, 0.125)
    assert torch.equal(perm, ref.pbs_permutation(q, k, 16, 32, 0.125))
    for row in perm:
        positions = {int(key): c for c, key in enumerate(row.flatten())}
        for low, high in [(5, 9), (33, 40), (160, 191)]:
            assert positions[high] == positions[low] + 1


def test_permutation_all_zero_queries_is_identity():
    """All logits 0: every key of a segment has the same mass, so the stable order keeps the segments as they are."""
    q, k = make_qk(2, 4, 2, 150, 64, torch.float16, seed=5)
    perm = cpp_permutation(torch.zeros_like(q), k, 16, 32, 0.125)
    assert torch.equal(perm, torch.arange(150, dtype=torch.int32).repeat(2, 2, 1))


# --- pbs_select_blocks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_select_blocks_equals_reference(shape, dtype):
    """The reference's own permutation, threshold 0.9, token 0 forced in."""
    batch, hq, hkv, n, d, bs, seg = shape
    q, k = make_qk(batch, hq, hkv, n, d, dtype, seed=2 * n + d, strided=dtype == torch.bfloat16)
    scale = 1 / math.sqrt(d)
    perm = ref.pbs_permutation(q, k, bs, seg, scale)
    assert_selection_equal(q, k, perm, bs, seg, 0.9, True, scale)


@pytest.mark.parametrize("force_first_block", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(2, 4, 2, 203, 64, 16, 32), (1, 3, 1, 250, 80, 32, 96)])
def test_select_blocks_thresholds(shape, threshold, force_first_block):
    """Shuffled segments (token 0 anywhere in the first segment), strided fp16 input."""
    batch, hq, hkv, n, d, bs, seg = shape
    q, k = make_qk(batch, hq, hkv, n, d, torch.float16, seed=n, strided=True)
    perm = segment_shuffle(batch, hkv, n, seg, seed=n + 1)
    assert_selection_equal(q, k, perm, bs, seg, threshold, force_first_block, 1 / math.sqrt(d))


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_select_blocks_ties(threshold):
    """All-zero queries: equal probabilities, kept by lower block index first; duplicated key blocks likewise."""
    q, k = make_qk(1, 4, 2, 200, 64, torch.float32, seed=13)
    k[:, :, 16:32] = k[:, :, 48:64]                     # key blocks 1 and 3 pool to the same mean
    perm = torch.arange(200, dtype=torch.int32).repeat(1, 2, 1)
    for queries in (torch.zeros_like(q), q):
        assert_selection_equal(queries, k, perm, 16, 32, threshold, False, 0.125)
    counts, indices = cpp_select(torch.zeros_like(q), k, perm, 16, 32, threshold, False, 0.125)
    # query block 12 (segment 6): 12 equal candidates, kept in index order until the running sum reaches the
    # threshold, plus its own segment's blocks 12 (its own rows) and not 13 (keys after its last row)
    kept = math.ceil(threshold * 12 - 1e-9)
    expected = torch.tensor(list(range(kept)) + [12], dtype=torch.int32)
    assert torch.equal(indices[0, 0, 12, :counts[0, 0, 12]], expected)


def test_select_blocks_rows_are_sorted_and_padded():
    q, k = make_qk(1, 2, 1, 150, 64, torch.bfloat16, seed=17)
    perm = segment_shuffle(1, 1, 150, 64, seed=3)
    counts, indices = cpp_select(q, k, perm, 16, 64, 0.5, True, 0.125)
    nb = indices.shape[-1]
    for count, row in zip(counts.flatten().tolist(), indices.view(-1, nb)):
        listed = row[:count]
        assert count >= 1 and torch.all(listed[1:] > listed[:-1])
        assert torch.all(row[count:] == -1)


def test_pbs_plan_cpp_backend_equals_reference():
    """The public plan through the cpp backend (these two ops plus the Python glue) equals the reference's."""
    q, k = make_qk(2, 4, 2, 300, 64, torch.bfloat16, seed=23, strided=True)
    cpp = pbs_plan(q, k, block_size=16, segment_size=48, threshold=0.8, backend="cpp")
    expected = pbs_plan(q, k, block_size=16, segment_size=48, threshold=0.8, backend="reference")
    assert torch.equal(cpp.perm, expected.perm)
    assert torch.equal(cpp.offsets, expected.offsets)
    assert torch.equal(cpp.indices, expected.indices)
    assert cpp.density == expected.density


# --- argument checks and the op contract ---------------------------------------------------------------------

def test_rejects_bad_arguments():
    q, k = make_qk(1, 4, 2, 64, 64, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="pbs_permutation: q and k must share one dtype"):
        cpp_permutation(q, k.half(), 16, 32, 0.125)
    with pytest.raises(RuntimeError, match="pbs_permutation: q heads"):
        cpp_permutation(q[:, :3], k, 16, 32, 0.125)
    with pytest.raises(RuntimeError, match="pbs_select_blocks: perm must be int32"):
        cpp_select(q, k, torch.zeros(1, 2, 64, dtype=torch.int64), 16, 32, 0.9, True, 0.125)
    with pytest.raises(RuntimeError, match=r"pbs_select_blocks: perm values must lie in \[0, N\)"):
        cpp_select(q, k, torch.full((1, 2, 64), 64, dtype=torch.int32), 16, 32, 0.9, True, 0.125)


@pytest.mark.parametrize("strided", [False, True])
def test_opcheck(strided):
    q, k = make_qk(1, 4, 2, 75, 64, torch.bfloat16, seed=1, strided=strided)
    torch.library.opcheck(torch.ops.pykernels.pbs_permutation.default, (q, k, 16, 32, 0.125))
    perm = cpp_permutation(q, k, 16, 32, 0.125)
    torch.library.opcheck(torch.ops.pykernels.pbs_select_blocks.default, (q, k, perm, 16, 32, 0.9, True, 0.125))
