"""Build script. All metadata lives in pyproject.toml; this file exists for the optional
CUDA C++ extension (csrc/), whose build switches are documented in docs/cuda_extension.md.

The extension ``gift_kernels._C`` is built when torch is a CUDA build and nvcc is found, and
skipped otherwise (a CPU torch, or pip's isolated build environment, which has no torch: use
``--no-build-isolation`` to build it). ``GIFT_KERNELS_FORCE_CUDA_BUILD=1`` turns a skip into an
error; ``GIFT_KERNELS_SKIP_CUDA_BUILD=1`` never builds it.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_build_config():
    """gift_kernels/ops/cuda/build.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_gift_cuda_build", ROOT / "gift_kernels" / "ops" / "cuda" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_extension():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with the reason printed."""
    force = _flag("GIFT_KERNELS_FORCE_CUDA_BUILD")
    if _flag("GIFT_KERNELS_SKIP_CUDA_BUILD"):
        if force:
            raise RuntimeError("GIFT_KERNELS_FORCE_CUDA_BUILD and GIFT_KERNELS_SKIP_CUDA_BUILD are both set")
        return [], {}

    def skip(why: str):
        if force:
            raise RuntimeError(f"GIFT_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {why}")
        print(f"gift-kernels: not building the CUDA extension ({why})", file=sys.stderr)
        return [], {}

    cfg = _cuda_build_config()
    if not cfg.have_sources():
        return skip("no csrc/ sources")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable here; pip's build isolation hides it, use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if cfg.use_cuda_home() is None:  # before torch.utils.cpp_extension reads CUDA_HOME
        return skip("no CUDA toolkit (nvcc not on PATH, CUDA_HOME unset)")
    os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    flags = cfg.compile_flags()
    ext = CUDAExtension(
        name=cfg.EXTENSION_NAME,
        sources=[os.path.relpath(s, ROOT) for s in cfg.sources()],
        extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
    )
    print(f"gift-kernels: building the CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
