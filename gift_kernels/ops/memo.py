"""Values derived from a tensor's contents (a mixed batch's adapter ids: their check against a
bank, their row layout), computed once and reused while the tensor lives unmodified.

A mixed batch passes one ids tensor to every adapted layer, forward and backward: without this,
each layer would rebuild the same layout (a dozen ATen ops, and on a GPU the torch path's host
reads) twice per step. Layers see it through views (``ids.reshape(...)``: a new tensor object
each time), so an entry is keyed on the view's base tensor, its geometry (offset, shape,
strides) and what was derived; it is used only while that base is alive and the shared version
counter (bumped by every in-place write to the base or any of its views) is unchanged, and
dropped when the base is freed. Like autograd's own check of saved tensors, writes that bypass
the version counter (through ``.data`` or a NumPy view) are not seen. Nothing is cached for
inference tensors (no version counter), inside a CUDA-graph capture (the values exist only on
replay) or a ``torch.compile`` trace.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Hashable, Tuple, TypeVar

import torch

T = TypeVar("T")

_entries: Dict[tuple, Tuple[weakref.ref, int, object]] = {}
_lock = threading.Lock()
MAX_ENTRIES = 64  # a handful of live ids tensors x banks; more means tensors are being leaked


def _cacheable(t: torch.Tensor) -> bool:
    if t.is_inference() or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def derived(t: torch.Tensor, what: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned for the same contents of ``t`` and the same ``what``."""
    if not _cacheable(t):
        return compute()
    base = t._base if t._base is not None else t
    key = (id(base), t.storage_offset(), tuple(t.shape), t.stride(), what)
    entry = _entries.get(key)
    version = t._version
    if entry is not None and entry[0]() is base and entry[1] == version:
        return entry[2]
    value = compute()
    ref = weakref.ref(base, lambda _, key=key: _entries.pop(key, None))
    with _lock:
        if len(_entries) >= MAX_ENTRIES:  # the oldest goes (a freed tensor's callback may race: list() is atomic)
            _entries.pop(next(iter(list(_entries)), None), None)
        _entries[key] = (ref, version, value)
    return value


def clear() -> None:
    """Forget every entry (tests)."""
    with _lock:
        _entries.clear()
