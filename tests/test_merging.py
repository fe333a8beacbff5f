"""Public merging API: every method x backend x dtype x shape against the reference backend."""
from __future__ import annotations

import math

import pytest
import torch

import pykernels as pk
from conftest import backend_params, make_models, tol_for

METHOD_ARGS = {
    "linear": dict(),
    "task_arithmetic": dict(lambda_=0.8),
    "ties": dict(densities=[0.5, 0.3, 0.2]),
    "dare_ties": dict(densities=[0.5, 0.3, 0.2], seed=7),
    "dare_linear": dict(densities=[0.5, 0.3, 0.2], seed=7),
    "breadcrumbs": dict(densities=[0.5, 0.3, 0.9], gammas=[0.05, 0.2, 0.0]),
    "breadcrumbs_ties": dict(densities=[0.6, 0.3, 0.2], gammas=0.1),
    "della": dict(densities=[0.5, 0.3, 0.2], epsilons=[0.1, 0.2, 0.15], seed=3),
    "della_linear": dict(densities=[0.4, 0.3, 0.6], seed=5),
}
WEIGHTS = [0.5, 0.3, 0.7]


def noncontiguous(shape):
    """A strided (transposed) view with logical shape `shape`."""
    return lambda t: t.reshape(shape[::-1]).t() if len(shape) == 2 else t


SHAPES = [(1,), (7,), (1023, 17), (4096, 11), (0,)]


def run(method, base, tensors, backend, **kwargs):
    args = dict(METHOD_ARGS[method], weights=WEIGHTS[: len(tensors)], **kwargs)
    if "densities" in args:
        args["densities"] = args["densities"][: len(tensors)]
        args["k_rule"] = "at_least_one"  # a 1-element tensor at density 0.5 keeps one, as mergekit does
    if method == "linear":
        return pk.merge(None, tensors, method, backend=backend, **args)
    return pk.merge(base, tensors, method, backend=backend, **args)


def models_for(shape, dtype, n=3, seed=0):
    base, tensors = make_models(shape, n, dtype, seed=seed)
    if shape == (4096, 11):  # strided views: logical order differs from memory order
        flip = lambda t: t.reshape(11, 4096).t()
        base, tensors = flip(base), [flip(t) for t in tensors]
        assert not base.is_contiguous()
    return base, tensors


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_method_matches_reference(method, shape, dtype, backend):
    if backend == "triton" and shape == (4096, 11) and dtype != torch.float32:
        pytest.skip("interpreter time: the strided case runs in fp32 only")
    if backend == "triton" and method.startswith("breadcrumbs") and shape == (1023, 17) and dtype != torch.float32:
        pytest.skip("interpreter time: breadcrumbs in low precision runs in test_breadcrumbs_variants_match_reference")
    if backend == "triton" and method.startswith("della") and shape[0] > 64:
        pytest.skip("interpreter time: a row sort per row; tests/test_della_primitives.py covers triton DELLA")
    base, tensors = models_for(shape, dtype)
    expected = run(method, base, tensors, "reference", out_dtype=torch.float32)
    got = run(method, base, tensors, backend, out_dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got_native = run(method, base, tensors, backend)
    assert got_native.dtype == dtype and got_native.shape == shape
    torch.testing.assert_close(got_native.float(), expected.to(dtype).float(), **tol_for(dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_dtypes(backend):
    base, tensors = make_models((33, 5), 3, [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])
    out = pk.ties(base, tensors, densities=0.4, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = pk.ties(base, tensors, densities=0.4, backend="reference", out_dtype=torch.float32)
    torch.testing.assert_close(pk.ties(base, tensors, densities=0.4, backend=backend, out_dtype=torch.float32),
                               expected, atol=1e-5, rtol=1e-5)


# --- hand-computed cases ---------------------------------------------------------------------------------

def test_ties_hand_computed():
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-1.0, -2.0, 1.0, 4.0])
    # density 0.5 keeps 2 per model: t1 -> {3, 2}, t2 -> {-2, 4}; signs: [+, -, none, +]
    out = pk.ties(base, [t1, t2], densities=0.5, weights=[1.0, 1.0], backend="reference")
    torch.testing.assert_close(out, torch.tensor([3.0, -2.0, 0.0, 3.0]))


def test_task_arithmetic_hand_computed():
    base = torch.tensor([1.0, 1.0])
    out = pk.task_arithmetic(base, [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])], weights=[1.0, 0.5],
                             lambda_=2.0, backend="reference")
    torch.testing.assert_close(out, torch.tensor([1.0 + 2 * 1.0, 1.0 + 2 * (-1.0 + 1.0)]))


