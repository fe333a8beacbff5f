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
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
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
    with pytest.raises(ValueError, match="gamma and epsilon"):
        pk.sparsify(torch.ones(4), "magnitude", 0.5, gamma=0.1)
