"""Triton kernels of DELLA (docs/PRIMITIVES.md "DELLA"; reference: pykernels/reference/della.py).

``della_l1_norms`` and ``della_merge`` have the signatures and results of the reference (merge outputs bit for
bit; norms to float64 rounding). The per-element helpers (model table, dtype loads, magnitude keys, output casts,
the float64 norm finaliser) are those of ``kernels/merging.py``.

Layout: rows = numel // n rows of n = shape[-1] elements (0-d: one row of 1), flat index i = row * n + col.
Rows may hold at most ``MAX_ROW = 2**15`` elements (one row is sorted inside one program); longer rows raise
``ValueError``.

Design
------
* One program handles whole rows, for all N models (``della_merge``: a persistent grid of P programs, program
  ``pid`` taking rows pid, pid + P, ...; ``della_l1_norms``: one program per (row, model)).
* Ranks: per model, the row's magnitude keys (``_mkey``: bits(d) & 0x7FFFFFFF, every NaN 0x7F800001) are
  packed into int64 composites ``key << 32 | col`` (padding lanes: int64 max) and sorted with ``tl.sort``;
  position k of the sorted row holds the element of rank k + 1 (ties by ascending column, as
  ``reference.selection.row_rank``). The keep decision is taken in sorted order: the element's x (and base) are
  gathered at its column, ``d = x - base`` recomputed (the same float32 operation, so the same d),
  ``p = lo + step * float32(k)`` (launched with ``enable_fp_fusion=False``: never an FMA),
  ``u = tl.rand(model_seed, row * n + col)`` (== reference philox_uniform), keep = u < p, and
  ``s = keep ? (inverse ? div_rn(d, p) : d) * scale : 0``.
* ``della_merge`` scatters each model's s into its row of a per-program float32 scratch (N x BLOCK_N), then,
  after a ``tl.debug_barrier()``, reads the N rows back in column order and combines them with exactly
  merge_element's float32 operations (common/merge_math.h; as ``_fused_merge_kernel``): models in order, sign
  election, ``div_rn`` for normalize, lambda, + base, NaN poisoning.
* ``della_l1_norms``: float64 row sums (sum |d| in column order, kept |d| in sorted order, each a ``tl.sum``),
  one partial per (model, row), then ``merging._norm_final_kernel`` adds the partials in row order.
  Deterministic for a given BLOCK_N; equal to the reference and C++ sums to float64 rounding.

Extra memory: the output; della_merge: P x N x BLOCK_N float32 scratch (P <= rows, capped so the scratch stays
under 64 MiB unless one program alone needs more); della_l1_norms: N x 2 x rows float64 partials; plus copies of
non-contiguous inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merging import (_Models, _cast_out, _delta, _is_finite, _load_base, _load_model, _mkey,
                      _model_seed, _norm_final_kernel, _prepare, _sign, _static_divisor, combine_args)

MAX_ROW = 1 << 15  # longest row one program sorts
_SCRATCH_BYTES = 64 << 20  # della_merge scratch budget (P x N x BLOCK_N float32)
_MAX_PROGRAMS_CPU = 8  # persistent programs under the interpreter
_FINAL_BLOCK = 1024

_KIND_ALL, _KIND_NONE, _KIND_RANDOM = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _sorted_row(base_ptr, ptrs, dts, m, start, cols, n, HAS_BASE: tl.constexpr, DT: tl.constexpr,
                ALIGNED: tl.constexpr):
    """(col, valid, d) of model m's row in ascending stable magnitude order: position k holds rank k + 1."""
    colmask = cols < n
    offs = start + cols
    b = _load_base(base_ptr, offs, colmask, HAS_BASE)
    d = _delta(_load_model(ptrs, dts, m, offs, colmask, DT, ALIGNED), b, HAS_BASE)
    composite = (_mkey(d).to(tl.int64) << 32) | cols.to(tl.int64)
    composite = tl.where(colmask, composite, 0x7FFFFFFFFFFFFFFF)  # padding sorts after every real element
    ordered = tl.sort(composite)
    col = ordered & 0xFFFF  # cols < 2^15
    valid = cols < n  # position k < n holds a real element
    col = tl.where(valid, col, 0)
    goffs = start + col
    bs = _load_base(base_ptr, goffs, valid, HAS_BASE)
    ds = _delta(_load_model(ptrs, dts, m, goffs, valid, DT, ALIGNED), bs, HAS_BASE)
    return col, valid, ds


