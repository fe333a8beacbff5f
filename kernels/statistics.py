"""Triton kernels of the element-wise statistics across N tensors (trimmed_mean, sign_count), plus launchers.

The launchers have the signatures and return values of ``pykernels.reference.statistics`` (see
docs/PRIMITIVES.md); results are bit-identical to it.

Design
------
* Models are passed as in ``kernels/merging.py``: a device table of data pointers (int64) and dtype codes
  (0 fp32, 1 bf16, 2 fp16), any N (1..64) and any mix of dtypes; bf16 is converted from its bits.
* trimmed_mean: a program owns ``ROWS`` elements and loads their N task-vector values as a 2-D tile
  (ROWS, NP), NP = next power of two >= N, column m from model m (one gathered load per tile; with mixed
  dtypes one fp32 and one 16-bit load, each masked to its models). The values become int32 totalOrder keys
  (numerical order with -0 < +0; the padding columns hold the largest key), ``tl.sort`` sorts each row, and
  the kept columns trim .. N - trim - 1 are taken one at a time (an integer sum over the row with one
  non-zero term, so exact) and added in ascending order in float32, starting from the smallest kept value.
  The sum is divided with ``tl.math.div_rn`` (IEEE round to nearest). Any NaN value -> canonical NaN.
* sign_count: one pass over the models per block, int32 counts stored as int8.

Peak extra memory: the output, plus copies of non-contiguous inputs (``.contiguous()``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merging import _DT_CODES, _MAX_MODELS, _NUM_WARPS, _bf16_bits_to_f32, _cast_out, _load_base, _load_model

_TILE = 2048  # values (elements x NP) per trimmed_mean program
_BLOCK = 1024  # elements per sign_count program
_QUIET_NAN = 0x7FC00000
_DIRECT_OUT = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _order_key(v):
    """int32 totalOrder key of float32 v (an involution of the bits: also maps a key back to its bits)."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(ptrs, dts, offs, mask, N, NP: tl.constexpr, DT: tl.constexpr):
    """float32 (ROWS, NP) tile: [r, m] = model m at offs[r] (0 where masked or m >= N)."""
    cols = tl.arange(0, NP)
    colmask = cols < N
    addr = tl.load(ptrs + cols, mask=colmask, other=0)
    m2 = mask[:, None] & colmask[None, :]
    if DT == 0:
        p = (addr[None, :] + offs[:, None] * 4).to(tl.pointer_type(tl.float32))
        x = tl.load(p, mask=m2, other=0.0)
    elif DT == 1:
        p = (addr[None, :] + offs[:, None] * 2).to(tl.pointer_type(tl.int16))
        x = _bf16_bits_to_f32(tl.load(p, mask=m2, other=0))
    elif DT == 2:
        p = (addr[None, :] + offs[:, None] * 2).to(tl.pointer_type(tl.float16))
        x = tl.load(p, mask=m2, other=0.0).to(tl.float32)
    else:
        code = tl.load(dts + cols, mask=colmask, other=0)[None, :]
        p32 = (addr[None, :] + offs[:, None] * 4).to(tl.pointer_type(tl.float32))
        x32 = tl.load(p32, mask=m2 & (code == 0), other=0.0)
        p16 = (addr[None, :] + offs[:, None] * 2).to(tl.pointer_type(tl.int16))
        bits = tl.load(p16, mask=m2 & (code != 0), other=0)
        bf = _bf16_bits_to_f32(bits)
        hf = bits.to(tl.float16, bitcast=True).to(tl.float32)
        x = tl.where(code == 0, x32, tl.where(code == 1, bf, hf))
    return x


@triton.jit
def _column(keys, cols, j):
    """keys[:, j] (exact: an integer sum with one non-zero term)."""
    return tl.sum(tl.where(cols[None, :] == j, keys, 0), axis=1)


