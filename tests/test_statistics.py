"""Element-wise statistics across N tensors: median, trimmed_mean, sign_count (docs/PRIMITIVES.md).

* every backend against the reference, bit for bit (non-NaN bits equal, including the sign of zeros; NaN at
  the same positions), over N, shapes (odd, empty, 0-d, 1-element, non-contiguous), dtypes (fp32, bf16,
  fp16, mixed), values with ties, +-0, +-inf and NaN;
* the reference against independent definitions (torch.quantile, numpy.median, scipy.stats.trim_mean,
  sort-and-slice, torch.sign(...).sum(0));
* the public API: argument checks and their messages, defaults, the nan policy of sign_count;
* opcheck of the operators.

Triton cases run only in the TRITON_INTERPRET=1 process (marked `triton`) and are kept small.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import backend_params
from pykernels import _backend, _ops
from pykernels import statistics as stats
from pykernels.reference import statistics as ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN/overflow warnings (interpreter)

NS = [1, 2, 3, 4, 5, 8]
DTYPES = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "fp16": [torch.float16],
          "mixed": [torch.bfloat16, torch.float32, torch.float16]}
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan")]
requires_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="pykernels._C not built")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _values(shape, gen, special=False):
    """float32 values with many ties (multiples of 0.5 in [-2, 2], exact in every dtype) mixed with continuous
    ones; with special=True also +-0, +-inf and NaN."""
    ties = torch.randint(-4, 5, shape, generator=gen).float() * 0.5
    cont = torch.randn(shape, generator=gen)
    x = torch.where(torch.rand(shape, generator=gen) < 0.5, ties, cont)
    if special:
        pick = torch.randint(0, len(SPECIALS), shape, generator=gen)
        sp = torch.tensor(SPECIALS)[pick]
        x = torch.where(torch.rand(shape, generator=gen) < 0.15, sp, x)
    return x


def _tensor(shape, dtype, gen, special=False, noncontig=False):
    if noncontig and len(shape) == 2:
        t = _values(shape[::-1], gen, special).to(dtype).t()  # transposed storage
    elif noncontig:
        t = _values(tuple(shape[:-1]) + (2 * shape[-1],), gen, special).to(dtype)[..., ::2]  # strided
    else:
        t = _values(shape, gen, special).to(dtype)
    assert t.shape == torch.Size(shape)
    return t


def make_inputs(shape, n, kind="fp32", base=True, special=False, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dts = DTYPES[kind]
    tensors = [_tensor(shape, dts[(i + 1) % len(dts)], gen, special, noncontig) for i in range(n)]
    b = _tensor(shape, dts[0], gen, special, noncontig) if base else None
    return b, tensors


def assert_same(actual, expected):
    """Bit-identical up to NaN payloads: dtype, shape, NaN positions and all other bits equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ at {(nan_a != nan_e).nonzero()[:5].tolist()}"
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[actual.dtype]
    a, e = actual.contiguous().view(view)[~nan_a], expected.contiguous().view(view)[~nan_e]
    bad = (a != e).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} values differ, e.g. {actual[~nan_a][bad[:3, 0]].tolist()} vs "
                              f"{expected[~nan_e][bad[:3, 0]].tolist()}")