def test_linear_hand_computed():
    out = pk.linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], weights=[1.0, 3.0], backend="reference")
    torch.testing.assert_close(out, torch.tensor([2.5, 5.0]))


def test_magnitude_ties_broken_by_index():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    out = pk.sparsify(x, "magnitude", 0.5, backend="reference")  # k = 3 of the four |2|s: the first three
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 2.0, 0.0, -2.0, 0.0]))


# --- ties in low precision -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("density", [0.0, 0.13, 0.5, 1.0])
def test_bf16_ties_keep_exactly_k(backend, density):
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    x = levels[torch.randint(0, len(levels), (97, 13), generator=g)].to(torch.bfloat16)
    out = pk.sparsify(x, "magnitude", density, backend=backend)
    expected = pk.sparsify(x, "magnitude", density, backend="reference")
    assert torch.equal(out, expected)
    k = int(density * x.numel())
    assert int(pk.topk_mask(x, k, backend=backend).sum()) == k


# --- random masks ----------------------------------------------------------------------------------------

def dare_mask(backend, seed, numel=5000, p=0.3, threads=None):
    x = torch.linspace(1.0, 2.0, numel)  # never zero, so the mask is where the output is non-zero
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        out = pk.sparsify(x, "random", p, seed=seed, backend=backend)
    finally:
        if threads is not None:
            torch.set_num_threads(old)
    return out != 0


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_dare_masks_identical_across_backends(backend):
    for seed in (0, 1, 2**62 + 12345):
        assert torch.equal(dare_mask(backend, seed), dare_mask("reference", seed))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_dare_masks_identical_across_thread_counts(backend):
    assert torch.equal(dare_mask(backend, 5, numel=300_001, threads=1), dare_mask(backend, 5, numel=300_001, threads=2))


def test_dare_seeds_differ_and_keep_rate_is_binomial():
    n, p = 200_000, 0.3
    a, b = dare_mask("reference", 1, n, p), dare_mask("reference", 2, n, p)
    assert not torch.equal(a, b)
    sd = math.sqrt(n * p * (1 - p))
    for mask in (a, b):
        assert abs(int(mask.sum()) - n * p) < 5 * sd


def test_dare_models_use_independent_streams():
    base = torch.zeros(1000)
    ones = [torch.ones(1000), torch.ones(1000)]
    m0 = pk.merge(base, ones[:1], "dare_linear", densities=[0.5], rescale=False, backend="reference") != 0
    both = pk.merge(base, ones, "dare_linear", densities=[0.5, 0.5], rescale=False, weights=[1.0, 2.0],
                    backend="reference")
    m1 = (both == 2.0) | (both == 3.0)
    assert not torch.equal(m0, m1)


# --- NaN / Inf policy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
def test_nonfinite_inputs_propagate(backend, method):
    base, tensors = make_models((50,), 3, torch.float32)
    tensors[1][3] = float("nan")
    tensors[2][10] = float("inf")
    base[20] = float("-inf")
    args = {} if method == "task_arithmetic" else dict(densities=0.1)
    out = pk.merge(base, tensors, method, backend=backend, **args)
    for j in (3, 10, 20):
        assert not math.isfinite(float(out[j])), (j, float(out[j]))
    with pytest.raises(ValueError, match="base contains NaN or Inf"):
        pk.merge(base, tensors, method, backend=backend, check_finite=True, **args)


