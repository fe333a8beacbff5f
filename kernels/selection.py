"""Triton order-statistics primitives on order-preserving keys, plus thin launchers.

The launchers have the signatures and return values of ``pykernels.reference.selection`` (key_histogram,
key_mask, key_find, row_select, row_topk_mask, row_rank); docs/PRIMITIVES.md has the exact semantics.
Results are bit-identical to the reference (they are integers and masks). This module imports only torch and
triton, so it works as ``pykernels.kernels.selection`` and standalone.

Keys
----
``_order_key`` computes the uint32 order key of an element (held in int64) from the bits of its float32 value:
fp32 is loaded as raw int32 bits, bf16 as raw int16 bits widened by a shift (the interpreter's bf16 cast
flushes subnormals), fp16 through an exact fp16 -> fp32 conversion. NaN -> 0xFFFFFFFF; magnitude keys
``bits & 0x7FFFFFFF``; signed keys ``~bits`` (negative), ``bits | 0x80000000`` (positive), 0x80000000 (either
zero). All key arithmetic is int64 with explicit int64 constants (no signed-shift or uint32-literal pitfalls).

Whole-tensor ops (flat row-major, int64 offsets, one program per ``_BLOCK`` elements)
------------------------------------------------------------------------------------
* key_histogram: atomic adds of 1 into int64 bins (duplicate indices in one atomic are counted one by one,
  also by the interpreter). Without buckets, a block whose elements all share one ``high`` digit (zeros,
  constants) adds its count with a single atomic. With buckets, a 65536-entry int32 table maps ``high`` to the
  output row (-1: not requested), so one pass serves any number of buckets.
* key_mask: ``key > k`` elements need no context; ties at ``k`` are kept in flat index order by counting the
  ties of each block, an exclusive prefix sum over the block counts (torch), and a second kernel that keeps a
  tie iff prefix + in-block position < ties. ties == 0 and ties >= numel skip the counting pass.
* key_find: the same per-block tie counts, a cumulative sum and a ``searchsorted`` (torch, on the device, no
  host sync) pick the block holding the rank-th tie; one program scans that block.

Row ops (one row of length n < 2^31; no other limit)
----------------------------------------------------
Each element gets a unique int64 composite ``(hi << 32) | index``, ``hi = key - 2^31`` (ascending key order, for
row_rank) or ``hi = 0x7FFFFFFF - key`` (descending key order, for row_select / row_topk_mask); sorting the
composites ascending gives exactly the stable order (equal keys by ascending index) and the index is the low 32
bits. Composites are signed int64, so no uint64 is needed anywhere.
  1. Chunk sort: chunks of CH = min(next_power_of_2(n), chunk limit) elements; one program sorts one chunk of
     several consecutive rows when rows are short (a tile of ~4096 elements). On a GPU with ``tl.sort``
     (bitonic along the last dimension; CH <= ``_BITONIC_CHUNK``; compiled for sm_90 with at most 152
     registers, spills <= 8 bytes). Under the interpreter, whose ``tl.sort`` costs ~1.5 s per 1024 elements, by
     counting: position = number of composites of the chunk smaller than the element (CH <= ``_COUNT_CHUNK``;
     composites are unique, so this is exact). Tests run both under the interpreter (``_SORT_IMPL``).
  2. Merge passes (rows longer than CH): runs of length CH, 2CH, 4CH, ... are merged pairwise; an element's
     position in the merged run is its position in its own run plus the number of elements of the partner run
     smaller than it (a branch-free binary search, exact because composites are unique). A program takes
     ``_MERGE_BLOCK`` consecutive elements of the flat (rows * n) buffer.
  3. The last stage writes the result directly: row_rank scatters ``position + 1`` to ``index``,
     row_topk_mask scatters ``position < k``; row_select keeps the sorted composites and gathers the requested
     positions (torch).
Peak extra memory of a row op: two int64 buffers of the input's size (one when a row fits one chunk; none for
row_rank / row_topk_mask then).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------
# Fixed sizes (module constants; tests may shrink them to exercise multi-block / multi-pass paths).
# ----------------------------------------------------------------------------------------------------------
_BLOCK = 1024  # elements per program of the whole-tensor kernels
_MERGE_BLOCK = 1024  # elements per program of a merge pass
_BITONIC_CHUNK = 4096  # longest chunk sorted by tl.sort in one program (GPU; 8 warps: 128 registers)
_BITONIC_TILE = 4096  # elements per chunk-sort program (several short rows per program)
_COUNT_CHUNK = 512  # longest chunk sorted by counting in one program (interpreter)
_COUNT_TILE = 4096  # elements per counting program
_COUNT_CUBE = 1 << 18  # comparisons per counting program (rows x chunk x chunk)
_MIN_CHUNK = 16
_NUM_WARPS = 4
_SORT_IMPL = None  # None: "count" under TRITON_INTERPRET=1, "bitonic" otherwise; tests may force either

_BUCKETS = 1 << 16
_KEY_LIMIT = 1 << 32  # key_mask's "select nothing above"
_MAX_ROW = (1 << 31) - 1  # the index lives in the low 32 bits of a composite; positions are int32 in kernels
_INT64_MAX = (1 << 63) - 1

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODE_STORE, _MODE_RANK, _MODE_TOPK = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_bits(x_ptr, offs, mask):
    """int32 bits of float32(x[offs]) (0 where masked): fp32 raw, bf16 widened from its bits, fp16 converted."""
    if x_ptr.dtype.element_ty == tl.float32:
        bits = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + offs, mask=mask, other=0)
    elif x_ptr.dtype.element_ty == tl.bfloat16:
        raw = tl.load(x_ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        bits = (raw.to(tl.int32) & 0xFFFF) << 16
    else:
        bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
    return bits


@triton.jit
def _order_key(bits, MAGNITUDE: tl.constexpr):
    """uint32 order key (as int64) of the float32 with int32 bits `bits` (docs/PRIMITIVES.md)."""
    one = tl.full((), 1, tl.int64)
    sign = one << 31  # 0x80000000
    absb = (bits & 0x7FFFFFFF).to(tl.int64)  # non-negative
    if MAGNITUDE:
        key = absb
    else:
        # x > 0: bits | 0x80000000 = |bits| + 2^31; x < 0: ~bits (as uint32) = 0x7FFFFFFF - |bits|;
        # either zero: 0x80000000.
        key = tl.where(bits < 0, (sign - 1) - absb, absb + sign)
        key = tl.where(absb == 0, sign, key)
    return tl.where(absb > 0x7F800000, (sign << 1) - 1, key)  # NaN -> 0xFFFFFFFF


@triton.jit
def _keys(x_ptr, offs, mask, MAGNITUDE: tl.constexpr):
    return _order_key(_load_bits(x_ptr, offs, mask), MAGNITUDE)


# ----------------------------------------------------------------------------------------------------------
# Whole-tensor kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _hist_high_kernel(x_ptr, hist_ptr, numel, MAGNITUDE: tl.constexpr, BLOCK: tl.constexpr):
    """hist[key >> 16] += 1."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    high = _keys(x_ptr, offs, mask, MAGNITUDE) >> 16
    lo = tl.min(tl.where(mask, high, 1 << 16), 0)
    hi = tl.max(tl.where(mask, high, -1), 0)
    if lo == hi:  # one digit in the whole block (zeros, constants): one atomic instead of BLOCK colliding ones
        tl.atomic_add(hist_ptr + lo, tl.sum(mask.to(tl.int64), 0), sem="relaxed")
    else:
        tl.atomic_add(hist_ptr + high, tl.full((BLOCK,), 1, tl.int64), mask=mask, sem="relaxed")


