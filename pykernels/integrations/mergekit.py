"""Drop-in pykernels backend for mergekit 0.1.5 (DESIGN.md sections 3 and 7).

    from pykernels.integrations import mergekit as pk_mergekit

    pk_mergekit.patch()                      # every later mergekit merge runs on pykernels
    with pk_mergekit.patched(seed=1234):     # or only inside a block
        merge_tensors([base, a, b], "dare_ties", base_index=0, parameters={...})

What is routed (everything else in mergekit is untouched):
- `mergekit.sparsify.magnitude`, `bernoulli` (method "random", DARE), `magnitude_outliers` (breadcrumbs) and
  `della_magprune` (DELLA) become `pykernels.sparsify` with mergekit's rules; `mergekit.sparsify.sparsify`
  dispatches through the module's globals, so it reaches them too. Every loaded module that imported one of
  these functions by name is patched as well, and `unpatch()` restores every such reference (also in modules
  imported while the patch was active).
- `GeneralizedTaskArithmeticMerge.merge_group` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
  breadcrumbs_ties, della, della_linear and any other instance of the class) becomes one fused
  `pykernels.merge` call per tensor group, and the registered `sce` method's kernel becomes `pykernels.merge(...,
  "sce")`. mergekit's own entry points are unchanged, so `mergekit.merge_methods.merge_tensors`,
  `merge_state_dicts`, `MergeMethod.__call__`, `mergekit-yaml` and the graph executor all reach the fused kernels,
  and parameter binding and its errors (missing weight, unknown parameter, shape mismatch) stay mergekit's.

Semantics kept from mergekit 0.1.5: magnitude keeps k = max(1, int(density * numel)) (density >= 1 returns the
input, density <= 0 zeros); magnitude_outliers keeps the ascending-|d| positions [n_bot, n_bot + int(density*n))
with n_top = int(gamma * n); DELLA ranks along dim 1 (a 1-D tensor is one row) and keeps with probability
(density - eps) + 2 eps (r - 1)/(n - 1); `rescale=True` is l1-norm matching (skipped when either norm is below
1e-7) for every sparsifier, including DARE and DELLA; sign consensus "sum"/"count" on the weighted sparsified
deltas, the divisor is the sum of the agreeing weights (0 -> 1) or, without consensus, of all weights (|.| < 1e-8 ->
1); normalize, then lambda. mergekit's errors are kept: DELLA's "Epsilon must be chosen such that density +/-
epsilon is in (0, 1)" ValueError, and inputs mergekit itself rejects (negative DARE density, 0-d or one-column
DELLA inputs, unknown rescale norms) go to mergekit's own code, which raises as before. (mergekit 0.1.5 does not
raise on magnitude density 0: it returns zeros, and so does the patch.)

Differences, by design:
- Precision: mergekit computes in the input dtype (a bf16 merge stays bf16 throughout, weights included); pykernels
  computes in float32 and casts the result back to the input dtype once, so bf16/fp16 results are at least as
  accurate and agree with mergekit's within bf16/fp16 rounding. fp32 results agree to float32 rounding.
- Ties in |d| at a magnitude threshold keep the lower flat index (mergekit's unstable sort keeps an arbitrary
  subset); continuous data has no ties, and then the outputs are equal.
- Random masks (DARE, DELLA) come from pykernels' counter-based Philox stream, not from torch's global generator:
  only which elements are dropped differs from a mergekit run, and `torch.manual_seed` has no effect on them. The
  seed is deterministic: a merge of the tensor group named `name` (the weight name mergekit passes, e.g.
  "model.layers.0.mlp.up_proj.weight"; "" when there is none) uses
      seed(name) = (base_seed + blake2b-64(name)) mod 2**63        (`seed_for(name)`)
  and model i of the group (i-th non-base input) draws from pykernels' stream i of that seed (DESIGN.md section
  2). The standalone sparsify functions have no name and use seed("") and stream 0. base_seed is patch()'s `seed`,
  else $PYKERNELS_MERGEKIT_SEED, else 0. So a merge is reproducible bit for bit, independent of call order and of
  torch's generator state; different tensors get independent masks. Keep probabilities are float32 (mergekit rounds
  DARE's density, and DELLA's ranks, to bf16 for bf16 inputs on CPU).
- Falls back to mergekit's own implementation (counted in `stats()`), for inputs pykernels does not take:
  float64 or integer tensors, tensors that require grad while autograd is on (mergekit's merges stay
  differentiable), empty tensors, more than 64 models, devices without a pykernels backend, l2/linf rescale norms,
  non-finite densities/gammas/epsilons/weights, negative gamma or epsilon, negative breadcrumbs density (mergekit's
  slice then has negative bounds), and the error cases above.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import sys
import threading
import types
import warnings
from collections import Counter

import torch

from .. import _backend
from .. import merging as pk_merging
from ..reference.merging import tensor_seed

SUPPORTED_VERSION = "0.1.5"
SEED_ENV = "PYKERNELS_MERGEKIT_SEED"
_LEAVES = ("magnitude", "bernoulli", "magnitude_outliers", "della_magprune")

_lock = threading.RLock()
_state = {"patched": False, "seed": None, "records": []}  # seed None: $PYKERNELS_MERGEKIT_SEED, else 0
_originals: dict = {}
_stats = {"routed": Counter(), "fallback": Counter()}


# --- seeds and bookkeeping ------------------------------------------------------------------------------

def seed_for(name: str | None) -> int:
    """The pykernels seed of a merge of the tensor group named `name` (None and "" are the same)."""
    return tensor_seed(base_seed(), name)


def base_seed() -> int:
    """The base seed in use (patch()'s `seed`, else $PYKERNELS_MERGEKIT_SEED, else 0)."""
    return _default_seed(_state["seed"])


def stats() -> dict:
    """Counts of calls run on pykernels ("routed") and handed to mergekit's own code ("fallback"), by function."""
    return {kind: dict(counter) for kind, counter in _stats.items()}


def reset_stats() -> None:
    for counter in _stats.values():
        counter.clear()


def is_patched() -> bool:
    return _state["patched"]


def _default_seed(seed) -> int:
    if seed is None:
        seed = int(os.environ.get(SEED_ENV, "0"))
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def _targets():
    """(mergekit.sparsify, GeneralizedTaskArithmeticMerge, the registered sce method), with a clear error when the
    installed mergekit lacks them."""
    try:
        import mergekit.sparsify as sparsify_module
        from mergekit.merge_methods import generalized_task_arithmetic as gta
        from mergekit.merge_methods import sce as sce_module
    except ImportError as error:
        raise ImportError(f"pykernels.integrations.mergekit needs mergekit {SUPPORTED_VERSION} "
                          f"(pip install mergekit=={SUPPORTED_VERSION}): {error}") from error
    missing = [name for name in _LEAVES if not callable(getattr(sparsify_module, name, None))]
    cls = getattr(gta, "GeneralizedTaskArithmeticMerge", None)
    if cls is None or "merge_group" not in vars(cls):
        missing.append("GeneralizedTaskArithmeticMerge.merge_group")
    sce_method = getattr(sce_module, "sce_merge", None)
    if not callable(getattr(sce_method, "implementation", None)):
        missing.append("sce_merge.implementation")
    if missing:
        raise ImportError(f"the installed mergekit ({_mergekit_version()}) lacks {', '.join(missing)}; "
                          f"pykernels.integrations.mergekit supports mergekit {SUPPORTED_VERSION}")
    return sparsify_module, cls, sce_method


def _mergekit_version() -> str:
    try:
        return importlib.metadata.version("mergekit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _original(name: str):
    """mergekit's own implementation of `name` (captured at the first patch, else read from mergekit)."""
    if name not in _originals:
        sparsify_module, cls, sce_method = _targets()
        own = {"merge_group": vars(cls)["merge_group"], "sce": sce_method.implementation}
        own.update({leaf: getattr(sparsify_module, leaf) for leaf in _LEAVES})
        for key, value in own.items():
            if value is not _INSTALLED.get(key):
                _originals.setdefault(key, value)
    return _originals[name]


def _fallback(name: str, *args, **kwargs):
    _stats["fallback"][name] += 1
    return _original(name)(*args, **kwargs)


def _routed(name: str) -> None:
    _stats["routed"][name] += 1


def _finite(*values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _routable(tensors) -> bool:
    """Inputs pykernels takes: plain float32/bf16/fp16 tensors, non-empty, same dtype and device, no autograd
    graph to keep, on a device with a pykernels backend, at most MAX_MODELS (+ base)."""
    if len(tensors) > pk_merging.MAX_MODELS + 1:
        return False
    first = tensors[0]
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return False
        if t.dtype not in pk_merging.SUPPORTED_DTYPES or t.dtype != first.dtype or t.device != first.device:
            return False
        if t.numel() == 0 or (grad and t.requires_grad):
            return False
    try:
        _backend.resolve(None, first.device)
    except RuntimeError:
        return False
    return True


def _rescale(norm) -> str | None:
    """pykernels' rescale for a mergekit rescale_norm, None when pykernels has no such norm."""
    if norm is None:
        return "none"
    if isinstance(norm, str) and norm == "l1":  # RescaleNorm is a str enum: RescaleNorm.l1 == "l1"
        return "l1"
    return None


# --- mergekit.sparsify -----------------------------------------------------------------------------------

def magnitude(tensor: torch.Tensor, density: float, rescale_norm=None) -> torch.Tensor:
    """mergekit.sparsify.magnitude on pykernels: keep the k = max(1, int(density * numel)) largest |tensor|."""
    rescale = _rescale(rescale_norm)
    if rescale is None or not _finite(density) or not isinstance(tensor, torch.Tensor) or not _routable([tensor]):
        return _fallback("magnitude", tensor, density, rescale_norm=rescale_norm)
    _routed("magnitude")
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    return pk_merging.sparsify(tensor, "magnitude", float(density), rescale=rescale, k_rule="at_least_one")


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm=None, gamma: float = 0.01) -> torch.Tensor:
    """mergekit.sparsify.magnitude_outliers (breadcrumbs) on pykernels."""
    rescale = _rescale(rescale_norm)
    if (rescale is None or not _finite(density, gamma) or density < 0 or gamma < 0
            or not isinstance(tensor, torch.Tensor) or not _routable([tensor])):
        # (a negative density or gamma gives mergekit's slice negative bounds: its own code keeps what it keeps)
        return _fallback("magnitude_outliers", tensor, density, rescale_norm=rescale_norm, gamma=gamma)
    _routed("magnitude_outliers")
    if density >= 1:
        return tensor
    return pk_merging.sparsify(tensor, "magnitude_outliers", float(density), gamma=min(float(gamma), 1.0),
                               rescale=rescale, k_rule="floor")


def bernoulli(tensor: torch.Tensor, density: float, rescale_norm=None) -> torch.Tensor:
    """mergekit.sparsify.bernoulli (DARE's random drop) on pykernels' counter-based stream (seed_for(None))."""
    rescale = _rescale(rescale_norm)
    if (rescale is None or not _finite(density) or density < 0 or not isinstance(tensor, torch.Tensor)
            or not _routable([tensor])):
        return _fallback("bernoulli", tensor, density, rescale_norm=rescale_norm)
    _routed("bernoulli")
    if density >= 1:
        return tensor
    return pk_merging.sparsify(tensor, "random", float(density), rescale=rescale, seed=seed_for(None))


_DELLA_RANGE_ERROR = "Epsilon must be chosen such that density +/- epsilon is in (0, 1)"


def _della_row_length(shape) -> int | None:
    """Length of the rows mergekit's della_magprune ranks (dim 1; a 1-D tensor is one row); None for 0-d."""
    if len(shape) == 0:
        return None
    return int(shape[0]) if len(shape) == 1 else int(shape[1])


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float, rescale_norm=None) -> torch.Tensor:
    """mergekit.sparsify.della_magprune on pykernels' counter-based stream (seed_for(None))."""
    rescale = _rescale(rescale_norm)
    usable = (rescale is not None and _finite(density, epsilon) and isinstance(tensor, torch.Tensor)
              and _routable([tensor]))
    if usable and 0 < density < 1:
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError(_DELLA_RANGE_ERROR)
        usable = epsilon >= 0 and (_della_row_length(tensor.shape) or 0) > 1
    if not usable:
        return _fallback("della_magprune", tensor, density, epsilon, rescale_norm=rescale_norm)
    _routed("della_magprune")
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    return pk_merging.sparsify(tensor, "della", float(density), epsilon=float(epsilon), rescale=rescale,
                               seed=seed_for(None))


# --- generalized task arithmetic and sce -----------------------------------------------------------------

_PRESETS = {  # mergekit sparsification method -> the pykernels method whose sparsifier it is
    None: "task_arithmetic",
    "magnitude": "ties",
    "random": "dare_ties",
    "magnitude_outliers": "breadcrumbs",
    "della_magprune": "della",
}
_CONSENSUS = {None: "none", "sum": "sum", "count": "count"}


def _enum_value(value):
    return getattr(value, "value", value)


def _merge_arguments(method, group, parameters) -> dict | None:
    """pykernels.merge arguments for a mergekit GTA merge of `group`, or None when mergekit's own code must run
    (it then raises mergekit's errors, or computes what pykernels does not)."""
    sparsification = _enum_value(method.sparsification_method)
    consensus = _enum_value(method.consensus_method)
    if sparsification not in _PRESETS or consensus not in _CONSENSUS:
        return None
    base = group.base.tensor
    entries = group.non_base
    tensors = [entry.tensor for entry in entries]
    if not _routable([base] + tensors):
        return None
    weights = [parameters["weight"][entry.id] for entry in entries]
    lambda_ = parameters["lambda"]
    if not _finite(lambda_, *weights):
        return None
    args = dict(weights=[float(w) for w in weights], normalize=bool(parameters["normalize"]), lambda_=float(lambda_),
                consensus=_CONSENSUS[consensus], seed=seed_for(group.metadata.name))
    if sparsification is None:
        return dict(args, method="task_arithmetic", rescale="none")
    args.update(method=_PRESETS[sparsification], rescale="l1" if parameters["rescale"] else "none")
    # sparsify()'s own defaults when the spec lacks the parameter: gamma 0, epsilon 0.
    gammas = [parameters["gamma"][entry.id] for entry in entries] if "gamma" in parameters else [0.0] * len(entries)
    epsilons = ([parameters["epsilon"][entry.id] for entry in entries] if "epsilon" in parameters
                else [0.0] * len(entries))
    densities = []
    for entry, gamma, epsilon in zip(entries, gammas, epsilons):
        rho = parameters["density"][entry.id]
        if not _finite(rho):
            return None
        rho = float(rho)
        if sparsification == "random" and rho < 0:
            return None  # torch.bernoulli rejects it in mergekit: let mergekit raise
        if sparsification == "magnitude_outliers" and (not _finite(gamma) or gamma < 0 or rho < 0):
            return None  # negative slice bounds in mergekit's magnitude_outliers: let its own code run
        if sparsification == "della_magprune" and 0 < rho < 1:
            if not _finite(epsilon):
                return None
            if rho + epsilon >= 1 or rho - epsilon <= 0:
                raise ValueError(_DELLA_RANGE_ERROR)
            if epsilon < 0 or (_della_row_length(base.shape) or 0) <= 1:
                return None
        densities.append(min(max(rho, 0.0), 1.0))
    args["densities"] = densities
    if sparsification == "magnitude":
        args["k_rule"] = "at_least_one"
    elif sparsification == "magnitude_outliers":
        args.update(gammas=[min(float(g), 1.0) for g in gammas], k_rule="floor")
    elif sparsification == "della_magprune":
        args["epsilons"] = [float(e) for e in epsilons]
    return args


def merge_group(self, group, /, **parameters):
    """GeneralizedTaskArithmeticMerge.merge_group as one fused pykernels.merge call."""
    if group.base is None or not group.non_base:
        return _fallback("merge_group", self, group, **parameters)
    args = _merge_arguments(self, group, parameters)
    if args is None:
        return _fallback("merge_group", self, group, **parameters)
    _routed("merge_group")
    method = args.pop("method")
    return pk_merging.merge(group.base.tensor, [entry.tensor for entry in group.non_base], method, **args)


def sce_merge(group, int8_mask: bool = False, select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's sce kernel on pykernels (int8_mask only picks mergekit's mask dtype; it changes no value)."""
    base = group.base.tensor if group.base is not None else None
    tensors = [entry.tensor for entry in group.non_base]
    if base is None or not tensors or not _finite(select_topk) or not _routable([base] + tensors):
        return _fallback("sce", group, int8_mask=int8_mask, select_topk=select_topk)
    _routed("sce")
    return pk_merging.merge(base, tensors, "sce", densities=min(max(float(select_topk), 0.0), 1.0))


_REPLACEMENTS = {"magnitude": magnitude, "bernoulli": bernoulli, "magnitude_outliers": magnitude_outliers,
                 "della_magprune": della_magprune, "merge_group": merge_group, "sce": sce_merge}


def _installable(function):
    @functools.wraps(function)
    def installed(*args, **kwargs):
        return function(*args, **kwargs)

    return installed


# What patch() installs: private wrappers of the functions above, so that unpatch() can find every reference to
# them by identity without touching modules that imported this module's public functions.
_INSTALLED = {key: _installable(function) for key, function in _REPLACEMENTS.items()}


# --- patch / unpatch -------------------------------------------------------------------------------------

def _module_references(functions: dict) -> list[tuple]:
    """(module, attribute, current, key) for every loaded module attribute holding one of `functions`
    ({key: function}); module dicts are read directly, so lazy modules load nothing."""
    by_id = {id(f): key for key, f in functions.items()}
    found = []
    this = sys.modules.get(__name__)
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or module is this:
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attribute, value in items:
            key = by_id.get(id(value))
            if key is not None and value is functions[key]:
                found.append((module, attribute, value, key))
    return found


def patch(seed: int | None = None) -> None:
    """Route mergekit's sparsifiers, generalized task arithmetic and sce through pykernels (see the module
    docstring). Idempotent: a second call only updates the seed when one is given."""
    with _lock:
        if _state["patched"]:
            if seed is not None:
                _state["seed"] = _default_seed(seed)
            return
        sparsify_module, cls, sce_method = _targets()
        version = _mergekit_version()
        if version != SUPPORTED_VERSION:
            warnings.warn(f"pykernels.integrations.mergekit follows mergekit {SUPPORTED_VERSION}'s semantics; "
                          f"mergekit {version} is installed", stacklevel=2)
        _state["seed"] = None if seed is None else _default_seed(seed)
        base_seed()  # a bad $PYKERNELS_MERGEKIT_SEED fails here, before anything is replaced
        for key in (*_LEAVES, "merge_group", "sce"):
            _original(key)
        records = []
        leaves = {leaf: _originals[leaf] for leaf in _LEAVES}
        for module, attribute, value, key in _module_references(leaves):
            records.append((module, attribute, value))
            setattr(module, attribute, _INSTALLED[key])
        records.append((cls, "merge_group", vars(cls)["merge_group"]))
        setattr(cls, "merge_group", _INSTALLED["merge_group"])
        records.append((sce_method, "implementation", sce_method.implementation))
        sce_method.implementation = _INSTALLED["sce"]
        _state.update(patched=True, records=records)


def unpatch() -> None:
    """Restore every reference patch() replaced, and every reference to a replacement that a module imported
    while the patch was active. A no-op when not patched."""
    with _lock:
        if not _state["patched"]:
            return
        for owner, attribute, original in reversed(_state["records"]):
            setattr(owner, attribute, original)
        leaves = {leaf: _INSTALLED[leaf] for leaf in _LEAVES}
        for module, attribute, _, key in _module_references(leaves):
            setattr(module, attribute, _originals[key])
        _state.update(patched=False, records=[])


@contextlib.contextmanager
def patched(seed: int | None = None):
    """Context manager: patch(seed) on entry; on exit unpatch() (unless the patch was already active before) and
    the previous seed again."""
    with _lock:
        was_patched = _state["patched"]
        previous_seed = _state["seed"]
        patch(seed)
    try:
        yield
    finally:
        with _lock:
            if not was_patched:
                unpatch()
            _state["seed"] = previous_seed
