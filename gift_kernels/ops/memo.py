"""Values derived from one mixed-adapter call's ids (its row layout), computed in the call's
forward and reused by the same call's backward.

The eager mixed op (:class:`gift_kernels.ops.mixed.op.GiftMixedFunction`) opens a :func:`scope`
that owns its ids tensor around the forward launcher, and reopens the same scope around the
backward launcher (the autograd context carries it). The launchers ask :func:`derived` for the
layout: computed on the first request, returned again while the ids' version counter is
unchanged (autograd also refuses a backward whose saved ids were modified in place).

Nothing is cached across calls or outside a scope (the registered ops, ``torch.compile``
graphs, direct launcher calls): an ids tensor can be given new contents under the same object
and version -- a buffer a compiled graph reuses, a write through ``.data``, a NumPy or DLPack
alias, a kernel filling a persistent buffer -- and a cache keyed on the object would then hand
back another batch's layout.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


class Scope:
    """The derived values of one call's ids (``base``: the tensor the ids are a view of)."""

    def __init__(self, ids: torch.Tensor):
        self.base = _base(ids)
        self.entries: Dict[tuple, Tuple[int, object]] = {}


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


_local = threading.local()  # each thread's open scopes (a backward may run on autograd's own thread)


def _stack() -> List[Scope]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextlib.contextmanager
def scope(ids: Optional[torch.Tensor] = None, *, reuse: Optional[Scope] = None) -> Iterator[Scope]:
    """Inside the block, values derived from ``ids`` (or from the ids of ``reuse``, a scope
    opened before: the forward's, for its backward) are computed once."""
    s = reuse if reuse is not None else Scope(ids)
    stack = _stack()
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


def derived(t: torch.Tensor, what: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned for the same view of the same unmodified ids in the
    innermost open scope that owns them; outside such a scope, ``compute()``."""
    stack = getattr(_local, "stack", None)
    if not stack or t.is_inference() or torch.compiler.is_compiling():
        return compute()
    if t.is_cuda and torch.cuda.is_current_stream_capturing():  # values that exist only on replay
        return compute()
    s = stack[-1]
    if _base(t) is not s.base:
        return compute()
    key = (t.storage_offset(), tuple(t.shape), t.stride(), what)
    version = t._version
    entry = s.entries.get(key)
    if entry is not None and entry[0] == version:
        return entry[1]
    value = compute()
    s.entries[key] = (version, value)
    return value
