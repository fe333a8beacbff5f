"""Backend choice (DESIGN.md section 2): explicit, checked, never a silent fallback."""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")


def _load_extension() -> bool:
    try:
        import pykernels._C  # noqa: F401  (registers torch.ops.pykernels.*)
    except ImportError:
        return False
    return True


_CPP = _load_extension()
_CUDA = _CPP and torch._C._dispatch_has_kernel_for_dispatch_key("pykernels::fused_merge", "CUDA")


def cpp_available() -> bool:
    return _CPP


def cuda_built() -> bool:
    return _CUDA


_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if not cpp_available():
            return "the C++ extension pykernels._C is not built (pip install --no-build-isolation -e .)"
        return None if device.type == "cpu" else f"the cpp backend runs on CPU tensors, got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        return None if cuda_built() else "pykernels._C was built without CUDA sources"
    if backend == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreted():
            return "triton on CPU tensors needs TRITON_INTERPRET=1 set before Python starts"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend to run on `device`: the one asked for, else $PYKERNELS_BACKEND, else the fastest built."""
    if backend is None:
        backend = os.environ.get("PYKERNELS_BACKEND") or None
    if backend is None:
        if device.type == "cuda":
            backend = "cuda" if cuda_built() else "triton"
        else:
            backend = "cpp" if cpp_available() else "reference"
    reason = _unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return backend
