"""Exact order statistics by radix select (DESIGN.md section 4).

Every float maps to an order-preserving uint32 key (reference.selection.order_keys; magnitude keys for
abs=True). A whole tensor is selected with two histogram passes: the top 16 bits of every key, then the low
16 bits inside the one bucket that holds the wanted rank; nothing is sorted and counts are int64, so there is
no size limit (torch.quantile stops at 2^24 elements). Histograms add, which is what StreamingThreshold and
its all_reduce build on. Rows (dim=...) are selected in parallel, each inside cache.

Results are those of a stable sort: the k-th largest is `torch.sort(x, descending=True, stable=True)[k-1]`
bit for bit (signed zeros included), ties in top-k masks are kept in ascending index order, and `rank` is the
1-based position in the ascending stable order.

NaN policy (argument `nan`): "raise" (default) raises ValueError; "largest" ranks NaN above +inf, like
torch.sort. `quantile` also takes "propagate" (torch.quantile: NaN results where a NaN is present).
Peak extra memory, whole tensor: 2^16-bin histograms per thread; per row: a contiguous copy when `dim` is not
the last contiguous dimension, and per-thread row buffers.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, NamedTuple, Sequence

import torch

from . import _backend, _ops
from .merging import SUPPORTED_DTYPES, _check_tensors
from .reference.selection import BUCKETS, KEEP_NONE, ORDER_NAN_KEY, SIGNED_ZERO_KEY

NAN_POLICIES = ("raise", "largest")
INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")
_NAN_BUCKET = BUCKETS - 1


# --- checks -------------------------------------------------------------------------------------------------

def _check_input(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are float32, bfloat16 and float16")


def _check_nan_policy(nan: str, options=NAN_POLICIES) -> None:
    if nan not in options:
        raise ValueError(f"nan must be one of {options}, got {nan!r}")


def _nan_error(where: str) -> ValueError:
    return ValueError(f"{where} contains NaN; pass nan='largest' to rank NaN above +inf (as torch.sort does)")


def _ops_for(x: torch.Tensor, backend):
    return _ops.primitives(_backend.resolve(backend, x.device))


def _check_k(k, n: int, low: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not low <= k <= n:
        raise ValueError(f"k must lie in [{low}, {n}] for {n} elements, got {k}")
    return k


# --- keys -> values -----------------------------------------------------------------------------------------

def _float_of_key(key: int, magnitude: bool) -> float:
    """The float32 whose key is `key` (+0.0 for the zero key)."""
    if key == ORDER_NAN_KEY:
        return math.nan
    if magnitude:
        bits = key
    else:
        bits = key & 0x7FFFFFFF if key >= SIGNED_ZERO_KEY else key ^ 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# --- whole-tensor radix select --------------------------------------------------------------------------------

def _bin_of_rank(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For 1-based ranks counted from the top bin down: (bin, rank left inside that bin). `hist` is one
    histogram for all ranks (1-D) or one row per rank (2-D)."""
    bins = hist.shape[-1]
    from_top = torch.cumsum(hist.flip(-1), -1).expand(len(ranks), bins).contiguous()  # [p]: top p + 1 bins
    position = torch.searchsorted(from_top, ranks.unsqueeze(-1)).squeeze(-1)  # first p reaching the rank
    above = from_top.gather(-1, (position - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return bins - 1 - position, ranks - torch.where(position > 0, above, 0)


class _Selection(NamedTuple):
    """Keys at descending 1-based ranks: the key, the rank among its ties (index order), the tie count."""

    keys: list[int]
    tie_ranks: list[int]
    ties: list[int]


def _refine(high_hist: torch.Tensor, ranks: list[int], low_hist_of: Callable[[list[int]], torch.Tensor]) -> _Selection:
    """Exact keys at `ranks` from the high histogram and one low-histogram pass over the chosen buckets."""
    rank_t = torch.tensor(ranks, dtype=torch.int64)
    buckets, inner = _bin_of_rank(high_hist.cpu(), rank_t)
    distinct = sorted(set(buckets.tolist()))
    low = low_hist_of(distinct).cpu().reshape(len(distinct), BUCKETS)
    row = torch.tensor([distinct.index(b) for b in buckets.tolist()], dtype=torch.int64)
    lows, tie_ranks = _bin_of_rank(low[row], inner)
    ties = low[row, lows]
    keys = (buckets << 16) | lows
    return _Selection(keys.tolist(), tie_ranks.tolist(), ties.tolist())


def _select_flat(ops, x: torch.Tensor, magnitude: bool, ranks: list[int], nan: str) -> _Selection:
    high = ops.key_histogram(x, magnitude, [])
    if nan == "raise" and int(high[_NAN_BUCKET]) > 0:
        raise _nan_error("x")
    return _refine(high, ranks, lambda buckets: ops.key_histogram(x, magnitude, buckets))


def _value_at(ops, x: torch.Tensor, magnitude: bool, key: int, tie_rank: int) -> torch.Tensor:
    """The element of the descending stable order with `key` and rank `tie_rank` among its ties, as a 0-d tensor
    of x's dtype (its magnitude when magnitude=True). Only a zero needs its index: the sign is not in its key."""
    if not magnitude and key == SIGNED_ZERO_KEY:
        index = int(ops.key_find(x, magnitude, key, tie_rank))
        return x.reshape(-1)[index].clone()
    return torch.tensor(_float_of_key(key, magnitude), dtype=torch.float32).to(x.dtype)


# --- rows -----------------------------------------------------------------------------------------------------

def _rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """x with `dim` moved last, as a contiguous (rows, n) matrix, and the moved shape."""
    moved = x.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous(), moved.shape


def _check_rows_nan(x: torch.Tensor, nan: str) -> None:
    if nan == "raise" and bool(torch.isnan(x).any()):
        raise _nan_error("x")


def _normalize_dim(x: torch.Tensor, dim: int) -> int:
    if x.dim() == 0:
        raise ValueError("dim needs a tensor with at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"dim {dim} is out of range for a {x.dim()}-d tensor")
    return dim % x.dim()


# --- public API -----------------------------------------------------------------------------------------------

def kth_largest(x: torch.Tensor, k: int, *, dim: int | None = None, abs: bool = False, keepdim: bool = False,
                nan: str = "raise", backend: str | None = None) -> torch.Tensor:
    """The k-th largest element (k = 1 is the maximum), or of |x| with abs=True, exactly.

    dim=None selects over the whole tensor and returns a 0-d tensor; an int selects along that dimension
    (every row in parallel) and drops it unless keepdim. Equal to
    `torch.sort(x, dim, descending=True, stable=True).values[k-1]` bit for bit, in x's dtype.
    """
    _check_input(x)
    _check_nan_policy(nan)
    ops = _ops_for(x, backend)
    if dim is None:
        k = _check_k(k, x.numel())
        sel = _select_flat(ops, x, abs, [k], nan)
        return _value_at(ops, x, abs, sel.keys[0], sel.tie_ranks[0])
    dim = _normalize_dim(x, dim)
    k = _check_k(k, x.shape[dim])
    _check_rows_nan(x, nan)
    rows, moved = _rows(x, dim)
    index = ops.row_select(rows, abs, [k])
    values = rows.gather(1, index).reshape(moved[:-1])
    values = values.abs() if abs else values
    return values.unsqueeze(dim) if keepdim else values


def topk_mask(x: torch.Tensor, k: int, *, dim: int | None = None, abs: bool = True, nan: str = "raise",
              backend: str | None = None) -> torch.Tensor:
    """Boolean mask of exactly the k largest elements (|x| by default), ties kept in ascending index order
    (flat index for dim=None, index along `dim` otherwise)."""
    _check_input(x)
    _check_nan_policy(nan)
    ops = _ops_for(x, backend)
    if dim is None:
        k = _check_k(k, x.numel(), low=0)
        if k == 0:
            if nan == "raise":
                _check_rows_nan(x, nan)
            return torch.zeros_like(x, dtype=torch.bool)
        sel = _select_flat(ops, x, abs, [k], nan)
        return ops.key_mask(x, abs, sel.keys[0], sel.tie_ranks[0])
    dim = _normalize_dim(x, dim)
    k = _check_k(k, x.shape[dim], low=0)
    _check_rows_nan(x, nan)
    rows, moved = _rows(x, dim)
    return ops.row_topk_mask(rows, abs, k).reshape(moved).movedim(-1, dim)


def rank(x: torch.Tensor, *, dim: int = -1, abs: bool = True, nan: str = "raise",
         backend: str | None = None) -> torch.Tensor:
    """int64 1-based rank of every element along `dim` in ascending order (of |x| by default), ties by index:
    equal to `argsort(argsort(x, dim, stable=True), dim, stable=True) + 1`."""
    _check_input(x)
    _check_nan_policy(nan)
    dim = _normalize_dim(x, dim)
    _check_rows_nan(x, nan)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    rows, moved = _rows(x, dim)
    return _ops_for(x, backend).row_rank(rows, abs).reshape(moved).movedim(-1, dim)


def _quantile_positions(q: torch.Tensor, n: int, interpolation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ascending positions below/above and lerp weights, computed as torch.quantile does (float32 while
    n - 1 is exact in float32, float64 beyond, where torch.quantile refuses to run)."""
    dtype = torch.float32 if n - 1 <= 2**24 else torch.float64
    ranks = q.to(dtype) * (n - 1)
    if interpolation == "lower":
        ranks = ranks.floor()
    elif interpolation == "higher":
        ranks = ranks.ceil()
    elif interpolation == "nearest":
        ranks = ranks.round()
    below = ranks.to(torch.int64)
    above = ranks.ceil().to(torch.int64)
    weights = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks - below
    return below, above, weights.to(torch.float32)


def _check_q(q) -> tuple[torch.Tensor, bool]:
    scalar = not isinstance(q, (torch.Tensor, Sequence)) or (isinstance(q, torch.Tensor) and q.dim() == 0)
    q_t = torch.as_tensor(q, dtype=torch.float64).reshape(-1).cpu()
    if q_t.numel() == 0 or bool(((q_t < 0) | (q_t > 1) | torch.isnan(q_t)).any()):
        raise ValueError(f"q must hold values in [0, 1], got {q}")
    return q_t, scalar


def quantile(x: torch.Tensor, q, *, dim: int | None = None, interpolation: str = "linear", keepdim: bool = False,
             nan: str = "raise", backend: str | None = None) -> torch.Tensor:
    """torch.quantile's results without its 2^24-element limit (counts are int64: any size works).

    q: a float or a 1-D sequence/tensor of floats in [0, 1] (then the result has a leading q dimension, as in
    torch.quantile). Values are interpolated in float32 and returned in x's dtype. nan: "raise" (default),
    or "propagate" (torch.quantile: NaN wherever the reduced set holds a NaN).
    """
    _check_input(x)
    _check_nan_policy(nan, ("raise", "propagate"))
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    q_t, scalar = _check_q(q)
    ops = _ops_for(x, backend)
    if dim is None:
        result = _quantile_flat(ops, x, q_t, interpolation, nan)
        if keepdim:
            result = result.reshape(result.shape + (1,) * x.dim())
    else:
        dim = _normalize_dim(x, dim)
        result = _quantile_rows(ops, x, q_t, dim, interpolation, nan, keepdim)
    return result[0] if scalar else result


def _interpolate(low: torch.Tensor, high: torch.Tensor, weights: torch.Tensor, interpolation: str) -> torch.Tensor:
    if interpolation not in ("linear", "midpoint"):
        return low.float()  # as torch.quantile: no lerp, which would turn -0.0 into +0.0
    return torch.lerp(low.float(), high.float(), weights.to(low.device))


def _quantile_flat(ops, x, q_t, interpolation, nan) -> torch.Tensor:
    n = x.numel()
    if n == 0:
        raise ValueError("quantile() needs a non-empty tensor, got 0 elements")
    below, above, weights = _quantile_positions(q_t, n, interpolation)
    positions = sorted(set(below.tolist()) | set(above.tolist()))
    high = ops.key_histogram(x, False, [])
    if int(high[_NAN_BUCKET]) > 0:
        if nan == "raise":
            raise _nan_error("x")
        return torch.full((len(q_t),), math.nan, dtype=x.dtype, device=x.device)
    # Ascending position j is descending rank n - j; its tie rank counts ascending, i.e. from the other end.
    sel = _refine(high, [n - j for j in positions], lambda buckets: ops.key_histogram(x, False, buckets))
    values = {j: _value_at(ops, x, False, key, ties - tie_rank + 1)
              for j, key, tie_rank, ties in zip(positions, sel.keys, sel.tie_ranks, sel.ties)}
    low = torch.stack([values[j] for j in below.tolist()])
    up = torch.stack([values[j] for j in above.tolist()])
    return _interpolate(low, up, weights, interpolation).to(x.dtype).to(x.device)


def _ascending_zero_fix(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Selected zeros replaced by the zero at that ascending position (a zero's sign is not in its key, and the
    descending order lists tied zeros the other way round)."""
    hit = (values == 0).any(dim=1)
    if not bool(hit.any()):
        return values
    sub = rows[hit]
    zeros_seen = torch.cumsum((sub == 0).to(torch.int64), 1)
    zero_rank = positions[hit] - (sub < 0).sum(1, keepdim=True)  # 0-based inside each row's zero group
    index = torch.searchsorted(zeros_seen, (zero_rank + 1).clamp(min=1)).clamp(max=sub.shape[1] - 1)
    fixed = values.clone()
    fixed[hit] = torch.where(values[hit] == 0, sub.gather(1, index), values[hit])
    return fixed


def _quantile_rows(ops, x, q_t, dim, interpolation, nan, keepdim) -> torch.Tensor:
    n = x.shape[dim]
    if n == 0:
        raise ValueError(f"quantile() needs a non-empty dimension, dim {dim} has size 0")
    below, above, weights = _quantile_positions(q_t, n, interpolation)
    rows, moved = _rows(x, dim)
    has_nan = torch.isnan(rows).any(1)
    if nan == "raise" and bool(has_nan.any()):
        raise _nan_error("x")
    positions = torch.cat([below, above])  # ascending, 0-based
    index = ops.row_select(rows, False, (n - positions).tolist())
    values = _ascending_zero_fix(rows, positions.to(rows.device).expand(rows.shape[0], -1), rows.gather(1, index))
    nq = len(q_t)
    result = _interpolate(values[:, :nq], values[:, nq:], weights.reshape(1, -1), interpolation)
    result = torch.where(has_nan.reshape(-1, 1), math.nan, result)
    result = result.t().reshape((nq,) + moved[:-1])
    if keepdim:
        result = result.unsqueeze(dim + 1)
    return result.to(x.dtype)


# --- streaming, many tensors, several processes --------------------------------------------------------------

class StreamingThreshold:
    """The exact k-th largest value (|x| by default) across many tensors fed one at a time.

    `update(t)` adds each tensor's 2^16-bin histogram of key top bits; `resolve(tensors)` reads the tensors once
    more (a Sequence, or a callable i -> tensor i, in update order) to refine inside the one bucket that holds
    rank k. Memory beyond the tensor being read: two int64 histograms and a few counts per tensor. Give k, or
    a density (k = int(density * total elements), resolved after every update / all_reduce).

    With torch.distributed, call `all_reduce(group)` on every rank after its updates: the histograms and counts
    are summed, and `resolve` then sums the refine histograms too, so every rank gets the same global answer.
    Ties at the threshold are ordered by (process rank, tensor order, flat index).
    """

    def __init__(self, k: int | None = None, *, density: float | None = None, abs: bool = True,
                 nan: str = "raise", backend: str | None = None):
        if (k is None) == (density is None):
            raise ValueError("give exactly one of k and density")
        if density is not None and not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        _check_nan_policy(nan)
        self.k_requested, self.density, self.magnitude, self.nan, self.backend = k, density, abs, nan, backend
        self.high = torch.zeros(BUCKETS, dtype=torch.int64)
        self.numels: list[int] = []
        self.total = 0
        self._group = None
        self._reduced = False

    @property
    def count(self) -> int:
        """Number of tensors fed to update()."""
        return len(self.numels)

    def update(self, t: torch.Tensor) -> "StreamingThreshold":
        if self._reduced:
            raise RuntimeError("update() after all_reduce(): every update must come before the reduction")
        _check_input(t, f"tensor {self.count}")
        self.high += _ops_for(t, self.backend).key_histogram(t, self.magnitude, []).cpu()
        self.numels.append(t.numel())
        self.total += t.numel()
        return self

    def all_reduce(self, group=None) -> "StreamingThreshold":
        import torch.distributed as dist

        packed = torch.cat([self.high, torch.tensor([self.total], dtype=torch.int64)])
        dist.all_reduce(packed, group=group)
        self.high, self.total = packed[:-1].clone(), int(packed[-1])
        self._group, self._reduced = group, True
        return self

    @property
    def k(self) -> int:
        k = self.k_requested if self.k_requested is not None else int(self.density * self.total)
        if k > self.total:
            raise ValueError(f"k = {k} exceeds the {self.total} elements seen")
        return k

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._reduced:
            import torch.distributed as dist

            dist.all_reduce(t, group=self._group)
        return t

    def resolve(self, tensors, *, k: int | None = None) -> "Threshold":
        """The exact threshold, after one refine pass over `tensors` (the same tensors, in update order).
        k overrides the k given at construction (histograms are independent of k: one set serves many k)."""
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.total:
                raise ValueError(f"k must be an int in [0, {self.total}], got {k!r}")
        else:
            k = self.k
        if self.nan == "raise" and int(self.high[_NAN_BUCKET]) > 0:
            raise _nan_error("a tensor fed to StreamingThreshold")
        if k == 0:
            return Threshold(KEEP_NONE, math.nan, 0, [0] * self.count, self)
        tensor_at = tensors if callable(tensors) else tensors.__getitem__
        per_tensor_lows: list[tuple[torch.Tensor, torch.Tensor]] = []  # non-zero (bins, counts): small

        def low_hist(buckets: list[int]) -> torch.Tensor:
            total = torch.zeros((len(buckets), BUCKETS), dtype=torch.int64)
            for i in range(self.count):
                t = tensor_at(i)
                if t.numel() != self.numels[i]:
                    raise ValueError(f"tensor {i} has {t.numel()} elements at resolve() but had {self.numels[i]} "
                                     f"at update(): pass the same tensors in the same order")
                low = _ops_for(t, self.backend).key_histogram(t, self.magnitude, buckets).cpu()
                del t  # before the next tensor is read: one tensor in memory at a time
                bins = low[0].nonzero().reshape(-1)
                per_tensor_lows.append((bins, low[0, bins]))
                total += low
            return self._reduce(total)

        sel = _refine(self.high, [k], low_hist)
        key, tie_rank = sel.keys[0], sel.tie_ranks[0]
        ties_here = [int(counts[bins == (key & 0xFFFF)].sum()) for bins, counts in per_tensor_lows]
        return Threshold(key, _float_of_key(key, self.magnitude), self._local_ties_kept(tie_rank, ties_here),
                         ties_here, self)

    def _local_ties_kept(self, tie_rank: int, ties_here: list[int]) -> int:
        """How many of this process's ties at the key are kept: ties are taken in process-rank order."""
        if not self._reduced:
            return tie_rank
        import torch.distributed as dist

        world, me = dist.get_world_size(self._group), dist.get_rank(self._group)
        mine = torch.zeros(world, dtype=torch.int64)
        mine[me] = sum(ties_here)
        before = int(self._reduce(mine)[:me].sum())
        return min(max(tie_rank - before, 0), sum(ties_here))


class Threshold:
    """A resolved StreamingThreshold: the k-th key and value, and how ties at it are split among tensors."""

    def __init__(self, key: int, value: float, ties_kept: int, ties_per_tensor: list[int], source):
        self.key, self.value, self.ties_kept, self.ties_per_tensor = key, value, ties_kept, ties_per_tensor
        self._source = source

    def __repr__(self) -> str:
        return f"Threshold(value={self.value!r}, key={self.key:#x}, ties_kept={self.ties_kept})"

    def ties_kept_per_tensor(self) -> list[int]:
        """Ties at the key kept in each of this process's tensors (in order, lower flat index first)."""
        left, kept = self.ties_kept, []
        for ties in self.ties_per_tensor:
            kept.append(min(left, ties))
            left -= kept[-1]
        return kept

    def mask(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """The top-k mask restricted to tensor i (the same tensor that was fed i-th)."""
        src = self._source
        return _ops_for(t, src.backend).key_mask(t, src.magnitude, self.key, self.ties_kept_per_tensor()[i])


def delta_topk_thresholds(base: torch.Tensor | None, tensors, ks, *, backend: str | None = None) -> torch.Tensor:
    """Exact magnitude top-k of each task vector d_i = tensors[i] - base (or tensors[i] when base is None).

    Returns int64 (N, 2) rows (key, cutoff): element j of d_i is among its k_i largest magnitudes (ties in
    ascending index order) iff mkey(d_ij) > key or (mkey(d_ij) == key and j <= cutoff), where mkey is the
    bit pattern of |d_ij| (NaN ranks above +inf). k_i == 0 gives (2**32, -1).
    """
    tensors = _check_tensors(base, tensors)
    ks = [int(k) for k in ks]
    if len(ks) != len(tensors):
        raise ValueError(f"ks has {len(ks)} entries but there are {len(tensors)} tensors")
    numel = tensors[0].numel()
    for i, k in enumerate(ks):
        if not 0 <= k <= numel:
            raise ValueError(f"ks[{i}] must lie in [0, {numel}], got {k}")
    ref = base if base is not None else tensors[0]
    return _ops.primitives(_backend.resolve(backend, ref.device)).delta_topk_thresholds(base, tensors, ks)
