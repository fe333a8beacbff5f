"""Reference DELLA (docs/PRIMITIVES.md, section "DELLA"): rank-dependent random keep, fused with the merge.

Plain PyTorch, written to be obviously right, never fast. The inputs are read in their ranking layout: rows =
numel // shape[-1] rows of n = shape[-1] elements (a 1-D tensor is one row, a 0-d tensor one row of 1), and
element (row, col) has the flat index i = row * n + col, which is also its Philox counter.

Per model m with density rho and epsilon eps:
  r  = row_rank(|d_m|) within the row (1-based, ascending magnitude; NaN largest; ties by index)
  lo = float32(rho - eps), step = float32(2 * eps / (n - 1)) (both computed in float64, rounded once; 0 if n == 1)
  p  = lo + step * float32(r - 1)          (a float32 multiply, then a float32 add)
  keep: everything if rho >= 1 (p = 1), nothing if rho <= 0, else philox_uniform(model_seed(seed, m), i) < p
  s  = keep ? (inverse ? d / p : d) * scales[m] : 0, then the combination of fused_merge (merging.combine).
"""
from __future__ import annotations

import torch

from .merging import combine, model_seed, philox_uniform
from .selection import row_rank, task_vector


def row_layout(shape) -> tuple[int, int]:
    """(rows, n) of the ranking layout of a tensor of `shape`."""
    if len(shape) == 0:
        return 1, 1
    n = int(shape[-1])
    numel = 1
    for s in shape:
        numel *= int(s)
    return (numel // n if n > 0 else 0), n


def keep_probabilities(d: torch.Tensor, rows: int, n: int, density: float, epsilon: float) -> torch.Tensor:
    """float32 p of every element of the flat task vector d (rows * n elements), for 0 < density < 1."""
    ranks = row_rank(d.reshape(rows, n), True).reshape(-1)
    lo = torch.tensor(density - epsilon, dtype=torch.float32)
    step = torch.tensor(2.0 * epsilon / (n - 1) if n > 1 else 0.0, dtype=torch.float32)
    return lo + step * (ranks - 1).to(torch.float32)


def della_keep(d: torch.Tensor, rows: int, n: int, density: float, epsilon: float, seed: int,
               m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool, p float32) of model m's flat task vector d."""
    numel = d.numel()
    if density >= 1.0:
        return torch.ones(numel, dtype=torch.bool), torch.ones(numel, dtype=torch.float32)
    if density <= 0.0:
        return torch.zeros(numel, dtype=torch.bool), torch.zeros(numel, dtype=torch.float32)
    p = keep_probabilities(d, rows, n, density, epsilon)
    u = philox_uniform(model_seed(seed, m), torch.arange(numel, dtype=torch.int64))
    return u < p, p


def _check(tensors, densities, epsilons, what):
    if len(tensors) == 0:
        raise ValueError(f"{what}: tensors must hold at least one model")
    if len(densities) != len(tensors) or len(epsilons) != len(tensors):
        raise ValueError(f"{what}: need one density and one epsilon per model ({len(tensors)}), got "
                         f"{len(densities)} and {len(epsilons)}")


def della_l1_norms(base, tensors, densities, epsilons, seed) -> torch.Tensor:
    """float64 (N, 2): (sum |d_m|, sum |kept d_m|). (The kernels sum in fixed blocks; equal to float64 rounding.)"""
    _check(tensors, densities, epsilons, "della_l1_norms")
    rows, n = row_layout(tensors[0].shape)
    out = []
    for m, t in enumerate(tensors):
        d = task_vector(base, t)
        keep, _ = della_keep(d, rows, n, float(densities[m]), float(epsilons[m]), seed, m)
        a = d.double().abs()
        out.append([a.sum(), a[keep].sum()])
    return torch.tensor(out, dtype=torch.float64).reshape(len(tensors), 2)


def della_merge(base, tensors, densities, epsilons, seed, inverse, scales, weights, sign_source, consensus, divisor,
                normalize, lambda_, out_dtype) -> torch.Tensor:
    """out = base + lambda * (sum_m w_m s_m agree_m) / divisor with DELLA's s_m, all float32, models in order."""
    _check(tensors, densities, epsilons, "della_merge")
    rows, n = row_layout(tensors[0].shape)
    sparsified = []
    for m, t in enumerate(tensors):
        d = task_vector(base, t)
        keep, p = della_keep(d, rows, n, float(densities[m]), float(epsilons[m]), seed, m)
        kept = d / p if inverse else d
        s = torch.where(keep, kept * scales[m].to(torch.float32), torch.zeros((), dtype=torch.float32))
        sparsified.append(s)
    return combine(base, tensors, sparsified, weights, sign_source, consensus, divisor, normalize, lambda_, out_dtype)
