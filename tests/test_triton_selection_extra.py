"""Triton order statistics (kernels/selection.py): paths the shared all-backend file does not reach.

tests/test_selection_primitives.py checks every backend against the reference with the module's default sizes.
Here, under TRITON_INTERPRET=1: the same ops with shrunken block/chunk sizes (ties and key_find ranks across
whole-tensor blocks, uniform-block histograms, several short rows per chunk-sort program, rows spanning several
chunks merged in several passes with an unpaired last run), both chunk sorts (``tl.sort``, the GPU default, and
counting, the interpreter default), a long row at the default sizes, arguments that Triton would specialise
(key = rank = k = 1), and argument errors. On a CUDA machine (without the interpreter) a compiled-kernel check.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

from pykernels.reference import selection as ref

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreted(test):
    """Marks of a test that runs on CPU tensors under the interpreter (the `make test` triton process)."""
    for mark in (pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
                 pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")):
        test = mark(test)
    return test


def _load_kernels():
    # This checkout's file, whatever `pykernels.kernels` resolves to (an editable install may point elsewhere).
    path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "selection.py"
    spec = importlib.util.spec_from_file_location("_pykernels_triton_selection", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


K = _load_kernels()


def make(kind, shape, dtype, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return make(kind, shape[::-1], dtype, seed=seed).t()
    if layout == "strided":
        return make(kind, (shape[0], 2 * shape[1]), dtype, seed=seed)[:, ::2]
    numel = 1
    for s in shape:
        numel *= s
    if kind == "random":
        v = torch.randn(numel, generator=gen)
    elif kind == "tied":
        v = torch.randint(-3, 4, (numel,), generator=gen).float() / 4
    else:  # specials: NaN of both signs, +-inf, signed zeros, subnormal-ish, ties
        pool = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1.0, -1.0,
                             1e-40, -1e-40, 2.0, -2.0])
        v = torch.where(torch.rand(numel, generator=gen) < 0.5, pool[torch.randint(0, 12, (numel,), generator=gen)],
                        torch.randn(numel, generator=gen))
    return v.to(dtype).reshape(shape)


def assert_same(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    assert torch.equal(got, want), f"{what}: mismatch at {torch.nonzero(got != want)[:5].tolist()}"


def check_rows(x, magnitude, dev=None):
    """row_rank / row_topk_mask / row_select of the kernels (on dev) against the reference (on CPU)."""
    xd = x if dev is None else x.to(dev)
    n = x.shape[1]
    assert_same(K.row_rank(xd, magnitude).cpu(), ref.row_rank(x, magnitude), "row_rank")
    for k in sorted({1, n // 3, n // 2, n - 1} - {0}):
        assert_same(K.row_topk_mask(xd, magnitude, k).cpu(), ref.row_topk_mask(x, magnitude, k), f"topk {k}")
    ks = [n, 1, (n + 1) // 2, 1]
    assert_same(K.row_select(xd, magnitude, ks).cpu(), ref.row_select(x, magnitude, ks), f"select {ks}")


def check_flat(x, magnitude, dev=None):
    """key_histogram / key_mask / key_find at every present key with tie counts and ranks around the middle."""
    xd = x if dev is None else x.to(dev)
    keys = ref.order_keys(x, magnitude)
    assert_same(K.key_histogram(xd, magnitude, []).cpu(), ref.key_histogram(x, magnitude, []), "high")
    buckets = torch.unique(keys >> 16).tolist()[:20] + [0x1234]
    buckets = list(dict.fromkeys(buckets))
    assert_same(K.key_histogram(xd, magnitude, buckets).cpu(), ref.key_histogram(x, magnitude, buckets), "low")
    values, counts = torch.unique(keys, return_counts=True)
    for key, count in list(zip(values.tolist(), counts.tolist()))[:12]:
        for ties in sorted({1, count // 2, count - 1, count + 1} - {0}):
            assert_same(K.key_mask(xd, magnitude, key, ties).cpu(), ref.key_mask(x, magnitude, key, ties),
                        f"mask {key:#x} {ties}")
        for rank in sorted({1, count // 2 + 1, count, count + 1}):
            assert_same(K.key_find(xd, magnitude, key, rank).cpu(), ref.key_find(x, magnitude, key, rank),
                        f"find {key:#x} {rank}")


def _shrink(monkeypatch, impl):
    """Tiny sizes: 64-element blocks, 16-element chunks, 4 rows of 16 per chunk-sort program, 32-element merges."""
    for name, value in dict(_SORT_IMPL=impl, _BLOCK=64, _MERGE_BLOCK=32, _BITONIC_CHUNK=16, _BITONIC_TILE=64,
                            _COUNT_CHUNK=16, _COUNT_TILE=64, _COUNT_CUBE=1024).items():
        monkeypatch.setattr(K, name, value)


@pytest.fixture(params=["count", "bitonic"])
def small_rows(request, monkeypatch):
    _shrink(monkeypatch, request.param)


@pytest.fixture
def small_blocks(monkeypatch):
    _shrink(monkeypatch, None)


ROW_CASES = [  # (kind, (rows, n), dtype, layout)
    pytest.param("random", (5, 17), torch.float32, "contiguous", id="random-fp32-2chunks"),  # last row group partial
    pytest.param("tied", (3, 100), torch.bfloat16, "transposed", id="tied-bf16-T-7chunks"),  # unpaired last run
    pytest.param("specials", (2, 70), torch.float16, "strided", id="specials-fp16-strided"),
    pytest.param("tied", (6, 9), torch.bfloat16, "contiguous", id="tied-bf16-short"),  # one chunk, several rows
]


@pytest.mark.parametrize("magnitude", [True, False], ids=["mag", "signed"])
@pytest.mark.parametrize("kind,shape,dtype,layout", ROW_CASES)
@interpreted
def test_rows_small_chunks(small_rows, kind, shape, dtype, layout, magnitude):
    check_rows(make(kind, shape, dtype, layout), magnitude)


@pytest.mark.parametrize("magnitude", [True, False], ids=["mag", "signed"])
@pytest.mark.parametrize("kind,shape,dtype,layout", [
    pytest.param("tied", (31, 29), torch.bfloat16, "transposed", id="tied-bf16-T"),
    pytest.param("specials", (700,), torch.float32, "contiguous", id="specials-fp32"),
])
@interpreted
def test_flat_small_blocks(small_blocks, kind, shape, dtype, layout, magnitude):
    check_flat(make(kind, shape, dtype, layout), magnitude)


@interpreted
def test_histogram_uniform_blocks(small_blocks):
    """Blocks of one `high` digit (one atomic per block) next to mixed blocks and a partial last block."""
    x = torch.cat([torch.zeros(128), torch.randn(50), torch.full((64,), 3.0), -torch.zeros(64), torch.ones(7)])
    for magnitude in (True, False):
        assert_same(K.key_histogram(x, magnitude, []), ref.key_histogram(x, magnitude, []), "high")


@interpreted
def test_long_row_default_sizes():
    """Rows of 5000 at the default sizes: 10 counting chunks of 512, then 4 merge passes."""
    x = make("tied", (2, 5000), torch.bfloat16, seed=3) * make("random", (2, 5000), torch.bfloat16, seed=4).sign()
    x[1, ::7] = float("nan")
    assert_same(K.row_rank(x, True), ref.row_rank(x, True), "row_rank")
    assert_same(K.row_topk_mask(x, False, 2501), ref.row_topk_mask(x, False, 2501), "topk")
    assert_same(K.row_select(x, False, [1, 2500, 5000]), ref.row_select(x, False, [1, 2500, 5000]), "select")


@interpreted
def test_arguments_equal_to_one():
    """key = ties = rank = k = 1 (values Triton would specialise as constants)."""
    x = torch.tensor([1, 1, 2, 1, 0], dtype=torch.int32).view(torch.float32)  # magnitude keys 1, 1, 2, 1, 0
    assert_same(K.key_mask(x, True, 1, 1), ref.key_mask(x, True, 1, 1), "mask")
    for rank in (1, 3):
        assert_same(K.key_find(x, True, 1, rank), ref.key_find(x, True, 1, rank), "find")
    assert_same(K.row_topk_mask(x.reshape(1, 5), True, 1), ref.row_topk_mask(x.reshape(1, 5), True, 1), "topk")
    assert_same(K.row_select(x.reshape(5, 1), True, [1]), ref.row_select(x.reshape(5, 1), True, [1]), "select")


@interpreted
def test_argument_errors():
    x = torch.randn(4, 6)
    cases = [
        (TypeError, "dtype", lambda: K.key_histogram(torch.arange(6), True, [])),
        (TypeError, "dtype", lambda: K.row_rank(x.double(), True)),
        (ValueError, "buckets", lambda: K.key_histogram(x, True, [65536])),
        (ValueError, "distinct", lambda: K.key_histogram(x, True, [7, 7])),
        (ValueError, "key", lambda: K.key_mask(x, True, -1, 0)),
        (ValueError, "key", lambda: K.key_mask(x, True, 2**32 + 1, 0)),
        (ValueError, "ties", lambda: K.key_mask(x, True, 5, -1)),
        (ValueError, "key", lambda: K.key_find(x, True, 2**32, 1)),
        (ValueError, "2-D", lambda: K.row_select(x.reshape(-1), True, [1])),
        (ValueError, r"ks\[1\] = 7", lambda: K.row_select(x, True, [1, 7])),
        (ValueError, "k = -1", lambda: K.row_topk_mask(x, True, -1)),
        (ValueError, "2-D", lambda: K.row_rank(x.reshape(2, 2, 6), True)),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
@pytest.mark.parametrize("magnitude", [True, False], ids=["mag", "signed"])
def test_cuda_matches_reference(magnitude):
    """Compiled kernels (tl.sort chunks of up to 4096, merge passes beyond) against the reference on CPU."""
    for kind, shape, dtype in [("tied", (300, 16), torch.bfloat16), ("specials", (64, 300), torch.float32),
                               ("random", (8, 5000), torch.float16), ("tied", (3, 20000), torch.bfloat16)]:
        check_rows(make(kind, shape, dtype, seed=1), magnitude, "cuda")
    for kind, shape, dtype in [("tied", (1 << 20,), torch.bfloat16), ("specials", (3001, 7), torch.float32)]:
        check_flat(make(kind, shape, dtype, seed=2), magnitude, "cuda")
