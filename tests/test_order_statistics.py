"""Public order statistics (kth_largest, quantile, topk_mask, rank, StreamingThreshold) against sorting and
torch.quantile, on every backend, whole tensor and per row."""
from __future__ import annotations

import math
import os

import pytest
import torch

import pykernels as pk
from conftest import backend_params

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPOLATIONS = ["linear", "lower", "higher", "nearest", "midpoint"]


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 != +0.0 and NaN == NaN in comparisons."""
    return x.contiguous().view({torch.float32: torch.int32}.get(x.dtype, torch.int16))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (-0.0 == +0.0), NaN where the other has NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def sample(kind: str, shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "random":
        x = torch.randn(n, generator=g)
    elif kind == "tied":  # few distinct values: long runs of exact ties
        x = torch.randint(-3, 4, (n,), generator=g).float() / 4
    elif kind == "constant":
        x = torch.full((n,), 0.375)
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind == "signed_zeros":
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[::7] = torch.randn(x[::7].shape, generator=g)
    elif kind == "inf":
        x = torch.randn(n, generator=g)
        x[::5] = float("inf")
        x[1::6] = -float("inf")
        x[2::9] = 1e-41  # subnormal in fp32, 0 in the low-precision dtypes
    else:
        raise ValueError(kind)
    return x.reshape(shape).to(dtype)


KINDS = ["random", "tied", "constant", "zeros", "signed_zeros", "inf"]
SHAPES = [(1,), (2,), (37,), (5, 41), (3, 4, 9)]


def sorted_desc(x: torch.Tensor, dim=None) -> torch.Tensor:
    """The oracle: a stable descending sort of x (signed zeros in index order)."""
    if dim is None:
        return torch.sort(x.reshape(-1), descending=True, stable=True).values
    return torch.sort(x, dim=dim, descending=True, stable=True).values


# --- kth_largest -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kth_largest_whole_tensor_equals_sort(backend, dtype, kind, shape):
    x = sample(kind, shape, dtype)
    n = x.numel()
    for abs_ in (False, True):
        oracle = sorted_desc(x.abs() if abs_ else x)
        for k in sorted({1, 2, n // 2 + 1, n} & set(range(1, n + 1))):
            got = pk.kth_largest(x, k, abs=abs_, backend=backend)
            assert got.shape == () and got.dtype == dtype
            assert torch.equal(bits(got.reshape(1)), bits(oracle[k - 1].reshape(1))), (k, abs_, got, oracle[k - 1])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "tied", "signed_zeros", "inf"])
def test_kth_largest_per_row_equals_sort(backend, dtype, kind):
    x = sample(kind, (6, 5, 13), dtype, seed=3)
    for dim in (-1, 0, 1):
        n = x.shape[dim]
        for abs_ in (False, True):
            oracle = sorted_desc(x.abs() if abs_ else x, dim=dim)
            for k in (1, n // 2 + 1, n):
                got = pk.kth_largest(x, k, dim=dim, abs=abs_, backend=backend)
                want = oracle.select(dim, k - 1)
                assert torch.equal(bits(got), bits(want)), (dim, k, abs_)
                kept = pk.kth_largest(x, k, dim=dim, abs=abs_, keepdim=True, backend=backend)
                assert kept.shape == want.unsqueeze(dim).shape


@pytest.mark.parametrize("backend", backend_params())
def test_kth_largest_non_contiguous(backend):
    x = sample("random", (23, 40), torch.float32)[:, ::3].t()
    assert not x.is_contiguous()
    assert torch.equal(pk.kth_largest(x, 5, backend=backend), sorted_desc(x)[4])
    assert torch.equal(pk.kth_largest(x, 2, dim=0, backend=backend), sorted_desc(x, dim=0)[1])


@pytest.mark.parametrize("backend", backend_params())
def test_nan_policy(backend):
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf")])
    for call in (lambda: pk.kth_largest(x, 1, backend=backend),
                 lambda: pk.kth_largest(x.reshape(2, 2), 1, dim=1, backend=backend),
                 lambda: pk.topk_mask(x, 1, backend=backend),
                 lambda: pk.rank(x, backend=backend),
                 lambda: pk.quantile(x, 0.5, backend=backend)):
        with pytest.raises(ValueError, match="contains NaN"):
            call()
    assert math.isnan(pk.kth_largest(x, 1, nan="largest", backend=backend).item())
    assert pk.kth_largest(x, 2, nan="largest", backend=backend).item() == float("inf")
    assert pk.rank(x, nan="largest", abs=False, backend=backend).tolist() == [2, 4, 1, 3]
    assert math.isnan(pk.quantile(x, 0.1, nan="propagate", backend=backend).item())
    rows = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    got = pk.quantile(rows, 0.5, dim=1, nan="propagate", backend=backend)
    assert got[0].item() == 1.5 and math.isnan(got[1].item())


def test_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 12\]"):
        pk.kth_largest(x, 0)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
        pk.kth_largest(x, 4, dim=1)
    with pytest.raises(ValueError, match=r"k must lie in \[0, 12\]"):
        pk.topk_mask(x, 13)
    with pytest.raises(TypeError, match="k must be an int"):
        pk.kth_largest(x, 1.5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        pk.kth_largest(torch.arange(4), 1)
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        pk.rank(x, dim=2)
    with pytest.raises(ValueError, match=r"q must hold values in \[0, 1\]"):
        pk.quantile(x, 1.5)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        pk.quantile(x, 0.5, interpolation="cubic")
    with pytest.raises(ValueError, match="nan must be one of"):
        pk.kth_largest(x, 1, nan="ignore")
    with pytest.raises(ValueError, match="non-empty"):
        pk.quantile(torch.zeros(0), 0.5)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("backend 'triton' is unavailable (skipped: interpreter allows it)")
        pk.kth_largest(x, 1, backend="triton")


# --- quantile --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_quantile_equals_torch(backend, kind, interpolation):
    x = sample(kind, (7, 19), torch.float32, seed=5)
    qs = [0.0, 0.13, 0.5, 0.77, 1.0]
    for q in qs + [qs]:
        q_arg = torch.tensor(q) if isinstance(q, list) else q
        want = torch.quantile(x, q_arg, interpolation=interpolation)
        got = pk.quantile(x, q, interpolation=interpolation, backend=backend)
        # torch.quantile sorts unstably, so only values are compared with it (-0.0 == +0.0) ...
        assert same_values(got, want), (q, got, want)
        for dim in (0, 1):
            want = torch.quantile(x, q_arg, dim=dim, interpolation=interpolation, keepdim=True)
            got = pk.quantile(x, q, dim=dim, interpolation=interpolation, keepdim=True, backend=backend)
            assert same_values(got, want), (q, dim)
    # ... and the sign of a selected zero with a stable ascending sort.
    if interpolation in ("lower", "higher"):
        stable = torch.sort(x.reshape(-1), stable=True).values
        rounding = math.floor if interpolation == "lower" else math.ceil
        for q in qs:
            want = stable[rounding(torch.tensor(q, dtype=torch.float32).item() * (x.numel() - 1))]
            got = pk.quantile(x, q, interpolation=interpolation, backend=backend)
            assert torch.equal(bits(got.reshape(1)), bits(want.reshape(1))), q
        stable_rows = torch.sort(x, dim=1, stable=True).values
        got = pk.quantile(x, 0.5, dim=1, interpolation=interpolation, backend=backend)
        assert torch.equal(bits(got), bits(stable_rows[:, rounding(0.5 * (x.shape[1] - 1))]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quantile_low_precision_matches_fp32_quantile_rounded(backend, dtype):
    x = sample("random", (301,), dtype)
    for interpolation in INTERPOLATIONS:
        want = torch.quantile(x.float(), 0.3, interpolation=interpolation).to(dtype)
        assert torch.equal(pk.quantile(x, 0.3, interpolation=interpolation, backend=backend), want)


def test_quantile_beyond_torch_limit():
    if not pk._backend.cpp_available():
        pytest.skip("needs the cpp backend for a 2^24+ element tensor")
    n = (1 << 24) + 4  # n - 1 odd: the median lies halfway between two elements
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, 0.5)
    ordered = torch.sort(x).values
    for q in (0.0, 0.25, 0.5, 1.0):
        got = pk.quantile(x, q, interpolation="lower")
        assert got.item() == ordered[int(q * (n - 1))].item()
    pos = 0.5 * (n - 1)  # exact in float64: the two middle values, weight 0.5
    lo, hi = ordered[int(pos)], ordered[int(pos) + 1]
    assert pk.quantile(x, 0.5).item() == torch.lerp(lo, hi, torch.tensor(0.5)).item()


# --- topk_mask and rank ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "tied", "signed_zeros", "inf"])
def test_topk_mask_equals_stable_sort(backend, dtype, kind):
    x = sample(kind, (4, 29), dtype, seed=9)
    for abs_ in (False, True):
        keys = x.float().abs() if abs_ else x.float()
        flat_order = torch.sort(keys.reshape(-1), descending=True, stable=True).indices
        row_order = torch.sort(keys, dim=1, descending=True, stable=True).indices
        for k in (0, 1, 13, 29):
            want = torch.zeros(x.numel(), dtype=torch.bool)
            want[flat_order[:k]] = True
            assert torch.equal(pk.topk_mask(x, k, abs=abs_, backend=backend), want.reshape(x.shape))
            want_rows = torch.zeros(x.shape, dtype=torch.bool).scatter_(1, row_order[:, :k], True)
            assert torch.equal(pk.topk_mask(x, k, dim=1, abs=abs_, backend=backend), want_rows)
            want_cols = torch.zeros(x.shape, dtype=torch.bool).scatter_(
                0, torch.sort(keys, dim=0, descending=True, stable=True).indices[:min(k, 4)], True)
            assert torch.equal(pk.topk_mask(x, min(k, 4), dim=0, abs=abs_, backend=backend), want_cols)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "tied", "signed_zeros", "inf"])
def test_rank_equals_double_argsort(backend, dtype, kind):
    x = sample(kind, (3, 8, 17), dtype, seed=11)
    for dim in (-1, 1, 0):
        for abs_ in (False, True):
            keys = x.float().abs() if abs_ else x.float()
            keys = torch.where(keys == 0, 0.0, keys)  # -0.0 and +0.0 tie
            want = torch.argsort(torch.argsort(keys, dim=dim, stable=True), dim=dim, stable=True) + 1
            got = pk.rank(x, dim=dim, abs=abs_, backend=backend)
            assert got.dtype == torch.int64 and torch.equal(got, want), (dim, abs_)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_and_single(backend):
    assert pk.rank(torch.zeros(0, 5), backend=backend).shape == (0, 5)
    assert pk.topk_mask(torch.zeros(0), 0, backend=backend).shape == (0,)
    one = torch.tensor([-2.5])
    assert pk.kth_largest(one, 1, backend=backend).item() == -2.5
    assert pk.kth_largest(one, 1, abs=True, backend=backend).item() == 2.5
    assert pk.quantile(one, 0.7, backend=backend).item() == -2.5
    assert pk.rank(one, backend=backend).tolist() == [1]


# --- StreamingThreshold ----------------------------------------------------------------------------------------

def _stream_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(17,), (3, 11), (1,), (40, 7), (0,), (5, 5, 2)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.bfloat16]
    out = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        x = torch.randn(shape, generator=g)
        if i % 2:
            x = torch.round(x * 2) / 2  # ties across tensors
        out.append(x.to(dt))
    return out


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("abs_", [True, False])
def test_streaming_threshold_equals_concatenation(backend, abs_):
    tensors = _stream_tensors()
    flat = torch.cat([t.float().reshape(-1) for t in tensors])
    keys = flat.abs() if abs_ else flat
    order = torch.sort(keys, descending=True, stable=True).indices
    for k in (1, 5, 100, flat.numel()):
        st = pk.StreamingThreshold(k, abs=abs_, backend=backend)
        for t in tensors:
            st.update(t)
        th = st.resolve(tensors)
        assert th.value == keys[order[k - 1]].item()
        want = torch.zeros(flat.numel(), dtype=torch.bool)
        want[order[:k]] = True
        got = torch.cat([th.mask(t, i).reshape(-1) for i, t in enumerate(tensors)])
        assert torch.equal(got, want), k


def test_streaming_threshold_density_and_callback():
    tensors = _stream_tensors(1)
    st = pk.StreamingThreshold(density=0.25)
    for t in tensors:
        st.update(t)
    total = sum(t.numel() for t in tensors)
    reads = []
    th = st.resolve(lambda i: reads.append(i) or tensors[i])
    assert reads == list(range(len(tensors)))
    assert sum(th.ties_kept_per_tensor()) == th.ties_kept
    flat = torch.cat([t.float().reshape(-1) for t in tensors]).abs()
    assert th.value == torch.sort(flat, descending=True).values[int(0.25 * total) - 1].item()
    with pytest.raises(ValueError, match="pass the same tensors"):
        st.resolve(list(reversed(tensors)))
    with pytest.raises(ValueError, match="exactly one of k and density"):
        pk.StreamingThreshold()


def _distributed_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensors = _stream_tensors(seed=rank)  # each process holds its own shard of the model
    st = pk.StreamingThreshold(density=0.3)
    for t in tensors:
        st.update(t)
    st.all_reduce()
    th = st.resolve(tensors)
    kept = sum(int(th.mask(t, i).sum()) for i, t in enumerate(tensors))
    torch.save({"value": th.value, "kept": kept}, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_streaming_threshold_all_reduce_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "result")
    mp.spawn(_distributed_worker, args=(2, port, path), nprocs=2, join=True)
    results = [torch.load(f"{path}.{r}") for r in range(2)]
    everything = torch.cat([t.float().reshape(-1) for r in range(2) for t in _stream_tensors(seed=r)]).abs()
    k = int(0.3 * everything.numel())
    assert results[0]["value"] == results[1]["value"] == torch.sort(everything, descending=True).values[k - 1].item()
    assert results[0]["kept"] + results[1]["kept"] == k
