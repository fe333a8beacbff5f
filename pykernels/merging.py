"""Fused task-vector sparsification and merging (DESIGN.md section 3).

Every merge is one streaming engine: an optional selection pass (exact magnitude top-k thresholds, or l1
norms for rescaling) and one merge pass that recomputes d_i = t_i - base in float32, applies the masks,
elects signs and writes the output. No N-fold stack of task vectors is ever built.

DELLA is row-fused instead: each row of every model is ranked (a stable radix sort inside cache), kept with its
rank-dependent probability and merged in the same pass. SCE streams over chunks (see `sce`).

Peak extra memory: the output tensor, plus for the cpp backend per-thread 2^16-bin histograms per model (or
row buffers for DELLA) and O(N) scalars; non-contiguous inputs are copied once to contiguous memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import _backend, _ops
from .reference import sce as ref_sce
from .reference.merging import CONSENSUS, DIVISORS, SIGN_SOURCES, SPARSIFIERS, band_counts, l1_ratio

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_MODELS = 64
RESCALES = ("none", "l1", "inverse")
K_RULES = ("strict", "floor", "at_least_one")


@dataclass(frozen=True)
class Preset:
    """A merge method as engine parameters (mergekit's defaults for normalize and rescale)."""

    sparsifier: str = "none"
    consensus: str = "none"
    normalize: bool = False
    rescale: str = "none"
    uses_base: bool = True


METHODS = {
    "linear": Preset(normalize=True, uses_base=False),
    "task_arithmetic": Preset(),
    "ties": Preset(sparsifier="magnitude", consensus="sum", normalize=True),
    "dare_ties": Preset(sparsifier="random", consensus="sum", rescale="l1"),
    "dare_linear": Preset(sparsifier="random", rescale="l1"),
    "breadcrumbs": Preset(sparsifier="band"),
    "breadcrumbs_ties": Preset(sparsifier="band", consensus="sum"),
    "della": Preset(sparsifier="della", consensus="sum", normalize=True, rescale="l1"),
    "della_linear": Preset(sparsifier="della", rescale="l1"),
    "sce": Preset(sparsifier="variance", consensus="sum", normalize=True),
}
GAMMA_DEFAULT = 0.01  # mergekit's default share of the largest magnitudes breadcrumbs drops
EPSILON_DEFAULT = 0.15  # mergekit's default half-width of DELLA's keep probabilities


# --- argument checks: every message names the argument and the value ----------------------------------

def _named_inputs(base, tensors) -> list[tuple[str, torch.Tensor]]:
    return ([("base", base)] if base is not None else []) + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def _check_tensors(base, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must hold at least one tensor, got an empty list")
    if len(tensors) > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} tensors can be merged at once, got {len(tensors)}")
    named = _named_inputs(base, tensors)
    ref_name, ref = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float32, bfloat16 and float16")
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return tensors


def _per_model(value, n: int, name: str, default: float) -> list[float]:
    if value is None:
        return [default] * n
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = list(value) if isinstance(value, Sequence) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} tensors")
    values = [float(v) for v in values]
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite, got {v}")
    return values


def _check_densities(densities: list[float], name: str = "densities") -> None:
    for i, rho in enumerate(densities):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"{name}[{i}] must lie in [0, 1], got {rho}")


def _check_epsilons(epsilons: list[float], densities: list[float]) -> None:
    for i, (eps, rho) in enumerate(zip(epsilons, densities)):
        if eps < 0:
            raise ValueError(f"epsilons[{i}] must be >= 0, got {eps}")
        if 0 < rho < 1 and not (0 < rho - eps and rho + eps < 1):
            raise ValueError(f"epsilons[{i}]={eps} with densities[{i}]={rho}: density +/- epsilon must lie in "
                             f"(0, 1) (keep probabilities run from density - epsilon to density + epsilon)")


def _topk_counts(densities: list[float], numel: int, k_rule: str) -> list[int]:
    ks = []
    for i, rho in enumerate(densities):
        k = int(rho * numel)
        if k_rule == "at_least_one" and rho > 0:
            k = max(1, k)
        if k_rule == "strict" and rho > 0 and k == 0 and numel > 0:
            raise ValueError(f"densities[{i}]={rho} keeps no element of a tensor with {numel} elements "
                             f"(k = int(density * numel) = 0); raise the density or use density 0")
        ks.append(min(k, numel))
    return ks


