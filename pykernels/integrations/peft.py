"""Drop-in pykernels backend for peft's merge utilities (``peft.utils.merge_utils``, written against peft 0.21.2).

Usage::

    from pykernels.integrations import peft as pk_peft

    pk_peft.patch()                   # every peft module now calls the functions below
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type="dare_ties", density=0.5)
    pk_peft.unpatch()                 # every original is back

    with pk_peft.patched(seed=1234):  # the same, scoped (restores the previous state on exit)
        ...

What patch() replaces: magnitude_based_pruning, random_pruning, prune, calculate_majority_sign_mask,
disjoint_merge, task_arithmetic, magnitude_prune, ties, dare_linear and dare_ties, in ``peft.utils.merge_utils``
and in every module of ``sys.modules`` that holds a reference to one of them (peft imports five of them by name
into ``peft.tuners.lora.model``; an alias such as ``from peft.utils.merge_utils import ties as t`` is found too,
by identity). unpatch() puts every original back, including in modules imported while patched. patch() twice
is idempotent (it re-scans sys.modules and resets the seed); unpatch() without patch() does nothing.

The functions of this module keep peft's signatures and semantics (DESIGN.md section 3): magnitude pruning keeps
k = int(density * numel) elements; sign election ("total" = sign of the sum, "frequency" = sign of the sum of
signs, >= 0 counts as positive) runs on the *unweighted* pruned task tensors; the disjoint merge divides by the
*number* of agreeing models, clamped to >= 1; DARE keeps each element with probability density (rounded to the
task tensor's dtype, as peft's ``torch.full_like(tensor, density)`` does) and rescales by 1/density;
prune() warns and returns its input when density >= 1 and raises ValueError when density < 0 (ties and the other
whole merges warn once per task tensor, as peft's do); output dtypes follow peft's type promotion (bfloat16
task tensors merged with float32 weights give float32; ties and dare_ties give at least the default float dtype,
because peft divides by a float32 count). Errors are raised where peft raises, with the same
exception types (RuntimeError for an out-of-range top-k size or keep probability, RuntimeError for an unknown
majority_sign_method, ValueError for a negative density or an unknown pruning method, torch's own errors for
tensors that cannot be stacked).

How they run. When the whole merge is called (task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties,
and the pruning functions), it runs as one call of the fused engine (pykernels.merging.merge / sparsify): an
exact top-k selection pass and one merge pass in float32, no (N, ...) stack, extra memory O(output). peft's
semantics are engine presets (sign_source="unweighted", consensus "sum"/"count", divisor="count",
k_rule="floor"; DARE as a random keep with the 1/density rescale folded into the weights). Results equal peft's
up to float32 rounding (the engine accumulates in float32 in its own order and keeps the 1/density rescale in
float32; peft rounds intermediate products to the task dtype when weights and task tensors are both low
precision); magnitude ties are kept in ascending flat-index order (peft's torch.topk keeps an arbitrary subset).
calculate_majority_sign_mask and disjoint_merge take or return (N, ...) tensors by their API and compute exactly
peft's arithmetic ("frequency" counts signs with the pykernels sign_count kernel without an (N, ...) sign tensor).

peft's inputs the engine does not take run on a plain-torch path with peft's arithmetic (and pykernels' masks):
float64 (or float64 weights), more than 64 task tensors, weights that are not one value per task tensor,
a density that is not a finite Python number, devices without a pykernels backend, and DARE with density 0
(peft returns NaN there: 0/0). A fused result holding Inf or NaN is recomputed on that path, so non-finite
inputs follow peft's rules exactly (e.g. a pruned inf becomes NaN). With autograd on (inputs requiring grad,
e.g. add_weighted_adapter's *_svd variants, which merge get_delta_weight() outputs) the forward stays fused and
the backward recomputes the merge on the torch path with the same masks (first-order gradients).
stats() counts which path each call took.

Peak extra memory: a fused merge, the output plus the engine's per-thread histograms and a bool tensor of the
output's size (the finiteness check); the pruning functions, the output and that check; the torch path, what
peft's own code allocates (the (N, ...) stack and the pruned copies).

Random masks (random_pruning, dare_linear, dare_ties) come from pykernels' counter-based Philox stream
(DESIGN.md section 2), never from torch.bernoulli. Each call draws one 63-bit call seed s; task tensor m of the
call uses stream model_seed(s, m) = (s + m * 0x9E3779B97F4A7C15) mod 2^63 (random_pruning: s itself), element i
is kept where u_i < density. The call seed:
  * seed=None (the default of patch()/set_seed()): s is drawn from torch's default CPU generator
    (``torch.empty((), dtype=torch.int64).random_()``), so torch.manual_seed(...) makes the masks reproducible,
    as it does for peft's own torch.bernoulli;
  * seed=int: a private deterministic sequence independent of torch's generator: the c-th random call after
    patch(seed=...)/set_seed(...) uses call_seed(seed, c) (splitmix64 of seed + c * 0x9E3779B97F4A7C15, top 63
    bits).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import os
import sys
import threading
import warnings
from collections import Counter
from typing import Literal

import torch

from .. import _backend
from ..merging import MAX_MODELS, SUPPORTED_DTYPES, merge as _merge, sparsify as _sparsify
from ..reference.merging import model_seed, random_keep
from ..selection import topk_mask as _topk_mask
from ..statistics import sign_count as _sign_count

PEFT_MODULE = "peft.utils.merge_utils"
# Modules known to import the functions by name (imported by patch() when present so they are patched too).
KNOWN_IMPORTERS = ("peft.tuners.lora.model",)
FUNCTIONS = ("magnitude_based_pruning", "random_pruning", "prune", "calculate_majority_sign_mask", "disjoint_merge",
             "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = {"total": "sum", "frequency": "count"}

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# --- seeds ----------------------------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def call_seed(seed: int, index: int) -> int:
    """The call seed of the index-th (0-based) random call after set_seed(seed) / patch(seed=seed)."""
    return _splitmix64((seed + index * _GOLDEN) & _MASK64) >> 1


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.seed: int | None = None
        self.calls = 0
        self.backend: str | None = None
        self.originals: dict[str, object] = {}   # name -> peft's function
        self.installed: dict[str, object] = {}   # name -> the function put in its place
        self.records: list[tuple[object, str, str]] = []  # (module, attribute, name) replaced


_state = _State()
_stats: Counter = Counter()


def set_seed(seed: int | None) -> None:
    """None: draw each call's seed from torch's default generator; an int in [0, 2**63): the deterministic
    sequence call_seed(seed, 0), call_seed(seed, 1), ... (restarted by every set_seed / patch)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MASK63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    with _state.lock:
        _state.seed, _state.calls = seed, 0


