"""The one place that decides which backend runs a GIFT op, and the one place that falls back.

Order of precedence: ``with gift_kernels.backend(name):`` > ``GIFT_KERNELS_BACKEND`` >
``auto``. ``auto`` picks, for the device of the tensors:

    cuda tensors: triton -> cuda (C++ extension) -> torch
    cpu tensors:  torch  (the Triton interpreter is for testing, never picked by auto)

A backend is a module with the interface of :class:`Backend` (below). The optional backends
(triton, cuda) are not imported at import time: each is loaded on first use and, if it cannot
load, the reason is remembered and reported by :func:`explain`. A backend is asked two questions before a call:
can it run on this device (``unavailable_reason``), and can it take this call
(``declines``: a dtype without a kernel, tensors beyond 32-bit offsets, an op it does not
implement). An explicitly requested backend that cannot run on the device raises; one that
runs there but declines a call hands that call to the torch backend, and :func:`last_backend`
/ :func:`explain` then name ``torch`` and say why. ``auto`` skips what cannot run or declines.

The override is process-wide, not per thread: autograd runs CUDA backward passes on its own
worker threads, which must see the choice the forward saw. Contexts entered by several threads
may close in any order: each exit removes its own entry, and the most recently entered open
context wins. The eager autograd path also remembers the backend its forward ran on, so a
backward outside the ``with`` block runs on the same backend.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

import torch

logger = logging.getLogger("gift_kernels")

ENV_VAR = "GIFT_KERNELS_BACKEND"
BACKENDS: Tuple[str, ...] = ("torch", "triton", "cuda")
CHOICES: Tuple[str, ...] = ("auto",) + BACKENDS

# backend name -> module implementing the Backend interface
_MODULES = {
    "torch": "gift_kernels.ops.torch_backend",
    "triton": "gift_kernels.ops.triton.launch",
    "cuda": "gift_kernels.ops.cuda.backend",
}


class Backend:
    """The interface every backend module provides (module-level names, checked on load).

    ``unavailable_reason(device) -> str | None``
        why it cannot run on ``device`` (None: it can).
    ``declines(op, x, n) -> str | None``
        why it cannot take one call of ``op`` (``"gift_linear"``, ``"gift_input"``, ``"gift_mixed"``) with 2-D
        input ``x`` and output width ``n`` (None: it can). Inputs are already validated.
    ``gift_fwd(x, weight, bias, phi, psi) -> (y, t, B)``
    ``gift_bwd(grad_y, x, t, B, weight, phi, psi, needs) -> (dx, dW, db, dphi, dpsi)``
        the epilogue form ``y = x W^T + b + (x psi^T)(W phi)^T``; None where not needed.
    ``gift_infer(x, weight, bias, phi, psi) -> y`` or None
        forward without autograd, free to re-associate (None: ``gift_fwd``'s y).
    ``prefers_input_form(m, n, k, r) -> bool``
        whether a dense training call of that size is cheaper in the input-side form here.
    ``input_fwd(x, phi, psi) -> (u, t)`` / ``input_bwd(grad_u, x, t, phi, psi, needs) -> (dx, dphi, dpsi)``
        the input-side form ``u = x + (x psi^T) phi^T``, or None where not implemented.
    ``mixed_fwd(x, phis, psis, adapter_ids) -> (u, t)`` /
    ``mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs) -> (dx, dphis, dpsis)``
        optional (absent or None: the torch backend runs it): the input-side form with one
        adapter of a bank per row, ``u_i = x_i + (x_i psi_a^T) phi_a^T``, ``a = adapter_ids[i]``
        (-1: ``u_i = x_i``); op name ``"gift_mixed"``.
    """

    REQUIRED = ("unavailable_reason", "declines", "gift_fwd", "gift_bwd", "gift_infer", "input_fwd", "input_bwd",
                "prefers_input_form")


_lock = threading.Lock()
_loaded: Dict[str, ModuleType] = {}
_load_errors: Dict[str, str] = {}
_override: List[Tuple[object, str]] = []  # (token, name), innermost last
_last: Dict[str, Tuple[str, str]] = {}  # device type -> (backend, why)
_fallback_logged: set = set()


def _check_name(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"gift_kernels: backend name from {source} must be a str, one of {CHOICES}; got {name!r}")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"gift_kernels: unknown backend {name!r} from {source}; choose one of {CHOICES}")
    return name


def requested() -> str:
    """The backend asked for: the innermost open ``backend()`` context, else the env var, else ``auto``."""
    with _lock:
        if _override:
            return _override[-1][1]
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run GIFT ops inside the block on backend ``name`` (``auto``, ``torch``, ``triton``, ``cuda``)."""
    name = _check_name(name, "gift_kernels.backend()")
    token = object()
    with _lock:
        _override.append((token, name))
    try:
        yield name
    finally:
        with _lock:  # remove this context's own entry, wherever it is now
            for i in range(len(_override) - 1, -1, -1):
                if _override[i][0] is token:
                    del _override[i]
                    break


