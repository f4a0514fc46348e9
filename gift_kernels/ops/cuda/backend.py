"""The ``cuda`` backend: launchers over the CUDA C++ extension in ``csrc/``.

The extension registers four ops in the ``gift_kernels`` namespace (``csrc/gift_ops.cpp``):

    torch.ops.gift_kernels.cuda_gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
    torch.ops.gift_kernels.cuda_gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs)
        -> (dx, dweight, dbias, dphi, dpsi), empty tensors where not needed
    torch.ops.gift_kernels.cuda_gift_input_fwd(x, phi, psi) -> (u, t)
    torch.ops.gift_kernels.cuda_gift_input_bwd(grad_u, x, t, phi, psi, needs) -> (dx, dphi, dpsi)

with the schemas of ``gift_linear_fwd`` / ``gift_linear_bwd`` (:mod:`gift_kernels.ops.library`),
which call them through :func:`gift_fwd` / :func:`gift_bwd` when this backend is chosen. Their
fake implementations and autograd come from :mod:`gift_kernels.ops.cuda.ops`, so they also
work as ops on their own.

Where the extension comes from:

- ``gift_kernels._C``, built by ``setup.py`` when torch is a CUDA build and nvcc is present;
- or, with ``GIFT_KERNELS_CUDA_JIT=1`` in a source checkout, a JIT build of ``csrc/`` with
  ninja (:func:`gift_kernels.ops.cuda.build.jit_load`), cached under ``build/``.

Importing this module raises ImportError with the reason when neither is there;
:mod:`gift_kernels.ops.backends` catches it and reports it in ``gift_kernels.explain()``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import build as cuda_build
from .ops import bwd_with, fwd_with, input_bwd_with, input_fwd_with, register_python_parts

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
register_python_parts("gift_kernels")


gift_infer = None  # inference runs the forward op
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def declines(op: str, x: Tensor, n: int) -> Optional[str]:
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} has no CUDA kernel"
    return None


def prefers_input_form(m: int, n: int, k: int, r: int) -> bool:
    return False  # the extension implements the epilogue form


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


def gift_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)``. Returns ``(y, t, B)``; ``t`` and ``B`` are saved for backward."""
    return fwd_with(torch.ops.gift_kernels, x, weight, bias, phi, psi)


def gift_bwd(
    grad_y: Tensor,
    x: Tensor,
    t: Tensor,
    B: Tensor,
    weight: Tensor,
    phi: Tensor,
    psi: Tensor,
    needs: Tuple[bool, bool, bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """Backward. ``needs`` = which of (x, weight, bias, phi, psi) want a gradient; ``None`` where not."""
    return bwd_with(torch.ops.gift_kernels, grad_y, x, t, B, weight, phi, psi, needs)


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = x + (x psi^T) phi^T`` on 2-D ``x (M, K)``. Returns ``(u, t)``; ``t`` is saved for backward."""
    return input_fwd_with(torch.ops.gift_kernels, x, phi, psi)


def input_bwd(grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor,
              needs: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Backward of the input-side form. ``needs`` = which of (x, phi, psi) want a gradient."""
    return input_bwd_with(torch.ops.gift_kernels, grad_u, x, t, phi, psi, needs)