# --- input checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda b, t: pk.ties(b, [t[0], t[1][:3]], densities=0.5), r"tensors\[1\] has shape"),
    (lambda b, t: pk.ties(b, t, densities=1.5), r"densities\[0\] must lie in \[0, 1\]"),
    (lambda b, t: pk.ties(b, t, densities=[0.5, -0.1]), r"densities\[1\] must lie"),
    (lambda b, t: pk.ties(b[:1], [x[:1] for x in t], densities=0.1), r"densities\[0\]=0.1 keeps no element"),
    (lambda b, t: pk.ties(b, t, weights=[1.0]), r"weights has 1 entries but there are 2 tensors"),
    (lambda b, t: pk.ties(b, [], densities=0.5), r"at least one tensor"),
    (lambda b, t: pk.ties(b.long(), t, densities=0.5), r"base has dtype torch.int64"),
    (lambda b, t: pk.ties(b, [t[0].double(), t[1]], densities=0.5), r"tensors\[0\] has dtype torch.float64"),
    (lambda b, t: pk.ties(b.to("meta"), t, densities=0.5), r"tensors\[0\] is on cpu but base is on meta"),
    (lambda b, t: pk.merge(b, t, "nope"), r"method must be one of"),
    (lambda b, t: pk.task_arithmetic(b, t, densities=0.5), r"densities have no effect"),
    (lambda b, t: pk.merge(b, t, "linear"), r"pass base=None"),
    (lambda b, t: pk.dare_ties(b, t, densities=0.5, seed=-1), r"seed must be an int"),
    (lambda b, t: pk.ties(b, t, densities=0.5, consensus="majority"), r"consensus must be one of"),
    (lambda b, t: pk.ties(b, t, densities=0.5, backend="gpu"), r"backend must be one of"),
    (lambda b, t: pk.ties(b, t, densities=0.5, weights=[1.0, float("nan")]), r"weights\[1\] must be finite"),
])
def test_bad_input_errors_name_the_argument(call, match):
    base, tensors = make_models((4, 5), 2, torch.float32)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(base, tensors)


def test_unavailable_backend_is_an_error_not_a_fallback():
    base, tensors = make_models((4, 5), 2, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        pk.ties(base, tensors, densities=0.5, backend="cuda")


def test_env_var_picks_the_default_backend(monkeypatch):
    base, tensors = make_models((4, 5), 2, torch.float32)
    monkeypatch.setenv("PYKERNELS_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.ties(base, tensors, densities=0.5)


def test_sparsify_rejects_gamma_for_magnitude():
    with pytest.raises(ValueError, match="gamma applies to method .magnitude_outliers. only"):
        pk.sparsify(torch.ones(4), "magnitude", 0.5, gamma=0.1)


# --- breadcrumbs (band sparsifier, mergekit's magnitude_outliers) ----------------------------------------

def mergekit_outliers_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's magnitude_outliers mask built directly: sort |d| ascending and keep the positions
    [n_bot, n_bot + target_n); equal magnitudes ordered so that the lower flat index counts as larger (the
    engine's tie rule; NaN largest)."""
    numel = d.numel()
    if density >= 1:
        return torch.ones(numel, dtype=torch.bool)
    target_n = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target_n - n_top)
    w = d.float().reshape(-1).abs()
    w = torch.where(torch.isnan(w), torch.tensor(float("inf")), w)
    nan_rank = torch.isnan(d.float().reshape(-1)).to(torch.int64)  # NaN above +inf
    index = torch.arange(numel)
    # ascending by (|d|, NaN flag), ties: the higher index first (it counts as smaller)
    order = sorted(range(numel), key=lambda i: (int(nan_rank[i]), float(w[i]), -int(index[i])))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[n_bot:n_bot + target_n]] = True
    return mask


def _crumb_cases():
    g = torch.Generator().manual_seed(21)
    continuous = torch.randn(97, generator=g)
    tied = (torch.randint(-3, 4, (120,), generator=g).float() * 0.25).to(torch.bfloat16)
    special = torch.randint(-2, 3, (64,), generator=g).float()
    special[[3, 17, 40]] = float("nan")
    special[[5, 50]] = float("inf")
    special[9] = -0.0
    return {"continuous": continuous, "ties": tied, "nonfinite": special, "one": torch.tensor([2.5])}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["continuous", "ties", "nonfinite", "one"])