def get_seed() -> int | None:
    """The seed set by patch() / set_seed() (None: seeds come from torch's default generator)."""
    return _state.seed


def _next_seed() -> int:
    with _state.lock:
        if _state.seed is None:
            return int(torch.empty((), dtype=torch.int64).random_()) & _MASK63
        index = _state.calls
        _state.calls += 1
        return call_seed(_state.seed, index)


def stats() -> dict:
    """How many calls took each path: {(function, "fused" | "torch" | "recomputed-nonfinite"): count}."""
    return dict(_stats)


def reset_stats() -> None:
    _stats.clear()


# --- when the fused engine applies --------------------------------------------------------------------

def _engine_backend(device: torch.device) -> str | None:
    """The pykernels backend for `device`; None when no backend runs there (the torch path is used).
    A backend asked for explicitly (patch(backend=...) or $PYKERNELS_BACKEND) raises when unavailable."""
    explicit = _state.backend or os.environ.get("PYKERNELS_BACKEND") or None
    if explicit is not None:
        return _backend.resolve(explicit, device)
    if device.type not in ("cpu", "cuda"):
        return None
    try:
        return _backend.resolve(None, device)
    except RuntimeError:
        return None


def _engine_tensor(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype in SUPPORTED_DTYPES
            and t.numel() > 0)


def _tasks_backend(tasks: list) -> str | None:
    """The backend when the fused engine can merge `tasks` (peft would stack them without error), else None."""
    if not 1 <= len(tasks) <= MAX_MODELS or not all(_engine_tensor(t) for t in tasks):
        return None
    first = tasks[0]
    if any(t.shape != first.shape or t.device != first.device for t in tasks):
        return None
    return _engine_backend(first.device)


