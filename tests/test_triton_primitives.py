"""Triton merge primitives (kernels/merging.py) against the pure-PyTorch reference, under the interpreter.

Run in its own process: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_primitives.py -q``
(TRITON_INTERPRET must be set before triton is imported). Thresholds, masks and Philox draws must be
bit-identical to the reference; merged values too (same float32 operations in the same order), which is
stronger than the contract's "within float32 rounding".
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy overflow/NaN warnings of the interpreter
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton tests run on CPU tensors only under TRITON_INTERPRET=1"),
]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from pykernels.reference import merging as ref  # noqa: E402
from pykernels.reference import selection as refsel  # noqa: E402


def _load_kernels():
    """This checkout's kernels/merging.py: the installed pykernels.kernels when it is that file (an editable
    install of this checkout), else the file itself (a source checkout without an install, or another checkout
    of the same repository, e.g. a git worktree, whose editable install maps pykernels.kernels elsewhere)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "merging.py"
    try:
        from pykernels.kernels import merging as mod  # installed package (package_dir mapping)
        if pathlib.Path(mod.__file__).resolve() == path:
            return mod
    except ImportError:
        pass
    # never as a top-level `kernels` module
    spec = importlib.util.spec_from_file_location("_pykernels_triton_merging", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


K = _load_kernels()

DTYPES = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "fp16": [torch.float16],
          "mixed": [torch.float32, torch.bfloat16, torch.float16]}
SHAPES = [(1,), (7,), (33, 17), (64, 11), (0,)]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _tensor(shape, dtype, gen, ties=False, noncontig=False):
    if noncontig and len(shape) == 2:
        x = _values(shape[::-1], gen, ties).t()  # same logical shape, transposed storage
    else:
        x = _values(shape, gen, ties)
    x = x.to(dtype)
    if noncontig and len(shape) == 2:
        assert not x.is_contiguous()
    return x


def _values(shape, gen, ties):
    if ties:  # few distinct magnitudes: many exact ties, also after subtracting a quantised base
        return torch.randint(-4, 5, shape, generator=gen).to(torch.float32) / 4
    return torch.randn(shape, generator=gen)