def test_magnitude_outliers_equals_direct_sort_construction(backend, case):
    x = _crumb_cases()[case]
    settings = [(0.0, 0.01), (0.1, 0.01), (0.3, 0.05), (0.5, 0.0), (0.5, 0.5), (0.9, 0.2), (0.99, 0.02),
                (0.2, 1.0), (1.0, 0.3), (0.5, 0.999)]
    for density, gamma in settings:
        want = mergekit_outliers_mask(x, density, gamma)
        out = pk.sparsify(x, "magnitude_outliers", density, gamma=gamma, k_rule="floor", backend=backend)
        assert out.dtype == x.dtype and out.shape == x.shape
        kept = torch.where(want, x, torch.zeros((), dtype=x.dtype))
        finite = torch.isfinite(x)
        assert torch.equal(out[finite], kept[finite]), (density, gamma)
        # non-finite inputs stay non-finite: kept as they are, or poisoned to NaN where dropped
        assert not bool(torch.isfinite(out[~finite]).any())
        torch.testing.assert_close(out[~finite & want], x[~finite & want], atol=0, rtol=0, equal_nan=True)


def test_breadcrumbs_hand_computed():
    base = torch.zeros(10)
    t1 = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 3.0, 0.1, 0.2, 0.3])
    t2 = torch.tensor([-1.0, 4.0, 0.5, -0.25, 1.0, 0.125, -3.0, 2.0, -0.5, 0.75])
    # density 0.3, gamma 0.1: target 3, n_top 1 -> drop the largest, keep the next 3 (ties: lower index first)
    # t1: drop 3.0 (6); keep -2.0 (1), 2.0 (2), -2.0 (4); index 5 loses the tie at |2|
    # t2: drop 4.0 (1); keep -3.0 (6), 2.0 (7), 1.0 (4)... |-1.0| (0) ties |1.0| (4): index 0 wins
    s1 = torch.tensor([0.0, -2.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    s2 = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 2.0, 0.0, 0.0])
    for backend in ("reference", "cpp"):
        out = pk.merge(base, [t1, t2], "breadcrumbs", densities=0.3, gammas=0.1, weights=[1.0, 0.5],
                       backend=backend)
        torch.testing.assert_close(out, s1 + 0.5 * s2)
        ties_out = pk.merge(base, [t1, t2], "breadcrumbs_ties", densities=0.3, gammas=0.1, backend=backend)
        summed = s1 + s2
        agree = lambda s: torch.where(torch.sign(s) == torch.where(summed >= 0, 1.0, -1.0), s, 0.0)
        torch.testing.assert_close(ties_out, agree(s1) + agree(s2))  # normalize False: no division
        torch.testing.assert_close(pk.merging.breadcrumbs(base, [t1, t2], densities=0.3, gammas=0.1,
                                                          weights=[1.0, 0.5], backend=backend), out)
        torch.testing.assert_close(pk.merging.breadcrumbs_ties(base, [t1, t2], densities=0.3, gammas=0.1,
                                                               backend=backend), ties_out)