def _model_weights(weights, tasks: list) -> list[float] | None:
    """One float per task tensor when peft's broadcast of `weights` over the stacked (N, ...) tensors gives one
    weight per task tensor (shape (), (1,) or (N,), trailing 1s allowed), else None."""
    if not isinstance(weights, torch.Tensor) or weights.layout != torch.strided or weights.is_complex():
        return None
    n = len(tasks)
    if weights.device != tasks[0].device or weights.dim() > tasks[0].dim() + 1:
        return None
    if weights.dim() > 0 and (weights.shape[0] not in (1, n) or any(s != 1 for s in weights.shape[1:])):
        return None
    values = [float(v) for v in weights.detach().reshape(-1).tolist()]
    if not all(math.isfinite(v) for v in values):
        return None
    return values * n if len(values) == 1 else values


def _result_dtype(tasks: list, weights) -> torch.dtype:
    """peft's output dtype: the stacked task tensors' dtype promoted with the weights'."""
    dtype = tasks[0].dtype
    for t in tasks[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, weights.dtype)


def _real(value) -> float | None:
    """A finite Python/NumPy real number as float, else None (tensors and NaN take the torch path)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _topk_size(tensor: torch.Tensor, density) -> int:
    """k = int(density * numel) as peft computes it, checked the way torch.topk checks it."""
    numel = tensor.numel()
    k = int(density * numel)
    if not 0 <= k <= numel:
        raise RuntimeError(f"magnitude pruning keeps k = int(density * numel) = {k} elements (density={density}, "
                           f"numel={numel}); k must lie in [0, numel] (torch.topk: selected index k out of range)")
    return k


def _density_for_k(k: int, numel: int) -> float:
    """A density for which the engine's int(density * numel) is exactly k."""
    if k >= numel:
        return 1.0
    return 0.0 if k <= 0 else (k + 0.5) / numel


def _keep_probability(tensor: torch.Tensor, density) -> float:
    """peft's keep probability: density stored in the tensor's dtype (torch.full_like(tensor, density))."""
    p = torch.full((), density, dtype=tensor.dtype).item()
    if not 0 <= p <= 1:  # also NaN
        raise RuntimeError(f"random pruning keeps each element with probability density, which must lie in [0, 1]; "
                           f"got density={density} (torch.bernoulli: expected 0 <= p <= 1)")
    return float(p)


def _prune_gate(density, n: int) -> bool:
    """peft's prune() checks, once per task tensor: density >= 1 warns and prunes nothing (False), density < 0
    raises."""
    if n == 0:
        return True
    if density >= 1:
        for _ in range(n):
            warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return False
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    return True


def _check_sign_method(method) -> str:
    if method not in SIGN_METHODS:
        raise RuntimeError(f'Unimplemented mask method "{method}" (majority_sign_method must be "total" or '
                           f'"frequency")')
    return method


# --- dispatch: fused engine, or the torch path; autograd by recomputation --------------------------------

class _Recompute(torch.autograd.Function):
    """Forward: the fused engine. Backward: the torch path (same masks) recomputed under autograd."""

    @staticmethod
    def forward(ctx, fused, fallback, *inputs):
        ctx.fallback = fallback
        ctx.save_for_backward(*inputs)
        return fused(list(inputs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]
        leaves = [x.detach().requires_grad_(bool(r)) for x, r in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            out = ctx.fallback(leaves)
        wanted = [x for x, r in zip(leaves, needs) if r]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if r else None for r in needs])


def _dispatch(name: str, inputs: list, fused, fallback):
    """fused(inputs) when given (a non-finite result is recomputed by fallback, peft's inf/NaN rules), else
    fallback(inputs); `inputs` are the tensors autograd tracks."""
    if fused is None:
        _stats[(name, "torch")] += 1
        return fallback(inputs)
    _stats[(name, "fused")] += 1

    def checked(xs):
        out = fused(xs)
        if not bool(torch.isfinite(out).all()):
            _stats[(name, "recomputed-nonfinite")] += 1
            with torch.no_grad():
                out = fallback(xs)
        return out

    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return _Recompute.apply(checked, fallback, *inputs)
    return checked(inputs)


# --- the torch path: peft's arithmetic, pykernels' masks ------------------------------------------------

