"""pykernels: fused kernels for model merging, order statistics, block-sparse attention and MoE routing."""
from . import _ops  # noqa: F401  (registers the operators and their fake implementations)
from .attention import PBSPlan, block_sparse_attention, pbs_attention, pbs_plan
from .moe import (GlobalBatchAuxLoss, align_block_size, permute, switch_aux_loss, topk_route, unpermute,
                  update_expert_bias, z_loss)
from .merging import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, linear, merge,
                      sce, sparsify, task_arithmetic, ties)
from .model_merging import merge_model
from .selection import StreamingThreshold, delta_topk_thresholds, kth_largest, quantile, rank, topk_mask
from .statistics import median, sign_count, trimmed_mean

__version__ = "0.1.0"
__all__ = ["METHODS", "merge", "sparsify", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "merge_model",
           "delta_topk_thresholds", "topk_mask", "kth_largest", "quantile", "rank", "StreamingThreshold",
           "median", "trimmed_mean", "sign_count", "pbs_attention", "pbs_plan", "block_sparse_attention", "PBSPlan",
           "topk_route", "align_block_size", "permute", "unpermute", "switch_aux_loss", "z_loss", "GlobalBatchAuxLoss",
           "update_expert_bias"]