@pytest.mark.parametrize("backend", backend_params())
def test_breadcrumbs_defaults_follow_mergekit(backend):
    """Defaults: density 1 keeps everything (task arithmetic, whatever gamma), gamma 0.01, no rescale, no
    normalize; gamma 0 is a plain magnitude top-k (k_rule floor)."""
    base, tensors = make_models((40, 25), 3, torch.float32, seed=4)
    ta = pk.merge(base, tensors, "task_arithmetic", weights=WEIGHTS, backend="reference")
    torch.testing.assert_close(pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, backend=backend), ta)
    torch.testing.assert_close(pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, gammas=0.5,
                                        rescale=True, backend=backend), ta)
    explicit = pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, densities=0.3, gammas=0.01, backend=backend)
    torch.testing.assert_close(pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, densities=0.3,
                                        backend=backend), explicit, atol=0, rtol=0)
    magnitude = pk.merge(base, tensors, "ties", weights=WEIGHTS, densities=0.3, consensus="none", normalize=False,
                         k_rule="floor", backend=backend)
    torch.testing.assert_close(pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, densities=0.3, gammas=0.0,
                                        k_rule="floor", backend=backend), magnitude, atol=0, rtol=0)
    zero = pk.merge(base, tensors, "breadcrumbs", weights=WEIGHTS, densities=0.0, backend=backend)
    torch.testing.assert_close(zero, base)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("variant", ["rescale", "ties_in_bf16", "nonfinite", "no_base"])
