"""MoE routing: top-k gating, token alignment for grouped GEMMs, permute / combine, load-balancing losses.

Compatible with vLLM's routing contracts (fused top-k, grouped top-k, moe_align_block_size) with a deterministic
order everywhere: experts in descending score order with ties to the lower expert index, and every expert's
pairs in ascending flattened index t * k + j. Semantics: DESIGN.md section 6, docs/PRIMITIVES.md "MoE".
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from . import _backend, _ops
from .reference.moe import SIGMOID, SOFTMAX, expert_capacity

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCORINGS = {"softmax": SOFTMAX, "sigmoid": SIGMOID}
MAX_EXPERTS = 1024
MAX_K = 32


def _ops_for(device, backend):
    return _ops.primitives(_backend.resolve(backend, device))


def _positive_int(name, value, upper=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (upper and value > upper):
        bound = f" and <= {upper}" if upper else ""
        raise ValueError(f"{name} must be an integer >= 1{bound}, got {value!r}")
    return int(value)


def _check_logits(logits, bias):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor (tokens, experts), got {getattr(logits, 'shape', logits)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    experts = logits.shape[1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in [1, {MAX_EXPERTS}], got {experts}")
    if logits.numel() and not all(math.isfinite(v) for v in torch.aminmax(logits)):  # NaN propagates
        raise ValueError("logits contain NaN or +-inf: routing refuses non-finite logits")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (experts,):
            raise ValueError(f"bias must be a tensor of shape ({experts},), got {getattr(bias, 'shape', bias)}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device}, logits on {logits.device}")
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("bias contains NaN or +-inf")


def topk_route(logits, k: int, *, scoring: str = "softmax", bias=None, renormalize: bool = True,
               num_groups: Optional[int] = None, topk_groups: Optional[int] = None, scaling: float = 1.0,
               backend: Optional[str] = None):
    """Top-k expert choice per token: ``(weights float32 (T, k), ids int32 (T, k))``.

    scores = softmax or sigmoid of the float32 logits. Experts are chosen on ``scores + bias`` (on the logits
    when there is no bias: the same order), in descending order with ties to the lower expert index; the
    weights are the unbiased scores of the chosen experts, divided by their sum when ``renormalize`` (a zero
    sum is left alone), then multiplied by ``scaling``. Grouped routing (DeepSeek-V3): the E experts form
    ``num_groups`` equal groups; a group scores the sum of its top-2 biased scores (its largest score without a
    bias); only the ``topk_groups`` best groups (ties: lower group) compete.

    Args:
        logits: (T, E) float32 / bfloat16 / float16, 1 <= E <= 1024, finite (NaN or +-inf raise).
        k: 1 <= k <= min(E, 32) (and <= the experts of the kept groups).
        bias: optional (E,) finite correction for selection only (aux-loss-free balancing); may be negative.
    """
    _check_logits(logits, bias)
    experts = logits.shape[1]
    k = _positive_int("k", k, min(MAX_K, experts))
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    groups, kept = 0, 0
    if num_groups is not None or topk_groups is not None:
        if num_groups is None or topk_groups is None:
            raise ValueError("grouped routing needs both num_groups and topk_groups")
        groups = _positive_int("num_groups", num_groups, experts)
        kept = _positive_int("topk_groups", topk_groups, groups)
        if experts % groups:
            raise ValueError(f"num_groups={groups} must divide the number of experts {experts}")
        if k > kept * (experts // groups):
            raise ValueError(f"k={k} exceeds the {kept * (experts // groups)} experts of the kept groups")
    if not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    ops = _ops_for(logits.device, backend)
    return ops.moe_topk_route(logits, k, SCORINGS[scoring], bias, bool(renormalize), groups, kept, float(scaling))


def _check_ids(ids, num_experts):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be an int32/int64 (tokens, k) tensor, got {getattr(ids, 'dtype', ids)} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    num_experts = _positive_int("num_experts", num_experts)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"ids must be expert indices in [0, {num_experts})")
    return ids.to(torch.int32).contiguous(), num_experts


def align_block_size(ids, num_experts: int, block_size: int, *, expert_map=None, backend: Optional[str] = None):
    """vLLM's ``moe_align_block_size``: ``(sorted_ids, block_expert_ids, num_tokens_post_pad)``, all int32.

    Every expert's pairs (flattened index t * k + j) in ascending order, padded to a multiple of
    ``block_size`` with the sentinel T * k; ``block_expert_ids[b]`` is the expert of block b (-1 past the
    total). sorted_ids has T*k + E*(block_size - 1) entries rounded up to a block. Empty experts take no
    block. ``expert_map`` (E,) maps global to local experts (-1: not on this rank): non-local pairs are
    dropped and blocks carry local ids.
    """
    ids, num_experts = _check_ids(ids, num_experts)
    block_size = _positive_int("block_size", block_size)
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor) or expert_map.shape != (num_experts,):
            raise ValueError(f"expert_map must be a ({num_experts},) tensor, got {getattr(expert_map, 'shape', None)}")
        expert_map = expert_map.to(device=ids.device, dtype=torch.int32).contiguous()
    return _ops_for(ids.device, backend).moe_align_block_size(ids, num_experts, block_size, expert_map)


class Permuted(NamedTuple):
    """x_sorted: the kept (token, expert) pairs' rows of x, by expert then flattened index t * k + j.
    perm: int64 flattened pair index of each row. expert_offsets: int64 (E + 1,), expert e's rows are
    expert_offsets[e]:expert_offsets[e + 1]. dropped: bool (T, k), pairs over an expert's capacity."""
    x_sorted: torch.Tensor
    perm: torch.Tensor
    expert_offsets: torch.Tensor
    dropped: torch.Tensor