@triton.jit
def _hist_low_kernel(x_ptr, slot_ptr, hist_ptr, numel, MAGNITUDE: tl.constexpr, BLOCK: tl.constexpr):
    """hist[slot[key >> 16], key & 0xFFFF] += 1 where slot[key >> 16] >= 0 (a requested bucket)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    key = _keys(x_ptr, offs, mask, MAGNITUDE)
    slot = tl.load(slot_ptr + (key >> 16), mask=mask, other=-1).to(tl.int64)
    hit = mask & (slot >= 0)
    tl.atomic_add(hist_ptr + slot * 65536 + (key & 0xFFFF), tl.full((BLOCK,), 1, tl.int64), mask=hit,
                  sem="relaxed")


@triton.jit(do_not_specialize=["key"])
def _tie_count_kernel(x_ptr, count_ptr, key, numel, MAGNITUDE: tl.constexpr, BLOCK: tl.constexpr):
    """count[block] = number of elements of the block whose key equals `key`."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tie = mask & (_keys(x_ptr, offs, mask, MAGNITUDE) == key.to(tl.int64))
    tl.store(count_ptr + pid, tl.sum(tie.to(tl.int32), 0))


@triton.jit(do_not_specialize=["key", "ties"])
def _key_mask_kernel(x_ptr, out_ptr, prefix_ptr, key, ties, numel, MAGNITUDE: tl.constexpr, TIES: tl.constexpr,
                     BLOCK: tl.constexpr):
    """out = key' > key, or key' == key and (TIES 0: never; 1: always; 2: tie position < ties)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    k = _keys(x_ptr, offs, mask, MAGNITUDE)
    key = key.to(tl.int64)
    if TIES == 0:
        keep = k > key
    elif TIES == 1:
        keep = k >= key
    else:
        tie = mask & (k == key)
        # position among all ties in flat index order: ties of earlier blocks + ties before it in this block
        position = tl.load(prefix_ptr + pid) + (tl.cumsum(tie.to(tl.int32), 0) - 1).to(tl.int64)
        keep = (k > key) | (tie & (position < ties.to(tl.int64)))
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["key", "rank"])
def _key_find_kernel(x_ptr, out_ptr, block_ptr, cum_ptr, key, rank, numel, nblocks, MAGNITUDE: tl.constexpr,
                     BLOCK: tl.constexpr):
    """out = flat index of the rank-th tie, which lies in block[0] (-1 when block[0] == nblocks: too few)."""
    b = tl.load(block_ptr)
    found = tl.full((), -1, tl.int64)
    if b < nblocks:
        offs = b * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        tie = mask & (_keys(x_ptr, offs, mask, MAGNITUDE) == key.to(tl.int64))
        before = tl.load(cum_ptr + b - 1, mask=b > 0, other=0)
        running = before + tl.cumsum(tie.to(tl.int32), 0).to(tl.int64)
        hit = tie & (running == rank.to(tl.int64))
        found = tl.max(tl.where(hit, offs, -1), 0)
    tl.store(out_ptr, found)


# ----------------------------------------------------------------------------------------------------------
# Row kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _finish(values, pos, valid, row, dst_ptr, out_ptr, k, MODE: tl.constexpr):
    """Element with composite `values` sits at in-row position `pos` (int64) of the (partially) sorted row."""
    if MODE == 0:
        tl.store(dst_ptr + row + pos, values, mask=valid)
    else:
        index = values & 0xFFFFFFFF
        if MODE == 1:
            tl.store(out_ptr + row + index, pos + 1, mask=valid)
        else:
            tl.store(out_ptr + row + index, (pos < k).to(tl.uint8), mask=valid)


@triton.jit(do_not_specialize=["k"])
def _chunk_sort_kernel(x_ptr, dst_ptr, out_ptr, rows, n, nchunks, k, MAGNITUDE: tl.constexpr,
                       DESCENDING: tl.constexpr, MODE: tl.constexpr, BITONIC: tl.constexpr, ROWS: tl.constexpr,
                       CHUNK: tl.constexpr):
    """Sort the composites of chunk c of ROWS consecutive rows ascending (positions relative to the row), then
    _finish. Padding (past the row end or the last row) gets INT64_MAX, which sorts after every composite."""
    pid = tl.program_id(0)
    g = pid // nchunks
    c = pid % nchunks
    r = g.to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    cols = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)[None, :]  # [1, CHUNK]
    mask = (r < rows) & (cols < n)
    row = r * n
    key = _keys(x_ptr, row + cols, mask, MAGNITUDE)
    if DESCENDING:
        hi = 0x7FFFFFFF - key  # larger key first
    else:
        hi = key - (tl.full((), 1, tl.int64) << 31)
    comp = tl.where(mask, (hi << 32) | cols, 9223372036854775807)
    if BITONIC:
        values = tl.sort(comp)  # along the last dimension: each row's chunk on its own
        pos = cols + tl.zeros((ROWS, CHUNK), tl.int64)
        valid = values != 9223372036854775807
    else:
        smaller = comp[:, None, :] < comp[:, :, None]  # [row, i, j]: composite j < composite i
        pos = c.to(tl.int64) * CHUNK + tl.sum(smaller.to(tl.int32), 2).to(tl.int64)
        values = comp
        valid = mask
    _finish(values, pos, valid, row, dst_ptr, out_ptr, k, MODE)


@triton.jit(do_not_specialize=["k"])
def _merge_kernel(src_ptr, dst_ptr, out_ptr, total, n, run, steps, k, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Merge the sorted runs [2j*run, (2j+1)*run) and [(2j+1)*run, (2j+2)*run) of every row, then _finish.
    Programs take BLOCK consecutive elements of the flat (rows * n) buffer, across row ends."""
    pid = tl.program_id(0)
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < total
    values = tl.load(src_ptr + flat, mask=mask, other=0)
    row = (flat // n) * n
    i = flat - row
    run_id = i // run
    own_start = run_id * run
    partner_start = (run_id ^ 1) * run
    partner_len = tl.maximum(tl.minimum(n - partner_start, run), 0)
    # count = number of partner elements smaller than `values` (binary search over power-of-two strides)
    count = tl.zeros((BLOCK,), tl.int64)
    for t in range(steps):
        s = run >> t
        probe = count + s
        inside = mask & (probe <= partner_len)
        other = tl.load(src_ptr + row + partner_start + probe - 1, mask=inside, other=0)
        count = tl.where(inside & (other < values), probe, count)
    pos = (run_id & ~1) * run + (i - own_start) + count
    _finish(values, pos, mask, row, dst_ptr, out_ptr, k, MODE)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _check_x(x, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a Tensor")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{what}: x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    return x.contiguous()


def _grid(numel):
    return (triton.cdiv(numel, _BLOCK),)


def key_histogram(x, magnitude, buckets) -> torch.Tensor:
    """int64 (65536,) counts of key >> 16, or (len(buckets), 65536) counts of key & 0xFFFF per requested bucket."""
    x = _check_x(x, "key_histogram")
    buckets = [int(b) for b in buckets]
    magnitude = bool(magnitude)
    numel = x.numel()
    if not buckets:
        hist = torch.zeros(_BUCKETS, dtype=torch.int64, device=x.device)
        if numel:
            _hist_high_kernel[_grid(numel)](x, hist, numel, MAGNITUDE=magnitude, BLOCK=_BLOCK,
                                            num_warps=_NUM_WARPS)
        return hist
    for j, b in enumerate(buckets):
        if not 0 <= b < _BUCKETS:
            raise ValueError(f"key_histogram: buckets[{j}] = {b} is outside [0, 65535]")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"key_histogram: buckets must be distinct, got {buckets}")
    hist = torch.zeros((len(buckets), _BUCKETS), dtype=torch.int64, device=x.device)
    if numel:
        slot = torch.full((_BUCKETS,), -1, dtype=torch.int32)
        slot[torch.tensor(buckets, dtype=torch.int64)] = torch.arange(len(buckets), dtype=torch.int32)
        _hist_low_kernel[_grid(numel)](x, slot.to(x.device), hist, numel, MAGNITUDE=magnitude, BLOCK=_BLOCK,
                                       num_warps=_NUM_WARPS)
    return hist


def _tie_counts(x, magnitude, key):
    numel = x.numel()
    counts = torch.empty(triton.cdiv(numel, _BLOCK), dtype=torch.int32, device=x.device)
    _tie_count_kernel[_grid(numel)](x, counts, key, numel, MAGNITUDE=magnitude, BLOCK=_BLOCK,
                                    num_warps=_NUM_WARPS)
    return counts.to(torch.int64)


def key_mask(x, magnitude, key, ties) -> torch.Tensor:
    """bool, shape of x: key' > key, or key' == key among the first `ties` such elements in flat index order."""
    shape = x.shape
    x = _check_x(x, "key_mask")
    key, ties, magnitude = int(key), int(ties), bool(magnitude)
    if not 0 <= key <= _KEY_LIMIT:
        raise ValueError(f"key_mask: key must be in [0, 2^32], got {key}")
    if ties < 0:
        raise ValueError(f"key_mask: ties must be >= 0, got {ties}")
    numel = x.numel()
    out = torch.empty(shape, dtype=torch.bool, device=x.device)
    if numel == 0:
        return out
    if key == _KEY_LIMIT:  # no key reaches 2^32: nothing selected
        return out.fill_(False)
    if ties == 0:
        mode, prefix = 0, out  # prefix unused
    elif ties >= numel:
        mode, prefix = 1, out
    else:
        mode = 2
        counts = _tie_counts(x, magnitude, key)
        prefix = (torch.cumsum(counts, 0) - counts).contiguous()  # ties of the earlier blocks
    _key_mask_kernel[_grid(numel)](x, out.view(torch.uint8), prefix, key, ties, numel, MAGNITUDE=magnitude,
                                   TIES=mode, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


def key_find(x, magnitude, key, rank) -> torch.Tensor:
    """int64 0-d: flat index of the rank-th (1-based) element whose key == key; -1 if there are fewer."""
    x = _check_x(x, "key_find")
    key, rank, magnitude = int(key), int(rank), bool(magnitude)
    if not 0 <= key < _KEY_LIMIT:
        raise ValueError(f"key_find: key must be in [0, 2^32 - 1], got {key}")
    numel = x.numel()
    if numel == 0 or not 1 <= rank <= numel:
        return torch.tensor(-1, dtype=torch.int64, device=x.device)
    cum = torch.cumsum(_tie_counts(x, magnitude, key), 0)
    block = torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64, device=x.device))  # first cum >= rank
    out = torch.empty((), dtype=torch.int64, device=x.device)
    _key_find_kernel[(1,)](x, out, block, cum, key, rank, numel, cum.numel(), MAGNITUDE=magnitude, BLOCK=_BLOCK,
                           num_warps=_NUM_WARPS)
    return out


