"""Order-statistics primitives (docs/PRIMITIVES.md, module `selection`) on every backend.

Three layers:
- every backend's key_histogram / key_mask / key_find / row_select / row_topk_mask / row_rank equals the
  reference bit for bit (torch.equal) on small inputs: random, heavily tied, constant, zeros, signed zeros,
  +-inf, NaN (several payloads and signs), subnormals, fp32/bf16/fp16, odd and empty shapes, non-contiguous
  views, both key modes. Triton params run only under TRITON_INTERPRET=1 (conftest.backend_params). The
  "reference" param checks the reference itself, against ByDefinition: the contract spelt out in Python, one
  element at a time, with keys computed here from the float bits (so a wrong reference cannot make every
  backend agree on a wrong answer);
- the reference against torch.sort / argsort and the float order of the values;
- the C++ ops: opcheck, argument errors, and sizes spanning several of its parallel blocks (ties cut across
  blocks, counter copies, bucket groups), identical for 1 and 2 threads.
"""
from __future__ import annotations

import collections
import contextlib
import struct

import pytest
import torch

from conftest import backend_params
from pykernels import _backend, _ops
from pykernels.reference import selection as ref

BACKENDS = backend_params()
NAN_KEY = 0xFFFFFFFF
cpp_only = pytest.mark.skipif(not _backend.cpp_available(), reason="pykernels._C not built")


def prims(backend):
    return _ops.primitives(backend)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one intra-op thread unless it asks for more (check_thread_counts): the inputs are small,
    and on a busy 2-core machine each parallel region of a torch op can wait for a time slice."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------------------
# keys from the contract, one element at a time (independent of reference.order_keys)


def key_of_bits(u: int, magnitude: bool) -> int:
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return NAN_KEY
    if magnitude:
        return a
    if a == 0:
        return 0x80000000
    return (~u & 0xFFFFFFFF) if u >> 31 else (u | 0x80000000)


def keys_by_hand(x: torch.Tensor, magnitude: bool) -> list[int]:
    bits = x.detach().reshape(-1).float().view(torch.int32).tolist()
    return [key_of_bits(b & 0xFFFFFFFF, magnitude) for b in bits]


def f32_key(v: float, magnitude: bool) -> int:
    return key_of_bits(struct.unpack("<I", struct.pack("<f", v))[0], magnitude)


# ---------------------------------------------------------------------------------------------------------------
# inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAN_BITS = {  # quiet and signalling NaNs of both signs, odd payloads
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0xFFFF],
    torch.float16: [0x7E00, 0xFE00, 0x7C01, 0xFFFF],
}
SUBNORMAL_MAX = {torch.float32: 0x7FFFFF, torch.bfloat16: 0x7F, torch.float16: 0x3FF}


