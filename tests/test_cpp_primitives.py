"""The CPU C++ merge primitives (torch.ops.pykernels.*) against the pure-PyTorch reference.

Thresholds and masks must be bit-identical to the reference, l1 norms equal to float64 rounding, merged values
equal to float32 rounding (the C++ kernel evaluates the same float32 operations in the same order).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import pykernels._C  # noqa: F401  (registers torch.ops.pykernels.*)
from pykernels.reference import merging as ref
from pykernels.reference import selection as ref_sel

ops = torch.ops.pykernels
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEEP_NONE = 1 << 32


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _tensor(shape, dtype, gen, layout="contiguous", levels=None, scale=1.0):
    """A random tensor of `shape`; layout "transposed" / "strided" gives a non-contiguous view of it."""
    if layout == "transposed":
        assert len(shape) == 2
        return _tensor(shape[::-1], dtype, gen, "contiguous", levels, scale).t()
    if layout == "strided":
        full = _tensor((*shape[:-1], 2 * shape[-1]), dtype, gen, "contiguous", levels, scale)
        return full[..., ::2]
    if levels is not None:  # few distinct values: many exact ties
        x = torch.randint(-levels, levels + 1, shape, generator=gen).float() * 0.125
    else:
        x = torch.randn(shape, generator=gen) * scale
    return x.to(dtype)


def make_inputs(shape, model_dtypes, base_dtype, seed=0, layout="contiguous", levels=None):
    gen = torch.Generator().manual_seed(seed)
    base = None if base_dtype is None else _tensor(shape, base_dtype, gen, layout, levels)
    tensors = [_tensor(shape, dt, gen, layout, levels, scale=1.0 + 0.5 * i) for i, dt in enumerate(model_dtypes)]
    return base, tensors


def model_dtypes(kind, n):
    if kind == "mixed":
        cycle = [torch.bfloat16, torch.float32, torch.float16]
        return [cycle[i % 3] for i in range(n)]
    return [DTYPES[kind]] * n


def ks_for(numel, n, seed=0):
    """k per model: includes 0, numel and interior values."""
    gen = torch.Generator().manual_seed(seed)
    fixed = [numel // 5, 0, numel, max(numel // 2, 0), int(torch.randint(0, numel + 1, (), generator=gen))]
    return [fixed[i % len(fixed)] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# comparisons


def assert_thresholds(base, tensors, ks):
    got = ops.delta_topk_thresholds(base, tensors, ks)
    want = ref_sel.delta_topk_thresholds(base, tensors, ks)
    assert got.dtype == torch.int64 and got.shape == (len(tensors), 2)
    assert torch.equal(got, want), f"ks={ks}\n{got}\n!=\n{want}"
    return got


def assert_norms(base, tensors, sparsifier, thresholds, keep_probs, seed):
    got = ops.delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)
    want = ref.delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)
    assert got.dtype == torch.float64 and got.shape == (len(tensors), 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300, equal_nan=True)
    return got


MERGE_TOL = {  # float32 rounding of the merged value, then one rounding to the output dtype
    torch.float32: dict(rtol=4e-7, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
    torch.float64: dict(rtol=4e-7, atol=1e-6),
}


def assert_merge(base, tensors, *args):
    out_dtype = args[-1]
    got = ops.fused_merge(base, tensors, *args)
    want = ref.fused_merge(base, tensors, *args)
    assert got.dtype == out_dtype and got.shape == tensors[0].shape
    torch.testing.assert_close(got, want, equal_nan=True, **MERGE_TOL[out_dtype])
    return got


def assert_merge_l1(base, tensors, sparsifier, thresholds, keep_probs, seed, *combination):
    """fused_merge_l1 is fused_merge with the l1 scales of delta_l1_norms, bit for bit (the random masks drawn
    once and reused must be the ones a second draw gives), and matches the reference's composite."""
    got = ops.fused_merge_l1(base, tensors, sparsifier, thresholds, keep_probs, seed, *combination)
    scales = ref.l1_ratio(ops.delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed))
    two_calls = ops.fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, *combination)
    assert torch.equal(got.view(-1).view(torch.uint8), two_calls.view(-1).view(torch.uint8))
    want = ref.fused_merge_l1(base, tensors, sparsifier, thresholds, keep_probs, seed, *combination)
    torch.testing.assert_close(got, want, equal_nan=True, **MERGE_TOL[combination[-1]])


