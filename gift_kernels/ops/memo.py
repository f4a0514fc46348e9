"""Values derived from a mixed batch's ids (their row layout), computed once where the package
owns the ids and their lifetime, never across calls on ids a user or a compiler holds.

Two owners open a :func:`scope`:
- the eager mixed op (:class:`gift_kernels.ops.mixed.op.GiftMixedFunction`), around its forward
  launcher, and again around its backward launcher (the autograd context carries the scope): the
  layout is built in forward and reused by the same call's backward (autograd also refuses a
  backward whose saved ids were modified in place), only when the backward gets the forward's
  own saved tensors (not recomputed by checkpointing or reloaded by offloading), and freed after;
- a model's mixed-batch forward (the PEFT integration's ``adapter_names=`` hook), around the whole
  forward: the ids it builds for its layers (:func:`own`) are never handed to user code, so every
  layer of that forward shares one layout.
The launchers ask :func:`derived`: computed on the first request, returned again while the ids'
version counter is unchanged. Nothing is cached outside a scope or for ids no scope owns (the
registered ops, ``torch.compile`` graphs, direct launcher calls): ids can get new contents under
the same tensor object and version -- a buffer a compiled graph reuses, a write through
``.data``, a NumPy or DLPack alias, a kernel filling a persistent buffer -- and a cache keyed on
the object would hand back another batch's layout.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


class Scope:
    """The derived values of the ids a scope owns, by their storage (shared by every view, in
    inference mode too, where views do not record their base)."""

    def __init__(self, ids: Optional[torch.Tensor] = None):
        self.storages: list = [] if ids is None else [ids.untyped_storage()]
        self.entries: Dict[tuple, Tuple[int, object]] = {}

    def owns(self, storage) -> bool:
        return any(s is storage for s in self.storages)


_local = threading.local()  # each thread's open scopes (a backward may run on autograd's own thread)


def _stack() -> List[Scope]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextlib.contextmanager
def scope(ids: Optional[torch.Tensor] = None, *, reuse: Optional[Scope] = None) -> Iterator[Optional[Scope]]:
    """Inside the block, values derived from ``ids`` (or from what ``reuse``, a scope opened
    before, owns: the forward's, for its backward; or what :func:`own` adds) are computed once.
    While a graph is traced, nothing is opened (yields None)."""
    if torch.compiler.is_compiling():
        yield None
        return
    s = reuse if reuse is not None else Scope(ids)
    stack = _stack()
    stack.append(s)
    try:
        yield s
    finally:  # its own entry by identity: scopes closed out of order must not pop another one
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is s:
                del stack[i]
                break


def own(ids: torch.Tensor) -> torch.Tensor:
    """Let the innermost open scope cache what is derived from ``ids`` (a tensor the scope's
    owner built and never exposes); returns ``ids``."""
    stack = getattr(_local, "stack", None)
    if stack and not torch.compiler.is_compiling():
        stack[-1].storages.append(ids.untyped_storage())
    return ids


def derived(t: torch.Tensor, what: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned for the same view of the same unmodified ids in an
    open scope that owns them (kept then in every owning scope); outside one, ``compute()``."""
    stack = getattr(_local, "stack", None)
    if not stack or torch.compiler.is_compiling():
        return compute()
    if t.is_cuda and torch.cuda.is_current_stream_capturing():  # values that exist only on replay
        return compute()
    storage = t.untyped_storage()
    owners = [s for s in stack if s.owns(storage)]  # e.g. a model's forward and, inside it, one call
    if not owners:
        return compute()
    key = (id(storage), t.storage_offset(), tuple(t.shape), t.stride(), what)
    version = 0 if t.is_inference() else t._version  # inference tensors have no counter: the owner never writes them
    for s in reversed(owners):
        entry = s.entries.get(key)
        if entry is not None and entry[0] == version:
            value = entry[1]
            break
    else:
        value = compute()
    for s in owners:  # the call's own scope keeps it for its backward
        s.entries[key] = (version, value)
    return value