def _check_rows(x, what):
    x = _check_x(x, what)
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D (rows, n), got shape {tuple(x.shape)}")
    if x.shape[1] > _MAX_ROW:
        raise ValueError(f"{what}: rows must hold fewer than 2^31 elements, got {x.shape[1]}")
    return x


def _sort_impl():
    if _SORT_IMPL is not None:
        return _SORT_IMPL
    return "count" if os.environ.get("TRITON_INTERPRET") == "1" else "bitonic"


def _row_sort(x, magnitude, descending, mode, out, k=0):
    """Sort the composites of every row; the last stage runs `mode` (store: returns the sorted composites)."""
    rows, n = x.shape
    bitonic = _sort_impl() == "bitonic"
    chunk = max(_MIN_CHUNK, min(triton.next_power_of_2(n), _BITONIC_CHUNK if bitonic else _COUNT_CHUNK))
    # rows per program: a tile of _BITONIC_TILE elements, or a counting cube of _COUNT_CUBE comparisons
    per = _BITONIC_TILE // chunk if bitonic else min(_COUNT_TILE // chunk, _COUNT_CUBE // (chunk * chunk))
    per = max(1, min(per, triton.next_power_of_2(rows)))
    nchunks = triton.cdiv(n, chunk)
    device = x.device
    single = nchunks == 1
    bufs = []
    if mode == _MODE_STORE or not single:
        bufs.append(torch.empty((rows, n), dtype=torch.int64, device=device))
    if out is None:
        out = bufs[0]
    warps = 8 if per * chunk >= 2048 else _NUM_WARPS
    _chunk_sort_kernel[(triton.cdiv(rows, per) * nchunks,)](
        x, bufs[0] if bufs else out, out, rows, n, nchunks, k, MAGNITUDE=magnitude, DESCENDING=descending,
        MODE=mode if single else _MODE_STORE, BITONIC=bitonic, ROWS=per, CHUNK=chunk, num_warps=warps)
    run = chunk
    total = rows * n
    block = max(_MIN_CHUNK, min(triton.next_power_of_2(total), _MERGE_BLOCK))
    while run < n:
        if len(bufs) == 1:
            bufs.append(torch.empty_like(bufs[0]))
        src, dst = bufs
        last = 2 * run >= n
        steps = run.bit_length()  # strides run, run/2, ..., 1
        _merge_kernel[(triton.cdiv(total, block),)](src, dst, out, total, n, run, steps, k,
                                                    MODE=mode if last else _MODE_STORE, BLOCK=block,
                                                    num_warps=_NUM_WARPS)
        bufs = [dst, src]
        run *= 2
    return bufs[0] if mode == _MODE_STORE else out


