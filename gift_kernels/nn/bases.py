"""What a base layer is: the one place that knows which modules GIFT can adapt, and how.

Two kinds of base:

- **dense**: an ``nn.Linear`` or a transformers ``Conv1D`` holding a plain floating-point
  weight. GIFT reads the weight (either form: :func:`gift_kernels.gift_linear`) and merges by
  writing ``W_hat`` into it.
- **module**: any other layer linear in its input -- a quantized linear (bitsandbytes,
  torchao, ...), another library's layer. GIFT never reads its weight: it runs the layer on
  the transformed input, ``base(x + (x psi^T) phi^T)`` (:func:`gift_kernels.gift_input`). Such
  a base must have integer ``in_features`` and ``out_features`` and a forward ``y = x A^T + b``
  for some matrix A (the rule for any module; nothing else can be checked). Merging it, the
  clustering head and export need its weight as a dense matrix: a :class:`BaseKind` registered
  here for that layer type says how (``dequantize``), and how to write a merged weight back
  and restore the original exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2): a linear map whose weight is stored ``(d_in, d_out)``.

    Recognised by name and shape so transformers need not be imported."""
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


def is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``Conv1D`` whose weight is a plain floating-point tensor (not a
    quantized parameter or tensor subclass: bitsandbytes' and torchao's layers are
    ``nn.Linear`` subclasses or instances with such weights)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        return False
    w = module.weight
    return type(w) in _PLAIN_TENSORS and w.dtype.is_floating_point and w.dim() == 2


@dataclass(frozen=True)
class BaseKind:
    """How GIFT handles one type of module base (see the module docstring).

    ``dequantize(module) -> (d_out, d_in)`` float32 tensor: the weight the forward uses.
    ``snapshot(module) -> state`` / ``restore(module, state)``: keep and put back the exact
    original weight state (for an exact unmerge). ``requantize(module, w_hat)``: write a merged
    dense weight into the module in its own format (lossy for quantized weights).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Optional[Callable[[nn.Module], Tensor]] = None
    snapshot: Optional[Callable[[nn.Module], object]] = None
    restore: Optional[Callable[[nn.Module, object], None]] = None
    requantize: Optional[Callable[[nn.Module, Tensor], None]] = None


_KINDS: List[BaseKind] = []


def register_base_kind(kind: BaseKind) -> BaseKind:
    """Teach GIFT a module base type (first match wins; later registrations are tried first)."""
    _KINDS.insert(0, kind)
    return kind


def kind_of(module: nn.Module) -> Optional[BaseKind]:
    """The registered kind of a module base, or None (a generic linear module)."""
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def module_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` of a module base, or None if it does not say."""
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_in, d_out))
    return (d_in, d_out) if ok else None


def features(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of any base GIFT accepts."""
    if is_dense(module):
        w = module.weight
        return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])
    f = module_features(module)
    if f is None:
        raise TypeError(describe_rule(module))
    return f


def is_supported(module: nn.Module) -> bool:
    return is_dense(module) or module_features(module) is not None


def describe_rule(module: nn.Module) -> str:
    return (f"a {type(module).__name__} is not a layer GIFT can adapt: it needs an nn.Linear or transformers Conv1D, "
            f"a quantized linear layer (bitsandbytes, torchao), or any module with integer in_features and "
            f"out_features whose forward is linear in its input")


def theta_defaults(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device a Theta takes by default for this base: its weight's for a dense
    base; for a module base, its compute dtype (``compute_dtype``, else its first floating
    parameter's, else float32) and its weight's device."""
    w = getattr(module, "weight", None)
    device = w.device if isinstance(w, Tensor) else next((p.device for p in module.parameters()), torch.device("cpu"))
    if is_dense(module):
        return module.weight.dtype, device
    dtype = getattr(module, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((t.dtype for t in list(module.parameters()) + list(module.buffers())
                      if t.dtype.is_floating_point and type(t) in _PLAIN_TENSORS), torch.float32)
    return dtype, device


def dense_weight(module: nn.Module, where: str) -> Tensor:
    """The base's weight as a dense ``(d_out, d_in)`` tensor: a view for dense bases, the
    dequantized weight (float32) for a registered module kind; a clear error otherwise."""
    if is_dense(module):
        return module.weight.t() if is_conv1d(module) else module.weight
    kind = kind_of(module)
    if kind is None or kind.dequantize is None:
        raise TypeError(f"{where}: {type(module).__name__} does not expose its weight as a dense matrix (no "
                        f"registered dequantize for it in gift_kernels.nn.bases)")
    return kind.dequantize(module)