def merge_args(n, sparsifier, thresholds, *, sign_source=0, consensus=1, divisor=0, normalize=True, lambda_=1.0,
               out_dtype=torch.float32, seed=1234, keep_probs=None):
    keep_probs = keep_probs if keep_probs is not None else [0.3 + 0.6 * i / max(n, 1) for i in range(n)]
    scales = torch.tensor([1.0 + 0.25 * i for i in range(n)], dtype=torch.float32)
    weights = [0.7 - 0.45 * i for i in range(n)]  # mixed signs exercise the election
    return (sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source, consensus, divisor, normalize,
            lambda_, out_dtype)


def band_ks(numel, n, seed=0):
    """(k_a, k_b) per model from mergekit's formula (reference.merging.band_counts), including the edges: keep
    nothing, keep everything, gamma 0 (plain top-k), gamma 1 (the smallest), and interior bands."""
    settings = [(0.3, 0.05), (0.0, 0.1), (1.0, 0.01), (0.5, 0.0), (0.2, 1.0), (0.7, 0.2), (0.05, 0.5)]
    return [ref.band_counts(*settings[(m + seed) % len(settings)], numel) for m in range(n)]


def assert_band_thresholds(base, tensors, pairs):
    """(N, 4) band thresholds from one delta_topk_thresholds call over the models listed twice."""
    n = len(tensors)
    both = assert_thresholds(base, list(tensors) * 2, [a for a, _ in pairs] + [b for _, b in pairs])
    return torch.cat([both[:n], both[n:]], dim=1)


def check_everything(base, tensors, seed=0):
    """Thresholds, norms under every sparsifier, and typical merges."""
    n, numel = len(tensors), tensors[0].numel()
    ks = ks_for(numel, n, seed)
    thresholds = assert_thresholds(base, tensors, ks)
    band = assert_band_thresholds(base, tensors, band_ks(numel, n, seed))
    keep_probs = [0.1, 1.0, 0.5, 0.9, 0.0][:n] + [0.5] * max(0, n - 5)
    for sparsifier in (0, 1, 2):
        assert_norms(base, tensors, sparsifier, thresholds, keep_probs, seed)
    assert_norms(base, tensors, 3, band, keep_probs, seed)
    out_dtype = base.dtype if base is not None else tensors[0].dtype
    assert_merge(base, tensors, *merge_args(n, 1, thresholds, out_dtype=out_dtype))  # ties
    assert_merge(base, tensors, *merge_args(n, 2, torch.zeros(n, 2, dtype=torch.int64), consensus=0,
                                            normalize=False, lambda_=0.5, keep_probs=keep_probs))  # dare_linear
    assert_merge(base, tensors, *merge_args(n, 3, band, consensus=0, normalize=False))  # breadcrumbs
    assert_merge(base, tensors, *merge_args(n, 3, band, normalize=False, out_dtype=out_dtype))  # breadcrumbs_ties
    combination = merge_args(n, 0, None, normalize=False, out_dtype=out_dtype)[5:]
    assert_merge_l1(base, tensors, 2, torch.zeros(n, 2, dtype=torch.int64), keep_probs, seed, *combination)  # dare_ties
    assert_merge_l1(base, tensors, 1, thresholds, keep_probs, seed, *combination)  # ties with the l1 rescale


# ---------------------------------------------------------------------------------------------------------------
# shapes, layouts, dtypes, model counts

