"""Triton kernels of family 1 (task-vector sparsification and fused merging), plus thin launchers.

The launchers have the signatures and return values of ``pykernels.reference.merging`` /
``pykernels.reference.selection``; see /tmp/CONTRACT.md and csrc/common/merge_math.h for the exact semantics.
This module imports only torch and triton, so it works as ``pykernels.kernels.merging`` and standalone.

Design
------
* Models are passed through a small device table of data pointers (int64) and dtype codes
  (0 fp32, 1 bf16, 2 fp16); a kernel casts an address to a typed pointer (``tl.pointer_type``) and
  loops over the models at run time, so any N (1..64) and any mix of dtypes work with one compiled
  kernel and without stacking the models (no N-fold copies). When every model has the same dtype,
  the dtype is a compile-time constant (``DT``) and no per-model branch is emitted.
* All element indices are int64 (``pid.to(tl.int64) * BLOCK``); values are converted to float32
  right after loading and everything is computed in float32 (norms: float64).
* Thresholds (exact magnitude top-k, ties by ascending index) by radix select over the 31-bit
  magnitude key ``bits(d) & 0x7FFFFFFF``:
    1. one pass, all active models: histogram of ``key >> 16`` (32768 buckets) with atomics;
       the launcher finds the bucket holding rank k with a small cumsum;
    2. one pass restricted to that bucket: histogram of ``key & 0xFFFF`` (65536 buckets) plus the
       largest index per low bucket (atomic max); this gives the exact key, and the cutoff whenever all
       ties at the key are kept;
    3. only for models that keep a strict subset of the ties: a pass counting ties per fixed-size chunk,
       a prefix sum over the chunk counts, and one program per such model scanning its one chunk.
* L1 norms: float64 partial sums per fixed-size chunk (one program per chunk and model), then one
  program per (model, column) sums the partials in chunk order: deterministic.
* Fused merge: per element exactly ``merge_element`` of merge_math.h (float32, models in order). With
  sign consensus the kernel visits the models twice (first the elected sign, then the agreeing sum and
  divisor), recomputing each model's value bit-identically instead of holding N values per element.
  Kernels that must not contract a*b+c into an FMA are launched with ``enable_fp_fusion=False``, and
  the division uses ``tl.math.div_rn`` (IEEE round to nearest).
* Band sparsifier (code 3, breadcrumbs): thresholds (N, 4) = two top-k thresholds (a, b) of the same task
  vector; keep above(a) and not above(b), each test exactly the magnitude one (int64 keys and indices).
* Random keep masks: ``tl.rand(model_seed, j)`` with int64 ``j`` (Triton 3.x splits a 64-bit offset into
  the counter words (j mod 2^32, j >> 32), i.e. the documented Philox4x32-10 stream).

Peak extra memory: output + histograms ((A, 32768) + 2 x (A, 65536) int64 for A models with k > 0)
+ per-chunk partials (N x 2 x numel / NORM_CHUNK float64, P x numel / TIE_CHUNK int32) + copies of
non-contiguous inputs (``.contiguous()``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------
# Fixed sizes (module constants; tests may shrink them to exercise multi-chunk paths).
# ----------------------------------------------------------------------------------------------------------
_BLOCK = 1024  # elements per program (and per sub-block of the chunked kernels)
_TIE_CHUNK = 16 * 1024  # elements per tie-count chunk (multiple of _BLOCK)
_NORM_CHUNK = 16 * 1024  # elements per float64 partial sum (multiple of _BLOCK)
_FINAL_BLOCK = 1024  # partials summed per step by the norm finaliser
_NUM_WARPS = 4

_HI_BINS = 1 << 15  # key >> 16 of a 31-bit key
_LO_BINS = 1 << 16  # key & 0xFFFF
_KEEP_NONE = 1 << 32
_GOLDEN64 = 0x9E3779B97F4A7C15
_MAX_MODELS = 64

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bf16_bits_to_f32(bits):
    """Exact bf16 -> float32 from the raw bits: the interpreter's bf16 cast flushes subnormals."""
    return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_as(addr, offs, mask, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """float32 of the ELEM-typed array at address addr (int64), at offs (0 where masked)."""
    if ELEM == tl.bfloat16:
        p = addr.to(tl.pointer_type(tl.int16))
    else:
        p = addr.to(tl.pointer_type(ELEM))
    if ALIGNED:
        p = tl.multiple_of(p, 16)  # lets the compiler vectorise the loads (16-byte aligned base address)
    if ELEM == tl.bfloat16:
        return _bf16_bits_to_f32(tl.load(p + offs, mask=mask, other=0))
    return tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_model(ptrs, dts, m, offs, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """float32 values of model m at offs (0 where masked). DT: uniform dtype code, or -1 (per-model code)."""
    addr = tl.load(ptrs + m)
    if DT == 0:
        x = _load_as(addr, offs, mask, tl.float32, ALIGNED)
    elif DT == 1:
        x = _load_as(addr, offs, mask, tl.bfloat16, ALIGNED)
    elif DT == 2:
        x = _load_as(addr, offs, mask, tl.float16, ALIGNED)
    else:
        code = tl.load(dts + m)
        if code == 0:
            x = _load_as(addr, offs, mask, tl.float32, ALIGNED)
        elif code == 1:
            x = _load_as(addr, offs, mask, tl.bfloat16, ALIGNED)
        else:
            x = _load_as(addr, offs, mask, tl.float16, ALIGNED)
    return x


@triton.jit
def _load_base(base_ptr, offs, mask, HAS_BASE: tl.constexpr):
    if HAS_BASE:
        if base_ptr.dtype.element_ty == tl.bfloat16:
            b = _bf16_bits_to_f32(tl.load(base_ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0))
        else:
            b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(offs.shape, tl.float32)
    return b


@triton.jit
def _delta(x, b, HAS_BASE: tl.constexpr):
    if HAS_BASE:
        d = x - b
    else:
        d = x
    return d


@triton.jit
def _mkey(d):
    """31-bit magnitude key bits(d) & 0x7FFFFFFF as int32 (non-negative), every NaN mapped to 0x7F800001."""
    return tl.minimum(d.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800001)


@triton.jit
def _is_finite(x):
    return _mkey(x) < 0x7F800000


@triton.jit
def _sign(x):
    """torch.sign in float32 (NaN -> 0)."""
    return (x > 0.0).to(tl.float32) - (x < 0.0).to(tl.float32)


@triton.jit
def _cast_out(x, OUT: tl.constexpr):
    """float32 -> output element type, round to nearest even. bf16 by integer arithmetic (exact everywhere,
    also under the interpreter, whose float32 -> bf16 cast truncates); NaN -> 0x7FC0 like torch."""
    if OUT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        hi = tl.where(_mkey(x) > 0x7F800000, 0x7FC0, rounded & 0xFFFF)
        y = hi.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(OUT)
    return y


@triton.jit
def _keep(d, offs, m, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr, SPARSIFIER: tl.constexpr):
    """Sparsifier mask of model m at offs: 0 all, 1 exact top-k threshold, 2 Philox u < p,
    3 band: above (key_a, cutoff_a) and not above (key_b, cutoff_b)."""
    if SPARSIFIER == 1:
        key = tl.load(thr_ptr + 2 * m)
        cutoff = tl.load(thr_ptr + 2 * m + 1)
        mk = _mkey(d).to(tl.int64)
        keep = (mk > key) | ((mk == key) & (offs <= cutoff))
    elif SPARSIFIER == 3:
        key_a = tl.load(thr_ptr + 4 * m)
        cutoff_a = tl.load(thr_ptr + 4 * m + 1)
        key_b = tl.load(thr_ptr + 4 * m + 2)
        cutoff_b = tl.load(thr_ptr + 4 * m + 3)
        mk = _mkey(d).to(tl.int64)
        above_a = (mk > key_a) | ((mk == key_a) & (offs <= cutoff_a))
        above_b = (mk > key_b) | ((mk == key_b) & (offs <= cutoff_b))
        keep = above_a & (~above_b)
    elif SPARSIFIER == 2:
        if tl.load(keepall_ptr + m) != 0:
            keep = offs >= 0
        else:
            seed = tl.load(seeds_ptr + m)
            p = tl.load(probs_ptr + m)
            u = tl.rand(seed, offs)
            keep = u < p
    else:
        keep = offs >= 0
    return keep


# ----------------------------------------------------------------------------------------------------------
# Philox
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _philox_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    u = tl.rand(seed, idx + offset)
    tl.store(out_ptr + idx, u, mask=mask)


def philox_uniform_tensor(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """float32 (n,): Philox uniform of stream ``seed`` at offsets offset .. offset + n - 1 (== tl.rand)."""
    seed, offset, n = int(seed), int(offset), int(n)
    if n < 0:
        raise ValueError(f"philox_uniform: n must be >= 0, got {n}")
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"philox_uniform: seed must be in [0, 2^64), got {seed}")
    if not 0 <= offset or offset + n > (1 << 63):
        raise ValueError(f"philox_uniform: offsets must lie in [0, 2^63), got offset {offset}, n {n}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    # A seed >= 2^63 would be typed uint64; express it as the int64 with the same bits.
    seed_arg = seed - (1 << 64) if seed >= (1 << 63) else seed
    grid = (triton.cdiv(n, _BLOCK),)
    _philox_kernel[grid](out, seed_arg, offset, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


# ----------------------------------------------------------------------------------------------------------
# Radix select kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _hist_hi_kernel(base_ptr, ptrs, dts, sel_ptr, A, hist_ptr, numel,
                    HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """hist[i, key >> 16] += 1 for active model i = 0..A-1 (model index sel[i]); one pass, base read once."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, HAS_BASE)
    ones = tl.full((BLOCK,), 1, tl.int64)
    for i in range(A):
        m = tl.load(sel_ptr + i)
        d = _delta(_load_model(ptrs, dts, m, offs, mask, DT, ALIGNED), b, HAS_BASE)
        hi = (_mkey(d) >> 16).to(tl.int64)
        tl.atomic_add(hist_ptr + tl.cast(i, tl.int64) * 32768 + hi, ones, mask=mask, sem="relaxed")


@triton.jit
def _hist_lo_kernel(base_ptr, ptrs, dts, sel_ptr, bucket_ptr, A, lo_ptr, last_ptr, numel,
                    HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """For keys in bucket[i] (top 16 bits): lo[i, key & 0xFFFF] += 1, last[i, key & 0xFFFF] = max index."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, HAS_BASE)
    ones = tl.full((BLOCK,), 1, tl.int64)
    for i in range(A):
        m = tl.load(sel_ptr + i)
        bucket = tl.load(bucket_ptr + i)
        d = _delta(_load_model(ptrs, dts, m, offs, mask, DT, ALIGNED), b, HAS_BASE)
        key = _mkey(d)
        hit = mask & ((key >> 16).to(tl.int64) == bucket)
        slot = tl.cast(i, tl.int64) * 65536 + (key & 0xFFFF).to(tl.int64)
        tl.atomic_add(lo_ptr + slot, ones, mask=hit, sem="relaxed")
        tl.atomic_max(last_ptr + slot, offs, mask=hit, sem="relaxed")


@triton.jit
def _tie_count_kernel(base_ptr, ptrs, dts, sel_ptr, key_ptr, P, count_ptr, nchunks, numel,
                      HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                      CHUNK: tl.constexpr):
    """count[i, c] = number of elements of chunk c whose key equals key[i] (model sel[i])."""
    c = tl.program_id(0).to(tl.int64)
    start = c * CHUNK
    for i in range(P):
        m = tl.load(sel_ptr + i)
        key = tl.load(key_ptr + i)
        acc = tl.zeros((BLOCK,), tl.int32)
        for s in range(0, CHUNK, BLOCK):
            offs = start + s + tl.arange(0, BLOCK)
            mask = offs < numel
            b = _load_base(base_ptr, offs, mask, HAS_BASE)
            d = _delta(_load_model(ptrs, dts, m, offs, mask, DT, ALIGNED), b, HAS_BASE)
            tie = mask & (_mkey(d).to(tl.int64) == key)
            acc += tie.to(tl.int32)
        tl.store(count_ptr + tl.cast(i, tl.int64) * nchunks + c, tl.sum(acc, 0))


@triton.jit
def _tie_locate_kernel(base_ptr, ptrs, dts, sel_ptr, key_ptr, chunk_ptr, rank_ptr, out_ptr, numel,
                       HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr):
    """out[i] = index of the rank[i]-th (1-based) tie of key[i] inside chunk[i] (model sel[i])."""
    i = tl.program_id(0)
    m = tl.load(sel_ptr + i)
    key = tl.load(key_ptr + i)
    rank = tl.load(rank_ptr + i).to(tl.int32)
    start = tl.load(chunk_ptr + i) * CHUNK
    seen = tl.zeros((), tl.int32)
    best = tl.full((), -1, tl.int64)
    for s in range(0, CHUNK, BLOCK):
        offs = start + s + tl.arange(0, BLOCK)
        mask = offs < numel
        b = _load_base(base_ptr, offs, mask, HAS_BASE)
        d = _delta(_load_model(ptrs, dts, m, offs, mask, DT, ALIGNED), b, HAS_BASE)
        tie = (mask & (_mkey(d).to(tl.int64) == key)).to(tl.int32)
        running = tl.cumsum(tie, 0) + seen
        hit = (tie != 0) & (running == rank)
        best = tl.maximum(best, tl.max(tl.where(hit, offs, -1), 0))
        seen += tl.sum(tie, 0)
    tl.store(out_ptr + i, best)


# ----------------------------------------------------------------------------------------------------------
# L1 norms
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_partial_kernel(base_ptr, ptrs, dts, part_ptr, nchunks, numel, thr_ptr, keepall_ptr, probs_ptr,
                         seeds_ptr, HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr,
                         SPARSIFIER: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """part[m, 0, c] = sum |d| and part[m, 1, c] = sum kept |d| over chunk c, float64."""
    c = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    start = c * CHUNK
    acc_all = tl.zeros((BLOCK,), tl.float64)
    acc_kept = tl.zeros((BLOCK,), tl.float64)
    for s in range(0, CHUNK, BLOCK):
        offs = start + s + tl.arange(0, BLOCK)
        mask = offs < numel
        b = _load_base(base_ptr, offs, mask, HAS_BASE)
        d = _delta(_load_model(ptrs, dts, m, offs, mask, DT, ALIGNED), b, HAS_BASE)
        a = tl.abs(d.to(tl.float64))
        keep = _keep(d, offs, m, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr, SPARSIFIER)
        acc_all += tl.where(mask, a, 0.0)
        acc_kept += tl.where(mask & keep, a, 0.0)
    row = m.to(tl.int64) * 2 * nchunks
    tl.store(part_ptr + row + c, tl.sum(acc_all, 0))
    tl.store(part_ptr + row + nchunks + c, tl.sum(acc_kept, 0))


@triton.jit
def _norm_final_kernel(part_ptr, out_ptr, nchunks, BLOCK: tl.constexpr):
    """out[r] = sum of part[r, :] in chunk order (fixed lanes, then one fixed reduction)."""
    r = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float64)
    for s in range(0, nchunks, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + r * nchunks + idx, mask=idx < nchunks, other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, 0))


# ----------------------------------------------------------------------------------------------------------
# Fused merge
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _model_terms(ptrs, dts, m, offs, mask, b, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr, scales_ptr,
                 weights_ptr, HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr,
                 SPARSIFIER: tl.constexpr, SIGN_SOURCE: tl.constexpr):
    """(weighted, elector, input finite) of model m: s = keep ? d * scale : 0; weighted = w * s."""
    x = _load_model(ptrs, dts, m, offs, mask, DT, ALIGNED)
    d = _delta(x, b, HAS_BASE)
    keep = _keep(d, offs, m, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr, SPARSIFIER)
    scale = tl.load(scales_ptr + m)
    w = tl.load(weights_ptr + m)
    s = tl.where(keep, d * scale, 0.0)
    wd = w * s
    if SIGN_SOURCE == 0:
        e = wd
    else:
        e = s
    return wd, e, _is_finite(x)


@triton.jit
def _fused_merge_kernel(base_ptr, ptrs, dts, out_ptr, numel, N, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr,
                        scales_ptr, weights_ptr, params_ptr,
                        HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr,
                        SPARSIFIER: tl.constexpr, SIGN_SOURCE: tl.constexpr, CONSENSUS: tl.constexpr,
                        DIVISOR: tl.constexpr, NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, HAS_BASE)
    if HAS_BASE:
        finite = _is_finite(b)
    else:
        finite = offs >= 0
    mixed = tl.zeros((BLOCK,), tl.float32)
    if CONSENSUS == 0:
        for m in range(N):
            wd, e, fin = _model_terms(ptrs, dts, m, offs, mask, b, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr,
                                      scales_ptr, weights_ptr, HAS_BASE, DT, ALIGNED, SPARSIFIER,
                                      SIGN_SOURCE)
            finite = finite & fin
            mixed = mixed + wd
        div = tl.load(params_ptr + 1)  # static divisor, already guarded
    else:
        total = tl.zeros((BLOCK,), tl.float32)
        for m in range(N):
            wd, e, fin = _model_terms(ptrs, dts, m, offs, mask, b, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr,
                                      scales_ptr, weights_ptr, HAS_BASE, DT, ALIGNED, SPARSIFIER,
                                      SIGN_SOURCE)
            finite = finite & fin
            if CONSENSUS == 1:
                total = total + e
            else:
                total = total + _sign(e)
        majority = tl.where(total >= 0.0, 1.0, -1.0)
        div = tl.zeros((BLOCK,), tl.float32)
        for m in range(N):
            wd, e, fin = _model_terms(ptrs, dts, m, offs, mask, b, thr_ptr, keepall_ptr, probs_ptr, seeds_ptr,
                                      scales_ptr, weights_ptr, HAS_BASE, DT, ALIGNED, SPARSIFIER,
                                      SIGN_SOURCE)
            agree = _sign(e) == majority
            mixed = mixed + tl.where(agree, wd, 0.0)
            if DIVISOR == 0:
                dw = tl.load(weights_ptr + m)
            else:
                dw = 1.0
            div = div + tl.where(agree, dw, 0.0)
        div = tl.where(div == 0.0, 1.0, div)
    if NORMALIZE:
        mixed = tl.math.div_rn(mixed, div + tl.zeros((BLOCK,), tl.float32))
    if APPLY_LAMBDA:
        out = tl.load(params_ptr) * mixed
    else:
        out = mixed
    if HAS_BASE:
        out = b + out
    out = tl.where((~finite) & _is_finite(out), float("nan"), out)
    tl.store(out_ptr + offs, _cast_out(out, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _model_seed(seed: int, m: int) -> int:
    return (int(seed) + m * _GOLDEN64) % (1 << 63)


def _prepare(base, tensors, what):
    """Validate; return (base or None, contiguous tensors, device, numel, shape)."""
    assert _TIE_CHUNK % _BLOCK == 0 and _NORM_CHUNK % _BLOCK == 0, "chunk sizes must be multiples of _BLOCK"
    tensors = list(tensors)
    n = len(tensors)
    if not 1 <= n <= _MAX_MODELS:
        raise ValueError(f"{what}: need 1 <= len(tensors) <= {_MAX_MODELS}, got {n}")
    first = tensors[0]
    shape, device = first.shape, first.device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: tensors[{i}] is not a Tensor")
        if t.dtype not in _DT_CODES:
            raise TypeError(f"{what}: tensors[{i}] has dtype {t.dtype}; expected float32, bfloat16 or float16")
        if t.shape != shape:
            raise ValueError(f"{what}: tensors[{i}] has shape {tuple(t.shape)}, tensors[0] {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"{what}: tensors[{i}] is on {t.device}, tensors[0] on {device}")
    if base is not None:
        if base.dtype not in _DT_CODES:
            raise TypeError(f"{what}: base has dtype {base.dtype}; expected float32, bfloat16 or float16")
        if base.shape != shape:
            raise ValueError(f"{what}: base has shape {tuple(base.shape)}, tensors {tuple(shape)}")
        if base.device != device:
            raise ValueError(f"{what}: base is on {base.device}, tensors on {device}")
        base = base.contiguous()
    tensors = [t.contiguous() for t in tensors]
    return base, tensors, device, first.numel(), shape


class _Models:
    """Device table of the models' data pointers and dtype codes (keeps the tensors alive)."""

    def __init__(self, tensors, device):
        self.tensors = tensors
        codes = [_DT_CODES[t.dtype] for t in tensors]
        self.ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
        self.dts = torch.tensor(codes, dtype=torch.int32, device=device)
        self.dt = codes[0] if all(c == codes[0] for c in codes) else -1
        self.aligned = all(t.data_ptr() % 16 == 0 for t in tensors)


_THRESHOLD_COLUMNS = {1: (2, "magnitude"), 3: (4, "band")}  # thresholds (N, columns) a sparsifier reads


def _sparsifier_args(sparsifier, thresholds, keep_probs, seed, n, device):
    """Tensors (thresholds int64 (N,2) or (N,4) flattened, keep-all int32, probs fp32, model seeds int64) for
    the kernels. Sparsifier 1 (magnitude) reads (key, cutoff) rows, 3 (band) (key_a, cutoff_a, key_b, cutoff_b)."""
    sparsifier = int(sparsifier)
    if sparsifier not in (0, 1, 2, 3):
        raise ValueError(f"unknown sparsifier code {sparsifier}")
    if sparsifier in _THRESHOLD_COLUMNS:
        columns, name = _THRESHOLD_COLUMNS[sparsifier]
        if thresholds is None:
            raise ValueError(f"sparsifier {sparsifier} ({name}) needs thresholds of shape ({n}, {columns})")
        shape = tuple(torch.as_tensor(thresholds).shape)
        if shape != (n, columns):
            raise ValueError(f"thresholds must have shape ({n}, {columns}) for sparsifier {sparsifier} ({name}), "
                             f"got {shape}")
        thr = torch.as_tensor(thresholds).to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    else:
        thr = torch.zeros(2 * n, dtype=torch.int64, device=device)
    if sparsifier == 2:
        probs = [float(p) for p in keep_probs]
        if len(probs) != n:
            raise ValueError(f"keep_probs must have {n} entries, got {len(probs)}")
        seed = int(seed)
    else:
        probs = [1.0] * n
        seed = 0
    keepall = torch.tensor([1 if p >= 1.0 else 0 for p in probs], dtype=torch.int32, device=device)
    probs_t = torch.tensor(probs, dtype=torch.float32, device=device)
    seeds = torch.tensor([_model_seed(seed, m) for m in range(n)], dtype=torch.int64, device=device)
    return sparsifier, thr, keepall, probs_t, seeds


def _rev_cumsum(h):
    return h.flip(1).cumsum(1).flip(1)


def _gather_or_zero(t, idx):
    """t[i, idx[i]], or 0 where idx[i] is past the end."""
    width = t.shape[1]
    vals = t.gather(1, idx.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    return torch.where(idx < width, vals, torch.zeros_like(vals))


def _same_tensor(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device)


def _distinct_models(tensors):
    """(distinct tensors, index into them of each listed tensor): a tensor listed more than once (the band
    sparsifier's two top-k sizes per model) is read once per histogram pass."""
    distinct, model_of = [], []
    for t in tensors:
        u = next((i for i, d in enumerate(distinct) if _same_tensor(d, t)), len(distinct))
        if u == len(distinct):
            distinct.append(t)
        model_of.append(u)
    return distinct, model_of


def delta_topk_thresholds(base, tensors, ks) -> torch.Tensor:
    """int64 (N, 2): (key, cutoff) of the exact magnitude top-k of each task vector, by radix select.
    Repeated tensors share the first pass (one top-16-bit histogram per distinct tensor)."""
    what = "delta_topk_thresholds"
    tensors = list(tensors)
    n = len(tensors)
    if not 1 <= n <= _MAX_MODELS:
        raise ValueError(f"{what}: need 1 <= len(tensors) <= {_MAX_MODELS}, got {n}")
    distinct, model_of = _distinct_models(tensors)
    try:
        base, tensors, device, numel, _ = _prepare(base, distinct, what)
    except (TypeError, ValueError):
        _prepare(base, list(tensors), what)  # the same error, naming the tensor by its index in the list
        raise
    ks = [int(k) for k in ks]
    if len(ks) != n:
        raise ValueError(f"delta_topk_thresholds: len(ks) = {len(ks)} but {n} tensors")
    for i, k in enumerate(ks):
        if not 0 <= k <= numel:
            raise ValueError(f"delta_topk_thresholds: ks[{i}] = {k} not in [0, {numel}]")
    rows = [[_KEEP_NONE, -1] for _ in range(n)]
    active = [m for m in range(n) if ks[m] > 0]
    if not active:
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(n, 2)

    models = _Models(tensors, device)
    has_base = base is not None
    base_arg = base if has_base else tensors[0]
    a = len(active)
    sel = torch.tensor([model_of[m] for m in active], dtype=torch.int32, device=device)
    grid = (triton.cdiv(numel, _BLOCK),)
    common = dict(HAS_BASE=has_base, DT=models.dt, ALIGNED=models.aligned, BLOCK=_BLOCK, num_warps=_NUM_WARPS)

    # Pass 1: top 16 bits, one histogram per distinct model.
    hist_models = sorted({model_of[m] for m in active})
    slot = torch.tensor([hist_models.index(model_of[m]) for m in active], dtype=torch.int64, device=device)
    hsel = torch.tensor(hist_models, dtype=torch.int32, device=device)
    hist = torch.zeros((len(hist_models), _HI_BINS), dtype=torch.int64, device=device)
    _hist_hi_kernel[grid](base_arg, models.ptrs, models.dts, hsel, len(hist_models), hist, numel, **common)
    hist = hist[slot]  # each row's histogram
    kt = torch.tensor([ks[m] for m in active], dtype=torch.int64, device=device)
    ge = _rev_cumsum(hist)
    bucket = (ge >= kt.unsqueeze(1)).sum(1) - 1  # bucket holding rank k (>= 0 because ge[:, 0] = numel >= k)
    rank = kt - _gather_or_zero(ge, bucket + 1)  # rank inside the bucket, >= 1

    # Pass 2: low 16 bits inside that bucket (+ last index per low key).
    lo = torch.zeros((a, _LO_BINS), dtype=torch.int64, device=device)
    last = torch.full((a, _LO_BINS), -1, dtype=torch.int64, device=device)
    _hist_lo_kernel[grid](base_arg, models.ptrs, models.dts, sel, bucket.contiguous(), a, lo, last, numel,
                          **common)
    lge = _rev_cumsum(lo)
    low = (lge >= rank.unsqueeze(1)).sum(1) - 1
    need = rank - _gather_or_zero(lge, low + 1)  # ties at the exact key to keep, >= 1
    ties = lo.gather(1, low.unsqueeze(1)).squeeze(1)
    last_at = last.gather(1, low.unsqueeze(1)).squeeze(1)
    key = bucket * _LO_BINS + low
    key_l, need_l, ties_l, last_l = (v.tolist() for v in (key, need, ties, last_at))

    partial = []
    for i, m in enumerate(active):
        rows[m][0] = key_l[i]
        if need_l[i] == ties_l[i]:
            rows[m][1] = last_l[i]
        else:
            partial.append(i)

    # Pass 3 (only models keeping a strict subset of their ties): locate the need-th tie by index.
    if partial:
        p = len(partial)
        psel = torch.tensor([model_of[active[i]] for i in partial], dtype=torch.int32, device=device)
        pkey = torch.tensor([key_l[i] for i in partial], dtype=torch.int64, device=device)
        pneed = torch.tensor([need_l[i] for i in partial], dtype=torch.int64, device=device)
        nchunks = triton.cdiv(numel, _TIE_CHUNK)
        counts = torch.zeros((p, nchunks), dtype=torch.int32, device=device)
        _tie_count_kernel[(nchunks,)](base_arg, models.ptrs, models.dts, psel, pkey, p, counts, nchunks, numel,
                                      CHUNK=_TIE_CHUNK, **common)
        cum = counts.to(torch.int64).cumsum(1)
        chunk = (cum < pneed.unsqueeze(1)).sum(1)  # first chunk whose running count reaches need
        before = torch.where(chunk > 0, cum.gather(1, (chunk - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                             torch.zeros_like(chunk))
        inner = (pneed - before).contiguous()
        cutoff = torch.empty(p, dtype=torch.int64, device=device)
        _tie_locate_kernel[(p,)](base_arg, models.ptrs, models.dts, psel, pkey, chunk.contiguous(), inner, cutoff,
                                 numel, CHUNK=_TIE_CHUNK, **common)
        for j, c in zip(partial, cutoff.tolist()):
            rows[active[j]][1] = c
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(n, 2)


def delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed) -> torch.Tensor:
    """float64 (N, 2): (sum |d_i|, sum |kept d_i|), float64 partials per fixed chunk summed in chunk order."""
    base, tensors, device, numel, _ = _prepare(base, tensors, "delta_l1_norms")
    n = len(tensors)
    sparsifier, thr, keepall, probs, seeds = _sparsifier_args(sparsifier, thresholds, keep_probs, seed, n, device)
    out = torch.zeros((n, 2), dtype=torch.float64, device=device)
    if numel == 0:
        return out
    models = _Models(tensors, device)
    has_base = base is not None
    base_arg = base if has_base else tensors[0]
    nchunks = triton.cdiv(numel, _NORM_CHUNK)
    part = torch.empty((n, 2, nchunks), dtype=torch.float64, device=device)
    _norm_partial_kernel[(nchunks, n)](base_arg, models.ptrs, models.dts, part, nchunks, numel, thr, keepall, probs,
                                       seeds, HAS_BASE=has_base, DT=models.dt, ALIGNED=models.aligned,
                                       SPARSIFIER=sparsifier,
                                       BLOCK=_BLOCK, CHUNK=_NORM_CHUNK, num_warps=_NUM_WARPS)
    _norm_final_kernel[(2 * n,)](part, out, nchunks, BLOCK=_FINAL_BLOCK, num_warps=_NUM_WARPS)
    return out


def _static_divisor(weights, divisor, n):
    """merge_math.h static_divisor(): float32 sum of the weights in order (|sum| < 1e-8 -> 1), or n."""
    if divisor == 1:
        return float(n)
    total = torch.tensor(0.0, dtype=torch.float32)
    for w in weights:
        total = total + torch.tensor(float(w), dtype=torch.float32)
    return 1.0 if bool(total.abs() < 1e-8) else float(total)


def combine_args(what, sign_source, consensus, divisor, out_dtype, weights, scales, n, device):
    """Checked combination arguments shared by the merge launchers: (sign_source, consensus, divisor) codes,
    float weights and the float32 scales tensor on `device`."""
    sign_source, consensus, divisor = int(sign_source), int(consensus), int(divisor)
    if sign_source not in (0, 1):
        raise ValueError(f"{what}: unknown sign_source code {sign_source}")
    if consensus not in (0, 1, 2):
        raise ValueError(f"{what}: unknown consensus code {consensus}")
    if divisor not in (0, 1):
        raise ValueError(f"{what}: unknown divisor code {divisor}")
    if out_dtype not in _DT_CODES:
        raise TypeError(f"{what}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{what}: {len(weights)} weights for {n} tensors")
    scales_t = torch.as_tensor(scales).to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if scales_t.numel() != n:
        raise ValueError(f"{what}: scales must have shape ({n},), got {tuple(torch.as_tensor(scales).shape)}")
    return sign_source, consensus, divisor, weights, scales_t


def fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source,
                consensus, divisor, normalize, lambda_, out_dtype) -> torch.Tensor:
    """out = base + lambda * (sum_i w_i s_i mask_i) / divisor, per element exactly merge_element()."""
    base, tensors, device, numel, shape = _prepare(base, tensors, "fused_merge")
    n = len(tensors)
    sign_source, consensus, divisor, weights, scales_t = combine_args(
        "fused_merge", sign_source, consensus, divisor, out_dtype, weights, scales, n, device)
    sparsifier, thr, keepall, probs, seeds = _sparsifier_args(sparsifier, thresholds, keep_probs, seed, n, device)

    out = torch.empty(shape, dtype=out_dtype, device=device)
    if numel == 0:
        return out
    models = _Models(tensors, device)
    has_base = base is not None
    base_arg = base if has_base else tensors[0]
    weights_t = torch.tensor(weights, dtype=torch.float32, device=device)
    params = torch.tensor([float(lambda_), _static_divisor(weights, divisor, n)], dtype=torch.float32,
                          device=device)
    grid = (triton.cdiv(numel, _BLOCK),)
    _fused_merge_kernel[grid](base_arg, models.ptrs, models.dts, out, numel, n, thr, keepall, probs, seeds,
                              scales_t, weights_t, params,
                              HAS_BASE=has_base, DT=models.dt, ALIGNED=models.aligned, SPARSIFIER=sparsifier,
                              SIGN_SOURCE=sign_source,
                              CONSENSUS=consensus, DIVISOR=divisor, NORMALIZE=bool(normalize),
                              APPLY_LAMBDA=float(lambda_) != 1.0, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                              enable_fp_fusion=False)
    return out