def make_inputs(shape, dtypes, n, with_base=True, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    noncontig = shape == (64, 11)
    tensors = [_tensor(shape, dtypes[m % len(dtypes)], gen, ties, noncontig) for m in range(n)]
    base = _tensor(shape, dtypes[0], gen, ties, noncontig) if with_base else None
    return base, tensors


def assert_same(actual, expected):
    """Bit-identical (NaN == NaN), same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype,
                                                                              actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def ks_for(numel, n, variant):
    choices = [[numel // 3, numel, 0, 1], [1, numel // 2, max(numel - 1, 0), numel // 5]][variant]
    return [min(choices[m % 4], numel) for m in range(n)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny fixed sizes: many programs, many tie chunks and norm partials even for small tensors."""
    monkeypatch.setattr(K, "_BLOCK", 16)
    monkeypatch.setattr(K, "_TIE_CHUNK", 32)
    monkeypatch.setattr(K, "_NORM_CHUNK", 48)
    monkeypatch.setattr(K, "_FINAL_BLOCK", 4)


# ----------------------------------------------------------------------------------------------------------
# Philox
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tl_rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    if WIDE:
        u = tl.rand(seed, idx.to(tl.int64) + offset)
    else:
        u = tl.rand(seed, idx + offset)  # int32 offsets
    tl.store(out_ptr + idx, u, mask=idx < n)


@pytest.mark.parametrize("seed", [0, 1, 12345, ref.model_seed(7, 3), (1 << 63) - 1, (1 << 64) - 1])
@pytest.mark.parametrize("offset", [0, 1000, (1 << 32) - 5, (1 << 40) + 3])
def test_philox_matches_reference(seed, offset):
    n = 37
    got = K.philox_uniform_tensor(seed, offset, n, device="cpu")
    want = ref.philox_uniform(seed, torch.arange(offset, offset + n, dtype=torch.int64))
    assert_same(got, want)
    assert bool(((got >= 0) & (got < 1)).all())


@pytest.mark.parametrize("seed", [0, 3, ref.model_seed(99, 5)])
def test_philox_matches_tl_rand(seed):
    n = 50
    for offset, wide in [(0, False), (77, False), ((1 << 32) - 20, True), ((1 << 35) + 1, True)]:
        out = torch.empty(64, dtype=torch.float32)
        _tl_rand_kernel[(1,)](out, seed, offset, n, BLOCK=64, WIDE=wide)
        assert_same(K.philox_uniform_tensor(seed, offset, n, device="cpu"), out[:n])


def test_philox_empty():
    assert K.philox_uniform_tensor(1, 0, 0, device="cpu").shape == (0,)


# ----------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dt", list(DTYPES))
def test_thresholds_match_reference(shape, dt):
    numel = int(torch.Size(shape).numel())
    for n, with_base, ties, variant in [(1, True, False, 0), (3, True, True, 1), (3, False, True, 0)]:
        base, tensors = make_inputs(shape, DTYPES[dt], n, with_base, seed=n + 10 * variant, ties=ties)
        ks = ks_for(numel, n, variant)
        got = K.delta_topk_thresholds(base, tensors, ks)
        want = refsel.delta_topk_thresholds(base, tensors, ks)
        assert got.dtype == torch.int64 and got.shape == (n, 2)
        assert torch.equal(got, want), (shape, dt, n, ks, got, want)


def test_thresholds_multi_chunk(small_blocks):
    """Ties spread over many chunks and programs: the tie pass must find the exact cutoff."""
    for dt in ["bf16", "mixed"]:
        base, tensors = make_inputs((33, 17), DTYPES[dt], 3, True, seed=5, ties=True)
        for variant in (0, 1):
            ks = ks_for(561, 3, variant)
            assert torch.equal(K.delta_topk_thresholds(base, tensors, ks),
                               refsel.delta_topk_thresholds(base, tensors, ks))


def test_bf16_ties_keep_exactly_k(small_blocks):
    gen = torch.Generator().manual_seed(3)
    t = (torch.randint(-3, 4, (300,), generator=gen).to(torch.float32) / 8).to(torch.bfloat16)
    d = t.float()
    keys = refsel.magnitude_keys(d)
    for k in [0, 1, 2, 37, 100, 150, 299, 300]:
        thr = K.delta_topk_thresholds(None, [t], [k])
        assert torch.equal(thr, refsel.delta_topk_thresholds(None, [t], [k]))
        key, cutoff = (int(v) for v in thr[0])
        assert int(refsel.keep_mask(keys, key, cutoff).sum()) == k


def test_thresholds_all_equal_and_extremes():
    x = torch.zeros(50)
    for k in [0, 1, 25, 49, 50]:
        assert torch.equal(K.delta_topk_thresholds(None, [x], [k]), refsel.delta_topk_thresholds(None, [x], [k]))
    y = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-45, -3e38, 3e38, 5.0, -5.0])
    b = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3e38, -3e38, 0.0, 0.0])  # overflow to +-inf in d too
    for base in (None, b):
        for k in range(11):
            assert torch.equal(K.delta_topk_thresholds(base, [y], [k]),
                               refsel.delta_topk_thresholds(base, [y], [k]))


def test_thresholds_many_models():
    """N above any fixed pointer count: 9 and 64 models with mixed dtypes through one pointer table."""
    for n in (9, 64):
        base, tensors = make_inputs((5, 3), DTYPES["mixed"], n, True, seed=n, ties=True)
        ks = [(m * 7) % 16 for m in range(n)]
        assert torch.equal(K.delta_topk_thresholds(base, tensors, ks),
                           refsel.delta_topk_thresholds(base, tensors, ks))