SHAPES = [((1,), "contiguous"), ((7,), "contiguous"), ((1023, 17), "contiguous"), ((4096, 11), "transposed"),
          ((513, 9), "strided"), ((0,), "contiguous")]


@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16", "mixed"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_shapes_dtypes(shape, layout, kind, n):
    dtypes = model_dtypes(kind, n)
    base_dtype = torch.bfloat16 if kind == "mixed" else dtypes[0]
    base, tensors = make_inputs(shape, dtypes, base_dtype, seed=n, layout=layout)
    check_everything(base, tensors, seed=n)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "mixed"])
def test_without_base(kind):
    _, tensors = make_inputs((1023, 17), model_dtypes(kind, 3), None, seed=3)
    check_everything(None, tensors, seed=3)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_out_dtypes(out_dtype):
    base, tensors = make_inputs((333, 7), model_dtypes("mixed", 3), torch.float16, seed=4)
    thresholds = assert_thresholds(base, tensors, [500, 1000, 2000])
    assert_merge(base, tensors, *merge_args(3, 1, thresholds, out_dtype=out_dtype, lambda_=1.5))


# ---------------------------------------------------------------------------------------------------------------
# every engine setting


@pytest.mark.parametrize("sparsifier", [0, 1, 2, 3])
@pytest.mark.parametrize("sign_source,consensus,divisor,normalize",
                         list(itertools.product([0, 1], [0, 1, 2], [0, 1], [False, True])))
def test_engine_settings(sparsifier, sign_source, consensus, divisor, normalize):
    base, tensors = make_inputs((1023, 17), model_dtypes("mixed", 3), torch.float32, seed=5)
    if sparsifier == 3:
        thresholds = band_thresholds_ref(base, tensors, [(3000, 500), (8000, 0), (17391, 9000)])
    else:
        thresholds = ref_sel.delta_topk_thresholds(base, tensors, [3000, 8000, 17391])
    args = merge_args(3, sparsifier, thresholds, sign_source=sign_source, consensus=consensus, divisor=divisor,
                      normalize=normalize, lambda_=0.8)
    assert_merge(base, tensors, *args)


def band_thresholds_ref(base, tensors, pairs):
    """Reference (N, 4) band thresholds of explicit (k_a, k_b) pairs."""
    a = ref_sel.delta_topk_thresholds(base, tensors, [p[0] for p in pairs])
    b = ref_sel.delta_topk_thresholds(base, tensors, [p[1] for p in pairs])
    return torch.cat([a, b], dim=1)


def test_weights_summing_to_zero():
    """No consensus, divisor weights, |sum w| < 1e-8: the divisor falls back to 1."""
    base, tensors = make_inputs((100,), model_dtypes("fp32", 2), torch.float32, seed=6)
    args = list(merge_args(2, 0, torch.zeros(2, 2, dtype=torch.int64), consensus=0, divisor=0))
    args[5] = [0.5, -0.5]
    assert_merge(base, tensors, *args)


# ---------------------------------------------------------------------------------------------------------------
# ties, k edge cases, masks


def kept_mask(tensors, thresholds, m):
    """Model m's magnitude mask as the C++ merge applies it: merge of one model, weight 1, no base."""
    t = tensors[m]
    th = thresholds[m:m + 1].clone()
    out = ops.fused_merge(None, [t], 1, th, [1.0], 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0, torch.float32)
    return out.reshape(-1) != 0


