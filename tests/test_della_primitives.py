"""DELLA primitives (docs/PRIMITIVES.md "DELLA"): every backend against the reference, and the reference
against independent checks (keep rates per rank, mergekit's della_magprune and della merges).

della_merge must be bit-identical to the reference (same float32 operations in the same order; NaN positions
equal, NaN payloads free); della_l1_norms equal to float64 rounding (the kernels sum in fixed blocks of rows).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import backend_params
from pykernels import _backend, _ops
from pykernels.reference import della as ref
from pykernels.reference.merging import model_seed, philox_uniform

MIXED = [torch.bfloat16, torch.float32, torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# inputs and comparisons


def _tensor(shape, dtype, gen, layout="contiguous", levels=None, scale=1.0):
    """A random tensor; layout "transposed" / "strided" gives a non-contiguous view; levels: few values (ties)."""
    if layout == "transposed":
        return _tensor(shape[::-1], dtype, gen, "contiguous", levels, scale).t()
    if layout == "strided":
        return _tensor((*shape[:-1], 2 * shape[-1]), dtype, gen, "contiguous", levels, scale)[..., ::2]
    if levels is not None:
        x = torch.randint(-levels, levels + 1, shape, generator=gen).float() * 0.125
    else:
        x = torch.randn(shape, generator=gen) * scale
    return x.to(dtype)


def make_inputs(shape, dtypes, base_dtype=torch.float32, seed=0, layout="contiguous", levels=None):
    gen = torch.Generator().manual_seed(seed)
    base = None if base_dtype is None else _tensor(shape, base_dtype, gen, layout, levels)
    tensors = [_tensor(shape, dt, gen, layout, levels, scale=1.0 + 0.5 * i) for i, dt in enumerate(dtypes)]
    return base, tensors


def assert_same(got, want):
    """Bit-identical values (NaN anywhere want has a NaN, any payload); same dtype and shape."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    g, w = got.reshape(-1)[~nan.reshape(-1)], want.reshape(-1)[~nan.reshape(-1)]
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[want.dtype]
    bad = (g.view(ints) != w.view(ints)).nonzero().reshape(-1)
    assert bad.numel() == 0, f"{bad.numel()} elements differ, first at {bad[:5].tolist()}: " \
                             f"{g[bad[:5]].tolist()} != {w[bad[:5]].tolist()}"


def merge_args(n, densities=None, epsilons=None, *, seed=1234, inverse=True, sign_source=0, consensus=1, divisor=0,
               normalize=True, lambda_=1.0, out_dtype=torch.float32):
    densities = densities if densities is not None else [0.2 + 0.6 * i / max(n - 1, 1) for i in range(n)]
    epsilons = epsilons if epsilons is not None else [min(0.15, d / 2, (1 - d) / 2) for d in densities]
    scales = torch.tensor([1.0 + 0.25 * i for i in range(n)], dtype=torch.float32)
    weights = [0.7 - 0.45 * i for i in range(n)]  # mixed signs exercise the election
    return (densities, epsilons, seed, inverse, scales, weights, sign_source, consensus, divisor, normalize, lambda_,
            out_dtype)


def check_merge(backend, base, tensors, *args):
    got = _ops.primitives(backend).della_merge(base, tensors, *args)
    want = ref.della_merge(base, tensors, *args)
    assert_same(got, want)
    return got


def check_norms(backend, base, tensors, densities, epsilons, seed):
    got = _ops.primitives(backend).della_l1_norms(base, tensors, densities, epsilons, seed)
    want = ref.della_l1_norms(base, tensors, densities, epsilons, seed)
    assert got.dtype == torch.float64 and got.shape == (len(tensors), 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300, equal_nan=True)
    return got


def check_both(backend, base, tensors, out_dtype=None, **kw):
    n = len(tensors)
    out_dtype = out_dtype or (base.dtype if base is not None else tensors[0].dtype)
    args = merge_args(n, out_dtype=out_dtype, **kw)
    check_norms(backend, base, tensors, args[0], args[1], args[2])
    return check_merge(backend, base, tensors, *args)