def test_thresholds_repeated_models(small_blocks):
    """The band's 2N thresholds in one call: models listed several times (sharing the first pass) with
    different k, ties cut across many tie chunks, non-contiguous repeats; errors name the listed index."""
    base, tensors = make_inputs((33, 17), DTYPES["mixed"], 3, True, seed=6, ties=True)
    numel = 561
    for ks in ([400, numel, 0, 37, 1, 200], [123, 0, 560, 5, 300, 301]):
        listed = tensors * 2
        assert torch.equal(K.delta_topk_thresholds(base, listed, ks), refsel.delta_topk_thresholds(base, listed, ks))
    a, b = tensors[0].t(), tensors[1].t()
    assert not a.is_contiguous()
    listed = [a, b, a, a]
    ks = [100, 200, 500, 0]
    assert torch.equal(K.delta_topk_thresholds(None, listed, ks), refsel.delta_topk_thresholds(None, listed, ks))
    with pytest.raises(ValueError, match=r"tensors\[3\]"):
        K.delta_topk_thresholds(None, [a, a, a, torch.zeros(5)], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="len\\(tensors\\) <= 64"):
        K.delta_topk_thresholds(None, [a] * 65, [1] * 65)


# ----------------------------------------------------------------------------------------------------------
# Band thresholds (sparsifier 3): (N, 4) = two top-k thresholds of each model
# ----------------------------------------------------------------------------------------------------------
BAND_SETTINGS = [(0.3, 0.05), (0.0, 0.1), (1.0, 0.01), (0.5, 0.0), (0.2, 1.0), (0.7, 0.2), (0.05, 0.5)]


def band_thresholds(base, tensors, offset=0):
    """Reference (N, 4) thresholds of mergekit's magnitude_outliers for a spread of (density, gamma)."""
    n, numel = len(tensors), tensors[0].numel()
    pairs = [ref.band_counts(*BAND_SETTINGS[(m + offset) % len(BAND_SETTINGS)], numel) for m in range(n)]
    both = refsel.delta_topk_thresholds(base, list(tensors) * 2, [a for a, _ in pairs] + [b for _, b in pairs])
    return torch.cat([both[:n], both[n:]], dim=1)


