"""Whole-model merges: every tensor of a checkpoint, with optional model-wide ("global") density.

`merge_model` merges tensor by tensor (peak memory: one tensor's inputs and its output). With
`global_density=True` each model's sparsification is decided over the whole model, as in the TIES paper: the
magnitude top-k (ties, breadcrumbs) keeps the `density` fraction of all of a model's task-vector entries, with
one exact threshold from a StreamingThreshold, and DARE's l1 rescale matches whole-model norms. Ties at a
global threshold are kept in (tensor order, flat index) order. Cost: two extra reads of every tensor per
threshold (histogram, refine), each computing one task vector at a time.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from . import _backend, _ops
from .merging import GAMMA_DEFAULT, METHODS, _check_densities, _per_model, _topk_counts, merge
from .reference.merging import band_counts, l1_ratio, tensor_seed
from .reference.selection import KEEP_NONE, ORDER_NAN_KEY
from .selection import StreamingThreshold

ENGINE_NAN_KEY = 0x7F800001  # the merge engine's magnitude key of NaN (reference.selection.NAN_KEY)
GLOBAL_SPARSIFIERS = ("magnitude", "band", "random")


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    """A tqdm bar over items when enabled and tqdm is installed (off when stderr is not a terminal)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="tensor", disable=None, leave=False)


def _task_vector(base: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """d = tensor - base in float32 (one float32 buffer; the same float32 subtraction the kernels perform)."""
    d = tensor.float() if tensor.dtype != torch.float32 else tensor.clone()
    return d.sub_(base)


def _tensor_names(base: Mapping, models: Sequence[Mapping]) -> list[str]:
    names = list(base.keys())
    for i, m in enumerate(models):
        missing = [n for n in names if n not in m]
        if missing:
            raise KeyError(f"models[{i}] lacks tensor {missing[0]!r} (and {len(missing) - 1} more) of the base")
    return names


def _engine_threshold(threshold, i: int, numel: int, task_vector: Callable[[], torch.Tensor], ops) -> tuple[int, int]:
    """The engine's (key, cutoff) of a global threshold restricted to tensor i (numel elements); the task vector
    is computed only when the threshold's ties split inside this tensor."""
    if threshold.key == KEEP_NONE:
        return KEEP_NONE, -1
    kept = threshold.ties_kept_per_tensor()[i]
    key = ENGINE_NAN_KEY if threshold.key == ORDER_NAN_KEY else threshold.key
    if kept == threshold.ties_per_tensor[i]:
        return key, numel - 1
    if kept == 0:
        return key, -1
    return key, int(ops.key_find(task_vector(), True, threshold.key, kept))


def engine_thresholds(thresholds: Sequence[Sequence], i: int, base_t: torch.Tensor, tensors: Sequence[torch.Tensor],
                      ops) -> torch.Tensor:
    """int64 (N, 2) or (N, 4): model m's global thresholds (thresholds[m]) as engine thresholds of tensor i."""
    rows = []
    for m, t in enumerate(tensors):
        row = []
        for th in thresholds[m]:
            row.extend(_engine_threshold(th, i, t.numel(), lambda: _task_vector(base_t, t), ops))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=base_t.device)