def _band_thresholds(ops, base, tensors, densities, gammas, k_rule) -> torch.Tensor:
    """int64 (N, 4) band thresholds (key_a, cutoff_a, key_b, cutoff_b): a = the top k_a, b = the top k_b of
    |d_i| (reference.merging.band_counts: mergekit's magnitude_outliers), ties at either edge resolved like
    top-k (the lower flat index counts as larger). The 2N top-k thresholds come from one selection pass over
    the models (each model listed twice) when 2N <= MAX_MODELS. An edge that keeps everything (k_a = numel)
    or nothing (k_b = 0) needs no selection: (-1, -1) selects every key, k = 0 gives (2^32, -1)."""
    n, numel = len(tensors), tensors[0].numel()
    counts = [band_counts(rho, gamma, numel, target) for rho, gamma, target in
              zip(densities, gammas, _topk_counts(densities, numel, k_rule))]
    ks_a = [0 if ka == numel else ka for ka, _ in counts]
    ks_b = [kb for _, kb in counts]
    if 2 * n <= MAX_MODELS:
        both = ops.delta_topk_thresholds(base, tensors + tensors, ks_a + ks_b)
        rows_a, rows_b = both[:n], both[n:]
    else:
        rows_a = ops.delta_topk_thresholds(base, tensors, ks_a)
        rows_b = ops.delta_topk_thresholds(base, tensors, ks_b)
    keep_all = torch.tensor([ka == numel for ka, _ in counts], device=rows_a.device).unsqueeze(1)
    rows_a = torch.where(keep_all, torch.full_like(rows_a, -1), rows_a)
    return torch.cat([rows_a, rows_b], dim=1).contiguous()


def _check_finite(base, tensors) -> None:
    for name, t in _named_inputs(base, tensors):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


def _rescale_name(rescale, preset_default: str) -> str:
    if rescale is None:
        return preset_default
    if rescale is True:
        return "l1"
    if rescale is False:
        return "none"
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be a bool or one of {RESCALES}, got {rescale!r}")
    return rescale


def _choice(value: str, options: dict | tuple, name: str) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


# --- the engine -----------------------------------------------------------------------------------------

def _scales(n: int, rescale: str, densities, device) -> torch.Tensor:
    """The scales of rescale "none" or "inverse" (the l1 rescale is computed by fused_merge_l1)."""
    if rescale == "none":
        return torch.ones(n, dtype=torch.float32, device=device)
    return torch.tensor([1.0 / p if p > 0 else 1.0 for p in densities], dtype=torch.float32, device=device)