def _magnitude_keep(t: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k largest |t| (NaN counts as largest, like torch.topk); ties by flat index where
    pykernels can select, so the torch path keeps what the fused path keeps."""
    if _engine_tensor(t) and _engine_backend(t.device) is not None:
        return _topk_mask(t.detach(), k, abs=True, nan="largest", backend=_engine_backend(t.device))
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.topk(t.detach().abs().reshape(-1), k=k, largest=True).indices] = True
    return keep.reshape(t.shape)


def _random_keep(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """bool mask: element i kept where the Philox uniform u_i of stream `seed` is < p."""
    backend = _engine_backend(t.device)
    if backend is not None and t.numel() > 0:
        ones = torch.ones(t.shape, dtype=torch.float32, device=t.device)
        return _sparsify(ones, "random", p, seed=seed, rescale="none", backend=backend) != 0
    return random_keep(t.numel(), p, seed, 0).reshape(t.shape).to(t.device)


def _torch_magnitude_pruning(t: torch.Tensor, density) -> torch.Tensor:
    return t * _magnitude_keep(t, _topk_size(t, density)).to(t.dtype)


def _torch_random_pruning(t: torch.Tensor, density, rescale: bool, seed: int) -> torch.Tensor:
    pruned = t * _random_keep(t, _keep_probability(t, density), seed).to(t.dtype)
    return pruned / density if rescale else pruned


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stacked * weights, weights viewed with trailing singleton dims (peft's broadcast)."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _torch_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    if method == "total":
        positive = stacked.sum(dim=0) >= 0
    else:
        positive = stacked.sign().sum(dim=0) >= 0
    return torch.where(positive, stacked > 0, stacked < 0)  # sign(x) == majority; 0 and NaN never agree


def _torch_disjoint(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _torch_merge(pruned: list, weights: torch.Tensor, sign_method: str | None) -> torch.Tensor:
    stacked = torch.stack(pruned, dim=0)
    weighted = _weighted(stacked, weights)
    if sign_method is None:
        return weighted.sum(dim=0)
    return _torch_disjoint(weighted, _torch_sign_mask(stacked, sign_method))


# --- the functions of peft.utils.merge_utils ----------------------------------------------------------

def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * numel) largest-magnitude values of `tensor`, zero the rest (peft's function;
    ties at the threshold kept in ascending flat-index order). Fused: one exact top-k selection pass + one
    masking pass, no sort."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    rho = _density_for_k(_topk_size(tensor, density), tensor.numel())
    backend = _engine_backend(tensor.device) if _engine_tensor(tensor) else None

    def fused(xs):
        return _sparsify(xs[0], "magnitude", rho, k_rule="floor", backend=backend)

    return _dispatch("magnitude_based_pruning", [tensor], fused if backend is not None else None,
                     lambda xs: _torch_magnitude_pruning(xs[0], density))


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each value with probability density (pykernels' counter-based stream, see the module docstring);
    if rescale, divide the result by density (peft's function, same arithmetic: (tensor * mask) / density in
    the tensor's dtype)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    p = _keep_probability(tensor, density)
    seed = _next_seed()
    backend = _engine_backend(tensor.device) if _engine_tensor(tensor) and _real(density) is not None else None

    def fused(xs):
        kept = _sparsify(xs[0], "random", p, seed=seed, rescale="none", backend=backend)
        return kept / density if rescale else kept

    return _dispatch("random_pruning", [tensor], fused if backend is not None else None,
                     lambda xs: _torch_random_pruning(xs[0], density, rescale, seed))


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """peft's prune(): density >= 1 warns and returns `tensor` itself; density < 0 raises ValueError; method
    "magnitude" or "random" (rescale: divide by density) else ValueError."""
    if not _prune_gate(density, 1):
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Boolean (N, ...) mask of the task tensors (stacked on dim 0) whose sign is the majority sign: sign of
    the sum ("total") or of the sum of signs ("frequency"), >= 0 counting as positive; zeros never agree.
    "frequency" counts signs with pykernels' sign_count kernel (no (N, ...) sign tensor); "total" is torch's
    sum over dim 0 in the tensor's dtype, as peft."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor of task tensors stacked on dim 0, got "
                        f"{type(tensor).__name__}")
    _check_sign_method(method)
    rows = list(tensor.detach().unbind(0)) if tensor.dim() > 0 else []
    backend = _tasks_backend(rows) if method == "frequency" else None
    if backend is None:
        _stats[("calculate_majority_sign_mask", "torch")] += 1
        return _torch_sign_mask(tensor, method)
    _stats[("calculate_majority_sign_mask", "fused")] += 1
    # torch.sign(NaN) is 0, so NaN counts 0 as in peft.
    positive = _sign_count(rows, nan="zero", backend=backend) >= 0
    return torch.where(positive, tensor > 0, tensor < 0)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the task tensors where the mask holds, divided by the number of agreeing models clamped to >= 1
    (peft's function and arithmetic; the fused merges never build the mask)."""
    _stats[("disjoint_merge", "torch")] += 1
    return _torch_disjoint(task_tensors, majority_sign_mask)


def _engine_call(tasks: list, weights, density, sign_method: str | None, sparsifier: str, seed: int):
    """(method, keyword arguments) of the pykernels.merging.merge call computing peft's merge, or None when the
    engine cannot (the torch path runs). density None: no pruning (peft's density >= 1, or task_arithmetic)."""
    backend = _tasks_backend(tasks)
    w = _model_weights(weights, tasks) if backend is not None else None
    if w is None:
        return None
    out_dtype = _result_dtype(tasks, weights)
    if sign_method is not None:
        # peft divides by clamp(count, min=1.0), a tensor of the default float dtype: bf16 * bf16 gives float32
        out_dtype = torch.promote_types(out_dtype, torch.get_default_dtype())
    if out_dtype not in SUPPORTED_DTYPES:
        return None
    options = dict(weights=w, out_dtype=out_dtype, backend=backend, normalize=False)
    if sign_method is not None:
        options.update(consensus=SIGN_METHODS[sign_method], sign_source="unweighted", divisor="count",
                       normalize=True)
    if density is None:
        return "task_arithmetic", options
    d = _real(density)
    if d is None:
        return None  # a density tensor or NaN: the torch path (with peft's errors)
    if sparsifier == "magnitude":
        options.update(densities=_density_for_k(_topk_size(tasks[0], density), tasks[0].numel()), k_rule="floor",
                       consensus=options.get("consensus", "none"))
        return "ties", options
    # DARE: keep with p = density in each task tensor's dtype (peft's full_like), weights * 1/density
    scaled = [wi / d for wi in w] if d > 0 else [math.inf]  # density 0: peft's 0/0 gives NaN
    if not all(math.isfinite(v) for v in scaled):
        return None
    options.update(weights=scaled, densities=[_keep_probability(t, density) for t in tasks], rescale="none",
                   seed=seed)
    return ("dare_linear" if sign_method is None else "dare_ties"), options


def _fused_merge(name: str, task_tensors, weights, density, sign_method: str | None, sparsifier: str):
    """The whole merges: sparsifier "none" (task_arithmetic), "magnitude" or "random" (DARE, 1/density rescale);
    sign_method None (weighted sum) or "total"/"frequency" (sign election + disjoint mean)."""
    tasks = list(task_tensors)
    prune_on = sparsifier != "none" and _prune_gate(density, len(tasks))
    if sign_method is not None:
        _check_sign_method(sign_method)
    seed = _next_seed() if prune_on and sparsifier == "random" else 0
    n = len(tasks)

    def pruned_of(xs):
        if not prune_on:
            return list(xs[:n])
        if sparsifier == "magnitude":
            return [_torch_magnitude_pruning(t, density) for t in xs[:n]]
        return [_torch_random_pruning(t, density, True, model_seed(seed, m)) for m, t in enumerate(xs[:n])]

    def fallback(xs):
        return _torch_merge(pruned_of(xs), xs[n], sign_method)

    engine = _engine_call(tasks, weights, density if prune_on else None, sign_method, sparsifier, seed)

    def fused(xs):
        method, options = engine
        return _merge(None, list(xs[:n]), method, **options)

    return _dispatch(name, tasks + [weights], fused if engine is not None else None, fallback)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * task_tensors[i] (peft's function), one fused pass."""
    if not isinstance(task_tensors, (list, tuple)):  # peft's torch.stack takes a list or tuple only
        _stats[("task_arithmetic", "torch")] += 1
        return _torch_merge(task_tensors, weights, None)
    return _fused_merge("task_arithmetic", task_tensors, weights, None, None, "none")


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude-prune each task tensor to k = int(density * numel) values, then the weighted sum (peft's
    function), fused."""
    return _fused_merge("magnitude_prune", task_tensors, weights, density, None, "magnitude")


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES as peft computes it: magnitude pruning, sign election on the unweighted pruned tensors, weighted
    disjoint merge divided by the number of agreeing models (>= 1), fused."""
    return _fused_merge("ties", task_tensors, weights, density, majority_sign_method, "magnitude")


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random keep with probability density, rescale 1/density, weighted sum (peft's function), fused;
    masks from pykernels' stream (module docstring)."""
    return _fused_merge("dare_linear", task_tensors, weights, density, None, "random")


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE + TIES as peft computes it: random keep, 1/density rescale, unweighted sign election, weighted
    disjoint merge divided by the number of agreeing models (>= 1), fused."""
    return _fused_merge("dare_ties", task_tensors, weights, density, majority_sign_method, "random")


# --- patching ---------------------------------------------------------------------------------------------

def _merge_utils():
    try:
        return importlib.import_module(PEFT_MODULE)
    except ImportError as e:
        raise ImportError(f"pykernels.integrations.peft.patch() needs peft installed ({PEFT_MODULE} could not be "
                          f"imported: {e})") from e


def _module_dicts():
    ours = sys.modules.get(__name__)
    for module in list(sys.modules.values()):
        try:
            d = object.__getattribute__(module, "__dict__")
        except Exception:  # odd objects in sys.modules
            continue
        if isinstance(d, dict) and module is not ours:
            yield module, d


def _replace_everywhere(mapping: dict) -> list[tuple[object, str, str]]:
    """Set every module attribute holding a key of `mapping` (by identity) to its value; the (module, attribute,
    name) replaced."""
    by_id = {id(old): (old, new) for old, new in mapping.items()}
    done = []
    for module, d in _module_dicts():
        for attr, value in list(d.items()):
            hit = by_id.get(id(value))
            if hit is not None and value is hit[0]:
                d[attr] = hit[1]
                done.append((module, attr, getattr(hit[1], "__name__", attr)))
    return done


def _installed_version(name: str, original):
    """A distinct function object per patch(): a module holding it got it from peft while patched, so
    unpatch() can tell it from a direct import of this module's function."""
    ours = globals()[name]

    @functools.wraps(ours)
    def installed(*args, **kwargs):
        return ours(*args, **kwargs)

    installed._pykernels_original = original
    return installed


def is_patched() -> bool:
    return bool(_state.installed)


def patch(seed: int | None = None, backend: str | None = None) -> None:
    """Route peft's merge utilities through pykernels (module docstring). `seed` sets the random-mask seed
    (None: from torch's default generator; see set_seed); `backend` forces a pykernels backend (None: the
    fastest available for the tensors' device, falling back to the torch path where none runs)."""
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
    merge_utils = _merge_utils()
    set_seed(seed)
    with _state.lock:
        _state.backend = backend
        for name in KNOWN_IMPORTERS:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        if not _state.installed:
            missing = [name for name in FUNCTIONS if not callable(getattr(merge_utils, name, None))]
            if missing:
                raise ImportError(f"{PEFT_MODULE} lacks {missing}: this peft version is not supported "
                                  f"(written against peft 0.21.2)")
            _state.originals = {name: getattr(merge_utils, name) for name in FUNCTIONS}
            _state.installed = {name: _installed_version(name, fn) for name, fn in _state.originals.items()}
        mapping = {_state.originals[name]: _state.installed[name] for name in FUNCTIONS}
        _state.records.extend(_replace_everywhere(mapping))


def unpatch() -> None:
    """Put back every original peft function, in every module that holds one of the patched ones; a no-op when
    not patched."""
    with _state.lock:
        if not _state.installed:
            return
        mapping = {_state.installed[name]: _state.originals[name] for name in FUNCTIONS}
        _replace_everywhere(mapping)
        for module, attr, _ in _state.records:  # modules since removed from sys.modules
            value = getattr(module, attr, None)
            for installed, original in mapping.items():
                if value is installed:
                    setattr(module, attr, original)
        _state.records, _state.installed, _state.originals, _state.backend = [], {}, {}, None


@contextlib.contextmanager
def patched(seed: int | None = None, backend: str | None = None):
    """Context manager: patch() on entry; on exit restore the previous state (unpatch unless it was already
    patched, and the previous seed and backend)."""
    was_patched = is_patched()
    previous = (_state.seed, _state.calls, _state.backend)
    patch(seed=seed, backend=backend)
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
        with _state.lock:
            _state.seed, _state.calls, _state.backend = previous


__all__ = list(FUNCTIONS) + ["patch", "unpatch", "patched", "is_patched", "set_seed", "get_seed", "call_seed",
                             "stats", "reset_stats"]