class _GlobalSelection:
    """Per model, the global thresholds (one for magnitude, two for band) resolved over every tensor."""

    def __init__(self, base: Mapping, models: Sequence[Mapping], names: list[str], ranks: list[list[int]],
                 progress: bool, backend):
        self.names, self.backend = names, backend
        self.thresholds = []  # [model][j] -> Threshold
        for m, model in enumerate(models):
            def d_of(i: int, model=model) -> torch.Tensor:
                return _task_vector(base[names[i]], model[names[i]])

            st = StreamingThreshold(0, abs=True, nan="largest", backend=backend)
            for i in _progress(range(len(names)), progress, f"model {m}: histogram"):
                st.update(d_of(i))
            self.thresholds.append([st.resolve(d_of, k=k) for k in ranks[m]])

    def for_tensor(self, i: int, base_t: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        ops = _ops.primitives(_backend.resolve(self.backend, base_t.device))
        return engine_thresholds(self.thresholds, i, base_t, tensors, ops)


def _global_ranks(method: str, densities: list[float], gammas: list[float], total: int, k_rule: str) -> list[list[int]]:
    """Per model, the global top-k sizes to resolve: [k] for magnitude, [k_outer, k_top] for band."""
    ks = _topk_counts(densities, total, k_rule)
    if METHODS[method].sparsifier == "magnitude":
        return [[k] for k in ks]
    return [list(band_counts(rho, gamma, total, target)) for rho, gamma, target in zip(densities, gammas, ks)]


def _global_l1_scales(base: Mapping, models: Sequence[Mapping], names: list[str], densities: list[float],
                      seed: int, progress: bool, backend) -> torch.Tensor:
    """DARE's l1 rescale over the whole model: sum |d| / sum |kept d| per model (skipped when either < 1e-7)."""
    totals = torch.zeros(len(models), 2, dtype=torch.float64)
    for name in _progress(names, progress, "l1 norms"):
        b = base[name]
        ops = _ops.primitives(_backend.resolve(backend, b.device))
        thresholds = torch.zeros(len(models), 2, dtype=torch.int64)
        totals += ops.delta_l1_norms(b, [m[name] for m in models], 2, thresholds, densities,
                                     tensor_seed(seed, name)).cpu()
    return l1_ratio(totals)


def merge_model(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                method: str = "task_arithmetic", *, global_density: bool = False, densities=None, gammas=None,
                seed: int = 0, k_rule: str = "strict", progress: bool = False, backend: str | None = None,
                on_tensor: Callable[[str, torch.Tensor], None] | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Merge every tensor of `base` with the same-named tensors of `models` (mappings: dicts, or lazy
    loaders such as a safetensors handle wrapped in a Mapping). Extra keyword arguments go to `merge`.

    seed: random masks (DARE, DELLA) of the tensor called `name` use tensor_seed(seed, name), as `pykernels merge`
    does, so that tensors of the same shape get independent masks.
    global_density: one model-wide threshold per model (ties, breadcrumbs, breadcrumbs_ties; for dare_ties and
    dare_linear the l1 rescale uses whole-model norms). on_tensor(name, merged): called for each merged tensor
    (e.g. to write it out); then the result dict stays empty, so memory holds one tensor at a time.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    names = _tensor_names(base, models)
    n = len(models)
    merge_kwargs = dict(kwargs, seed=seed, k_rule=k_rule, backend=backend, densities=densities)
    if gammas is not None:
        merge_kwargs["gammas"] = gammas
    selection = scales = None
    if global_density:
        sparsifier = METHODS[method].sparsifier
        if sparsifier not in GLOBAL_SPARSIFIERS:
            raise ValueError(f"global_density applies to methods with a magnitude, band or random sparsifier, "
                             f"not {method!r}")
        rhos = _per_model(densities, n, "densities", 1.0)
        _check_densities(rhos)
        if sparsifier == "random":
            if kwargs.get("rescale", METHODS[method].rescale) in ("l1", True):
                scales = _global_l1_scales(base, models, names, rhos, seed, progress, backend)
        else:
            total = sum(base[name].numel() for name in names)
            ranks = _global_ranks(method, rhos, _per_model(gammas, n, "gammas", GAMMA_DEFAULT), total, k_rule)
            selection = _GlobalSelection(base, models, names, ranks, progress, backend)
    merged = {}
    for i, name in enumerate(_progress(names, progress, "merge")):
        b = base[name]
        tensors = [m[name] for m in models]
        prepared = {}
        if selection is not None:
            prepared["thresholds"] = selection.for_tensor(i, b, tensors).to(b.device)
        if scales is not None:
            prepared["scales"] = scales.to(b.device)
        out = merge(b, tensors, method, _prepared=prepared or None, **dict(merge_kwargs, seed=tensor_seed(seed, name)))
        if on_tensor is not None:
            on_tensor(name, out)
        else:
            merged[name] = out
    return merged