@triton.jit
def _keep_sorted(col, start, cols, m, lo_ptr, step_ptr, seeds_ptr):
    """(keep, p) of the sorted row: p = lo + step * float32(rank - 1), keep = tl.rand(seed, flat index) < p."""
    lo = tl.load(lo_ptr + m)
    step = tl.load(step_ptr + m)
    p = lo + step * cols.to(tl.float32)
    u = tl.rand(tl.load(seeds_ptr + m), start + col)
    return u < p, p


# ----------------------------------------------------------------------------------------------------------
# della_l1_norms
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _della_norms_kernel(base_ptr, ptrs, dts, part_ptr, rows, n, kind_ptr, lo_ptr, step_ptr, seeds_ptr,
                        HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[m, 0, row] = sum |d|, part[m, 1, row] = sum kept |d| (float64) of model m's row."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    start = row * n
    cols = tl.arange(0, BLOCK_N)
    colmask = cols < n
    offs = start + cols
    b = _load_base(base_ptr, offs, colmask, HAS_BASE)
    d = _delta(_load_model(ptrs, dts, m, offs, colmask, DT, ALIGNED), b, HAS_BASE)
    total = tl.sum(tl.where(colmask, tl.abs(d.to(tl.float64)), 0.0), 0)
    kind = tl.load(kind_ptr + m)
    if kind == 2:
        col, valid, ds = _sorted_row(base_ptr, ptrs, dts, m, start, cols, n, HAS_BASE, DT, ALIGNED)
        keep, p = _keep_sorted(col, start, cols, m, lo_ptr, step_ptr, seeds_ptr)
        kept = tl.sum(tl.where(valid & keep, tl.abs(ds.to(tl.float64)), 0.0), 0)
    elif kind == 0:
        kept = total
    else:
        kept = tl.full((), 0.0, tl.float64)
    slot = m.to(tl.int64) * 2 * rows + row
    tl.store(part_ptr + slot, total)
    tl.store(part_ptr + slot + rows, kept)


# ----------------------------------------------------------------------------------------------------------
# della_merge
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _della_merge_kernel(base_ptr, ptrs, dts, out_ptr, scratch_ptr, rows, n, N, kind_ptr, lo_ptr, step_ptr,
                        seeds_ptr, scales_ptr, weights_ptr, params_ptr,
                        HAS_BASE: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, INVERSE: tl.constexpr,
                        SIGN_SOURCE: tl.constexpr, CONSENSUS: tl.constexpr, DIVISOR: tl.constexpr,
                        NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    colmask = cols < n
    scratch = scratch_ptr + pid.to(tl.int64) * N * BLOCK_N
    for row in range(pid, rows, tl.num_programs(0)):
        start = tl.cast(row, tl.int64) * n
        offs = start + cols
        b = _load_base(base_ptr, offs, colmask, HAS_BASE)
        if HAS_BASE:
            finite = _is_finite(b)
        else:
            finite = cols >= 0
        # 1. every model's s, scattered into its scratch row in column order.
        for m in range(N):
            x = _load_model(ptrs, dts, m, offs, colmask, DT, ALIGNED)
            finite = finite & _is_finite(x)
            scale = tl.load(scales_ptr + m)
            kind = tl.load(kind_ptr + m)
            srow = scratch + m * BLOCK_N
            if kind == 2:
                col, valid, ds = _sorted_row(base_ptr, ptrs, dts, m, start, cols, n, HAS_BASE, DT, ALIGNED)
                keep, p = _keep_sorted(col, start, cols, m, lo_ptr, step_ptr, seeds_ptr)
                if INVERSE:
                    v = tl.math.div_rn(ds, p)
                else:
                    v = ds
                s = tl.where(keep, v * scale, 0.0)
                tl.store(srow + col, s, mask=valid)
            elif kind == 0:
                d = _delta(x, b, HAS_BASE)
                tl.store(srow + cols, d * scale, mask=colmask)
            else:
                tl.store(srow + cols, tl.zeros((BLOCK_N,), tl.float32), mask=colmask)
        tl.debug_barrier()
        # 2. merge_element's combination, models in order.
        mixed = tl.zeros((BLOCK_N,), tl.float32)
        if CONSENSUS == 0:
            for m in range(N):
                s = tl.load(scratch + m * BLOCK_N + cols, mask=colmask, other=0.0)
                mixed = mixed + tl.load(weights_ptr + m) * s
            div = tl.load(params_ptr + 1)  # static divisor, already guarded
        else:
            total = tl.zeros((BLOCK_N,), tl.float32)
            for m in range(N):
                s = tl.load(scratch + m * BLOCK_N + cols, mask=colmask, other=0.0)
                wd = tl.load(weights_ptr + m) * s
                if SIGN_SOURCE == 0:
                    e = wd
                else:
                    e = s
                if CONSENSUS == 1:
                    total = total + e
                else:
                    total = total + _sign(e)
            majority = tl.where(total >= 0.0, 1.0, -1.0)
            div = tl.zeros((BLOCK_N,), tl.float32)
            for m in range(N):
                s = tl.load(scratch + m * BLOCK_N + cols, mask=colmask, other=0.0)
                w = tl.load(weights_ptr + m)
                wd = w * s
                if SIGN_SOURCE == 0:
                    e = wd
                else:
                    e = s
                agree = _sign(e) == majority
                mixed = mixed + tl.where(agree, wd, 0.0)
                if DIVISOR == 0:
                    dw = w
                else:
                    dw = 1.0
                div = div + tl.where(agree, dw, 0.0)
            div = tl.where(div == 0.0, 1.0, div)
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, div + tl.zeros((BLOCK_N,), tl.float32))
        if APPLY_LAMBDA:
            out = tl.load(params_ptr) * mixed
        else:
            out = mixed
        if HAS_BASE:
            out = b + out
        out = tl.where((~finite) & _is_finite(out), float("nan"), out)
        tl.store(out_ptr + offs, _cast_out(out, out_ptr.dtype.element_ty), mask=colmask)
        tl.debug_barrier()  # the scratch is rewritten by the next row


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _row_layout(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    n = int(shape[-1])
    numel = 1
    for s in shape:
        numel *= int(s)
    return (numel // n if n > 0 else 0), n


def _block_n(n: int, what: str) -> int:
    if n > MAX_ROW:
        raise ValueError(f"{what}: the triton backend ranks rows of at most {MAX_ROW} elements (shape[-1]); got "
                         f"rows of {n}: use the cpp or reference backend")
    return max(16, triton.next_power_of_2(n))


def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 4096 else 8 if block_n <= 16384 else 16


def _rule_args(densities, epsilons, seed, n_models, n, device, what):
    """Tensors (kind int32, lo fp32, step fp32, model seeds int64) of the models' keep rules."""
    densities = [float(v) for v in densities]
    epsilons = [float(v) for v in epsilons]
    if len(densities) != n_models or len(epsilons) != n_models:
        raise ValueError(f"{what}: need one density and one epsilon per model ({n_models}), got {len(densities)} "
                         f"and {len(epsilons)}")
    kinds, los, steps = [], [], []
    for rho, eps in zip(densities, epsilons):
        if rho >= 1.0:
            kinds.append(_KIND_ALL)
        elif rho <= 0.0:
            kinds.append(_KIND_NONE)
        else:
            kinds.append(_KIND_RANDOM)
        los.append(rho - eps)  # rounded once to float32 by torch.tensor
        steps.append(2.0 * eps / (n - 1) if n > 1 else 0.0)
    seeds = [_model_seed(int(seed), m) for m in range(n_models)]
    return (torch.tensor(kinds, dtype=torch.int32, device=device),
            torch.tensor(los, dtype=torch.float32, device=device),
            torch.tensor(steps, dtype=torch.float32, device=device),
            torch.tensor(seeds, dtype=torch.int64, device=device))


def della_l1_norms(base, tensors, densities, epsilons, seed) -> torch.Tensor:
    """float64 (N, 2): (sum |d_m|, sum |kept d_m|): float64 row partials, added in row order."""
    what = "della_l1_norms"
    base, tensors, device, numel, shape = _prepare(base, tensors, what)
    n_models = len(tensors)
    rows, n = _row_layout(shape)
    kinds, los, steps, seeds = _rule_args(densities, epsilons, seed, n_models, n, device, what)
    out = torch.zeros((n_models, 2), dtype=torch.float64, device=device)
    if rows == 0:
        return out
    block_n = _block_n(n, what)
    models = _Models(tensors, device)
    has_base = base is not None
    part = torch.empty((n_models, 2, rows), dtype=torch.float64, device=device)
    _della_norms_kernel[(rows, n_models)](base if has_base else tensors[0], models.ptrs, models.dts, part, rows, n,
                                          kinds, los, steps, seeds, HAS_BASE=has_base, DT=models.dt,
                                          ALIGNED=models.aligned, BLOCK_N=block_n, num_warps=_num_warps(block_n),
                                          enable_fp_fusion=False)
    _norm_final_kernel[(2 * n_models,)](part, out, rows, BLOCK=_FINAL_BLOCK, num_warps=4)
    return out


def _programs(rows: int, n_models: int, block_n: int, device) -> int:
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = _MAX_PROGRAMS_CPU
    budget = max(1, _SCRATCH_BYTES // (4 * n_models * block_n))
    return max(1, min(rows, cap, budget))


def della_merge(base, tensors, densities, epsilons, seed, inverse, scales, weights, sign_source, consensus, divisor,
                normalize, lambda_, out_dtype) -> torch.Tensor:
    """out = base + lambda * (sum_m w_m s_m agree_m) / divisor with DELLA's s_m (merge_element's arithmetic)."""
    what = "della_merge"
    base, tensors, device, numel, shape = _prepare(base, tensors, what)
    n_models = len(tensors)
    sign_source, consensus, divisor, weights, scales_t = combine_args(
        what, sign_source, consensus, divisor, out_dtype, weights, scales, n_models, device)
    rows, n = _row_layout(shape)
    kinds, los, steps, seeds = _rule_args(densities, epsilons, seed, n_models, n, device, what)

    out = torch.empty(shape, dtype=out_dtype, device=device)
    if rows == 0:
        return out
    block_n = _block_n(n, what)
    models = _Models(tensors, device)
    has_base = base is not None
    weights_t = torch.tensor(weights, dtype=torch.float32, device=device)
    params = torch.tensor([float(lambda_), _static_divisor(weights, divisor, n_models)], dtype=torch.float32,
                          device=device)
    programs = _programs(rows, n_models, block_n, device)
    scratch = torch.empty((programs, n_models, block_n), dtype=torch.float32, device=device)
    _della_merge_kernel[(programs,)](base if has_base else tensors[0], models.ptrs, models.dts, out, scratch, rows, n,
                                     n_models, kinds, los, steps, seeds, scales_t, weights_t, params,
                                     HAS_BASE=has_base, DT=models.dt, ALIGNED=models.aligned, INVERSE=bool(inverse),
                                     SIGN_SOURCE=sign_source, CONSENSUS=consensus, DIVISOR=divisor,
                                     NORMALIZE=bool(normalize), APPLY_LAMBDA=float(lambda_) != 1.0, BLOCK_N=block_n,
                                     num_warps=_num_warps(block_n), enable_fp_fusion=False)
    return out
