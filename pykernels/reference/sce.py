"""Reference SCE merge (mergekit 0.1.5's `sce`, arXiv:2408.07990), plain PyTorch on whole tensors.

Select: keep the k = int(density * count_nonzero(var)) elements with the largest element-wise variance of the
task vectors across models (population variance, float32; ties kept in ascending index order, NaN largest).
Calculate: per-model weights = mean of the squared selected task vector, normalised to sum 1 (1/N each when
that sum is below 1e-6). Erase: sum sign election on the unweighted selected task vectors; the merge is
sum_i w_i s_i [agree_i] / sum_i w_i [agree_i] (0 -> 1), added to the base.
"""
from __future__ import annotations

import math

import torch

from .merging import combine
from .selection import keep_mask, magnitude_keys, task_vector, topk_threshold

SIGN_UNWEIGHTED, CONSENSUS_SUM, DIVISOR_WEIGHTS = 1, 1, 0


def variance(ds: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models, element-wise, float32 in a fixed order: mean = (sum_i d_i) / N, then
    (sum_i (d_i - mean)^2) / N, models added in order. Element-wise, so any chunking gives the same bits."""
    n = torch.tensor(float(len(ds)), dtype=torch.float32)
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    mean = total / n
    squares = (ds[0] - mean) * (ds[0] - mean)
    for d in ds[1:]:
        squares = squares + (d - mean) * (d - mean)
    return squares / n


def selected_count(nonzero: int, density: float) -> int:
    return int(nonzero * density)


def weights_of(sums_of_squares: list[float], numel: int) -> list[float]:
    """mergekit's sce_weight from float64 sums of squared selected task vectors. The weights scale every element,
    so a NaN/Inf selected anywhere would turn the whole output into NaN: that is an error instead."""
    for i, s in enumerate(sums_of_squares):
        if not math.isfinite(s):
            raise ValueError(f"SCE weight of tensors[{i}] is {s}: its selected task vector holds NaN/Inf (or "
                             f"overflows float64), and SCE's weights are whole-tensor statistics")
    means = [s / numel if numel else 0.0 for s in sums_of_squares]
    total = sum(means)
    if abs(total) < 1e-6:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def sce_merge(base: torch.Tensor, tensors, density: float, out_dtype: torch.dtype) -> torch.Tensor:
    ds = [task_vector(base, t) for t in tensors]
    numel = ds[0].numel()
    if density >= 1.0:
        keep = torch.ones(numel, dtype=torch.bool)
    elif density <= 0.0:
        keep = torch.zeros(numel, dtype=torch.bool)
    else:
        keys = magnitude_keys(variance(ds))  # variance >= 0: its magnitude key orders it
        k = selected_count(int(torch.count_nonzero(keys)), density)
        keep = keep_mask(keys, *topk_threshold(keys, k))
    selected = [torch.where(keep, d, torch.zeros((), dtype=torch.float32)) for d in ds]
    weights = weights_of([float(s.double().square().sum()) for s in selected], numel)
    return combine(base, tensors, selected, weights, SIGN_UNWEIGHTED, CONSENSUS_SUM, DIVISOR_WEIGHTS, True, 1.0,
                   out_dtype)