def permute(x, ids, num_experts: int, *, weights=None, capacity_factor: Optional[float] = None,
            backend: Optional[str] = None) -> Permuted:
    """Rows of x (T, H) gathered per expert for grouped expert GEMMs (one counting sort, no argsort).

    With ``capacity_factor``, an expert keeps at most ceil(capacity_factor * T * k / E) pairs: those of largest
    routing weight (``weights`` (T, k) required), ties to the lower flattened index; the rest are dropped.
    """
    ids, num_experts = _check_ids(ids, num_experts)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"x must be (T={ids.shape[0]}, H), got {tuple(getattr(x, 'shape', ()))}")
    factor = 0.0
    if capacity_factor is not None:
        if not isinstance(capacity_factor, numbers.Real) or not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be a positive number or None, got {capacity_factor!r}")
        if weights is None or weights.shape != ids.shape:
            raise ValueError("capacity dropping needs the routing weights (T, k) to choose whom to drop")
        factor = float(capacity_factor)
    if weights is not None:
        weights = weights.contiguous()
    x_sorted, perm, offsets, dropped = _ops_for(x.device, backend).moe_permute(x, ids, weights, num_experts, factor)
    kept = int(offsets[-1])
    return Permuted(x_sorted[:kept], perm[:kept], offsets, dropped)


def unpermute(y_sorted, perm, weights, *, backend: Optional[str] = None):
    """(T, H) combine: out[t] = sum_j weights[t, j] * y_sorted[row of pair (t, j)], float32 accumulation in
    ascending j, dropped pairs contributing nothing; output in y_sorted's dtype."""
    if y_sorted.dim() != 2 or perm.dim() != 1 or y_sorted.shape[0] != perm.shape[0]:
        raise ValueError(f"y_sorted (rows, H) and perm (rows,) must agree, got {tuple(y_sorted.shape)} and "
                         f"{tuple(perm.shape)}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be (T, k), got {tuple(weights.shape)}")
    if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= weights.numel()):
        raise ValueError(f"perm must hold flattened pair indices in [0, {weights.numel()})")
    ops = _ops_for(y_sorted.device, backend)
    return ops.moe_unpermute(y_sorted.contiguous(), perm.to(torch.int64).contiguous(), weights.contiguous())


# --- load-balancing losses (differentiable torch; small tensors) --------------------------------------------

def expert_counts(ids, num_experts: int) -> torch.Tensor:
    """int64 (E,) pairs routed to each expert."""
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts)


def switch_aux_loss(probs, ids, num_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e * P_e: f_e the fraction of the T*k routed pairs that go to
    expert e, P_e the mean router probability of e over the T tokens (differentiable through probs)."""
    fraction = expert_counts(ids, num_experts).to(probs.dtype) / max(ids.numel(), 1)
    return num_experts * (fraction * probs.mean(0)).sum()


def z_loss(logits) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.logsumexp(x, dim=-1).square().mean()


class GlobalBatchAuxLoss:
    """The global-batch balance loss: f_e counted over every micro-batch since ``reset()`` and over every rank
    of ``group`` (all-reduced), P_e from the micro-batch at hand. The mean of the ranks' losses equals the
    switch loss of the concatenated batch when the ranks hold equal numbers of tokens."""

    def __init__(self, num_experts: int, group=None):
        self.num_experts = _positive_int("num_experts", num_experts)
        self.group = group
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.num_experts, dtype=torch.int64)

    def __call__(self, probs, ids) -> torch.Tensor:
        counts = expert_counts(ids, self.num_experts).to(self.counts.device)
        if self.group is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.all_reduce(counts, group=self.group)
        self.counts += counts
        fraction = self.counts.to(probs.device, probs.dtype) / max(int(self.counts.sum()), 1)
        return self.num_experts * (fraction * probs.mean(0)).sum()


def update_expert_bias(bias, counts, rate: float):
    """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean(counts) - counts), in place."""
    counts = counts.to(bias.device, torch.float32)
    bias += rate * torch.sign(counts.mean() - counts).to(bias.dtype)
    return bias