@pytest.mark.parametrize("numel", [5000, 200_003])
def test_bf16_ties_keep_exactly_k(numel):
    """Values from few levels: the k-th key has many ties and exactly k elements must be kept."""
    base, tensors = make_inputs((numel,), model_dtypes("bf16", 3), torch.bfloat16, seed=7, levels=4)
    ks = [numel // 3, numel // 2 + 1, numel - 7]
    thresholds = assert_thresholds(base, tensors, ks)
    for m, k in enumerate(ks):
        d = ref_sel.task_vector(base, tensors[m])
        keys = ref_sel.magnitude_keys(d)
        mask = ref_sel.keep_mask(keys, *(int(v) for v in thresholds[m]))
        assert int(mask.sum()) == k
        ties = int((keys == int(thresholds[m, 0])).sum())
        assert ties > 1  # the tie-cutting pass really ran
    # Magnitude masks through the merge: base None, d = t, so nonzero kept entries are exactly the mask.
    _, models = make_inputs((numel,), model_dtypes("bf16", 2), None, seed=8, levels=3)
    ks = [numel // 4, numel // 2]
    thresholds = assert_thresholds(None, models, ks)
    for m in range(2):
        keys = ref_sel.magnitude_keys(models[m].float())
        want = ref_sel.keep_mask(keys, *(int(v) for v in thresholds[m]))
        got = kept_mask(models, thresholds, m)
        assert torch.equal(got, want & (models[m].float().reshape(-1) != 0))
    assert_norms(base, tensors, 1, ref_sel.delta_topk_thresholds(base, tensors, [1, numel // 2, numel]), [], 0)


def band_mask(tensor, thresholds4):
    """Model 0's band mask as the C++ merge applies it (one model, no base, weight 1): nonzero kept entries."""
    out = ops.fused_merge(None, [tensor], 3, thresholds4, [1.0], 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0,
                          torch.float32)
    return out.reshape(-1) != 0


@pytest.mark.parametrize("numel", [5000, 200_003])
def test_band_ties_keep_exactly_the_band(numel):
    """Few magnitude levels: both band edges cut through tie groups, across chunks and blocks; the C++ mask
    equals the reference's bit for bit and keeps exactly k_a - k_b elements."""
    _, models = make_inputs((numel,), model_dtypes("bf16", 2), None, seed=15, levels=5)
    for m, (ka, kb) in enumerate([(numel // 2 + 17, numel // 7), (numel - 3, numel // 3 + 1)]):
        t = models[m]
        t[t == 0] = 0.0625  # no zero deltas, so the nonzero entries of the output are exactly the mask
        th = assert_band_thresholds(None, [t], [(ka, kb)])
        keys = ref_sel.magnitude_keys(t.float())
        assert int((keys == int(th[0, 0])).sum()) > 1 and int((keys == int(th[0, 2])).sum()) > 1  # ties at both
        want = ref.band_keep(keys, *(int(v) for v in th[0]))
        assert int(want.sum()) == ka - kb
        assert torch.equal(band_mask(t, th), want)
        assert_norms(None, [t], 3, th, [], 0)


def test_band_degenerate_thresholds():
    """Rows that select everything (key < 0), nothing (key >= 2^31), one edge only, b above a (empty band), equal
    edges, and edges on the same key with different cutoffs: the resolved C++ rules against the reference."""
    gen = torch.Generator().manual_seed(16)
    clean = torch.randint(1, 6, (10_000,), generator=gen).float() * 0.25  # no zeros, many ties
    with_nan = clean.clone()
    with_nan[::97] = float("nan")
    k3 = int(ref_sel.magnitude_keys(torch.tensor([0.75]))[0])
    rows = [
        [-1, -1, KEEP_NONE, -1],          # everything
        [-1, -1, k3, 4000],               # everything but the top part
        [k3, 5000, KEEP_NONE, -1],        # plain top-k
        [KEEP_NONE, -1, KEEP_NONE, -1],   # nothing (a selects nothing)
        [k3, 5000, -1, -1],               # nothing (b selects everything)
        [k3, 5000, k3, 5000],             # empty band: equal edges
        [k3, 2000, k3, 5000],             # b above a: empty
        [k3, 5000, k3, 2000],             # same key: the ties with index in (2000, 5000]
        [k3 - 1, 100, k3, 9999],          # a key held by no element
        [0, 0, 0x7F800001, 50],           # b: the NaNs up to index 50
        [0x7FFFFFFF, 0, 0x7FFFFFFF, -1],  # keys just below KEEP_NONE
    ]
    keys = ref_sel.magnitude_keys(clean)
    for row in rows:
        th = torch.tensor([row], dtype=torch.int64)
        assert torch.equal(band_mask(clean, th), ref.band_keep(keys, *row)), row
        # with NaNs (key 0x7F800001): a kept NaN makes the kept l1 norm NaN, so the norms tell whether it is kept
        assert_norms(None, [with_nan], 3, th, [], 0)
        assert_merge(None, [with_nan], *merge_args(1, 3, th, consensus=0, normalize=False))


@pytest.mark.parametrize("with_base", [False, True])
def test_tie_groups_too_large_to_record(with_base):
    """Tie groups larger than the recorded bucket members (> 2^16 elements): the cutoff comes from the per-block
    tie-count pass, for ties cut inside the group and for groups kept whole."""
    numel = 400_000
    base, tensors = make_inputs((numel,), model_dtypes("bf16", 3), torch.bfloat16 if with_base else None, seed=14,
                                levels=1)
    keys = ref_sel.magnitude_keys(ref_sel.task_vector(base, tensors[0]))
    top = int((keys == keys.max()).sum())  # size of the largest-magnitude tie group
    assert top > 1 << 16
    assert_thresholds(base, tensors, [top, top + 12_345, numel])
    assert_thresholds(base, tensors, [numel - 1, 1, top - 1])


@pytest.mark.parametrize("with_base", [False, True])
def test_repeated_models(with_base):
    """The same tensor listed several times (the band's 2N thresholds in one call) shares the first pass; every
    row is still its own exact top-k, also when ties are cut by the per-block tie pass (groups > 2^16), for
    non-contiguous views, and next to a different view of the same memory (not a repeat)."""
    numel = 300_000
    base, tensors = make_inputs((numel,), model_dtypes("bf16", 2), torch.bfloat16 if with_base else None, seed=17,
                                levels=1)
    a, b = tensors
    keys = ref_sel.magnitude_keys(ref_sel.task_vector(base, a))
    top = int((keys == keys.max()).sum())
    assert top > 1 << 16
    listed = [a, b, a, a, b, a]
    assert_thresholds(base, listed, [top, numel // 2, top + 12_345, 0, numel, top - 7])
    assert_thresholds(base, listed, [1, 0, numel, numel - 1, 5, 70_000])
    gen = torch.Generator().manual_seed(18)
    full = torch.randn(400, 31, generator=gen)
    view = full.t()  # non-contiguous
    other = full.reshape(31, 400)  # same memory, other strides: a different tensor
    assert_thresholds(None, [view, other, view, view], [100, 200, 12_000, 5])
    # a wrong tensor after repeats is named by its position in the list
    with pytest.raises(RuntimeError, match=r"tensors\[3\] has shape"):
        ops.delta_topk_thresholds(None, [view, view, view, torch.zeros(5)], [1, 1, 1, 1])


def test_all_ties_kept_across_blocks():
    """Ties at the k-th key are all kept: the cutoff is the last tie, found across several blocks/threads."""
    numel = 300_000
    gen = torch.Generator().manual_seed(9)
    t = torch.randn(numel, generator=gen)
    t[::1000] = 7.0  # 300 ties at the top key, spread over the whole tensor
    thresholds = assert_thresholds(None, [t], [300])
    assert int(thresholds[0, 1]) == numel - 1000
    assert_thresholds(None, [t], [299])
    assert_thresholds(None, [t], [301])


def test_zero_deltas():
    """Models equal to the base at most positions: ties at key 0 (and -0.0 == +0.0)."""
    base, tensors = make_inputs((20_000,), model_dtypes("fp32", 2), torch.float32, seed=10)
    for t in tensors:
        t[1000:] = base[1000:]
    tensors[1][5000:6000] = -0.0
    base[5000:6000] = 0.0
    check_everything(base, tensors)
    assert_thresholds(base, tensors, [5000, 20_000])


@pytest.mark.parametrize("k", ["zero", "all"])
def test_k_edges(k):
    base, tensors = make_inputs((1023, 17), model_dtypes("mixed", 3), torch.float32, seed=11)
    numel = tensors[0].numel()
    ks = [0] * 3 if k == "zero" else [numel] * 3
    thresholds = assert_thresholds(base, tensors, ks)
    if k == "zero":
        assert thresholds.tolist() == [[KEEP_NONE, -1]] * 3
    assert_norms(base, tensors, 1, thresholds, [], 0)
    assert_merge(base, tensors, *merge_args(3, 1, thresholds))


def test_empty():
    base, tensors = make_inputs((0, 5), model_dtypes("mixed", 2), torch.float32)
    assert ops.delta_topk_thresholds(base, tensors, [0, 0]).tolist() == [[KEEP_NONE, -1]] * 2
    assert ops.delta_l1_norms(base, tensors, 2, torch.zeros(2, 2, dtype=torch.int64), [0.5, 0.5], 0).tolist() == [
        [0.0, 0.0]] * 2
    out = ops.fused_merge(base, tensors, *merge_args(2, 0, torch.zeros(2, 2, dtype=torch.int64)))
    assert out.shape == (0, 5)


def test_random_masks_exact():
    """DARE masks through the merge equal the reference Philox masks bit for bit."""
    numel = 70_000
    ones = [torch.ones(numel), torch.ones(numel, dtype=torch.bfloat16)]
    probs = [0.3, 0.75]
    out = ops.fused_merge(None, ones, 2, torch.zeros(2, 2, dtype=torch.int64), probs, 99, torch.ones(2),
                          [1.0, 2.0], 0, 0, 0, False, 1.0, torch.float32)
    want = ref.random_keep(numel, probs[0], 99, 0).float() + 2 * ref.random_keep(numel, probs[1], 99, 1).float()
    assert torch.equal(out, want)


def test_outputs_alive_together_are_independent():
    """Merge outputs come from a block the kernels keep between calls: an output still referenced is never handed
    out again, and a freed one is reused only once nothing refers to it."""
    base, tensors = make_inputs((3000, 7), model_dtypes("bf16", 2), torch.bfloat16, seed=4)
    args = merge_args(2, 0, torch.zeros(2, 2, dtype=torch.int64), out_dtype=torch.bfloat16)
    first = ops.fused_merge(base, tensors, *args)
    first_copy = first.clone()
    second = ops.fused_merge(base, [t * 2 for t in tensors], *args)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, first_copy) and torch.equal(first, ref.fused_merge(base, tensors, *args))
    del first
    third = ops.fused_merge(base, tensors, *args)
    assert torch.equal(third, first_copy)
    assert torch.equal(second, ref.fused_merge(base, [t * 2 for t in tensors], *args))


@pytest.mark.parametrize("op", ["norms", "merge", "merge_l1"])
def test_random_keep_at_the_probability_boundary(op):
    """Keep is u < p, decided in the kernels as an integer compare against the first integer whose uniform
    reaches p: with p equal to drawn uniforms (and one float either side) every kernel keeps exactly the
    reference's elements. 20_001 elements: full 32-draw groups and a scalar tail."""
    numel, seed = 20_001, 7
    u = ref.philox_uniform(ref.model_seed(seed, 0), torch.arange(numel))
    for p0 in (u[5].item(), u[19_999].item(), 2**-31, 1.0 - 2**-24, 0.0):
        for p in (p0, torch.nextafter(torch.tensor(p0), torch.tensor(0.0)).item(),
                  torch.nextafter(torch.tensor(p0), torch.tensor(1.0)).item()):
            want = (u < torch.tensor(p, dtype=torch.float32)).float()
            x, none = [torch.ones(numel)], torch.zeros(1, 2, dtype=torch.int64)
            if op == "norms":
                got = ops.delta_l1_norms(None, x, 2, none, [p], seed)[0].tolist()
                assert got == [float(numel), want.sum().item()], p
                continue
            tail = ([1.0], 0, 0, 0, False, 1.0, torch.float32)
            got = (ops.fused_merge(None, x, 2, none, [p], seed, torch.ones(1), *tail) if op == "merge" else
                   ops.fused_merge_l1(None, x, 2, none, [p], seed, *tail))
            scale = ref.l1_ratio(torch.tensor([[float(numel), want.sum().item()]], dtype=torch.float64))
            assert torch.equal(got, want * (scale if op == "merge_l1" else 1.0)), p


# ---------------------------------------------------------------------------------------------------------------
# non-finite inputs


@pytest.mark.parametrize("kind", ["fp32", "bf16", "mixed"])
def test_nonfinite_inputs(kind):
    base, tensors = make_inputs((2000,), model_dtypes(kind, 3), torch.float32, seed=12)
    tensors[0][3] = float("nan")
    tensors[1][10] = float("inf")
    tensors[2][10] = float("-inf")  # d = +inf and -inf at one element
    tensors[1][20] = float("-inf")
    base[30] = float("nan")
    base[40] = float("inf")
    tensors[0][40] = float("inf")  # inf - inf = nan
    n, numel = 3, 2000
    for ks in ([1, 2, 3], [numel // 3, 0, numel], [5, 100, 1999]):
        thresholds = assert_thresholds(base, tensors, ks)
        assert_norms(base, tensors, 1, thresholds, [], 0)
        for consensus in (0, 1, 2):
            out = assert_merge(base, tensors, *merge_args(n, 1, thresholds, consensus=consensus))
            # NaN poisoning: every element with a non-finite input is non-finite in the output
            assert not torch.isfinite(out[[3, 10, 20, 30, 40]]).any()
        assert_merge(base, tensors, *merge_args(n, 2, thresholds, consensus=1))
    assert_merge(base, tensors, *merge_args(n, 0, thresholds, consensus=0, normalize=False))


def test_finite_inputs_overflowing_delta_are_not_poisoned():
    """Poisoning looks at the inputs: finite inputs whose difference overflows give inf, not NaN."""
    base = torch.tensor([-3e38, 1.0])
    t = torch.tensor([3e38, 2.0])
    out = assert_merge(base, [t], *merge_args(1, 0, torch.zeros(1, 2, dtype=torch.int64), consensus=0,
                                              normalize=False))
    assert torch.isnan(out[0]) or torch.isinf(out[0])


# ---------------------------------------------------------------------------------------------------------------
# determinism across thread counts


def _run_all(base, tensors, ks):
    n = len(tensors)
    thresholds = ops.delta_topk_thresholds(base, tensors, ks)
    norms = ops.delta_l1_norms(base, tensors, 1, thresholds, [], 0)
    dare_norms = ops.delta_l1_norms(base, tensors, 2, thresholds, [0.4] * n, 5)
    ties = ops.fused_merge(base, tensors, *merge_args(n, 1, thresholds))
    dare = ops.fused_merge(base, tensors, *merge_args(n, 2, thresholds, consensus=2, out_dtype=torch.bfloat16))
    both = ops.delta_topk_thresholds(base, list(tensors) * 2, list(ks) + [k // 3 for k in ks])
    band = torch.cat([both[:n], both[n:]], dim=1)
    band_norms = ops.delta_l1_norms(base, tensors, 3, band, [], 0)
    crumbs = ops.fused_merge(base, tensors, *merge_args(n, 3, band))
    # bit patterns, so that NaNs compare equal
    return (thresholds, norms.view(torch.int64), dare_norms.view(torch.int64), ties.view(torch.int32),
            dare.view(torch.int16), band, band_norms.view(torch.int64), crumbs.view(torch.int32))


def test_thread_count_determinism():
    numel = 400_003
    base, tensors = make_inputs((numel,), model_dtypes("mixed", 3), torch.bfloat16, seed=13, levels=50)
    tensors[1][numel // 2] = float("nan")
    ks = [numel // 10, numel // 2, numel]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(base, tensors, ks)
        torch.set_num_threads(2)
        two = _run_all(base, tensors, ks)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.equal(one[0], ref_sel.delta_topk_thresholds(base, tensors, ks))
    torch.testing.assert_close(one[1].view(torch.float64), ref.delta_l1_norms(base, tensors, 1, one[0], [], 0),
                               rtol=1e-12, atol=0.0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# philox


@pytest.mark.parametrize("seed,offset,n", [(0, 0, 1000), (12345, 2**32 - 3, 10), (2**62 + 7, 3 * 2**32 + 5, 777),
                                           (ref.model_seed(42, 3), 2**40, 100_000), (1, 5, 0)])
def test_philox_uniform(seed, offset, n):
    got = ops.philox_uniform(seed, offset, n)
    want = ref.philox_uniform(seed, offset + torch.arange(n, dtype=torch.int64))
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def test_argument_errors():
    base, tensors = make_inputs((10,), model_dtypes("fp32", 2), torch.float32)
    with pytest.raises(RuntimeError, match="at least one model"):
        ops.delta_topk_thresholds(base, [], [])
    with pytest.raises(RuntimeError, match="ks must have"):
        ops.delta_topk_thresholds(base, tensors, [1])
    with pytest.raises(RuntimeError, match="outside"):
        ops.delta_topk_thresholds(base, tensors, [1, 11])
    with pytest.raises(RuntimeError, match="shape"):
        ops.delta_topk_thresholds(base, [tensors[0], torch.zeros(11)], [1, 1])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.delta_topk_thresholds(base, [tensors[0], torch.zeros(10, dtype=torch.int32)], [1, 1])
    with pytest.raises(RuntimeError, match="at most 64"):
        ops.delta_topk_thresholds(None, [tensors[0]] * 65, [1] * 65)
    with pytest.raises(RuntimeError, match="thresholds must have shape"):
        ops.delta_l1_norms(base, tensors, 1, torch.zeros(3, 2, dtype=torch.int64), [], 0)
    with pytest.raises(RuntimeError, match="keep_probs"):
        ops.delta_l1_norms(base, tensors, 2, torch.zeros(2, 2, dtype=torch.int64), [0.5], 0)
    with pytest.raises(RuntimeError, match="consensus"):
        ops.fused_merge(base, tensors, *merge_args(2, 0, torch.zeros(2, 2, dtype=torch.int64), consensus=3))
    # thresholds are validated per sparsifier: magnitude (N, 2), band (N, 4)
    two, four = torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"thresholds must have shape \(2, 4\) for sparsifier 3 \(band\)"):
        ops.fused_merge(base, tensors, *merge_args(2, 3, two))
    with pytest.raises(RuntimeError, match=r"thresholds must have shape \(2, 4\) for sparsifier 3"):
        ops.delta_l1_norms(base, tensors, 3, torch.zeros(4, 2, dtype=torch.int64), [], 0)
    with pytest.raises(RuntimeError, match=r"thresholds must have shape \(2, 2\) for sparsifier 1 \(magnitude\)"):
        ops.fused_merge(base, tensors, *merge_args(2, 1, four))
    with pytest.raises(RuntimeError, match="integer tensor"):
        ops.fused_merge(base, tensors, *merge_args(2, 3, four.double()))
    with pytest.raises(RuntimeError, match=r"sparsifier must be 0 \(none\), 1 \(magnitude\), 2 \(random\) or 3"):
        ops.fused_merge(base, tensors, *merge_args(2, 4, four))
    with pytest.raises(ValueError, match=r"thresholds must have shape \(2, 4\) for sparsifier 3 \(band\)"):
        ref.fused_merge(base, tensors, *merge_args(2, 3, two))