def test_breadcrumbs_variants_match_reference(backend, method, variant):
    dtype = torch.bfloat16 if variant == "ties_in_bf16" else torch.float32
    base, tensors = make_models((31, 29), 3, dtype, seed=9)
    if variant == "ties_in_bf16":  # few levels: both band edges fall inside tie groups
        g = torch.Generator().manual_seed(2)
        tensors = [(base.float() + 0.25 * torch.randint(-3, 4, base.shape, generator=g)).to(dtype) for _ in tensors]
    if variant == "nonfinite":
        tensors[0][2, 3] = float("nan")
        tensors[1][5, 5] = float("inf")
        base[7, 1] = float("-inf")
    if variant == "no_base":
        base = None
    kwargs = dict(weights=[0.5, -0.3, 0.7], densities=[0.4, 0.25, 0.6], gammas=[0.02, 0.3, 0.1],
                  normalize=variant == "rescale", rescale=variant == "rescale", lambda_=0.9, out_dtype=torch.float32)
    want = pk.merge(base, tensors, method, backend="reference", **kwargs)
    got = pk.merge(base, tensors, method, backend=backend, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_breadcrumbs_many_models_two_threshold_calls(backend):
    """2N > 64: the band thresholds come from two delta_topk_thresholds calls instead of one."""
    base, tensors = make_models((9, 7), 33, torch.float32, seed=12)
    kwargs = dict(densities=[0.2 + 0.02 * i for i in range(33)], gammas=0.05, k_rule="floor")
    want = pk.merge(base, tensors, "breadcrumbs_ties", backend="reference", **kwargs)
    torch.testing.assert_close(pk.merge(base, tensors, "breadcrumbs_ties", backend=backend, **kwargs), want,
                               atol=1e-6, rtol=1e-6)


def test_band_thresholds_are_two_topk_thresholds():
    """The engine's (N, 4) thresholds: top (numel - n_bot) and top (numel - n_bot - target_n) of |d|."""
    from pykernels.merging import _band_thresholds
    from pykernels.reference import selection as ref_sel

    base, tensors = make_models((50,), 3, torch.float32, seed=3)
    densities, gammas = [0.3, 1.0, 0.9], [0.1, 0.2, 0.3]
    th = _band_thresholds(pk._ops.primitives("reference"), base, tensors, densities, gammas, "floor")
    assert th.shape == (3, 4) and th.dtype == torch.int64
    # model 0: target 15, n_top 5, n_bot 30 -> top 20 minus top 5
    assert th[0].tolist() == ref_sel.delta_topk_thresholds(base, [tensors[0]] * 2, [20, 5]).reshape(-1).tolist()
    assert th[1].tolist() == [-1, -1, 1 << 32, -1]  # density 1: everything
    # model 2: target 45, n_top 15 -> n_bot 0: top 50 (everything) minus top 5
    assert th[2, :2].tolist() == [-1, -1]
    assert th[2, 2:].tolist() == ref_sel.delta_topk_thresholds(base, [tensors[2]], [5])[0].tolist()


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_breadcrumbs_primitives_opcheck_and_compile(backend):
    """The band calls are real operator calls: opcheck of the 2N-threshold call (repeated tensors) and of the band
    norms / merge, and torch.compile(fullgraph=True) of a breadcrumbs_ties merge with l1 rescale."""
    from pykernels import _ops
    from pykernels.merging import _band_thresholds

    base, tensors = make_models((33, 7), 2, [torch.float32, torch.bfloat16, torch.float32])
    ops = _ops.primitives(backend)
    th = _band_thresholds(ops, base, tensors, [0.5, 0.4], [0.1, 0.3], "strict")
    torch.library.opcheck(ops.delta_topk_thresholds, (base, tensors + tensors, [100, 50, 10, 0]))
    torch.library.opcheck(ops.delta_l1_norms, (base, tensors, 3, th, [0.5, 0.5], 3))
    torch.library.opcheck(ops.fused_merge, (base, tensors, 3, th, [0.5, 0.5], 3, torch.ones(2), [0.3, 0.4], 0, 1, 0,
                                            True, 0.9, torch.bfloat16))

    def f(b, t1, t2):
        return pk.merge(b, [t1, t2], "breadcrumbs_ties", densities=[0.5, 0.4], gammas=0.1, rescale=True,
                        backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(base, *tensors), f(base, *tensors))


@pytest.mark.parametrize("call, match", [
    (lambda b, t: pk.ties(b, t, densities=0.5, gammas=0.1), r"gammas apply to the breadcrumbs methods only"),
    (lambda b, t: pk.task_arithmetic(b, t, gammas=[0.1, 0.1]), r"gammas apply to the breadcrumbs methods only"),
    (lambda b, t: pk.merge(b, t, "breadcrumbs", densities=0.5, gammas=1.5),
     r"gammas\[0\] must lie in \[0, 1\], got 1.5"),
    (lambda b, t: pk.merge(b, t, "breadcrumbs", densities=0.5, gammas=[0.1, -0.2]),
     r"gammas\[1\] must lie in \[0, 1\], got -0.2"),
    (lambda b, t: pk.merge(b, t, "breadcrumbs_ties", densities=0.5, gammas=[0.1, float("nan")]),
     r"gammas\[1\] must be finite, got nan"),
    (lambda b, t: pk.merge(b, t, "breadcrumbs", densities=0.5, gammas=[0.1]), r"gammas has 1 entries but there are 2"),
    (lambda b, t: pk.merge(b, t, "breadcrumbs", densities=[0.5, 1.2]), r"densities\[1\] must lie in \[0, 1\]"),
    (lambda b, t: pk.merge(b[:1], [x[:1] for x in t], "breadcrumbs", densities=0.1), r"densities\[0\]=0.1 keeps no"),
    (lambda b, t: pk.sparsify(t[0], "magnitude_outliers", 0.5, gamma=2.0), r"gamma must lie in \[0, 1\], got 2.0"),
    (lambda b, t: pk.sparsify(t[0], "magnitude_outliers", 0.5, gamma=[0.1]), r"gamma must be a number"),
    (lambda b, t: pk.sparsify(t[0], "magnitude_outliers", 0.5, epsilon=0.1), r"epsilon applies to method .della. only"),
    (lambda b, t: pk.sparsify(t[0], "magnitude_outliers", 1.5), r"densities\[0\] must lie in \[0, 1\]"),
    (lambda b, t: pk.sparsify(t[0], "breadcrumbs", 0.5), r"method must be one of .*magnitude_outliers"),
])
def test_breadcrumbs_argument_errors(call, match):
    base, tensors = make_models((4, 5), 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(base, tensors)
