"""pykernels: fused kernels for model merging, order statistics, block-sparse attention and MoE routing."""
from . import _ops  # noqa: F401  (registers the operators and their fake implementations)
from .merging import METHODS, dare_linear, dare_ties, linear, merge, sparsify, task_arithmetic, ties
from .selection import StreamingThreshold, delta_topk_thresholds, kth_largest, quantile, rank, topk_mask
from .statistics import median, sign_count, trimmed_mean

__version__ = "0.1.0"
__all__ = ["METHODS", "merge", "sparsify", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "delta_topk_thresholds", "topk_mask", "kth_largest", "quantile", "rank", "StreamingThreshold",
           "median", "trimmed_mean", "sign_count"]
