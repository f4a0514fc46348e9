"""The ``cuda`` backend's shared part: loading the CUDA C++ extension built from ``csrc/``, and
whether it can run a call. Each op's launchers over the extension's kernels live in the op's
folder (``gift_kernels/ops/linear/cuda.py``); an op without one there has no CUDA kernel (the
plan hands it to another backend and says so).

The extension registers its kernels as C++ ops (``TORCH_LIBRARY`` in ``csrc/gift_ops.cpp``),
e.g. ``torch.ops.gift_kernels.cuda_gift_linear_fwd``; they are kernels, not the package's
ops: the registered op with its fake and autograd is the Python one of each op
(``gift_kernels/ops/<op>/op.py``), which calls them when this backend is chosen.

Where the extension comes from:

- ``gift_kernels._C``, built by ``setup.py`` when torch is a CUDA build and nvcc is present;
- or, with ``GIFT_KERNELS_CUDA_JIT=1`` in a source checkout, a JIT build of ``csrc/`` with
  ninja (:func:`gift_kernels.ops.cuda.build.jit_load`), cached under ``build/``.

Importing this module raises ImportError with the reason when neither is there;
:mod:`gift_kernels.ops.plan` catches it and reports it in ``gift_kernels.explain()``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from . import build as cuda_build

JIT_ENV = "GIFT_KERNELS_CUDA_JIT"
MIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores (WMMA) and the sm_80 / sm_90 builds


def _load_extension() -> str:
    """Load the extension's library (which registers its ops); return where it came from."""
    if torch.version.cuda is None:
        raise ImportError(f"torch {torch.__version__} is a CPU-only build; the CUDA extension needs a CUDA build of torch")
    if os.environ.get(JIT_ENV) == "1":
        try:
            return f"JIT build in {cuda_build.jit_load()}"
        except ImportError:
            raise
        except Exception as exc:  # a failed compile is a reason to report, like a missing build
            raise ImportError(f"{JIT_ENV}=1: building csrc/ failed: {exc}") from exc
    spec = importlib.util.find_spec(cuda_build.EXTENSION_NAME)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"{cuda_build.EXTENSION_NAME} (the CUDA C++ extension) is not built: reinstall with "
            "`GIFT_KERNELS_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation` (needs nvcc and a CUDA "
            f"build of torch), or set {JIT_ENV}=1 in a source checkout to build it on first use"
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against another torch
        raise ImportError(f"{spec.origin} failed to load: {exc}") from exc
    return spec.origin


SOURCE = _load_extension()

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def declines(op: str, x: Tensor, n: int) -> Optional[str]:
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} has no CUDA kernel"
    return None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why this backend cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"the CUDA extension runs only on cuda tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, {device} has {cap[0]}.{cap[1]}"
    return None