def _from_bits(bits: torch.Tensor, dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return bits.to(torch.int64).where(bits < 2**31, bits - 2**32).to(torch.int32).view(torch.float32)
    return bits.to(torch.int64).where(bits < 2**15, bits - 2**16).to(torch.int16).view(dtype)


def _values(kind: str, numel: int, dtype, gen) -> torch.Tensor:
    """Flat tensor of `numel` values of `dtype`."""
    if kind == "random":
        return (torch.randn(numel, generator=gen) * 3).to(dtype)
    if kind == "tied":  # 7 distinct values, heavily tied in both key modes
        return (torch.randint(-3, 4, (numel,), generator=gen).float() * 0.25).to(dtype)
    if kind == "constant":
        return torch.full((numel,), -1.5, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(numel, dtype=dtype)
    if kind == "signed_zeros":  # +0 / -0 with a few +-1: zeros tie across signs
        z = torch.zeros(numel, dtype=dtype)
        sign = torch.randint(0, 2, (numel,), generator=gen).bool()
        z[sign] = -0.0
        pick = torch.randint(0, 8, (numel,), generator=gen)
        z[pick == 0] = 1.0
        z[pick == 1] = -1.0
        return z
    if kind == "subnormals":
        bits = torch.randint(1, SUBNORMAL_MAX[dtype] + 1, (numel,), generator=gen)
        sign = torch.randint(0, 2, (numel,), generator=gen) * (2**31 if dtype == torch.float32 else 2**15)
        return _from_bits(bits + sign, dtype)
    if kind == "specials":  # random values mixed with every special value
        info = torch.finfo(dtype)
        pool = [0.0, -0.0, float("inf"), float("-inf"), info.max, -info.max, info.tiny, -info.tiny, 1.0, -1.0]
        v = (torch.randn(numel, generator=gen) * 2).to(dtype)
        pick = torch.randint(0, 3 * len(pool), (numel,), generator=gen)
        for i, value in enumerate(pool):
            v[pick == i] = value
        nans = _from_bits(torch.tensor(NAN_BITS[dtype]), dtype)
        where = torch.randint(0, numel, (max(1, numel // 20),), generator=gen)
        v[where] = nans[torch.randint(0, len(nans), where.shape, generator=gen)]
        subnormal = _values("subnormals", numel, dtype, gen)
        return torch.where(pick == len(pool), subnormal, v)
    raise ValueError(kind)


def make(kind: str, shape, dtype, layout="contiguous", seed=0) -> torch.Tensor:
    """A tensor of `shape`; layout "transposed" / "strided" gives a non-contiguous view with that shape."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return make(kind, shape[::-1], dtype, "contiguous", seed).transpose(0, 1)
    if layout == "strided":
        full = make(kind, (*shape[:-1], 2 * shape[-1] + 1), dtype, "contiguous", seed)
        return full[..., 1::2]
    numel = 1
    for s in shape:
        numel *= s
    return _values(kind, numel, dtype, gen).reshape(shape)


# (id, kind, shape, dtype, layout): flat ops read any shape row-major
FLAT_CASES = [
    ("random-fp32", "random", (4999,), "fp32", "contiguous"),
    ("random-bf16-T", "random", (37, 41), "bf16", "transposed"),
    ("random-fp16-strided", "random", (9, 5, 23), "fp16", "strided"),
    ("tied-bf16", "tied", (3001,), "bf16", "contiguous"),
    ("tied-fp32-T", "tied", (50, 61), "fp32", "transposed"),
    ("constant-fp16", "constant", (777,), "fp16", "contiguous"),
    ("zeros-bf16", "zeros", (33, 3), "bf16", "contiguous"),
    ("signed-zeros-fp32", "signed_zeros", (1000,), "fp32", "contiguous"),
    ("specials-fp32", "specials", (2048,), "fp32", "contiguous"),
    ("specials-bf16-strided", "specials", (40, 51), "bf16", "strided"),
    ("specials-fp16-T", "specials", (31, 47), "fp16", "transposed"),
    ("subnormals-fp32", "subnormals", (513,), "fp32", "contiguous"),
    ("subnormals-bf16", "subnormals", (513,), "bf16", "contiguous"),
    ("subnormals-fp16", "subnormals", (513,), "fp16", "contiguous"),
    ("one", "random", (1,), "fp32", "contiguous"),
    ("scalar", "random", (), "bf16", "contiguous"),
    ("empty", "random", (0,), "fp32", "contiguous"),
    ("empty-2d", "random", (4, 0), "fp16", "contiguous"),
]

# (id, kind, (rows, n), dtype, layout): row ops take 2-D tensors
ROW_CASES = [
    ("random-fp32", "random", (64, 300), "fp32", "contiguous"),
    ("random-bf16-T", "random", (17, 129), "bf16", "transposed"),
    ("random-fp16-strided", "random", (8, 77), "fp16", "strided"),
    ("tied-bf16", "tied", (32, 150), "bf16", "contiguous"),
    ("tied-fp16-T", "tied", (9, 100), "fp16", "transposed"),
    ("constant-fp32", "constant", (5, 64), "fp32", "contiguous"),
    ("zeros-bf16", "zeros", (3, 31), "bf16", "contiguous"),
    ("signed-zeros-fp32", "signed_zeros", (6, 200), "fp32", "contiguous"),
    ("specials-fp32", "specials", (16, 256), "fp32", "contiguous"),
    ("specials-bf16-strided", "specials", (12, 99), "bf16", "strided"),
    ("specials-fp16", "specials", (7, 120), "fp16", "contiguous"),
    ("subnormals-fp32", "subnormals", (4, 257), "fp32", "contiguous"),
    ("one-column", "random", (11, 1), "fp32", "contiguous"),
    ("one-element", "random", (1, 1), "bf16", "contiguous"),
    ("no-rows", "random", (0, 7), "fp32", "contiguous"),
]


def _case_params(cases):
    return [pytest.param(kind, shape, DTYPES[dt], layout, id=name) for name, kind, shape, dt, layout in cases]


FLAT = _case_params(FLAT_CASES)
ROWS = _case_params(ROW_CASES)
MAGNITUDE = pytest.mark.parametrize("magnitude", [True, False], ids=["mag", "signed"])


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} != " \
                                                                   f"{want.dtype}{tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: mismatch at {torch.nonzero(got != want)[:5].tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# the contract spelt out in Python, element by element: what the reference itself is checked against


def _counts(values, size=65536) -> list[int]:
    out = [0] * size
    for v in values:
        out[v] += 1
    return out


def _descending(row: list[int]) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (-row[j], j))  # larger key first, then smaller index


class ByDefinition:
    @staticmethod
    def key_histogram(x, magnitude, buckets):
        keys = keys_by_hand(x, magnitude)
        if not buckets:
            return torch.tensor(_counts(k >> 16 for k in keys), dtype=torch.int64)
        return torch.tensor([_counts(k & 0xFFFF for k in keys if k >> 16 == b) for b in buckets], dtype=torch.int64)

    @staticmethod
    def key_mask(x, magnitude, key, ties):
        seen, mask = 0, []
        for k in keys_by_hand(x, magnitude):
            mask.append(k > key or (k == key and seen < ties))
            seen += k == key
        return torch.tensor(mask, dtype=torch.bool).reshape(x.shape)

    @staticmethod
    def key_find(x, magnitude, key, rank):
        hits = [i for i, k in enumerate(keys_by_hand(x, magnitude)) if k == key]
        return torch.tensor(hits[rank - 1] if 1 <= rank <= len(hits) else -1, dtype=torch.int64)

    @staticmethod
    def _rows(x, magnitude):
        keys, n = keys_by_hand(x, magnitude), x.shape[1]
        return [keys[r * n:(r + 1) * n] for r in range(x.shape[0])]

    @staticmethod
    def row_select(x, magnitude, ks):
        picked = [[_descending(row)[k - 1] for k in ks] for row in ByDefinition._rows(x, magnitude)]
        return torch.tensor(picked, dtype=torch.int64).reshape(x.shape[0], len(ks))

    @staticmethod
    def row_topk_mask(x, magnitude, k):
        mask = torch.zeros(x.shape, dtype=torch.bool)
        for r, row in enumerate(ByDefinition._rows(x, magnitude)):
            mask[r, _descending(row)[:k]] = True
        return mask

    @staticmethod
    def row_rank(x, magnitude):
        ranks = torch.zeros(x.shape, dtype=torch.int64)
        for r, row in enumerate(ByDefinition._rows(x, magnitude)):
            ascending = sorted(range(len(row)), key=lambda j: (row[j], j))
            ranks[r, ascending] = torch.arange(1, len(row) + 1)
        return ranks


def expected(backend):
    """What a backend must return: the reference's results, and for the reference itself the contract's."""
    return ByDefinition if backend == "reference" else ref


# ---------------------------------------------------------------------------------------------------------------
# argument choices derived from the data


def bucket_lists(keys: list[int]) -> list[list[int]]:
    """Bucket lists: present buckets (most populated first), absent ones, 0, 0xFFFF, and a long list."""
    present = [b for b, _ in collections.Counter(k >> 16 for k in keys).most_common()]
    absent = [b for b in (0x1234, 0x7F80, 0x8000, 0xFFFE) if b not in present]
    lists = [[0xFFFF], present[:1] or [5], present[:3] + absent[:1], [0] + present[:6] + [0xFFFF],
             present[:12] + absent + [0, 0xFFFF]]
    return [list(dict.fromkeys(b)) for b in lists]  # distinct, in order


def key_choices(keys: list[int]) -> list[tuple[int, int]]:
    """(key, ties) pairs: k-th largest keys with every interesting tie count, absent keys, the limits."""
    order = sorted(keys, reverse=True)
    out = [(0, 0), (0, 3), (2**32, 0), (2**32, 5), (NAN_KEY, 1), (0x3F800001, 2)]
    for k in sorted({1, len(order) // 3, len(order) // 2, len(order)} - {0}) if order else ():
        key = order[k - 1]
        count = order.count(key)
        for ties in sorted({0, 1, count // 2, count - 1, count, count + 7}):
            out.append((key, ties))
    return out


def ks_for(n: int) -> list[list[int]]:
    if n == 0:
        return [[]]
    return [[1], [n], [n // 2 + 1, 1, n, n // 2 + 1], list(range(1, n + 1, max(1, n // 9)))]


# ---------------------------------------------------------------------------------------------------------------
# every backend against the reference


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", FLAT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_histogram(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    op, want = prims(backend).key_histogram, expected(backend).key_histogram
    assert_same(op(x, magnitude, []), want(x, magnitude, []), "high")
    for buckets in bucket_lists(keys_by_hand(x, magnitude)):
        assert_same(op(x, magnitude, buckets), want(x, magnitude, buckets), f"buckets {buckets}")


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", FLAT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mask(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    op, want = prims(backend).key_mask, expected(backend).key_mask
    for key, ties in key_choices(keys_by_hand(x, magnitude)):
        assert_same(op(x, magnitude, key, ties), want(x, magnitude, key, ties), f"key {key:#x} ties {ties}")


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", FLAT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_find(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    op, want = prims(backend).key_find, expected(backend).key_find
    keys = keys_by_hand(x, magnitude)
    for key in sorted({k for k, _ in key_choices(keys) if k < 2**32}):
        count = keys.count(key)
        for rank in sorted({1, 2, count // 2 + 1, count, count + 1, 0, -3, x.numel() + 1}):
            assert_same(op(x, magnitude, key, rank), want(x, magnitude, key, rank), f"key {key:#x} rank {rank}")


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_select(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    for ks in ks_for(shape[1]):
        assert_same(prims(backend).row_select(x, magnitude, ks), expected(backend).row_select(x, magnitude, ks),
                    f"ks {ks}")


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_topk_mask(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    n = shape[1]
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
        assert_same(prims(backend).row_topk_mask(x, magnitude, k), expected(backend).row_topk_mask(x, magnitude, k),
                    f"k {k}")


@MAGNITUDE
@pytest.mark.parametrize("kind,shape,dtype,layout", ROWS + [pytest.param("random", (3, 0), torch.float32,
                                                                         "contiguous", id="empty-rows")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_rank(backend, kind, shape, dtype, layout, magnitude):
    x = make(kind, shape, dtype, layout)
    assert_same(prims(backend).row_rank(x, magnitude), expected(backend).row_rank(x, magnitude), "ranks")


# ---------------------------------------------------------------------------------------------------------------
# the reference against the contract and against sorting


@pytest.mark.parametrize("value,mag_key,signed_key", [
    (0.0, 0, 0x80000000), (-0.0, 0, 0x80000000), (1.0, 0x3F800000, 0xBF800000), (-1.0, 0x3F800000, 0x407FFFFF),
    (float("inf"), 0x7F800000, 0xFF800000), (float("-inf"), 0x7F800000, 0x007FFFFF),
    (float("nan"), NAN_KEY, NAN_KEY), (-float("nan"), NAN_KEY, NAN_KEY),
    (1e-45, 1, 0x80000001), (-1e-45, 1, 0x7FFFFFFE), (-3.0e38, 0x7F61B1E6, 0x009E4E19),
], ids=lambda v: repr(v))
def test_contract_keys(value, mag_key, signed_key):
    assert (f32_key(value, True), f32_key(value, False)) == (mag_key, signed_key)
    x = torch.tensor([value], dtype=torch.float32)
    assert ref.order_keys(x, True).tolist() == [mag_key]
    assert ref.order_keys(x, False).tolist() == [signed_key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
                                   1e-45, -1e-45, -3.0e38, 2.5e-39], ids=repr)
def test_single_element_keys(backend, value):
    """The key of one element, read back through both histogram passes (high bucket, then low bits)."""
    x = torch.tensor([value], dtype=torch.float32)
    op = prims(backend).key_histogram
    for magnitude in (True, False):
        key = f32_key(value, magnitude)
        high = op(x, magnitude, [])
        assert high.sum() == 1 and high[key >> 16] == 1
        low = op(x, magnitude, [key >> 16, (key >> 16) ^ 1])
        assert low.shape == (2, 65536) and low[0, key & 0xFFFF] == 1 and low.sum() == 1


def test_signed_keys_follow_float_order():
    """Signed keys sort like the values themselves (NaN last, -0 == +0)."""
    x = make("specials", (3000,), torch.float32, seed=3)
    keys = torch.tensor(keys_by_hand(x, False))
    finite = ~torch.isnan(x)
    by_key = x[finite][torch.sort(keys[finite], stable=True).indices]
    assert torch.equal(by_key, torch.sort(x[finite], stable=True).values)  # == treats -0 and +0 as equal
    assert bool((keys[~finite] == NAN_KEY).all()) and int(keys[finite].max()) < NAN_KEY


@MAGNITUDE
@pytest.mark.parametrize("case", ["specials-fp32", "tied-bf16", "signed-zeros-fp32", "random-fp16-strided"])
def test_reference_row_ops_match_sorting(case, magnitude):
    _, kind, shape, dt, layout = next(c for c in ROW_CASES if c[0] == case)
    x = make(kind, shape, DTYPES[dt], layout)
    rows, n = shape
    keys = torch.tensor(keys_by_hand(x, magnitude), dtype=torch.int64).reshape(rows, n)
    # descending stable order, spelt out: larger key first, then smaller index
    order = torch.tensor([sorted(range(n), key=lambda j: (-int(row[j]), j)) for row in keys], dtype=torch.int64)
    ks = [1, n // 2, n // 2, n]
    assert torch.equal(ref.row_select(x, magnitude, ks), order[:, [k - 1 for k in ks]])
    # the selected keys are torch.sort's, descending
    sorted_keys = torch.sort(keys, dim=-1, descending=True, stable=True).values
    assert torch.equal(keys.gather(1, ref.row_select(x, magnitude, list(range(1, n + 1)))), sorted_keys)
    for k in (0, 1, n // 3, n):
        want = torch.zeros(rows, n, dtype=torch.bool)
        want.scatter_(1, order[:, :k], True)
        assert torch.equal(ref.row_topk_mask(x, magnitude, k), want)
    ranks = torch.argsort(torch.argsort(keys, dim=-1, stable=True), dim=-1, stable=True) + 1
    assert torch.equal(ref.row_rank(x, magnitude), ranks)
    ascending = torch.tensor([sorted(range(n), key=lambda j: (int(row[j]), j)) for row in keys])
    assert torch.equal(ref.row_rank(x, magnitude).gather(1, ascending), torch.arange(1, n + 1).expand(rows, n))


def test_row_select_values_match_float_sort():
    """Signed keys: the selected values are torch.sort's values of the floats (NaN first when descending)."""
    x = make("specials", (12, 99), torch.float32, seed=5)
    order = ref.row_select(x, False, list(range(1, 100)))
    want = torch.sort(x, dim=-1, descending=True, stable=True).values
    torch.testing.assert_close(x.gather(1, order), want, equal_nan=True, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# C++: opcheck, argument errors, several parallel blocks


def _op_calls():
    x = make("specials", (13, 29), torch.float32, seed=1).requires_grad_()
    b = make("tied", (5, 40), torch.bfloat16, seed=2)
    h = make("random", (7, 9), torch.float16, seed=3)
    ops = torch.ops.pykernels
    return [
        ("key_histogram", ops.key_histogram.default, [(x, True, []), (b, False, [0xBF00, 0x3F80]), (h, True, [1])]),
        ("key_mask", ops.key_mask.default, [(x, True, 0x3F800000, 2), (b, False, 0xBF800000, 3), (h, True, 2**32, 0)]),
        ("key_find", ops.key_find.default, [(x, False, 0x80000000, 1), (b, True, 0x3E800000, 4), (h, True, 7, 1)]),
        ("row_select", ops.row_select.default, [(x, True, [1, 29, 7]), (b, False, [40]), (h, True, [])]),
        ("row_topk_mask", ops.row_topk_mask.default, [(x, True, 5), (b, False, 40), (h, True, 0)]),
        ("row_rank", ops.row_rank.default, [(x, False), (b, True), (h, False)]),
    ]


@cpp_only
@pytest.mark.parametrize("name", ["key_histogram", "key_mask", "key_find", "row_select", "row_topk_mask", "row_rank"])
def test_opcheck(name):
    _, op, calls = next(c for c in _op_calls() if c[0] == name)
    for args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                    "test_aot_dispatch_dynamic"))


def _bad_calls():
    x = torch.randn(4, 6)
    ops = torch.ops.pykernels
    return [
        ("int dtype", lambda: ops.key_histogram(torch.arange(6), True, []), "dtype"),
        ("float64", lambda: ops.key_mask(x.double(), True, 0, 0), "dtype"),
        ("row float64", lambda: ops.row_rank(x.double(), True), "dtype"),
        ("bucket -1", lambda: ops.key_histogram(x, True, [-1]), "buckets"),
        ("bucket 65536", lambda: ops.key_histogram(x, True, [3, 65536]), "buckets"),
        ("bucket twice", lambda: ops.key_histogram(x, True, [7, 8, 7]), "distinct"),
        ("mask key -1", lambda: ops.key_mask(x, True, -1, 0), "key"),
        ("mask key 2^32+1", lambda: ops.key_mask(x, True, 2**32 + 1, 0), "key"),
        ("mask ties -1", lambda: ops.key_mask(x, True, 5, -1), "ties"),
        ("find key -1", lambda: ops.key_find(x, True, -1, 1), "key"),
        ("find key 2^32", lambda: ops.key_find(x, True, 2**32, 1), "key"),
        ("select 1-D", lambda: ops.row_select(x.reshape(-1), True, [1]), "2-D"),
        ("select 3-D", lambda: ops.row_select(x.reshape(2, 2, 6), True, [1]), "2-D"),
        ("select k 0", lambda: ops.row_select(x, True, [1, 0]), r"ks\[1\] = 0"),
        ("select k n+1", lambda: ops.row_select(x, True, [7]), r"ks\[0\] = 7"),
        ("select empty row", lambda: ops.row_select(torch.empty(3, 0), True, [1]), r"ks\[0\] = 1"),
        ("topk 1-D", lambda: ops.row_topk_mask(x.reshape(-1), True, 1), "2-D"),
        ("topk k -1", lambda: ops.row_topk_mask(x, True, -1), "k = -1"),
        ("topk k n+1", lambda: ops.row_topk_mask(x, False, 7), "k = 7"),
        ("rank 0-D", lambda: ops.row_rank(torch.tensor(1.0), True), "2-D"),
        ("rank 3-D", lambda: ops.row_rank(torch.randn(2, 3, 4), True), "2-D"),
    ]


@cpp_only
@pytest.mark.parametrize("index", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_argument_errors(index):
    _, call, word = _bad_calls()[index]
    with pytest.raises(RuntimeError, match=word):
        call()


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_thread_counts(calls):
    """calls: (op name, args). The reference's results, then the C++ op's on 1 and 2 threads. The reference runs
    on one thread: on a busy machine each parallel region of its many small torch ops waits for a time slice."""
    with num_threads(1):
        want = [getattr(ref, name)(*args) for name, args in calls]
    for n in (1, 2):
        with num_threads(n):
            for (name, args), w in zip(calls, want):
                what = f"{name}{tuple(a for a in args[1:] if not isinstance(a, list))} on {n} threads"
                assert_same(getattr(torch.ops.pykernels, name)(*args), w, what)


BIG_KINDS = pytest.mark.parametrize("kind,dtype", [
    pytest.param("random", torch.float32, id="random-fp32"), pytest.param("tied", torch.bfloat16, id="tied-bf16"),
    pytest.param("specials", torch.float16, id="specials-fp16"),
    pytest.param("constant", torch.float32, id="constant-fp32")])
BIG = 4 * 65536 + 4099  # several of the C++ blocks (65536 elements), a partial chunk, > 2^18 (counter copies)


@cpp_only
@MAGNITUDE
@BIG_KINDS
def test_cpp_several_blocks(kind, dtype, magnitude):
    """Sizes spanning blocks: ties cut in a later block, bucket groups of 1 / 5 / 12 / 40, both thread counts."""
    x = make(kind, (BIG,), dtype, seed=7)
    keys = ref.order_keys(x, magnitude)
    present = torch.argsort(ref.key_histogram(x, magnitude, []), descending=True, stable=True)[:40].tolist()
    order = torch.sort(keys, descending=True, stable=True)
    calls = [("key_histogram", (x, magnitude, present[:g])) for g in (0, 1, 5, 12, 40)]
    for k in (1, BIG // 3, BIG // 2, BIG - 5):
        key = int(order.values[k - 1])
        ties = int((keys == key).sum())
        rank = int((order.values[:k] == key).sum())  # the k-th element of the order is the rank-th tie
        calls += [("key_mask", (x, magnitude, key, t)) for t in sorted({0, 1, rank, ties // 2, ties})]
        calls += [("key_find", (x, magnitude, key, r)) for r in sorted({1, rank, ties})]
        # exactly the top k: the mask with `rank` ties, whose last element is the k-th of the order
        assert int(ref.key_mask(x, magnitude, key, rank).sum()) == k
        assert int(ref.key_find(x, magnitude, key, rank)) == int(order.indices[k - 1])
    check_thread_counts(calls)


@cpp_only
@MAGNITUDE
@BIG_KINDS
def test_cpp_long_rows(kind, dtype, magnitude):
    """Rows long enough for the C++ radix step (>= 1024), few and many positions, several parallel calls of rows,
    on 1 and 2 threads."""
    x = make(kind, (40, 2500), dtype, seed=9)
    x[5, ::7] = float("nan")
    x[7, ::3] = -0.0
    calls = [("row_select", (x, magnitude, [1, 700, 2500])), ("row_select", (x, magnitude, [1250, 3, 1250])),
             ("row_select", (x, magnitude, list(range(2500, 0, -199)))),  # 13 positions: whole-row selection
             ("row_topk_mask", (x, magnitude, 1)), ("row_topk_mask", (x, magnitude, 701)),
             ("row_topk_mask", (x, magnitude, 2499)), ("row_rank", (x, magnitude))]
    check_thread_counts(calls)