def _thresholds_for(base, tensors, sparsifier, variant):
    n, numel = len(tensors), tensors[0].numel()
    if sparsifier == 1:
        return refsel.delta_topk_thresholds(base, tensors, ks_for(numel, n, variant))
    if sparsifier == 3:
        return band_thresholds(base, tensors, variant)
    return torch.zeros(n, 2, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# L1 norms
# ----------------------------------------------------------------------------------------------------------
def _norm_case(shape, dt, n, sparsifier, with_base=True, seed=0):
    base, tensors = make_inputs(shape, DTYPES[dt], n, with_base, seed=seed)
    thr = _thresholds_for(base, tensors, sparsifier, seed % 2)
    probs = [0.3, 1.0, 0.0, 0.7][:n] if n <= 4 else [0.5] * n
    got = K.delta_l1_norms(base, tensors, sparsifier, thr, probs, 1234)
    want = ref.delta_l1_norms(base, tensors, sparsifier, thr, probs, 1234)
    assert got.dtype == torch.float64 and got.shape == (n, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    return got


@pytest.mark.parametrize("sparsifier", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_match_reference(sparsifier, shape):
    for dt, n, with_base in [("mixed", 3, True), ("bf16", 1, False)]:
        _norm_case(shape, dt, n, sparsifier, with_base, seed=n)


def test_norms_multi_chunk_deterministic(small_blocks):
    for sparsifier in (0, 1, 2, 3):
        a = _norm_case((64, 11), "mixed", 3, sparsifier, seed=4)
        b = _norm_case((64, 11), "mixed", 3, sparsifier, seed=4)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# Fused merge
# ----------------------------------------------------------------------------------------------------------
def _merge_args(base, tensors, sparsifier, seed=42, weights=None, ks_variant=0):
    n = len(tensors)
    thr = _thresholds_for(base, tensors, sparsifier, ks_variant)
    probs = ([0.4, 1.0, 0.8, 0.0] * 16)[:n]
    if sparsifier == 2:
        scales = torch.tensor([1.0 / p if p > 0 else 1.0 for p in probs], dtype=torch.float32)
    else:
        scales = torch.tensor([1.0 + 0.25 * m for m in range(n)], dtype=torch.float32)
    if weights is None:
        weights = [(0.7, -0.4, 1.3, 0.55)[m % 4] * (1 + m // 4) for m in range(n)]
    return thr, probs, seed, scales, weights


def _check_merge(base, tensors, sparsifier, sign_source, consensus, divisor, normalize, lambda_, out_dtype,
                 weights=None, ks_variant=0):
    thr, probs, seed, scales, weights = _merge_args(base, tensors, sparsifier, weights=weights,
                                                    ks_variant=ks_variant)
    args = (base, tensors, sparsifier, thr, probs, seed, scales, weights, sign_source, consensus, divisor,
            normalize, lambda_, out_dtype)
    got = K.fused_merge(*args)
    want = ref.fused_merge(*args)
    assert_same(got, want)
    return got


@pytest.mark.parametrize("sparsifier", [0, 1, 2, 3])
@pytest.mark.parametrize("consensus", [0, 1, 2])
@pytest.mark.parametrize("sign_source", [0, 1])
@pytest.mark.parametrize("divisor", [0, 1])
@pytest.mark.parametrize("normalize", [False, True])
def test_merge_engine_codes(sparsifier, consensus, sign_source, divisor, normalize):
    base, tensors = make_inputs((33, 17), DTYPES["mixed"], 3, True, seed=sparsifier + 3 * consensus)
    _check_merge(base, tensors, sparsifier, sign_source, consensus, divisor, normalize, 0.8, torch.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dt", list(DTYPES))
def test_merge_shapes_dtypes(shape, dt):
    out_dtype = DTYPES[dt][-1]
    for n, with_base, sparsifier, consensus in [(1, True, 1, 1), (3, True, 2, 2), (3, False, 1, 0), (3, True, 3, 1)]:
        base, tensors = make_inputs(shape, DTYPES[dt], n, with_base, seed=n + sparsifier)
        _check_merge(base, tensors, sparsifier, 0, consensus, 0, True, 1.0, out_dtype)
        _check_merge(base, tensors, sparsifier, 1, consensus, 1, False, 0.5, torch.float32)


@pytest.mark.parametrize("sparsifier", [1, 2])
def test_merge_l1_matches_reference(sparsifier):
    """The Triton fused_merge_l1 (norm kernel, l1 ratio, merge kernel) equals the reference composite."""
    from pykernels import _ops

    base, tensors = make_inputs((33, 17), DTYPES["mixed"], 3, True, seed=5 + sparsifier)
    thr, probs, seed, _, weights = _merge_args(base, tensors, sparsifier)
    args = (base, tensors, sparsifier, thr, probs, seed, weights, 0, 1, 0, True, 0.8, torch.bfloat16)
    assert_same(_ops.primitives("triton").fused_merge_l1(*args), ref.fused_merge_l1(*args))


def test_merge_multi_block(small_blocks):
    base, tensors = make_inputs((64, 11), DTYPES["mixed"], 3, True, seed=8, ties=True)
    for sparsifier, consensus in [(1, 1), (2, 2), (0, 0), (3, 1), (3, 0)]:
        _check_merge(base, tensors, sparsifier, 0, consensus, 0, True, 0.9, torch.bfloat16, ks_variant=1)


def test_band_masks_with_ties(small_blocks):
    """Band edges inside tie groups spread over many programs: the Triton mask is the reference's bit for bit
    (one model, no base, weight 1: the nonzero outputs are the mask) and keeps exactly k_a - k_b elements."""
    gen = torch.Generator().manual_seed(11)
    t = (torch.randint(1, 5, (300,), generator=gen).to(torch.float32) / 8).to(torch.bfloat16)  # no zeros
    keys = refsel.magnitude_keys(t.float())
    for ka, kb in [(150, 37), (300, 299), (299, 1), (100, 0), (300, 0), (50, 50), (0, 0), (200, 210)]:
        both = refsel.delta_topk_thresholds(None, [t, t], [ka, kb])
        thr = both.reshape(1, 4)
        want = ref.band_keep(keys, *(int(v) for v in thr[0]))
        assert int(want.sum()) == max(ka - kb, 0)
        out = K.fused_merge(None, [t], 3, thr, None, 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0, torch.float32)
        assert torch.equal(out != 0, want)
        torch.testing.assert_close(K.delta_l1_norms(None, [t], 3, thr, None, 0),
                                   ref.delta_l1_norms(None, [t], 3, thr, None, 0), rtol=1e-12, atol=1e-12)


def test_band_degenerate_rows():
    """Rows selecting everything (key -1), nothing (2^32), b above a, and NaN keys, against the reference."""
    x = torch.tensor([0.5, -0.25, float("nan"), 0.5, 2.0, -0.5, float("inf"), 0.25, -2.0, 0.125])
    key = int(refsel.magnitude_keys(torch.tensor([0.5]))[0])
    rows = [[-1, -1, 1 << 32, -1], [-1, -1, key, 3], [key, 5, 1 << 32, -1], [1 << 32, -1, -1, -1],
            [key, 3, key, 5], [key, 5, key, 0], [0, 0, 0x7F800001, 2], [0x7F800000, 6, 0x7F800001, -1]]
    for row in rows:
        thr = torch.tensor([row, row[2:] + row[:2]], dtype=torch.int64)
        args = (None, [x, -x], 3, thr, None, 0, torch.ones(2), [1.0, 0.5], 0, 1, 0, False, 1.0, torch.float32)
        assert_same(K.fused_merge(*args), ref.fused_merge(*args))
        torch.testing.assert_close(K.delta_l1_norms(None, [x, -x], 3, thr, None, 0),
                                   ref.delta_l1_norms(None, [x, -x], 3, thr, None, 0), equal_nan=True)


def test_merge_static_divisor_guard():
    """Weights summing to (almost) zero: the no-consensus divisor falls back to 1."""
    base, tensors = make_inputs((7,), DTYPES["fp32"], 2, True, seed=1)
    for weights in ([0.5, -0.5], [1e-9, 0.0], [0.25, 0.75]):
        for divisor in (0, 1):
            _check_merge(base, tensors, 0, 0, 0, divisor, True, 1.0, torch.float32, weights=weights)


def test_merge_many_models():
    for n in (9, 64):
        base, tensors = make_inputs((6, 5), DTYPES["mixed"], n, True, seed=n)
        for sparsifier, consensus in [(1, 1), (2, 2), (0, 0), (3, 1)]:
            _check_merge(base, tensors, sparsifier, 0, consensus, 0, True, 0.7, torch.float32)


def test_merge_nonfinite_poisoning():
    nan, inf = float("nan"), float("inf")
    base = torch.tensor([0.0, 1.0, nan, 2.0, inf, 0.0, 3e38, 1.0, 0.0])
    t1 = torch.tensor([1.0, nan, 0.0, inf, 1.0, -inf, -3e38, 2.0, 0.5])
    t2 = torch.tensor([0.5, 2.0, 1.0, -inf, 0.0, 1.0, 3e38, 0.0, 0.25]).to(torch.bfloat16)
    tensors = [t1, t2]
    for sparsifier in (0, 1, 2, 3):
        for consensus in (0, 1, 2):
            for with_base in (True, False):
                got = _check_merge(base if with_base else None, tensors, sparsifier, 0, consensus, 0, True, 1.0,
                                   torch.float32)
                bad = ~torch.isfinite(t1) | ~torch.isfinite(t2.float())
                if with_base:
                    bad |= ~torch.isfinite(base)
                assert not bool(torch.isfinite(got[bad]).any())
    thr_tensors = [t1, t2]
    for k in range(10):
        assert torch.equal(K.delta_topk_thresholds(base, thr_tensors, [k, 9 - k]),
                           refsel.delta_topk_thresholds(base, thr_tensors, [k, 9 - k]))
    got = K.delta_l1_norms(base, tensors, 0, None, None, 0)
    torch.testing.assert_close(got, ref.delta_l1_norms(base, tensors, 0, None, None, 0), equal_nan=True)


def test_merge_out_dtypes_and_lambda():
    base, tensors = make_inputs((33, 17), DTYPES["bf16"], 3, True, seed=21)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for lambda_ in (1.0, 0.3, 2.5):
            _check_merge(base, tensors, 2, 1, 1, 1, True, lambda_, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Empty tensors and argument checks
# ----------------------------------------------------------------------------------------------------------
def test_empty():
    base, tensors = make_inputs((0,), DTYPES["mixed"], 3, True)
    thr = K.delta_topk_thresholds(base, tensors, [0, 0, 0])
    assert torch.equal(thr, torch.tensor([[1 << 32, -1]] * 3))
    assert torch.equal(K.delta_l1_norms(base, tensors, 1, thr, None, 0), torch.zeros(3, 2, dtype=torch.float64))
    out = K.fused_merge(base, tensors, 1, thr, None, 0, torch.ones(3), [1.0, 1.0, 1.0], 0, 1, 0, True, 1.0,
                        torch.bfloat16)
    assert out.shape == (0,) and out.dtype == torch.bfloat16


def test_argument_checks():
    x = torch.randn(4)
    with pytest.raises(ValueError):
        K.delta_topk_thresholds(None, [], [])
    with pytest.raises(ValueError):
        K.delta_topk_thresholds(None, [x] * 65, [1] * 65)
    with pytest.raises(ValueError):
        K.delta_topk_thresholds(None, [x, torch.randn(5)], [1, 1])
    with pytest.raises(ValueError):
        K.delta_topk_thresholds(None, [x], [5])
    with pytest.raises(ValueError):
        K.delta_topk_thresholds(None, [x], [1, 2])
    with pytest.raises(TypeError):
        K.delta_topk_thresholds(None, [x.double()], [1])
    with pytest.raises(ValueError, match="unknown sparsifier code 4"):
        K.delta_l1_norms(None, [x], 4, None, None, 0)
    with pytest.raises(ValueError):
        K.fused_merge(None, [x], 0, None, None, 0, torch.ones(1), [1.0], 0, 3, 0, True, 1.0, torch.float32)
    # thresholds are validated per sparsifier: magnitude (N, 2), band (N, 4)
    two, four = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64)
    merge_tail = (None, 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"sparsifier 3 \(band\) needs thresholds of shape \(1, 4\)"):
        K.delta_l1_norms(None, [x], 3, None, None, 0)
    with pytest.raises(ValueError, match=r"thresholds must have shape \(1, 4\) for sparsifier 3 \(band\)"):
        K.fused_merge(None, [x], 3, two, *merge_tail)
    with pytest.raises(ValueError, match=r"thresholds must have shape \(1, 2\) for sparsifier 1 \(magnitude\)"):
        K.fused_merge(None, [x], 1, four, *merge_tail)
    with pytest.raises(ValueError, match=r"thresholds must have shape \(1, 4\)"):
        K.delta_l1_norms(None, [x], 3, torch.zeros(2, 2, dtype=torch.int64), None, 0)


def test_bf16_output_rounding():
    """float32 -> bf16 of the output rounds to nearest even exactly like torch (halfway cases, overflow, NaN)."""
    vals = [1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -8 + 2.0 ** -20, -(1.0 + 2.0 ** -8), 3.3895314e38,
            3.4e38, -3.4e38, 1e-40, -1e-40, 1e-45, 0.0, -0.0, float("inf"), -float("inf"), float("nan"),
            0.07263184338808060]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(vals, dtype=torch.float32), torch.randn(200, generator=gen) * 100,
                   torch.randint(-2**30, 2**30, (100,), generator=gen).to(torch.int32).view(torch.float32)])
    for out_dtype in (torch.bfloat16, torch.float16):
        got = K.fused_merge(None, [x], 0, None, None, 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0, out_dtype)
        assert_same(got, ref.fused_merge(None, [x], 0, None, None, 0, torch.ones(1), [1.0], 0, 0, 0, False, 1.0,
                                         out_dtype))
