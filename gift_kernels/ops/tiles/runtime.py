"""What every Triton launcher shares: whether the kernels can run here, device facts (queried
once, on first launch, never at import), the autotuner, and the one place kernels are launched
(:func:`launch`, which the host-cost testing hook can turn into a no-op).

Imported by the op folders' ``triton.py`` and, for availability, by
:mod:`gift_kernels.ops.plan`; it imports triton (the tile tables in :mod:`gift_kernels.ops.tiles`
do not).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import triton

from ..checks import MAX_OFFSET, exceeds_offsets, span

Tensor = torch.Tensor

# Whether the kernels were built for the interpreter: triton decides when a function is
# decorated, i.e. when the op folders' triton modules are imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED_PROGRAMS = 2  # under the interpreter: several row blocks per program, so persistent loops run


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot``, by x's dtype. It only matters for float32
    operands: fp32 x runs IEEE fp32 products, as F.linear does by default; with 16-bit x the
    float32 operands are the rank path's (t, B, dt with a float32 Theta), which run as 3xTF32
    (each operand split into a tf32 high and low part, three tensor-core products): float32
    accuracy (docs/triton.md) without moving the rank-r products onto the FMA units, where IEEE
    products spilled registers in most tiles (benchmarks/NOTES.md)."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def cdiv(a: int, b: int) -> int:
    """Ceiling division on host ints, for grids and splits. Not ``triton.cdiv``: triton wraps it
    as a constexpr function, whose Python call costs microseconds (about ten per fwd+bwd)."""
    return -(-a // b)


def sum_partials(ws: Tensor) -> Tensor:
    """The per-program partial sums of a workspace ``(S, ...)`` added over S in a fixed order:
    how every Triton backward reduces over M (deterministic, no atomics)."""
    return ws[0] if ws.shape[0] == 1 else ws.sum(0)


# ------------------------------------------------------------------ device facts

_capability: Dict[int, Tuple[int, int, int]] = {}
_sizes: Dict[int, Tuple[int, int]] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_capability(device: torch.device) -> Tuple[int, int, int]:
    """The tile tables' target for ``device``: (major, minor, shared memory per block), read
    on first launch (never at import) from ``torch.cuda.get_device_properties`` (the opt-in
    maximum, e.g. 99 KiB on sm_86 / sm_89 against 163 KiB on sm_80): no tile is offered that
    does not fit the device itself. The interpreter uses the Hopper table (its configs only
    change tile sizes)."""
    if device.type != "cuda":
        return (9, 0, 227 * 1024)
    idx = _index(device)
    if idx not in _capability:
        props = torch.cuda.get_device_properties(idx)
        _capability[idx] = (props.major, props.minor, props.shared_memory_per_block_optin)
    return _capability[idx]


def device_sizes(device: torch.device) -> Tuple[int, int]:
    """(SM count, L2 bytes), queried on first launch."""
    idx = _index(device)
    if idx not in _sizes:
        props = torch.cuda.get_device_properties(idx)
        _sizes[idx] = (props.multi_processor_count, props.L2_cache_size)
    return _sizes[idx]


def device_ctx(t: Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------ availability


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    device = torch.device(device)
    if device.type == "cpu":
        if not INTERPRETED:
            return ("the Triton kernels were built for the GPU: TRITON_INTERPRET was not 1 when "
                    "gift_kernels' Triton kernels were imported")
        return None
    if device.type != "cuda":
        return f"the Triton kernels run on cuda tensors (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if INTERPRETED:
        return "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors only"
    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    cap = device_capability(device)
    if cap < (8, 0):
        return f"needs compute capability >= 8.0 (sm_80), device has {cap[0]}.{cap[1]}"
    return None


def declines(op: str, x: Tensor, n: int) -> Optional[str]:
    """Why one call cannot run on these kernels (None: it can). The input-side ops' tensors
    are x-sized (u, du, dx) and Theta; ``gift_linear`` has (M, d_out) and (d_out, d_in) too."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} has no Triton kernel"
    if exceeds_offsets(op, x, n):
        what = f"x {tuple(x.shape)}, d_out {n}" if op == "gift_linear" else f"x {tuple(x.shape)}"
        return f"tensors of 2**31 or more elements ({what}) exceed the kernels' 32-bit offsets"
    return None


def offsets_fit(t: Tensor, where: str, name: str) -> Tensor:
    """``t`` itself, or a contiguous copy when its strides reach beyond 32-bit offsets (a
    view into a much larger buffer); refused if even the copy does not fit."""
    if span(t) <= MAX_OFFSET:
        return t
    if t.numel() > MAX_OFFSET:
        raise RuntimeError(f"{where}: {name} {tuple(t.shape)} has 2**31 or more elements, beyond the Triton "
                           f"kernels' 32-bit offsets; use the torch backend")
    return t.contiguous()


# ------------------------------------------------------------------ launching and tuning

_skip_runs = [False]
_tuned: Dict[tuple, object] = {}


def launch(kernel, grid, args: tuple, meta: dict) -> None:
    """Launch ``kernel`` on ``grid``: every Triton launch of the package goes through here."""
    if _skip_runs[0]:
        return
    _run_kernel(kernel, grid, args, meta)


def _run_kernel(kernel, grid, args: tuple, meta: dict) -> None:
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def skipped_kernel_runs() -> Iterator[None]:
    """Testing hook (host cost): inside the block :func:`launch` returns at once, so a call
    runs every line of the package's Python (plans, tiles, buffers, grids) and no kernel;
    outputs are the launchers' allocated buffers, correctly shaped, contents undefined.
    Used through :func:`gift_kernels.ops.plan.stubbed_kernels`."""
    prev = _skip_runs[0]
    _skip_runs[0] = True
    try:
        yield
    finally:
        _skip_runs[0] = prev


def _capturing(device: torch.device) -> bool:
    """Inside a CUDA-graph capture or a torch.compile trace: nothing may synchronise or time."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autotune(key: tuple, cands: list, run: Callable[[object], None], reset: Callable[[], None], device: torch.device):
    """The configuration for ``key``: the only candidate, the first under the interpreter or
    the host-cost hook, the cached winner, else the fastest by ``triton.testing.do_bench``
    (timed once per key on the call's own tensors; ``reset`` then clears what the timed
    launches accumulated into). Never times inside a CUDA-graph capture or a compile trace:
    there the first candidate (the best guess) runs and nothing is cached."""
    if len(cands) == 1 or INTERPRETED or _skip_runs[0]:
        return cands[0]
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    if _capturing(device):
        return cands[0]
    times = [triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in cands]
    _tuned[key] = cands[min(range(len(cands)), key=times.__getitem__)]
    reset()
    return _tuned[key]
