"""The one place that decides which backend runs GIFT.

Order of precedence: ``with gift_kernels.backend(name):`` > ``GIFT_KERNELS_BACKEND`` >
``auto``. ``auto`` picks, for the device of the tensors:

    cuda tensors: triton -> cuda (C++ extension) -> torch
    cpu tensors:  torch  (the Triton interpreter is for testing, never picked by auto)

Nothing here imports a backend at import time: each backend is loaded on first use and,
if it cannot load, the reason is remembered and reported by :func:`explain`. An
explicitly requested backend that cannot run raises; ``auto`` falls back and logs why.

The override is process-global (not thread-local) on purpose: autograd runs CUDA
backward passes on its own worker threads, which must see the same choice as forward.
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

# backend name -> module holding its launchers ``gift_fwd`` / ``gift_bwd``
_MODULES = {
    "torch": "gift_kernels.kernels.torch_gift",
    "triton": "gift_kernels.kernels.triton_gift",
    "cuda": "gift_kernels.kernels.cuda_gift",
}

_lock = threading.Lock()
_loaded: Dict[str, ModuleType] = {}
_load_errors: Dict[str, str] = {}
_override: List[str] = []
_last: Dict[str, Tuple[str, str]] = {}  # device type -> (backend, why)
_fallback_logged: set = set()


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"gift_kernels: unknown backend {name!r} from {source}; choose one of {CHOICES}")
    return name


def requested() -> str:
    """The backend asked for: the innermost ``backend()`` context, else the env var, else ``auto``."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run GIFT ops inside the block on backend ``name`` (``auto``, ``torch``, ``triton``, ``cuda``)."""
    name = _check_name(name, "gift_kernels.backend()")
    _override.append(name)
    try:
        yield name
    finally:
        _override.pop()


def load(name: str) -> Optional[ModuleType]:
    """Import backend ``name``'s launchers, or return None and remember why not."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    with _lock:
        try:
            mod = importlib.import_module(_MODULES[name])
        except Exception as exc:  # any failure to load is a reason to report, not to crash
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        _loaded[name] = mod
        return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``; if not, why."""
    if name == "torch":
        return True, "always available"
    if name == "triton" and device.type == "cpu" and not _interpreting():
        return False, "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if name == "cuda" and device.type != "cuda":
        return False, f"the CUDA extension runs only on cuda tensors, not {device.type}"
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return False, f"triton does not run on {device.type} tensors"
    mod = load(name)
    if mod is None:
        return False, f"could not be loaded ({_load_errors[name]})"
    reason = getattr(mod, "unavailable_reason", lambda _device: None)(device)
    if reason:
        return False, reason
    return True, "available"


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)


def resolve(device: torch.device) -> str:
    """Pick the backend for tensors on ``device`` and record the choice."""
    req = requested()
    if req != "auto":
        ok, why = supports(req, device)
        if not ok:
            raise RuntimeError(f"gift_kernels: backend {req!r} was requested but cannot run on {device}: {why}")
        _last[device.type] = (req, "requested")
        return req
    skipped = []
    for name in _auto_order(device):
        ok, why = supports(name, device)
        if ok:
            why_chosen = "auto: " + ("; ".join(skipped) if skipped else f"first choice for {device.type}")
            _last[device.type] = (name, why_chosen)
            if skipped and (device.type, name) not in _fallback_logged:
                _fallback_logged.add((device.type, name))
                logger.warning("gift_kernels: using backend %r on %s because %s", name, device, "; ".join(skipped))
            return name
        skipped.append(f"{name} skipped ({why})")
    raise AssertionError("the torch backend is always available")  # pragma: no cover


def impl(device: torch.device) -> ModuleType:
    """The launchers module of the backend chosen for ``device``."""
    mod = load(resolve(device))
    assert mod is not None
    return mod


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
