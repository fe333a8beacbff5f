"""Reference task-vector sparsification and merging (DESIGN.md section 3), plain PyTorch, for clarity.

Engine codes (shared with the C++, Triton and CUDA backends):
  sparsifier  0 none, 1 magnitude (exact top-k thresholds), 2 random (Philox uniform u < p),
              3 band (between two top-k thresholds: mergekit's magnitude_outliers, i.e. breadcrumbs)
  sign_source 0 weighted (elect on w_i * s_i), 1 unweighted (elect on s_i)
  consensus   0 none, 1 sum (sign of the sum), 2 count (sign of the sum of signs)
  divisor     0 weights (sum of agreeing weights), 1 count (number of agreeing models)
"""
from __future__ import annotations

import hashlib

import torch

from .selection import keep_mask, magnitude_keys, task_vector

SPARSIFIERS = {"none": 0, "magnitude": 1, "random": 2, "band": 3}
# Columns of the thresholds tensor (N, columns) each sparsifier reads; the others ignore thresholds.
THRESHOLD_COLUMNS = {1: 2, 3: 4}
SIGN_SOURCES = {"weighted": 0, "unweighted": 1}
CONSENSUS = {"none": 0, "sum": 1, "count": 2}
DIVISORS = {"weights": 0, "count": 1}

_MASK32 = 0xFFFFFFFF
_GOLDEN64 = 0x9E3779B97F4A7C15


def model_seed(seed: int, m: int) -> int:
    """Seed of model m's independent stream (DESIGN.md section 2)."""
    return (seed + m * _GOLDEN64) % (1 << 63)


def tensor_seed(seed: int, name: str | None) -> int:
    """Seed of the random masks of the tensor called `name` (None is ""): (seed + blake2b-64(name)) mod 2^63,
    the first 8 digest bytes read little-endian. A function of the name, never of the order or the process."""
    digest = hashlib.blake2b((name or "").encode("utf-8"), digest_size=8).digest()
    return (seed + int.from_bytes(digest, "little")) % (1 << 63)


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of uint32 values held in int64, without overflow."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    middle = a1 * b0 + a0 * b1  # < 2^33
    low_full = (middle & 0xFFFF) * 65536 + a0 * b0  # < 2^49
    high = a1 * b1 + (middle >> 16) + (low_full >> 32)
    return high & _MASK32, low_full & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms equal bit for bit to triton.language.rand(seed, offsets) (Philox4x32-10)."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= (1 << 31), c0 - (1 << 32), c0)  # the first word read as int32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def random_keep(numel: int, p: float, seed: int, m: int) -> torch.Tensor:
    """DARE mask of model m: keep element i where u_i < p (everything when p >= 1)."""
    if p >= 1.0:
        return torch.ones(numel, dtype=torch.bool)
    u = philox_uniform(model_seed(seed, m), torch.arange(numel, dtype=torch.int64))
    return u < torch.tensor(p, dtype=torch.float32)


def band_counts(density: float, gamma: float, numel: int, target_n: int | None = None) -> tuple[int, int]:
    """(k_a, k_b) of mergekit's magnitude_outliers as two magnitude top-k sizes: keep the top k_a minus the
    top k_b, i.e. the ascending-sorted positions [n_bot, n_bot + target_n) with target_n = int(density*numel),
    n_top = int(gamma*numel), n_bot = max(0, numel - target_n - n_top). `target_n` overrides int(density*numel)
    (the engine's k_rule). Density >= 1 keeps everything (k_a = numel, k_b = 0)."""
    if target_n is None:
        target_n = numel if density >= 1 else int(density * numel)
    target_n = min(max(target_n, 0), numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target_n - n_top)
    return numel - n_bot, numel - n_bot - target_n


def band_keep(keys: torch.Tensor, key_a: int, cutoff_a: int, key_b: int, cutoff_b: int) -> torch.Tensor:
    """above(a) and not above(b), above(key, cutoff) = keys > key or (keys == key and index <= cutoff)."""
    return keep_mask(keys, key_a, cutoff_a) & ~keep_mask(keys, key_b, cutoff_b)


def check_thresholds(sparsifier: int, thresholds, n: int, op: str = "fused_merge") -> None:
    """The thresholds a sparsifier reads: (N, 2) (key, cutoff) for magnitude, (N, 4) (key_a, cutoff_a, key_b,
    cutoff_b) for band; none for the others."""
    if sparsifier not in SPARSIFIERS.values():
        raise ValueError(f"unknown sparsifier code {sparsifier}")
    columns = THRESHOLD_COLUMNS.get(sparsifier)
    if columns is None:
        return
    shape = None if thresholds is None else tuple(torch.as_tensor(thresholds).shape)
    if shape != (n, columns):
        name = {v: k for k, v in SPARSIFIERS.items()}[sparsifier]
        raise ValueError(f"{op}: thresholds must have shape ({n}, {columns}) for sparsifier {sparsifier} ({name}), "
                         f"got {shape}")


def keep_of(d: torch.Tensor, m: int, sparsifier: int, thresholds, keep_probs, seed: int) -> torch.Tensor:
    if sparsifier == 0:
        return torch.ones(d.numel(), dtype=torch.bool)
    if sparsifier == 1:
        key, cutoff = (int(v) for v in thresholds[m])
        return keep_mask(magnitude_keys(d), key, cutoff)
    if sparsifier == 2:
        return random_keep(d.numel(), float(keep_probs[m]), seed, m)
    if sparsifier == 3:
        return band_keep(magnitude_keys(d), *(int(v) for v in thresholds[m]))
    raise ValueError(f"unknown sparsifier code {sparsifier}")


def delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed) -> torch.Tensor:
    """float64 (N, 2): (sum |d_i|, sum |kept d_i|)."""
    check_thresholds(sparsifier, thresholds, len(tensors), "delta_l1_norms")
    rows = []
    for m, t in enumerate(tensors):
        d = task_vector(base, t)
        keep = keep_of(d, m, sparsifier, thresholds, keep_probs, seed)
        rows.append([d.double().abs().sum(), d.double().abs()[keep].sum()])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(tensors), 2)


def fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source,
                consensus, divisor, normalize, lambda_, out_dtype) -> torch.Tensor:
    """out = base + lambda * (sum_i w_i s_i mask_i) / divisor, all arithmetic in float32, models in order."""
    check_thresholds(sparsifier, thresholds, len(tensors), "fused_merge")
    sparsified = []
    for m, t in enumerate(tensors):
        d = task_vector(base, t)
        keep = keep_of(d, m, sparsifier, thresholds, keep_probs, seed)
        sparsified.append(torch.where(keep, d * scales[m].to(torch.float32), torch.zeros((), dtype=torch.float32)))
    return combine(base, tensors, sparsified, weights, sign_source, consensus, divisor, normalize, lambda_, out_dtype)


def l1_ratio(norms: torch.Tensor) -> torch.Tensor:
    """float32 (N,) scales of the kept values from delta_l1_norms rows (sum |d|, sum |kept d|): their ratio in
    float64, rounded; 1 where either sum is below 1e-7 (mergekit skips the rescale there). NaN propagates."""
    before, after = norms[:, 0], norms[:, 1]
    skip = (before < 1e-7) | (after < 1e-7)
    return torch.where(skip, torch.ones_like(before), before / after).to(torch.float32)


def fused_merge_l1(base, tensors, sparsifier, thresholds, keep_probs, seed, weights, sign_source, consensus,
                   divisor, normalize, lambda_, out_dtype) -> torch.Tensor:
    """fused_merge with the l1 rescale: scales = l1_ratio(delta_l1_norms(...)) of the same keep masks."""
    scales = l1_ratio(delta_l1_norms(base, tensors, sparsifier, thresholds, keep_probs, seed))
    return fused_merge(base, tensors, sparsifier, thresholds, keep_probs, seed, scales, weights, sign_source,
                       consensus, divisor, normalize, lambda_, out_dtype)


def combine(base, tensors, sparsified, weights, sign_source, consensus, divisor, normalize, lambda_,
            out_dtype) -> torch.Tensor:
    """The merge after sparsification, shared by every sparsifier: `sparsified` holds each model's s_i (flat
    float32); weighting, sign election, divisor, normalize, lambda, + base and the NaN-poison rule."""
    shape = tensors[0].shape
    n = tensors[0].numel()
    weighted, electors = [], []
    for m, s in enumerate(sparsified):
        wd = torch.tensor(weights[m], dtype=torch.float32) * s
        weighted.append(wd)
        electors.append(wd if sign_source == 0 else s)

    if consensus == 0:
        agree = [torch.ones(n, dtype=torch.bool) for _ in tensors]
    else:
        if consensus == 1:
            total = torch.zeros(n, dtype=torch.float32)
            for e in electors:
                total = total + e
        else:
            total = torch.zeros(n, dtype=torch.float32)
            for e in electors:
                total = total + torch.sign(e)
        majority = torch.where(total >= 0, 1.0, -1.0)
        agree = [torch.sign(e) == majority for e in electors]

    mixed = torch.zeros(n, dtype=torch.float32)
    for wd, a in zip(weighted, agree):
        mixed = mixed + torch.where(a, wd, torch.zeros((), dtype=torch.float32))

    if normalize:
        if consensus == 0:
            if divisor == 0:
                total_w = torch.tensor(0.0, dtype=torch.float32)
                for w in weights:
                    total_w = total_w + torch.tensor(w, dtype=torch.float32)
                div = torch.where(total_w.abs() < 1e-8, 1.0, total_w).expand(n)
            else:
                div = torch.full((n,), float(len(tensors)), dtype=torch.float32)
        else:
            div = torch.zeros(n, dtype=torch.float32)
            for w, a in zip(weights, agree):
                div = div + torch.where(a, torch.tensor(w if divisor == 0 else 1.0, dtype=torch.float32), 0.0)
            div = torch.where(div == 0, 1.0, div)
        mixed = mixed / div

    out = torch.tensor(lambda_, dtype=torch.float32) * mixed if lambda_ != 1.0 else mixed
    if base is not None:
        out = base.float().reshape(-1) + out

    # A non-finite input never yields a plausible finite output: poison the element instead.
    inputs = list(tensors) + ([base] if base is not None else [])
    bad = torch.zeros(n, dtype=torch.bool)
    for x in inputs:
        bad |= ~torch.isfinite(x.float().reshape(-1))
    out = torch.where(bad & torch.isfinite(out), float("nan"), out)
    return out.reshape(shape).to(out_dtype)