def load(name: str) -> Optional[ModuleType]:
    """Import backend ``name``, or return None and remember why not."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    with _lock:
        try:
            mod = importlib.import_module(_MODULES[name])
            missing = [attr for attr in Backend.REQUIRED if not hasattr(mod, attr)]
            if missing:
                raise ImportError(f"{_MODULES[name]} lacks {missing} of the backend interface")
        except Exception as exc:  # any failure to load is a reason to report, not to crash
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        _loaded[name] = mod
        return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``; if not, why."""
    device = torch.device(device)
    if name == "triton" and device.type == "cpu" and not _interpreting():
        return False, "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if name == "cuda" and device.type != "cuda":
        return False, f"the CUDA extension runs only on cuda tensors, not {device.type}"
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return False, f"triton does not run on {device.type} tensors"
    mod = load(name)
    if mod is None:
        return False, f"could not be loaded ({_load_errors[name]})"
    reason = mod.unavailable_reason(device)
    if reason:
        return False, reason
    return True, "always available" if name == "torch" else "available"


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)


def _declines(mod: ModuleType, op: str, x: torch.Tensor, n: int) -> Optional[str]:
    launcher = {"gift_linear": "gift_fwd", "gift_input": "input_fwd", "gift_mixed": "mixed_fwd"}[op]
    if getattr(mod, launcher, None) is None:  # the mixed launchers are optional
        return f"it has no {op} kernel"
    return mod.declines(op, x, n)


def _choose(x: torch.Tensor, n: int, op: str, prefer: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """(backend, why, a fallback note to log once or None) for one call; records nothing."""
    device = x.device
    req = prefer or requested()
    if req != "auto":
        ok, why = supports(req, device)
        if not ok:
            raise RuntimeError(f"gift_kernels: backend {req!r} was requested but cannot run on {device}: {why}")
        declined = _declines(_loaded[req], op, x, n)
        if declined is None:
            return req, "requested" if prefer is None else "the forward's backend", None
        note = f"backend {req!r} declined this {op} call ({declined}); the torch backend ran it"
        return "torch", note, note
    skipped = []
    for name in _auto_order(device):
        ok, why = supports(name, device)
        if ok:
            why = _declines(_loaded[name], op, x, n)
            if why is None:
                detail = "; ".join(skipped) if skipped else f"first choice for {device.type}"
                note = f"using backend {name!r} on {device} because {'; '.join(skipped)}" if skipped else None
                return name, "auto: " + detail, note
            why = f"declined this call: {why}"
        skipped.append(f"{name} skipped ({why})")
    raise AssertionError("the torch backend takes every call")  # pragma: no cover


def resolve(x: torch.Tensor, n: int, op: str = "gift_linear", prefer: Optional[str] = None) -> ModuleType:
    """The backend module that runs one call of ``op`` on 2-D ``x`` with output width ``n``.

    ``prefer`` (the backend an eager forward ran on, for its backward) stands in for the
    request. Records the choice for :func:`last_backend` and logs a fallback once.
    """
    name, why, note = _choose(x, n, op, prefer)
    _last[x.device.type] = (name, why)
    if note and (x.device.type, note) not in _fallback_logged:
        _fallback_logged.add((x.device.type, note))
        logger.warning("gift_kernels: %s", note)
    return _loaded[name] if name in _loaded else load(name)


def prefers_input_form(x: torch.Tensor, n: int, r: int) -> bool:
    """Whether the backend that would run this dense call finds the input-side form cheaper
    (its ``prefers_input_form(m, n, k, r)``; the fused GPU kernels say no until measured)."""
    name, _, _ = _choose(x, n, "gift_linear", None)
    mod = _loaded[name] if name in _loaded else load(name)
    m, k = x.shape
    return mod.prefers_input_form(m, n, k, r)


def traced_prefers_input_form(device_type: str, m, n: int, k: int, r: int) -> bool:
    """The form rule for a graph being traced by ``torch.compile``: the first backend ``auto``
    picks for the device decides (CPU: the torch backend's cost rule; CUDA: the fused epilogue
    kernels). Pure arithmetic on (possibly symbolic) sizes, so Dynamo guards on the outcome
    instead of on the backend choice, which stays a run-time decision inside the ops."""
    if device_type != "cpu":
        return False
    from . import torch_backend

    return torch_backend.prefers_input_form(m, n, k, r)


def name_of(mod: ModuleType) -> str:
    """The backend name of a module returned by :func:`resolve`."""
    return next(name for name, m in _loaded.items() if m is mod)


def last_backend(device_type: str = "cpu") -> Optional[str]:
    """The backend that ran the most recent GIFT op on ``device_type`` (None if none ran)."""
    entry = _last.get(device_type)
    return None if entry is None else entry[0]


def explain(device: Optional[torch.device] = None) -> str:
    """A human-readable report: what was requested, what can run where, what last ran and why."""
    lines = [f"requested: {requested()} (context > ${ENV_VAR} > auto)"]
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for dev in devices:
        lines.append(f"{dev.type}:")
        for name in BACKENDS:
            ok, why = supports(name, dev)
            lines.append(f"  {name:<7} {'yes' if ok else 'no '}  {why}")
        if dev.type in _last:
            name, why = _last[dev.type]
            lines.append(f"  last ran: {name} ({why})")
    return "\n".join(lines)
