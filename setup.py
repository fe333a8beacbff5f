"""Builds pykernels._C from csrc/ (CPU always; CUDA when torch has CUDA and nvcc exists).

PYKERNELS_CUDA=1 forces the CUDA sources in, PYKERNELS_CUDA=0 leaves them out.
PYKERNELS_PORTABLE=1 builds without -march=native (for binaries that move between machines).
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("PYKERNELS_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def extension():
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: no FMA contraction, so results match the unfused PyTorch reference bit for bit
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    if os.environ.get("PYKERNELS_PORTABLE") != "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"]
        nvcc = ["-O3", "-std=c++17", "-fmad=false", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return cpp_extension.CUDAExtension(
            "pykernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DPYKERNELS_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "pykernels._C", cpu_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )


setup(
    packages=["pykernels", "pykernels.reference", "pykernels.kernels", "pykernels.integrations", "pykernels.io"],
    package_dir={"pykernels.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
