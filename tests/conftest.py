"""Shared test helpers: which backends run here, and per-dtype tolerances."""
from __future__ import annotations

import os

import pytest
import torch

from pykernels import _backend
from pykernels.reference.merging import random_keep

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under the interpreter)."""
    names = ["reference"]
    if _backend.cpp_available():
        names.append("cpp")
    if INTERPRETED and _backend.triton_available():
        names.append("triton")
    return names


# Absolute/relative tolerances for float32 results computed by different backends in the same order.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def tol_for(dtype: torch.dtype) -> dict:
    """Tolerance of an output stored in `dtype`: one rounding step of that dtype."""
    if dtype == torch.float32:
        return FP32_TOL
    eps = torch.finfo(dtype).eps
    return dict(atol=eps, rtol=eps)


def make_models(shape, n, dtypes, seed=0, scale=0.1):
    """base + n fine-tuned tensors with continuous task vectors (no ties)."""
    g = torch.Generator().manual_seed(seed)
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * (n + 1)
    base = torch.randn(shape, generator=g).to(dtypes[0])
    tensors = [(base.float() + scale * torch.randn(shape, generator=g)).to(dt) for dt in dtypes[1:n + 1]]
    return base, tensors


def pytest_collection_modifyitems(config, items):
    # Triton tests run only in the interpreter process; everything else only outside it, so the two
    # `make test` processes never run the same test twice.
    for item in items:
        is_triton = item.get_closest_marker("triton") is not None
        if is_triton and not INTERPRETED:
            item.add_marker(pytest.mark.skip(reason="triton tests run under TRITON_INTERPRET=1 (make test)"))


def backend_params(include_reference: bool = True) -> list:
    """pytest params for every backend; triton ones are marked so only the interpreter process runs them."""
    params = [pytest.param("reference", id="reference")] if include_reference else []
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        not _backend.cpp_available(), reason="pykernels._C not built")))
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return params


class BernoulliFromOurStream:
    """Stands in for torch.bernoulli: returns model m's counter-based mask on its m-th call."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, probs, *args, **kwargs):
        p = float(probs.reshape(-1)[0])
        mask = random_keep(probs.numel(), p, self.seed, self.calls).reshape(probs.shape)
        self.calls += 1
        return mask.to(probs.dtype)