def merge(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], method: str = "task_arithmetic", *,
          weights=None, densities=None, gammas=None, epsilons=None, normalize: bool | None = None, rescale=None,
          lambda_: float = 1.0, seed: int = 0, consensus: str | None = None, sign_source: str = "weighted",
          divisor: str = "weights", k_rule: str = "strict", check_finite: bool = False, backend: str | None = None,
          out_dtype: torch.dtype | None = None, _prepared: dict | None = None) -> torch.Tensor:
    """Merge fine-tuned `tensors` into `base` with `method` (mergekit semantics; DESIGN.md section 3).

    Args:
        base: the base model's tensor, or None when `tensors` are task vectors already (and for "linear").
        tensors: N = 1..64 fine-tuned tensors, any mix of float32/bfloat16/float16, same shape as base.
        method: one of METHODS.
        weights: per-model weights (default 1.0). densities: per-model keep fractions in [0, 1].
        gammas: breadcrumbs only (mergekit's gamma, default 0.01): per-model share in [0, 1] of the largest
            magnitudes to drop, or one value for every model. mergekit's magnitude_outliers: with
            target = int(density*numel), n_top = int(gamma*numel), n_bot = max(0, numel - target - n_top), keep
            the ascending-|d| positions [n_bot, n_bot + target), i.e. the top (numel - n_bot) minus the top
            (numel - n_bot - target); density >= 1 keeps everything. Ties at either edge are resolved like
            top-k: among equal magnitudes the lower flat index counts as larger (mergekit's unstable sort keeps
            an arbitrary subset).
        epsilons: DELLA only (default 0.15): per-model half-width of the keep probabilities. Per row (a 1-D
            tensor is one row; from 3-D on, rows run along dim 1, as in mergekit), the element of ascending
            |d| rank r in 1..n (ties by index) is kept with probability p = (density - eps) +
            2*eps*(r - 1)/(n - 1) (p = density - eps when n = 1), drawn from the seeded counter-based stream;
            density +/- eps must lie in (0, 1).
        normalize: divide by the sum of (agreeing) weights; default per method.
        rescale: False/"none", True/"l1" (mergekit: l1-norm matching), "inverse" (1/density for DARE, 1/p for
            DELLA, as in the papers and peft).
        consensus: sign election "sum", "count" or "none"; default per method.
        sign_source: elect signs on "weighted" (mergekit) or "unweighted" (peft) sparsified task vectors.
        divisor: normalize by the sum of agreeing "weights" (mergekit) or their "count" (peft).
        k_rule: magnitude top-k size: "strict" k = int(density*numel), an error when that is 0 for density > 0;
            "floor" the same without the error (peft); "at_least_one" max(1, ...) (mergekit's ties). For
            breadcrumbs the rule sizes target (mergekit's breadcrumbs is "floor").
        seed: counter-based stream for random masks; same seed gives the same masks on every backend.
        check_finite: raise on NaN/Inf inputs instead of propagating them (a non-finite input gives NaN).
        out_dtype: output dtype (default: base's dtype, or the first tensor's without a base).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    preset = METHODS[method]
    if not preset.uses_base and base is not None:
        raise ValueError(f"method {method!r} averages the tensors themselves: pass base=None")
    tensors = _check_tensors(base, tensors)
    n = len(tensors)
    weights_given = weights is not None
    weights = _per_model(weights, n, "weights", 1.0)
    if preset.sparsifier == "none" and densities is not None:
        raise ValueError(f"densities have no effect with method {method!r}; leave them out")
    densities = _per_model(densities, n, "densities", 1.0)
    _check_densities(densities)
    if preset.sparsifier != "band" and gammas is not None:
        raise ValueError(f"gammas apply to the breadcrumbs methods only, not to method {method!r}; leave them out")
    gammas = _per_model(gammas, n, "gammas", GAMMA_DEFAULT)
    _check_densities(gammas, "gammas")
    if preset.sparsifier != "della" and epsilons is not None:
        raise ValueError(f"epsilons apply to the DELLA methods only, not to method {method!r}; leave them out")
    epsilons = _per_model(epsilons, n, "epsilons", EPSILON_DEFAULT)
    if preset.sparsifier == "della":
        _check_epsilons(epsilons, densities)
    if not math.isfinite(float(lambda_)):
        raise ValueError(f"lambda_ must be finite, got {lambda_}")
    _check_seed(seed)
    preset = replace(
        preset,
        consensus=_choice(consensus if consensus is not None else preset.consensus, CONSENSUS, "consensus"),
        normalize=preset.normalize if normalize is None else bool(normalize),
        rescale=_rescale_name(rescale, preset.rescale),
    )
    _choice(sign_source, SIGN_SOURCES, "sign_source")
    _choice(divisor, DIVISORS, "divisor")
    _choice(k_rule, K_RULES, "k_rule")
    ref = base if base is not None else tensors[0]
    out_dtype = ref.dtype if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if check_finite:
        _check_finite(base, tensors)
    backend = _backend.resolve(backend, ref.device)
    ops = _ops.primitives(backend)
    if preset.sparsifier == "variance":
        _check_sce_arguments(weights_given, densities, lambda_, normalize, rescale, consensus, sign_source, divisor)
        return _run_sce(ops, backend, base, tensors, densities, out_dtype)
    if preset.sparsifier == "della":
        return _run_della(ops, base, tensors, preset, weights, densities, epsilons, float(lambda_), seed,
                          sign_source, divisor, out_dtype)
    return _run(ops, base, tensors, preset, weights, densities, float(lambda_), seed, sign_source, divisor, k_rule,
                out_dtype, gammas, _prepared or {})


def _run(ops, base, tensors, preset: Preset, weights, densities, lambda_, seed, sign_source, divisor, k_rule,
         out_dtype, gammas=None, prepared=None) -> torch.Tensor:
    """The selection pass (unless `prepared` holds model-wide thresholds / scales) and the fused merge."""
    device = tensors[0].device
    sparsifier = SPARSIFIERS[preset.sparsifier]
    prepared = prepared or {}
    if "thresholds" in prepared:
        thresholds = prepared["thresholds"]
    elif preset.sparsifier == "magnitude":
        thresholds = ops.delta_topk_thresholds(base, tensors, _topk_counts(densities, tensors[0].numel(), k_rule))
    elif preset.sparsifier == "band":
        thresholds = _band_thresholds(ops, base, tensors, densities, gammas, k_rule)
    else:
        thresholds = torch.zeros((len(tensors), 2), dtype=torch.int64, device=device)
    combination = (weights, SIGN_SOURCES[sign_source], CONSENSUS[preset.consensus], DIVISORS[divisor],
                   preset.normalize, lambda_, out_dtype)
    scales = prepared.get("scales")
    if scales is None and preset.rescale == "l1":
        return ops.fused_merge_l1(base, tensors, sparsifier, thresholds, densities, seed, *combination)
    if scales is None:
        scales = _scales(len(tensors), preset.rescale, densities, device)
    return ops.fused_merge(base, tensors, sparsifier, thresholds, densities, seed, scales, *combination)


def _della_rows(t: torch.Tensor) -> torch.Tensor:
    """The layout DELLA ranks in: rows along the last dim, except from 3-D on, where mergekit ranks along dim 1."""
    return t.movedim(1, -1) if t.dim() >= 3 else t


def _run_della(ops, base, tensors, preset: Preset, weights, densities, epsilons, lambda_, seed, sign_source, divisor,
               out_dtype) -> torch.Tensor:
    """Row-fused DELLA: ranks, rank-dependent keep, rescale and merge in one pass (an l1 rescale adds a pass)."""
    rows_base = _della_rows(base) if base is not None else None
    rows = [_della_rows(t) for t in tensors]
    if preset.rescale == "l1":
        scales = l1_ratio(ops.della_l1_norms(rows_base, rows, densities, epsilons, seed))
    else:
        scales = torch.ones(len(tensors), dtype=torch.float32, device=tensors[0].device)
    out = ops.della_merge(rows_base, rows, densities, epsilons, seed, preset.rescale == "inverse", scales, weights,
                          SIGN_SOURCES[sign_source], CONSENSUS[preset.consensus], DIVISORS[divisor], preset.normalize,
                          lambda_, out_dtype)
    return out.movedim(-1, 1).contiguous() if tensors[0].dim() >= 3 else out


SCE_CHUNK = 1 << 20  # elements per chunk of the streaming SCE passes


def _check_sce_arguments(weights_given, densities, lambda_, normalize, rescale, consensus, sign_source, divisor):
    if weights_given:
        raise ValueError("method 'sce' computes its own weights (mean squared selected task vectors); leave out "
                         "weights")
    if (lambda_ != 1.0 or normalize is not None or rescale is not None or consensus is not None
            or sign_source != "weighted" or divisor != "weights"):
        raise ValueError("method 'sce' takes only densities (mergekit's select_topk, one value for all models); "
                         "leave out lambda_, normalize, rescale, consensus, sign_source and divisor")
    if any(rho != densities[0] for rho in densities):
        raise ValueError(f"method 'sce' selects one shared set of elements: give one density, got {densities}")


def _run_sce(ops, backend, base, tensors, densities, out_dtype) -> torch.Tensor:
    """SCE in chunks of SCE_CHUNK elements: (1) variance histograms and the non-zero count, (2) the refine pass
    of the exact top-k variance threshold, (3) weights from the selected task vectors, (4) the merge through
    the fused engine on the selected task vectors. Extra memory: the output plus a few chunks."""
    density = densities[0]
    if backend == "reference":
        return ref_sce.sce_merge(base, tensors, density, out_dtype)
    from .selection import StreamingThreshold

    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    numel, n = flat_base.numel(), len(tensors)
    bounds = [(s, min(s + SCE_CHUNK, numel)) for s in range(0, numel, SCE_CHUNK)]

    def deltas(c: int) -> list[torch.Tensor]:
        s, e = bounds[c]
        return [t[s:e].float() - flat_base[s:e].float() for t in flats]

    keep_of = lambda c, ds: None  # noqa: E731  (density >= 1: every element)
    if density <= 0:
        keep_of = lambda c, ds: torch.zeros_like(ds[0], dtype=torch.bool)  # noqa: E731
    elif density < 1:
        stream = StreamingThreshold(0, abs=True, nan="largest", backend=backend)
        nonzero = 0
        for c in range(len(bounds)):
            var = ref_sce.variance(deltas(c))
            stream.update(var)
            nonzero += int(torch.count_nonzero(var))
        threshold = stream.resolve(lambda c: ref_sce.variance(deltas(c)),
                                   k=ref_sce.selected_count(nonzero, density))
        keep_of = lambda c, ds: threshold.mask(ref_sce.variance(ds), c)  # noqa: E731

    def selected(c: int) -> list[torch.Tensor]:
        ds = deltas(c)
        keep = keep_of(c, ds)
        return ds if keep is None else [torch.where(keep, d, torch.zeros((), dtype=d.dtype)) for d in ds]

    squares = [0.0] * n
    for c in range(len(bounds)):
        for i, s in enumerate(selected(c)):
            squares[i] += float(s.double().square().sum())
    weights = ref_sce.weights_of(squares, numel)

    out = torch.empty(numel, dtype=out_dtype, device=flat_base.device)
    no_thresholds = torch.zeros((n, 2), dtype=torch.int64, device=flat_base.device)
    ones = torch.ones(n, dtype=torch.float32, device=flat_base.device)
    for c, (s, e) in enumerate(bounds):
        mixed = ops.fused_merge(None, selected(c), 0, no_thresholds, [1.0] * n, 0, ones, weights,
                                ref_sce.SIGN_UNWEIGHTED, ref_sce.CONSENSUS_SUM, ref_sce.DIVISOR_WEIGHTS, True, 1.0,
                                torch.float32)
        merged = flat_base[s:e].float() + mixed
        bad = ~torch.isfinite(flat_base[s:e])
        for t in flats:
            bad |= ~torch.isfinite(t[s:e])
        out[s:e] = torch.where(bad & torch.isfinite(merged), float("nan"), merged)
    return out.reshape(tensors[0].shape)


_SPARSIFY_METHODS = {  # method: (engine sparsifier, default rescale)
    "magnitude": ("magnitude", "none"),
    "random": ("random", "inverse"),
    "magnitude_outliers": ("band", "none"),
    "della": ("della", "inverse"),
}


def sparsify(delta: torch.Tensor, method: str, density: float, *, gamma: float | None = None,
             epsilon: float | None = None, rescale=None, seed: int = 0, k_rule: str = "strict",
             backend: str | None = None) -> torch.Tensor:
    """Sparsify one task vector: "magnitude" (exact top-k, ties by index), "random" (DARE) or
    "magnitude_outliers" (breadcrumbs: drop the top int(gamma*numel) magnitudes, keep the next
    int(density*numel); gamma defaults to mergekit's 0.01; see merge()'s gammas for the exact rule).

    or "della" (per-row rank-dependent random keep; epsilon defaults to mergekit's 0.15; see merge()'s
    epsilons for the exact rule).

    rescale defaults to "none" for magnitude and magnitude_outliers, and "inverse" for random (1/density) and
    della (1/p).
    """
    if method not in _SPARSIFY_METHODS:
        raise ValueError(f"method must be one of {tuple(_SPARSIFY_METHODS)}, got {method!r}")
    sparsifier, default_rescale = _SPARSIFY_METHODS[method]
    if sparsifier != "della" and epsilon is not None:
        raise ValueError(f"epsilon applies to method 'della' only, not to {method!r}")
    if sparsifier != "band" and gamma is not None:
        raise ValueError(f"gamma applies to method 'magnitude_outliers' only, not to {method!r}")
    tensors = _check_tensors(None, [delta])
    densities = _per_model([density], 1, "density", 1.0)
    _check_densities(densities)
    gammas = None
    if sparsifier == "band":
        if isinstance(gamma, (torch.Tensor, Sequence)):
            raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
        gammas = [float(gamma) if gamma is not None else GAMMA_DEFAULT]
        if not 0.0 <= gammas[0] <= 1.0:  # also rejects NaN
            raise ValueError(f"gamma must lie in [0, 1], got {gammas[0]}")
    _choice(k_rule, K_RULES, "k_rule")
    _check_seed(seed)
    preset = Preset(sparsifier=sparsifier, rescale=_rescale_name(rescale, default_rescale))
    ops = _ops.primitives(_backend.resolve(backend, delta.device))
    if sparsifier == "della":
        if isinstance(epsilon, (torch.Tensor, Sequence)):
            raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")
        epsilons = [float(epsilon) if epsilon is not None else EPSILON_DEFAULT]
        _check_epsilons(epsilons, densities)
        return _run_della(ops, None, tensors, preset, [1.0], densities, epsilons, 1.0, seed, "weighted", "weights",
                          delta.dtype)
    return _run(ops, None, tensors, preset, [1.0], densities, 1.0, seed, "weighted", "weights", k_rule, delta.dtype,
                gammas)


# --- one function per method ----------------------------------------------------------------------------

def linear(tensors, *, weights=None, normalize: bool = True, **kwargs) -> torch.Tensor:
    """Weighted average of the tensors: sum_i w_i t_i / sum_i w_i."""
    return merge(None, tensors, "linear", weights=weights, normalize=normalize, **kwargs)


def task_arithmetic(base, tensors, *, weights=None, lambda_: float = 1.0, **kwargs) -> torch.Tensor:
    """base + lambda * sum_i w_i (t_i - base)."""
    return merge(base, tensors, "task_arithmetic", weights=weights, lambda_=lambda_, **kwargs)


def ties(base, tensors, *, weights=None, densities=None, **kwargs) -> torch.Tensor:
    """TIES: magnitude top-k per task vector, sum sign election, disjoint mean (normalize=True)."""
    return merge(base, tensors, "ties", weights=weights, densities=densities, **kwargs)


def dare_ties(base, tensors, *, weights=None, densities=None, seed: int = 0, **kwargs) -> torch.Tensor:
    """DARE + TIES: random keep with probability density, l1 rescale, sum sign election."""
    return merge(base, tensors, "dare_ties", weights=weights, densities=densities, seed=seed, **kwargs)


def dare_linear(base, tensors, *, weights=None, densities=None, seed: int = 0, **kwargs) -> torch.Tensor:
    """DARE: random keep with probability density, l1 rescale, weighted sum."""
    return merge(base, tensors, "dare_linear", weights=weights, densities=densities, seed=seed, **kwargs)


def breadcrumbs(base, tensors, *, weights=None, densities=None, gammas=None, **kwargs) -> torch.Tensor:
    """Model Breadcrumbs: per task vector drop the top int(gamma*numel) magnitudes and all but the next
    int(density*numel) (mergekit's magnitude_outliers), weighted sum; normalize and rescale off."""
    return merge(base, tensors, "breadcrumbs", weights=weights, densities=densities, gammas=gammas, **kwargs)


def breadcrumbs_ties(base, tensors, *, weights=None, densities=None, gammas=None, **kwargs) -> torch.Tensor:
    """Breadcrumbs + TIES sign election (sum); normalize and rescale off (mergekit's defaults)."""
    return merge(base, tensors, "breadcrumbs_ties", weights=weights, densities=densities, gammas=gammas,
                 **kwargs)


def della(base, tensors, *, weights=None, densities=None, epsilons=None, seed: int = 0, **kwargs) -> torch.Tensor:
    """DELLA-TIES: per-row rank-dependent random keep, l1 rescale, sum sign election, normalized."""
    return merge(base, tensors, "della", weights=weights, densities=densities, epsilons=epsilons, seed=seed,
                 **kwargs)


def della_linear(base, tensors, *, weights=None, densities=None, epsilons=None, seed: int = 0,
                 **kwargs) -> torch.Tensor:
    """DELLA without sign election: per-row rank-dependent random keep, l1 rescale, weighted sum."""
    return merge(base, tensors, "della_linear", weights=weights, densities=densities, epsilons=epsilons, seed=seed,
                 **kwargs)


def sce(base, tensors, *, density: float = 1.0, **kwargs) -> torch.Tensor:
    """SCE (mergekit's sce): keep the top `density` share of elements by variance across models (of the ones
    with non-zero variance), weights from mean squared selected task vectors, sum sign election. Streams in
    chunks: four reads of the inputs, extra memory a few chunks plus the output. Differs from mergekit only
    where the agreeing weights sum to less than 1e-6 (mergekit clamps the divisor to 1e-6; here an empty sum
    divides by 1) and in ties at the variance threshold (kept in ascending index order)."""
    return merge(base, tensors, "sce", densities=density, **kwargs)