@triton.jit
def _trimmed_mean_kernel(base_ptr, ptrs, dts, out_ptr, numel, N, trim, divisor,
                         HAS_BASE: tl.constexpr, DT: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = offs < numel
    cols = tl.arange(0, NP)
    x = _load_tile(ptrs, dts, offs, mask, N, NP, DT)
    if HAS_BASE:
        v = x - _load_base(base_ptr, offs, mask, HAS_BASE)[:, None]
    else:
        v = x
    has_nan = tl.max((v != v).to(tl.int32), axis=1) != 0  # padding columns hold 0
    keys = tl.where(cols[None, :] < N, _order_key(v), 0x7FFFFFFF)
    keys = tl.sort(keys, dim=1)
    acc = _key_value(_column(keys, cols, trim))
    for j in range(trim + 1, N - trim):
        acc = acc + _key_value(_column(keys, cols, j))
    out = tl.math.div_rn(acc, divisor + tl.zeros((ROWS,), tl.float32))
    nan = tl.full((ROWS,), _QUIET_NAN, tl.int32).to(tl.float32, bitcast=True)
    out = tl.where(has_nan | (out != out), nan, out)
    tl.store(out_ptr + offs, _cast_out(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sign_count_kernel(base_ptr, ptrs, dts, out_ptr, numel, N, HAS_BASE: tl.constexpr, DT: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _load_base(base_ptr, offs, mask, HAS_BASE)
    count = tl.zeros((BLOCK,), tl.int32)
    for m in range(N):
        x = _load_model(ptrs, dts, m, offs, mask, DT, ALIGNED)
        if HAS_BASE:
            v = x - b
        else:
            v = x
        count += (v > 0.0).to(tl.int32) - (v < 0.0).to(tl.int32)  # NaN compares false: 0
    tl.store(out_ptr + offs, count.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _prepare(base, tensors, what):
    """Validate; return (contiguous base or None, contiguous tensors, models table, device, numel, shape)."""
    tensors = list(tensors)
    n = len(tensors)
    if not 1 <= n <= _MAX_MODELS:
        raise ValueError(f"{what}: need 1 <= len(tensors) <= {_MAX_MODELS}, got {n}")
    shape, device = tensors[0].shape, tensors[0].device
    named = ([("base", base)] if base is not None else []) + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} is not a Tensor")
        if t.dtype not in _DT_CODES:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}; expected float32, bfloat16 or float16")
        if t.shape != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, tensors[0] {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, tensors[0] on {device}")
    base = base.contiguous() if base is not None else None
    tensors = [t.contiguous() for t in tensors]
    codes = [_DT_CODES[t.dtype] for t in tensors]
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
    dts = torch.tensor(codes, dtype=torch.int32, device=device)
    dt = codes[0] if all(c == codes[0] for c in codes) else -1
    return base, tensors, (ptrs, dts, dt), device, tensors[0].numel(), shape


def trimmed_mean(base, tensors, trim, out_dtype) -> torch.Tensor:
    """Element-wise mean of the N task-vector values without the `trim` smallest and largest (float32)."""
    base, tensors, (ptrs, dts, dt), device, numel, shape = _prepare(base, tensors, "trimmed_mean")
    n, trim = len(tensors), int(trim)
    if not 0 <= 2 * trim < n:
        raise ValueError(f"trimmed_mean: trim must satisfy 0 <= 2 * trim < N = {n}, got {trim}")
    direct = out_dtype in _DIRECT_OUT
    out = torch.empty(shape, dtype=out_dtype if direct else torch.float32, device=device)
    if numel > 0:
        np2 = triton.next_power_of_2(n)
        rows = max(16, min(_TILE // np2, triton.next_power_of_2(numel)))  # small inputs: one small program
        has_base = base is not None
        _trimmed_mean_kernel[(triton.cdiv(numel, rows),)](
            base if has_base else tensors[0], ptrs, dts, out, numel, n, trim, float(n - 2 * trim),
            HAS_BASE=has_base, DT=dt, NP=np2, ROWS=rows, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return out if direct else out.to(out_dtype)


def sign_count(base, tensors) -> torch.Tensor:
    """int8: sum over the N task-vector values of sign(v) (sign(0) = sign(NaN) = 0)."""
    base, tensors, (ptrs, dts, dt), device, numel, shape = _prepare(base, tensors, "sign_count")
    out = torch.empty(shape, dtype=torch.int8, device=device)
    if numel > 0:
        has_base = base is not None
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        _sign_count_kernel[(triton.cdiv(numel, _BLOCK),)](
            base if has_base else tensors[0], ptrs, dts, out, numel, len(tensors), HAS_BASE=has_base, DT=dt,
            ALIGNED=aligned, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out