def trims(n):
    return list(range(0, (n + 1) // 2))


def task_vectors(base, tensors):
    return ref.task_vectors(base, tensors)


# ----------------------------------------------------------------------------------------------------------
# backends against the reference (bit-identical)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("kind", list(DTYPES))
@pytest.mark.parametrize("n", NS)
def test_trimmed_mean_matches_reference(backend, n, kind):
    ops = _ops.primitives(backend)
    for has_base, special in ((True, False), (False, True)):
        base, tensors = make_inputs((7, 9), n, kind, base=has_base, special=special, seed=n)
        out_dtype = (base if has_base else tensors[0]).dtype
        for trim in trims(n):
            assert_same(ops.trimmed_mean(base, tensors, trim, out_dtype),
                        ref.trimmed_mean(base, tensors, trim, out_dtype))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("kind", list(DTYPES))
@pytest.mark.parametrize("n", NS)
def test_sign_count_matches_reference(backend, n, kind):
    ops = _ops.primitives(backend)
    for has_base, special in ((True, False), (False, True), (True, True)):
        base, tensors = make_inputs((7, 9), n, kind, base=has_base, special=special, seed=n)
        assert_same(ops.sign_count(base, tensors), ref.sign_count(base, tensors))


SHAPES = [(0,), (3, 0), (), (1,), (1, 1), (13,), (5, 3, 2)]


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(backend, shape):
    ops = _ops.primitives(backend)
    for n in (1, 4, 5):
        base, tensors = make_inputs(shape, n, "mixed", special=True, seed=len(shape) + n)
        for b in (base, None):
            out = ops.trimmed_mean(b, tensors, (n - 1) // 2, torch.float32)
            assert out.shape == torch.Size(shape)
            assert_same(out, ref.trimmed_mean(b, tensors, (n - 1) // 2, torch.float32))
            assert_same(ops.sign_count(b, tensors), ref.sign_count(b, tensors))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 7)], ids=str)
def test_non_contiguous(backend, shape):
    ops = _ops.primitives(backend)
    base, tensors = make_inputs(shape, 5, "mixed", special=True, noncontig=True, seed=3)
    assert not base.is_contiguous() and not any(t.is_contiguous() for t in tensors)
    dense_base, dense = base.contiguous(), [t.contiguous() for t in tensors]
    for trim in trims(5):
        expected = ref.trimmed_mean(dense_base, dense, trim, torch.bfloat16)
        assert_same(ops.trimmed_mean(base, tensors, trim, torch.bfloat16), expected)
        assert_same(ref.trimmed_mean(base, tensors, trim, torch.bfloat16), expected)
    assert_same(ops.sign_count(base, tensors), ref.sign_count(dense_base, dense))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_out_dtypes(backend, out_dtype):
    ops = _ops.primitives(backend)
    base, tensors = make_inputs((5, 7), 4, "mixed", special=True, seed=11)
    # values that round differently in each output dtype, and overflow float16
    tensors[0] = tensors[0] * 1e5
    for trim in (0, 1):
        assert_same(ops.trimmed_mean(base, tensors, trim, out_dtype), ref.trimmed_mean(base, tensors, trim, out_dtype))


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_special_values_exhaustive(backend):
    """Every combination of 3 values from {-1, -0, +0, 1, -inf, +inf, NaN} (343 elements), with and without a
    base holding +-inf; -0 < +0 decides the sign of zero medians."""
    ops = _ops.primitives(backend)
    vals = torch.tensor([-1.0, -0.0, 0.0, 1.0, float("-inf"), float("inf"), float("nan")])
    grid = torch.cartesian_prod(vals, vals, vals)  # (343, 3)
    tensors = [grid[:, i].contiguous() for i in range(3)]
    base = vals[torch.arange(grid.shape[0]) % len(vals)]
    for b in (None, base):
        for trim in (0, 1):
            assert_same(ops.trimmed_mean(b, tensors, trim, torch.float32),
                        ref.trimmed_mean(b, tensors, trim, torch.float32))
        assert_same(ops.sign_count(b, tensors), ref.sign_count(b, tensors))
    # the median of (+0, -0, 1) is +0, of (-0, -0, +0) is -0, of (-0, +0) is +0 (sum -0 + +0)
    med = ops.trimmed_mean(None, [torch.tensor([0.0, -0.0]), torch.tensor([-0.0, -0.0]), torch.tensor([1.0, 0.0])],
                           1, torch.float32)
    assert torch.signbit(med).tolist() == [False, True]
    med2 = ops.trimmed_mean(None, [torch.tensor([-0.0]), torch.tensor([0.0])], 0, torch.float32)
    assert not torch.signbit(med2).item()


@requires_cpp
@pytest.mark.parametrize("n", list(range(1, 65)))
def test_cpp_every_n(n):
    """Every N up to 64 (every selection network), several trims, ties and specials."""
    base, tensors = make_inputs((97,), n, "fp32", special=True, seed=100 + n)
    ops = _ops.primitives("cpp")
    for trim in sorted({0, 1 if n > 2 else 0, n // 4, (n - 1) // 2}):
        assert_same(ops.trimmed_mean(base, tensors, trim, torch.float32),
                    ref.trimmed_mean(base, tensors, trim, torch.float32))
    assert_same(ops.sign_count(base, tensors), ref.sign_count(base, tensors))


@requires_cpp
@pytest.mark.parametrize("n", [3, 8, 20])
def test_cpp_many_chunks(n):
    """Tensors spanning several chunks, tiles and parallel blocks (with a ragged end)."""
    base, tensors = make_inputs((2 * 65536 + 4099,), n, "mixed", special=True, seed=n)
    ops = _ops.primitives("cpp")
    for trim in (0, (n - 1) // 2):
        assert_same(ops.trimmed_mean(base, tensors, trim, torch.float32),
                    ref.trimmed_mean(base, tensors, trim, torch.float32))
    assert_same(ops.sign_count(base, tensors), ref.sign_count(base, tensors))


@pytest.mark.triton
def test_triton_64_models():
    ops = _ops.primitives("triton")
    base, tensors = make_inputs((5,), 64, "mixed", special=True, seed=64)
    for trim in (0, 31):
        assert_same(ops.trimmed_mean(base, tensors, trim, torch.float32),
                    ref.trimmed_mean(base, tensors, trim, torch.float32))
    assert_same(ops.sign_count(base, tensors), ref.sign_count(base, tensors))


@pytest.mark.triton
def test_triton_several_programs(monkeypatch):
    from pykernels.kernels import statistics as k

    monkeypatch.setattr(k, "_TILE", 64)
    monkeypatch.setattr(k, "_BLOCK", 16)
    ops = _ops.primitives("triton")
    base, tensors = make_inputs((37,), 5, "mixed", special=True, seed=5)
    assert_same(ops.trimmed_mean(base, tensors, 2, torch.float32), ref.trimmed_mean(base, tensors, 2, torch.float32))
    assert_same(ops.sign_count(base, tensors), ref.sign_count(base, tensors))


# ----------------------------------------------------------------------------------------------------------
# the reference against independent definitions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", NS)
def test_reference_median_vs_quantile_and_numpy(n):
    base, tensors = make_inputs((11, 13), n, "mixed", seed=n)
    v = task_vectors(base, tensors)
    med = ref.trimmed_mean(base, tensors, (n - 1) // 2, torch.float32)
    torch.testing.assert_close(med, torch.quantile(v, 0.5, dim=0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(med, torch.from_numpy(np.median(v.numpy(), axis=0)), atol=0, rtol=0)
    # with +-inf and NaN: numpy's median (NaN propagates; mean of -inf and +inf is NaN)
    base, tensors = make_inputs((11, 13), n, "fp32", special=True, seed=n)
    v = task_vectors(base, tensors)
    med = ref.trimmed_mean(base, tensors, (n - 1) // 2, torch.float32)
    torch.testing.assert_close(med, torch.from_numpy(np.median(v.numpy(), axis=0)), atol=0, rtol=0,
                               equal_nan=True)


@pytest.mark.parametrize("n", NS)
def test_reference_trimmed_mean_vs_sort_and_slice(n):
    from scipy import stats as sps

    base, tensors = make_inputs((11, 13), n, "mixed", seed=n)
    v = task_vectors(base, tensors)
    for trim in trims(n):
        kept = torch.sort(v.double(), dim=0).values[trim:n - trim]
        expected = kept.sum(0) / (n - 2 * trim)
        got = ref.trimmed_mean(base, tensors, trim, torch.float32)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
        proportion = (trim + 0.5) / n  # int(proportion * n) == trim
        torch.testing.assert_close(got.double(), torch.from_numpy(sps.trim_mean(v.double().numpy(), proportion, 0)),
                                   atol=1e-6, rtol=1e-6)


def test_reference_sum_order_is_ascending():
    # 1 + 2^-24 + 2^-24 in float32: ascending order (2^-24 + 2^-24 first) keeps the small terms, 1 + 2^-24 would
    # round them away one at a time.
    tensors = [torch.tensor([1.0]), torch.tensor([2.0 ** -24]), torch.tensor([2.0 ** -24])]
    out = ref.trimmed_mean(None, tensors, 0, torch.float32)
    assert out.item() == np.float32((np.float32(2.0 ** -23) + np.float32(1.0)) / np.float32(3.0))


@pytest.mark.parametrize("n", NS)
def test_reference_sign_count_vs_torch_sign(n):
    base, tensors = make_inputs((11, 13), n, "mixed", special=True, seed=n)
    v = task_vectors(base, tensors)
    expected = torch.sign(v).nan_to_num(0.0).sum(0).to(torch.int8)
    assert torch.equal(ref.sign_count(base, tensors), expected)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
API_BACKENDS = backend_params()


@pytest.mark.parametrize("backend", API_BACKENDS)
@pytest.mark.parametrize("n", [1, 4, 5])
def test_api_median(backend, n):
    base, tensors = make_inputs((6, 5), n, "mixed", special=True, seed=n)
    out = stats.median(tensors, base=base, backend=backend)
    assert out.dtype == base.dtype  # default out_dtype: base's
    assert_same(out, ref.trimmed_mean(base, tensors, (n - 1) // 2, base.dtype))
    out = stats.median(tensors, backend=backend, out_dtype=torch.float32)
    assert_same(out, ref.trimmed_mean(None, tensors, (n - 1) // 2, torch.float32))
    assert stats.median(tensors, backend=backend).dtype == tensors[0].dtype  # without base: tensors[0]'s


@pytest.mark.parametrize("backend", API_BACKENDS)
def test_api_trimmed_mean(backend):
    base, tensors = make_inputs((6, 5), 5, "fp32", seed=1)
    for proportion, cut in ((0, 0), (0.1, 0), (0.2, 1), (0.39, 1), (0.4, 2), (0.49, 2)):
        out = stats.trimmed_mean(tensors, proportion, base=base, backend=backend)
        assert_same(out, ref.trimmed_mean(base, tensors, cut, torch.float32))


def test_api_trimmed_mean_vs_scipy():
    from scipy import stats as sps

    for n in (4, 5, 8):
        base, tensors = make_inputs((6, 5), n, "fp32", seed=n)
        v = task_vectors(base, tensors).double().numpy()
        for proportion in (0.0, 0.1, 0.25, 0.3, 0.45):
            got = stats.trimmed_mean(tensors, proportion, base=base)
            torch.testing.assert_close(got.double(), torch.from_numpy(sps.trim_mean(v, proportion, axis=0)),
                                       atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", API_BACKENDS)
def test_api_sign_count(backend):
    base, tensors = make_inputs((6, 5), 8, "mixed", seed=2)
    out = stats.sign_count(tensors, base=base, backend=backend)
    assert out.dtype == torch.int8
    assert_same(out, ref.sign_count(base, tensors))
    tensors[3] = tensors[3].clone()
    tensors[3][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[3\] contains NaN"):
        stats.sign_count(tensors, base=base, backend=backend)
    assert_same(stats.sign_count(tensors, base=base, nan="zero", backend=backend), ref.sign_count(base, tensors))


def test_api_sign_count_nan_names_the_input():
    base, tensors = make_inputs((4,), 3, "fp32", seed=0)
    b = base.clone()
    b[1] = float("nan")
    with pytest.raises(ValueError, match=r"^base contains NaN; pass nan='zero'"):
        stats.sign_count(tensors, base=b)
    b = base.clone()
    b[2] = float("-inf")
    stats.sign_count(tensors, base=b)  # inf - finite is fine
    tensors[1] = tensors[1].clone()
    tensors[1][2] = float("-inf")
    with pytest.raises(ValueError, match=r"tensors\[1\] - base is NaN \(inf - inf"):
        stats.sign_count(tensors, base=b)
    assert stats.sign_count(tensors, base=b, nan="zero")[2].item() == ref.sign_count(b, tensors)[2].item()
    with pytest.raises(ValueError, match=r"nan must be one of \('raise', 'zero'\), got 'ignore'"):
        stats.sign_count(tensors, nan="ignore")


@pytest.mark.parametrize("proportion", [0.5, 0.7, 1, -0.1, float("nan"), float("inf")])
def test_api_trimmed_mean_bad_proportion(proportion):
    base, tensors = make_inputs((3,), 4, "fp32")
    with pytest.raises(ValueError, match=r"proportion must lie in \[0, 0.5\), got " + str(float(proportion))):
        stats.trimmed_mean(tensors, proportion)


def test_api_argument_errors():
    base, tensors = make_inputs((3,), 4, "fp32")
    with pytest.raises(TypeError, match="proportion must be a real number"):
        stats.trimmed_mean(tensors, "0.1")
    with pytest.raises(TypeError, match="proportion must be a real number"):
        stats.trimmed_mean(tensors, True)
    with pytest.raises(ValueError, match="at least one tensor"):
        stats.median([])
    with pytest.raises(ValueError, match="at most 64 tensors"):
        stats.median([tensors[0]] * 65)
    with pytest.raises(TypeError, match="tensors must be a list of tensors"):
        stats.median(tensors[0])
    with pytest.raises(ValueError, match=r"tensors\[2\] has shape \(4,\) but base has shape \(3,\)"):
        stats.median(tensors[:2] + [torch.zeros(4)], base=base)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int32"):
        stats.sign_count([tensors[0], torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(TypeError, match="out_dtype must be float32, bfloat16 or float16, got torch.int8"):
        stats.median(tensors, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="backend must be one of"):
        stats.median(tensors, backend="numpy")


@requires_cpp
def test_cpp_op_errors():
    _, tensors = make_inputs((3,), 4, "fp32")
    with pytest.raises(RuntimeError, match=r"trim must satisfy 0 <= 2 \* trim < N = 4 \(got 2\)"):
        torch.ops.pykernels.trimmed_mean(None, tensors, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Int"):
        torch.ops.pykernels.sign_count(None, [tensors[0], torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"trim must satisfy 0 <= 2 \* trim < N = 4, got -1"):
        ref.trimmed_mean(None, tensors, -1, torch.float32)


@pytest.mark.triton
def test_triton_op_errors():
    from pykernels.kernels import statistics as k

    _, tensors = make_inputs((3,), 4, "fp32")
    with pytest.raises(ValueError, match=r"trim must satisfy 0 <= 2 \* trim < N = 4, got 2"):
        k.trimmed_mean(None, tensors, 2, torch.float32)
    with pytest.raises(ValueError, match=r"base has shape \(2,\)"):
        k.sign_count(torch.zeros(2), tensors)


# ----------------------------------------------------------------------------------------------------------
# operators
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_opcheck(backend):
    ops = _ops.primitives(backend)
    base, tensors = make_inputs((5, 3), 3, "mixed", seed=4)  # finite: opcheck's comparisons treat NaN != NaN
    calls = [
        (ops.trimmed_mean, (base, tensors, 1, torch.float32)),
        (ops.trimmed_mean, (None, tensors, 0, torch.bfloat16)),
        (ops.sign_count, (base, tensors)),
        (ops.sign_count, (None, tensors)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)