def row_select(x, magnitude, ks) -> torch.Tensor:
    """int64 (rows, len(ks)): in-row index of the element at 1-based position ks[j] of the descending order."""
    x = _check_rows(x, "row_select")
    rows, n = x.shape
    ks = [int(k) for k in ks]
    for j, k in enumerate(ks):
        if not 1 <= k <= n:
            raise ValueError(f"row_select: ks[{j}] = {k} is outside [1, n] with n = {n}")
    if rows == 0 or not ks:
        return torch.empty((rows, len(ks)), dtype=torch.int64, device=x.device)
    ordered = _row_sort(x, bool(magnitude), True, _MODE_STORE, None)
    cols = torch.tensor([k - 1 for k in ks], dtype=torch.int64, device=x.device)
    return (ordered.index_select(1, cols) & 0xFFFFFFFF).contiguous()


def row_topk_mask(x, magnitude, k) -> torch.Tensor:
    """bool (rows, n): the first k elements of each row's descending stable order."""
    x = _check_rows(x, "row_topk_mask")
    rows, n = x.shape
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"row_topk_mask: k = {k} is outside [0, n] with n = {n}")
    out = torch.empty((rows, n), dtype=torch.bool, device=x.device)
    if k == 0 or k == n or out.numel() == 0:
        return out.fill_(k > 0)
    _row_sort(x, bool(magnitude), True, _MODE_TOPK, out.view(torch.uint8), k)
    return out


def row_rank(x, magnitude) -> torch.Tensor:
    """int64 (rows, n): 1-based position of each element in its row's ascending stable order."""
    x = _check_rows(x, "row_rank")
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    _row_sort(x, bool(magnitude), False, _MODE_RANK, out)
    return out
