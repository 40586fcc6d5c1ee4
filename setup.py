"""Build script. The package is pure Python plus an optional CUDA extension `nunchaku._C`.

The extension is built when torch with CUDA support and nvcc are found at build time and
NUNCHAKU_SKIP_CUDA_BUILD is not 1. Installing never probes a GPU: the target architectures come
from TORCH_CUDA_ARCH_LIST (default "8.0;8.6;8.9;9.0a": the Ampere/Ada INT4 tensor-core kernels and
the Hopper ones; each family's kernels compile to empty bodies for the other targets, and the ops
check the GPU before launching). Without nvcc the build prints a warning
and installs the package without kernels; everything then runs on the PyTorch reference path.
Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch
you run (an isolated build would compile against a throwaway torch, or skip the kernels).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0a"


def _warn(msg: str) -> None:
    print(f"nunchaku setup: WARNING: {msg}", file=sys.stderr)


def cuda_extension():
    if os.environ.get("NUNCHAKU_SKIP_CUDA_BUILD", "0") == "1":
        _warn("NUNCHAKU_SKIP_CUDA_BUILD=1: not building the CUDA kernels (reference path only)")
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _warn("torch is not importable at build time (use --no-build-isolation): no CUDA kernels")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _warn("no CUDA toolkit (nvcc) or a CPU-only torch: installing without CUDA kernels; "
              "the PyTorch reference path will be used")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    arches = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()
    if any(a.split("+")[0] == "9.0" for a in arches) and not any(a.startswith("9.0a") for a in arches):
        _warn("TORCH_CUDA_ARCH_LIST has 9.0 but not 9.0a: the Hopper W4A4 kernels need sm_90a and will "
              "refuse to run in this build (add 9.0a)")
    include_dirs = [os.path.abspath("csrc")]
    try:
        import cutlass_library  # the nvidia-cutlass wheel ships CUTLASS/CuTe headers

        include_dirs.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    ext = CUDAExtension(
        name="nunchaku._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            # No -std: torch's BuildExtension picks the standard its headers need (C++20 for 2.14).
            "cxx": ["-O3", "-DNDEBUG"],
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="nunchaku",
    version="0.1.0",
    description="SVDQuant 4-bit (W4A4) inference for diffusion transformers",
    packages=find_packages(include=["nunchaku", "nunchaku.*"]),
    python_requires=">=3.10",
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt")
                      if line.split("#")[0].strip()],
    extras_require={
        "app": ["gradio>=5,<7", "gputil>=1.4"],
        "eval": ["torchmetrics>=1.4"],
        "bench": ["torchmetrics>=1.4", "matplotlib>=3.8"],
        "test": ["pytest>=8", "selenium>=4.20", "gradio>=5,<7", "torchmetrics>=1.4"],
    },
    package_data={"nunchaku": ["data/*.txt"]},
    entry_points={"console_scripts": ["nunchaku=nunchaku.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
