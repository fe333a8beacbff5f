"""Element-wise statistics across N tensors: median, trimmed mean and sign count (numpy / scipy semantics).

Each statistic reduces, element by element, the N task-vector values v_i = tensors[i] - base (or the tensors
themselves without a base), computed in float32 from any mix of float32 / bfloat16 / float16 inputs. The N
values are never stacked: every backend streams over the elements and sorts the N values of each element in
registers or cache (docs/PRIMITIVES.md, primitives ``trimmed_mean`` and ``sign_count``).

Results are float32 computations rounded once to ``out_dtype``, bit-identical across backends: the kept values
are summed in ascending order starting from the smallest, then divided by their count. Ties between -0.0 and
+0.0 are broken as -0.0 < +0.0 (IEEE totalOrder), so the sign of a zero result is well defined. Every NaN
result is a quiet NaN.

Peak extra memory: the output, plus one contiguous copy of each non-contiguous input.
"""
from __future__ import annotations

import numbers

import torch

from . import _backend, _ops
from .merging import SUPPORTED_DTYPES, _check_tensors, _named_inputs

NAN_POLICIES = ("raise", "zero")


def _out_dtype(base, tensors, out_dtype) -> torch.dtype:
    ref = base if base is not None else tensors[0]
    out_dtype = ref.dtype if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    return out_dtype


def _ops_for(base, tensors, backend):
    ref = base if base is not None else tensors[0]
    return _ops.primitives(_backend.resolve(backend, ref.device))


def median(tensors, *, base=None, out_dtype=None, backend=None) -> torch.Tensor:
    """Element-wise median of the N task vectors ``tensors[i] - base`` (or of the tensors without a base).

    Semantics of ``numpy.median(np.stack(v), axis=0)`` in float32: the middle value for odd N, the mean
    ``(a + b) / 2`` of the two middle values for even N (unlike ``torch.median``, which returns the lower one).
    A NaN among the N values gives NaN (numpy; ``torch.nanmedian`` would skip it). +-inf are ordinary values
    (the mean of -inf and +inf is NaN).

    Args:
        tensors: N = 1..64 tensors of one shape, any mix of float32 / bfloat16 / float16.
        base: optional tensor of the same shape subtracted from each (in float32).
        out_dtype: float32, bfloat16 or float16 (default: base's dtype, else tensors[0]'s).
        backend: "reference", "cpp", "triton", "cuda" or None (the fastest available).

    Returns:
        A tensor of tensors[0]'s shape and ``out_dtype``.
    """
    tensors = _check_tensors(base, tensors)
    out_dtype = _out_dtype(base, tensors, out_dtype)
    ops = _ops_for(base, tensors, backend)
    return ops.trimmed_mean(base, tensors, (len(tensors) - 1) // 2, out_dtype)


def trimmed_mean(tensors, proportion, *, base=None, out_dtype=None, backend=None) -> torch.Tensor:
    """Element-wise trimmed mean of the N task vectors, ``scipy.stats.trim_mean(np.stack(v), proportion, 0)``.

    ``cut = int(proportion * N)`` values are dropped from each end of the sorted N values and the remaining
    ``N - 2 * cut`` are averaged (summed in float32 in ascending order, then divided by their count).
    ``proportion = 0`` is the plain mean (of the sorted values); a NaN among the N values gives NaN.

    Args:
        tensors: N = 1..64 tensors of one shape, any mix of float32 / bfloat16 / float16.
        proportion: fraction cut off each end, in [0, 0.5) (scipy's ``proportiontocut``).
        base: optional tensor of the same shape subtracted from each (in float32).
        out_dtype: float32, bfloat16 or float16 (default: base's dtype, else tensors[0]'s).
        backend: "reference", "cpp", "triton", "cuda" or None (the fastest available).

    Raises:
        ValueError: proportion outside [0, 0.5) (or NaN), or a cut that leaves no value (2 * cut >= N).
    """
    tensors = _check_tensors(base, tensors)
    if isinstance(proportion, bool) or not isinstance(proportion, numbers.Real):
        raise TypeError(f"proportion must be a real number in [0, 0.5), got {type(proportion).__name__}")
    proportion = float(proportion)
    if not (0.0 <= proportion < 0.5):  # also rejects NaN
        raise ValueError(f"proportion must lie in [0, 0.5), got {proportion}")
    n = len(tensors)
    cut = int(proportion * n)
    if 2 * cut >= n:
        raise ValueError(f"proportion={proportion} cuts {cut} of {n} values from each end, leaving none")
    out_dtype = _out_dtype(base, tensors, out_dtype)
    ops = _ops_for(base, tensors, backend)
    return ops.trimmed_mean(base, tensors, cut, out_dtype)


def _check_no_nan(base, tensors) -> None:
    hint = "pass nan='zero' to count NaN task-vector values as 0"
    for name, t in _named_inputs(base, tensors):
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN; {hint}")
    if base is not None and bool(torch.isinf(base).any()):
        for i, t in enumerate(tensors):
            if bool((torch.isinf(t) & (t == base)).any()):
                raise ValueError(f"tensors[{i}] - base is NaN (inf - inf: both are infinite with the same sign "
                                 f"at some element); {hint}")


def sign_count(tensors, *, base=None, nan: str = "raise", backend=None) -> torch.Tensor:
    """Element-wise sum of the signs of the N task vectors: ``np.sign(np.stack(v)).sum(0)`` as int8.

    The result is (number of positive values) - (number of negative values), in [-N, N]; zeros (either sign)
    count 0, so a result of 0 is a tie or all-zero.

    Args:
        tensors: N = 1..64 tensors of one shape, any mix of float32 / bfloat16 / float16.
        base: optional tensor of the same shape subtracted from each (in float32).
        nan: "raise" (default): a ValueError naming the first input holding a NaN (or the model whose
            difference with base is inf - inf), checked before the kernel runs; "zero": NaN values count 0
            (numpy's sign of NaN is NaN, which would poison the sum).
        backend: "reference", "cpp", "triton", "cuda" or None (the fastest available).

    Returns:
        An int8 tensor of tensors[0]'s shape.
    """
    tensors = _check_tensors(base, tensors)
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    if nan == "raise":
        _check_no_nan(base, tensors)
    ops = _ops_for(base, tensors, backend)
    return ops.sign_count(base, tensors)


__all__ = ["median", "trimmed_mean", "sign_count"]