BACKENDS = backend_params(include_reference=False)


# ---------------------------------------------------------------------------------------------------------------
# backends against the reference

# Few rows: the Triton interpreter pays ~0.1 s per row sort.
SHAPES = [((33,), "contiguous"), ((), "contiguous"), ((3, 33), "contiguous"), ((1, 40), "contiguous"),
          ((4, 1), "contiguous"), ((2, 2, 17), "contiguous"), ((5, 3), "transposed"), ((3, 19), "strided"),
          ((0,), "contiguous"), ((0, 5), "contiguous"), ((5, 0), "contiguous")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
def test_shapes_mixed_dtypes(backend, shape, layout):
    base, tensors = make_inputs(shape, MIXED, torch.bfloat16, seed=len(shape), layout=layout)
    out = check_both(backend, base, tensors)
    assert out.shape == torch.Size(shape) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_uniform_dtypes(backend, kind, with_base):
    base, tensors = make_inputs((2, 45), [kind] * 3, kind if with_base else None, seed=2)
    check_both(backend, base, tensors)


# Every combination setting, inverse alternating (it acts before the combination).
ENGINE = [(*codes, i % 2 == 1) for i, codes in enumerate(itertools.product([0, 1], [0, 1, 2], [0, 1], [False, True]))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign_source,consensus,divisor,normalize,inverse", ENGINE)
def test_engine_settings(backend, sign_source, consensus, divisor, normalize, inverse):
    base, tensors = make_inputs((2, 37), MIXED, torch.float32, seed=3)
    check_merge(backend, base, tensors, *merge_args(3, inverse=inverse, sign_source=sign_source, consensus=consensus,
                                                    divisor=divisor, normalize=normalize, lambda_=0.8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("densities,epsilons", [
    ([0.0, 0.0, 0.0], [0.1, 0.1, 0.1]),  # keep nothing
    ([1.0, 1.0, 1.0], [0.1, 0.0, 0.3]),  # keep everything (p = 1)
    ([0.0, 1.0, 0.5], [0.1, 0.1, 0.0]),  # one of each, epsilon 0 (p = rho at every rank)
    ([0.3, 0.5, 0.9], [0.29, 0.5, 0.1]),  # p from ~0 (and exactly 0) to 1
    ([0.5, 0.5, 0.5], [0.6, 0.5, 0.2]),  # p below 0 and above 1 at the ends of a row
], ids=["none", "all", "mixed", "wide", "outside"])
@pytest.mark.parametrize("inverse", [False, True])
def test_densities(backend, densities, epsilons, inverse):
    base, tensors = make_inputs((3, 29), MIXED, torch.float32, seed=4)
    args = merge_args(3, densities, epsilons, inverse=inverse)
    check_norms(backend, base, tensors, densities, epsilons, 1234)
    check_merge(backend, base, tensors, *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_out_dtypes(backend, out_dtype):
    if backend == "triton" and out_dtype == torch.float64:
        pytest.skip("the triton kernels write fp32/bf16/fp16 (as fused_merge)")
    base, tensors = make_inputs((2, 31), MIXED, torch.float16, seed=5)
    check_merge(backend, base, tensors, *merge_args(3, out_dtype=out_dtype, lambda_=1.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_models", [1, 2, 5])
def test_model_counts(backend, n_models):
    base, tensors = make_inputs((2, 26), [MIXED[i % 3] for i in range(n_models)], torch.float32, seed=n_models)
    check_both(backend, base, tensors, out_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [1, 3])
def test_ties(backend, levels):
    """bf16 values from a few levels: long runs of equal magnitudes, ranked by index (and zero deltas)."""
    base, tensors = make_inputs((3, 64), [torch.bfloat16] * 3, torch.bfloat16, seed=6, levels=levels)
    tensors[0][1] = base[1]  # a row of zero deltas (+0 and -0 tie)
    tensors[1][2, ::2] = -base[2, ::2]
    check_both(backend, base, tensors, inverse=True)
    check_both(backend, None, tensors, inverse=False, consensus=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("consensus", [0, 1, 2])
def test_nonfinite_inputs(backend, consensus):
    base, tensors = make_inputs((2, 50), MIXED, torch.float32, seed=7)
    tensors[0][0, 3] = float("nan")
    tensors[1][1, 10] = float("inf")
    tensors[2][1, 10] = float("-inf")  # d = +inf and -inf at one element
    tensors[1][0, 20] = float("-inf")
    base[1, 30] = float("nan")
    base[0, 40] = float("inf")
    tensors[0][0, 40] = float("inf")  # inf - inf = nan
    for densities in ([0.5, 0.3, 0.7], [1.0, 1.0, 0.0]):
        check_norms(backend, base, tensors, densities, [0.2, 0.1, 0.25], 9)
        for inverse in (False, True):
            out = check_merge(backend, base, tensors, *merge_args(3, densities, [0.2, 0.1, 0.25], inverse=inverse,
                                                                  consensus=consensus))
            for r, c in [(0, 3), (1, 10), (0, 20), (1, 30), (0, 40)]:
                assert not torch.isfinite(out[r, c])  # poisoned
            assert torch.isfinite(out[0, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_inputs_overflowing_delta_are_not_poisoned(backend):
    base = torch.tensor([[-3e38, 1.0, 2.0]])
    t = torch.tensor([[3e38, 2.0, 0.0]])
    out = check_merge(backend, base, [t], *merge_args(1, [1.0], [0.0], consensus=0, normalize=False))
    assert torch.isinf(out[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_summing_to_zero(backend):
    base, tensors = make_inputs((2, 20), [torch.float32] * 2, torch.float32, seed=8)
    args = list(merge_args(2, consensus=0, divisor=0))
    args[5] = [0.5, -0.5]
    check_merge(backend, base, tensors, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    base, tensors = make_inputs((1, 40), MIXED, torch.float32, seed=9)
    for seed in (0, 2**40 + 3, 2**63 - 1):
        check_merge(backend, base, tensors, *merge_args(3, seed=seed))
        check_norms(backend, base, tensors, [0.5] * 3, [0.3] * 3, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ops = _ops.primitives(backend)
    base, tensors = make_inputs((2, 12), MIXED, torch.float32, seed=10)
    args = merge_args(3, out_dtype=torch.bfloat16)
    torch.library.opcheck(ops.della_merge, (base, tensors, *args))
    torch.library.opcheck(ops.della_merge, (None, tensors, *args))
    torch.library.opcheck(ops.della_l1_norms, (base, tensors, args[0], args[1], 3))


# ---------------------------------------------------------------------------------------------------------------
# backend-specific


cpp_only = pytest.mark.skipif(not _backend.cpp_available(), reason="pykernels._C not built")


@cpp_only
def test_cpp_larger_rows_and_thread_count_determinism():
    """Rows longer than the radix digit range, several blocks of rows: identical results for 1 and 2 threads."""
    base, tensors = make_inputs((40, 3001), MIXED, torch.bfloat16, seed=11, levels=200)
    tensors[1][7, 100] = float("nan")
    ops = torch.ops.pykernels
    args = merge_args(3, out_dtype=torch.float32, consensus=2)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ops.della_merge(base, tensors, *args), ops.della_l1_norms(base, tensors, *args[:3])))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0].view(torch.int32), results[1][0].view(torch.int32))
    assert torch.equal(results[0][1].view(torch.int64), results[1][1].view(torch.int64))
    assert_same(results[0][0], ref.della_merge(base, tensors, *args))
    torch.testing.assert_close(results[0][1], ref.della_l1_norms(base, tensors, *args[:3]), rtol=1e-12, atol=0.0,
                               equal_nan=True)


@cpp_only
def test_cpp_argument_errors():
    ops = torch.ops.pykernels
    base, tensors = make_inputs((3, 10), [torch.float32] * 2, torch.float32)
    with pytest.raises(RuntimeError, match="densities must have 2"):
        ops.della_l1_norms(base, tensors, [0.5], [0.1, 0.1], 0)
    with pytest.raises(RuntimeError, match="epsilons must have 2"):
        ops.della_merge(base, tensors, *merge_args(2, [0.5, 0.5], [0.1]))
    with pytest.raises(RuntimeError, match="consensus"):
        ops.della_merge(base, tensors, *merge_args(2, consensus=3))
    with pytest.raises(RuntimeError, match="at least one model"):
        ops.della_l1_norms(base, [], [], [], 0)


@pytest.mark.triton
def test_triton_row_limit():
    from pykernels.kernels import della as kd

    x = torch.zeros(1, kd.MAX_ROW + 1)
    with pytest.raises(ValueError, match="at most 32768"):
        kd.della_merge(None, [x], *merge_args(1))
    with pytest.raises(ValueError, match="at most 32768"):
        kd.della_l1_norms(None, [x], [0.5], [0.1], 0)


@pytest.mark.triton
def test_triton_several_rows_per_program(monkeypatch):
    """More rows than persistent programs: each program reuses its scratch for several rows."""
    from pykernels.kernels import della as kd

    monkeypatch.setattr(kd, "_MAX_PROGRAMS_CPU", 2)
    base, tensors = make_inputs((5, 20), MIXED, torch.float32, seed=12)
    check_both("triton", base, tensors)


# ---------------------------------------------------------------------------------------------------------------
# the reference against independent checks


def test_reference_keep_rate_by_rank():
    """Keep frequency per rank decile follows p = rho - eps + 2 eps (r - 1) / (n - 1) within binomial noise, and
    every kept value is d / p."""
    rows, n, rho, eps = 64, 2000, 0.5, 0.3
    gen = torch.Generator().manual_seed(13)
    t = torch.randn(rows, n, generator=gen)
    ones = torch.ones(1)
    kept = ref.della_merge(None, [t], [rho], [eps], 77, True, ones, [1.0], 0, 0, 0, False, 1.0, torch.float32)
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1) + 1  # ties (rare) by index
    p = (rho - eps) + 2 * eps * (ranks.double() - 1) / (n - 1)
    mask = kept != 0
    torch.testing.assert_close(kept[mask].double(), (t.double() / p)[mask], rtol=1e-6, atol=0)
    decile = ((ranks - 1) * 10) // n
    for q in range(10):
        sel = decile == q
        count = int(sel.sum())
        expected = float(p[sel].mean())
        sd = math.sqrt(expected * (1 - expected) / count)
        assert abs(float(mask[sel].double().mean()) - expected) < 5 * sd, (q, expected)
    # density 0.5 overall; different models (and seeds) draw different masks
    assert abs(float(mask.double().mean()) - rho) < 5 * math.sqrt(0.25 / mask.numel())
    other = ref.della_merge(None, [t, t], [rho] * 2, [eps] * 2, 77, True, torch.ones(2), [1.0, 0.0], 0, 0, 0, False,
                            1.0, torch.float32)
    assert torch.equal(other, kept)  # model 0 of the pair is the same stream
    second = ref.della_merge(None, [t, t], [rho] * 2, [eps] * 2, 77, True, torch.ones(2), [0.0, 1.0], 0, 0, 0, False,
                             1.0, torch.float32)
    assert 0.3 < float(((second != 0) == mask).double().mean()) < 0.7


def test_reference_ranks_ties_by_index():
    """Equal magnitudes (either sign) rank by ascending column; NaN ranks above +inf."""
    d = torch.tensor([[2.0, -1.0, 1.0, float("nan"), float("inf"), -0.0, 0.0, -2.0]])
    p = ref.keep_probabilities(d.reshape(-1), 1, 8, 0.5, 0.35)
    ranks = torch.tensor([5, 3, 4, 8, 7, 1, 2, 6])
    want = torch.tensor(0.5 - 0.35, dtype=torch.float32) + \
        torch.tensor(0.7 / 7, dtype=torch.float32) * (ranks - 1).float()
    assert torch.equal(p, want)


class _BernoulliFromOurStream:
    """Stands in for torch.bernoulli in mergekit's della_magprune: on its m-th call returns our Philox keep mask of
    model m, after checking that mergekit's probabilities (computed from its own ranks) equal ours."""

    def __init__(self, seed, deltas, densities, epsilons):
        self.seed, self.deltas, self.densities, self.epsilons = seed, deltas, densities, epsilons
        self.calls = 0

    def __call__(self, probs, *args, **kwargs):
        m = self.calls
        self.calls += 1
        rows, n = probs.shape  # della_magprune ranks rows of the last dimension (1-D: one row)
        d = self.deltas[m].float().reshape(-1)
        keep, p = ref.della_keep(d, rows, n, self.densities[m], self.epsilons[m], self.seed, m)
        torch.testing.assert_close(probs.float().reshape(-1), p, rtol=0, atol=2e-7)
        return keep.reshape(probs.shape).to(probs.dtype)


@pytest.mark.parametrize("shape", [(33,), (16, 40)])
@pytest.mark.parametrize("rescale", [False, True])
def test_reference_equals_mergekit_della_magprune(monkeypatch, shape, rescale):
    sparsify = pytest.importorskip("mergekit.sparsify")
    gen = torch.Generator().manual_seed(14)
    d = torch.randn(shape, generator=gen)
    rho, eps, seed = 0.45, 0.2, 21
    rows, n = ref.row_layout(shape)
    monkeypatch.setattr(torch, "bernoulli", _BernoulliFromOurStream(seed, [d], [rho], [eps]))
    norm = sparsify.RescaleNorm.l1 if rescale else None
    theirs = sparsify.della_magprune(d, rho, eps, rescale_norm=norm)
    norms = ref.della_l1_norms(None, [d], [rho], [eps], seed)
    scale = float(norms[0, 0] / norms[0, 1]) if rescale else 1.0
    ours = ref.della_merge(None, [d], [rho], [eps], seed, False, torch.tensor([scale]), [1.0], 0, 0, 0, False, 1.0,
                           torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    assert 0 < int((ours != 0).sum()) < d.numel()


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_reference_equals_mergekit_della_merge(monkeypatch, method):
    """mergekit's della / della_linear merges (l1 rescale, sum consensus for della) against della_merge with
    scales = sum|d| / sum|kept d| from della_l1_norms."""
    api = pytest.importorskip("mergekit.merge_methods.api")
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(24, 37, generator=gen)
    tensors = [base + 0.1 * torch.randn(24, 37, generator=gen) for _ in range(3)]
    weights, densities, epsilons, seed, lam = [0.5, 0.3, 0.7], [0.5, 0.4, 0.3], [0.1, 0.15, 0.2], 11, 0.9
    deltas = [t - base for t in tensors]
    monkeypatch.setattr(torch, "bernoulli", _BernoulliFromOurStream(seed, deltas, densities, epsilons))
    params = {"weight": weights, "density": densities, "epsilon": epsilons, "lambda": lam}
    theirs = api.merge_tensors([base] + tensors, method, parameters=params, base_index=0)
    norms = ref.della_l1_norms(base, tensors, densities, epsilons, seed)
    scales = torch.where((norms[:, 0] < 1e-7) | (norms[:, 1] < 1e-7), 1.0, norms[:, 0] / norms[:, 1]).float()
    della = method == "della"
    ours = ref.della_merge(base, tensors, densities, epsilons, seed, False, scales, weights, 0, 1 if della else 0, 0,
                           della, lam, torch.float32)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=2e-6)
