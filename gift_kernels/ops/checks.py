"""Input validation at the public boundary: the functional API and the registered ops.

Each call is checked once, where it enters the package (launchers trust their inputs). Every
message names the function, the offending tensor and the shapes involved; nothing is
broadcast, reshaped or cast to make bad input fit.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import memo

MAX_OFFSET = 2**31 - 1  # the Triton kernels index with 32-bit offsets


def span(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes for ``t`` from its strides."""
    if t.is_contiguous():  # the common case, without a walk over the strides
        return t.numel() - 1 if t.numel() else 0
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0


def n_rows(x: torch.Tensor) -> int:
    """The rows of ``x (..., d)`` flattened to 2-D (``math.prod`` of the leading sizes: d may be 0)."""
    if x.dim() == 2:
        return x.shape[0]
    return math.prod(x.shape[:-1])


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x (..., d)`` as 2-D ``(rows, d)``: itself when already 2-D, else a view where the
    strides allow one (a copy otherwise). What every launcher is given."""
    return x if x.dim() == 2 else x.reshape(n_rows(x), x.shape[-1])


def unflat(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """2-D ``y (rows, n)`` with ``like``'s leading shape: ``(..., n)``. Not a view in autograd's
    sense (``detach``): an autograd Function returns it, and a view created inside a custom
    Function could not be modified in place by the caller (``y += residual``)."""
    if like.dim() == 2:
        return y
    return y.view(*like.shape[:-1], y.shape[-1]).detach()


def grad_like(dx: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A backward's 2-D grad for ``x (..., d)`` in x's shape (None stays None)."""
    return dx if dx is None or x.dim() == 2 else dx.reshape(x.shape)


def exceeds_offsets(op: str, x: torch.Tensor, n: int, m: Optional[int] = None) -> bool:
    """Whether one call of ``op`` on ``x (..., d_in)`` with output width ``n`` reaches beyond
    32-bit offsets: the input-side ops' tensors are x-sized (u, du, dx); ``gift_linear`` has
    (M, d_out) and (d_out, d_in) too. Part of the plan's key: a plan made for a call that fits
    is never reused for one that does not. ``m``: x's rows, when the caller has them."""
    k = x.shape[-1]
    if m is None:
        m = n_rows(x)
    sizes = max(m * n, m * k, n * k) if op == "gift_linear" else m * k
    # a contiguous x spans m * k - 1 elements: within sizes
    return sizes > MAX_OFFSET or (not x.is_contiguous() and span(x) > MAX_OFFSET)


def _tensor_sig(t) -> tuple:
    return (type(t), t.layout, t.dtype, t.device, t.shape)


def gift_signature(x, weight, bias, phi, psi) -> Optional[tuple]:
    """What :func:`check_gift_args` decides on, as one hashable key: each tensor's type, layout,
    dtype, device and shape (x's: its rank and last dimension only). Calls with equal
    signatures pass or fail the checks alike, so the plan of a call whose signature passed
    once skips them (:func:`gift_kernels.ops.plan.known`). None where an argument is not a
    tensor, x is 0-d or not strided (sparse, nested: what the plan lookup reads of x would
    fail on it) or the weight is not 2-D: such a call is checked first (and refused)."""
    try:
        if x.layout is not torch.strided or weight.dim() != 2:
            return None
        return (type(x), x.layout, x.dtype, x.device, x.dim(), x.shape[-1], _tensor_sig(weight),
                None if bias is None else _tensor_sig(bias), _tensor_sig(phi), _tensor_sig(psi))
    except Exception:  # whatever a non-tensor raises: the checks name it
        return None


def input_signature(x, phi, psi) -> Optional[tuple]:
    """:func:`gift_signature` for :func:`check_input_args` (the functional ``gift_input``)."""
    try:
        if x.layout is not torch.strided:
            return None
        return (type(x), x.layout, x.dtype, x.device, x.dim(), x.shape[-1], _tensor_sig(phi), _tensor_sig(psi))
    except Exception:
        return None


def check_needs(op: str, needs: Sequence[bool], names: Sequence[str]) -> None:
    """A backward op's ``needs`` flags: one per differentiable input, by name."""
    if len(needs) != len(names):
        raise ValueError(f"{op}: needs must have {len(names)} flags for {tuple(names)}, got {len(needs)}")


def _fmt(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}"


def check_float(name: str, t: torch.Tensor, where: str = "gift_linear") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{where}: {name} must be a dense (strided) tensor, got layout {t.layout} (shape {_fmt(t)})")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{where}: {name} must be a floating-point tensor, got dtype {t.dtype} "
            f"(shape {_fmt(t)})"
        )


def _check_theta(where: str, d_in: int, phi: torch.Tensor, psi: torch.Tensor, name: str, other) -> None:
    """``other`` (named ``name``) is the tensor d_in came from: named in the messages only."""
    if phi.dim() != 2:
        raise ValueError(f"{where}: phi must be 2-D (d_in, r), got shape {_fmt(phi)}")
    if psi.dim() != 2:
        raise ValueError(f"{where}: psi must be 2-D (r, d_in), got shape {_fmt(psi)}")
    if phi.shape[0] != d_in:
        raise ValueError(f"{where}: phi must have shape (d_in, r) with d_in = {d_in} from {name} {_fmt(other)}, "
                         f"got phi {_fmt(phi)}")
    if psi.shape[1] != d_in:
        raise ValueError(f"{where}: psi must have shape (r, d_in) with d_in = {d_in} from {name} {_fmt(other)}, "
                         f"got psi {_fmt(psi)}")
    if phi.shape[1] != psi.shape[0]:
        raise ValueError(
            f"{where}: phi's rank ({phi.shape[1]}) and psi's rank ({psi.shape[0]}) differ: "
            f"phi {_fmt(phi)}, psi {_fmt(psi)}"
        )
    if phi.shape[1] == 0:
        raise ValueError(f"{where}: rank r must be >= 1, got phi {_fmt(phi)} and psi {_fmt(psi)}")
    if phi.dtype != psi.dtype:
        raise TypeError(
            f"{where}: phi dtype {phi.dtype} differs from psi dtype {psi.dtype}; "
            f"keep Theta in one dtype (phi {_fmt(phi)}, psi {_fmt(psi)})"
        )


def _check_device(where: str, x: torch.Tensor, tensors) -> None:
    device = x.device  # once: each .device builds a new object
    for name, t in tensors:
        if t.device != device:
            raise ValueError(
                f"{where}: {name} is on {t.device} (shape {_fmt(t)}) but x is on {x.device} "
                f"(shape {_fmt(x)}); all tensors must be on one device"
            )


def check_input_args(x: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor, *, x_2d: bool = False) -> None:
    """Raise a clear error unless (x, phi, psi) form a valid input-side GIFT call
    ``u = x + (x psi^T) phi^T``."""
    where = "gift_input op" if x_2d else "gift_input"
    for name, t in (("x", x), ("phi", phi), ("psi", psi)):
        check_float(name, t, where)
    if x.dim() == 0 or (x_2d and x.dim() != 2):
        raise ValueError(f"{where}: x must be {'2-D (M, d_in)' if x_2d else '(..., d_in)'}, got shape {_fmt(x)}")
    _check_theta(where, x.shape[-1], phi, psi, "x", x)
    _check_device(where, x, (("phi", phi), ("psi", psi)))


def check_gift_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    x_2d: bool = False,
) -> None:
    """Raise a clear error unless (x, weight, bias, phi, psi) form a valid GIFT call.

    ``x_2d`` is set by the registered op, which only ever sees flattened ``(M, d_in)``
    activations; the functional API accepts any leading shape.
    """
    tensors = [("x", x), ("weight", weight), ("phi", phi), ("psi", psi)]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        check_float(name, t)

    if x.dim() == 0:
        raise ValueError("gift_linear: x must have at least one dimension (..., d_in), got a 0-d tensor")
    if x_2d and x.dim() != 2:
        raise ValueError(f"gift_linear op: x must be 2-D (M, d_in), got shape {_fmt(x)}")
    if weight.dim() != 2:
        raise ValueError(f"gift_linear: weight must be 2-D (d_out, d_in), got shape {_fmt(weight)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"gift_linear: x's last dimension ({x.shape[-1]}) must equal weight's d_in ({d_in}); "
            f"x has shape {_fmt(x)}, weight has shape {_fmt(weight)}"
        )
    _check_theta("gift_linear", d_in, phi, psi, "weight", weight)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_out):
        raise ValueError(
            f"gift_linear: bias must have shape ({d_out},) to match weight {_fmt(weight)}, "
            f"got bias {_fmt(bias)}"
        )

    if x.dtype != weight.dtype:
        raise TypeError(
            f"gift_linear: x dtype {x.dtype} differs from weight dtype {weight.dtype} "
            f"(x {_fmt(x)}, weight {_fmt(weight)}); cast one of them or use torch.autocast"
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(
            f"gift_linear: bias dtype {bias.dtype} differs from weight dtype {weight.dtype} "
            f"(bias {_fmt(bias)}, weight {_fmt(weight)})"
        )
    _check_device("gift_linear", x, tensors[1:])


# ------------------------------------------------------------------ mixed-adapter batches


def check_mixed_args(
    x: torch.Tensor,
    phis: torch.Tensor,
    psis: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    where: str = "gift_input_mixed",
    x_2d: bool = False,
    check_values: bool = True,
) -> None:
    """Raise a clear error unless (x, phis, psis, adapter_ids) form a valid mixed-adapter call
    ``u_i = x_i + (x_i psi_a^T) phi_a^T`` with ``a = adapter_ids[i]`` (-1: ``u_i = x_i``).

    ``phis`` is a bank ``(A, d_in, r)``, ``psis`` ``(A, r, d_in)``; ``adapter_ids`` holds one
    int64 per row of x (``x.shape[:-1]`` or flattened ``(M,)``). ``check_values`` also checks
    that every id lies in ``[-1, A)`` (device-side, :func:`_check_id_values`; the fake
    implementation and a compile trace skip it).
    """
    for name, t in (("x", x), ("phis", phis), ("psis", psis)):
        check_float(name, t, where)
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"{where}: adapter_ids must be a torch.Tensor of int64, got {type(adapter_ids).__name__}")
    if x.dim() == 0 or (x_2d and x.dim() != 2):
        raise ValueError(f"{where}: x must be {'2-D (M, d_in)' if x_2d else '(..., d_in)'}, got shape {_fmt(x)}")
    d_in = x.shape[-1]
    if phis.dim() != 3:
        raise ValueError(f"{where}: phis must be a 3-D bank (A, d_in, r), got shape {_fmt(phis)}")
    if psis.dim() != 3:
        raise ValueError(f"{where}: psis must be a 3-D bank (A, r, d_in), got shape {_fmt(psis)}")
    n_adapters, _, r = phis.shape
    if phis.shape[1] != d_in:
        raise ValueError(f"{where}: phis must have shape (A, d_in, r) with d_in = {d_in} from x {_fmt(x)}, "
                         f"got phis {_fmt(phis)}")
    if psis.shape != (n_adapters, r, d_in):
        raise ValueError(f"{where}: psis must have shape (A, r, d_in) = {(n_adapters, r, d_in)} to match phis "
                         f"{_fmt(phis)} and x {_fmt(x)}, got psis {_fmt(psis)}")
    if n_adapters == 0 or r == 0:
        raise ValueError(f"{where}: the bank needs at least one adapter and rank r >= 1, got phis {_fmt(phis)}")
    if phis.dtype != psis.dtype:
        raise TypeError(f"{where}: phis dtype {phis.dtype} differs from psis dtype {psis.dtype}; keep the bank in "
                        f"one dtype (phis {_fmt(phis)}, psis {_fmt(psis)})")
    if adapter_ids.dtype != torch.int64:
        raise TypeError(f"{where}: adapter_ids must be int64 (use .long()), got dtype {adapter_ids.dtype} "
                        f"(shape {_fmt(adapter_ids)})")
    rows, m = x.shape[:-1], n_rows(x)
    if adapter_ids.shape != rows and adapter_ids.shape != (m,):
        raise ValueError(f"{where}: adapter_ids must hold one id per row of x: shape {tuple(rows)} or ({m},), got "
                         f"{_fmt(adapter_ids)} for x {_fmt(x)} (nothing is broadcast: expand per-sample ids over "
                         f"the sequence first)")
    _check_device(where, x, (("phis", phis), ("psis", psis), ("adapter_ids", adapter_ids)))
    if check_values and adapter_ids.numel():  # once per forward where the package owns the ids (ops/memo.py)
        memo.derived(adapter_ids.reshape(-1), ("ids in range", n_adapters),
                     lambda: _check_id_values(where, adapter_ids, n_adapters))


def _check_id_values(where: str, adapter_ids: torch.Tensor, n_adapters: int) -> None:
    """Every id in ``[-1, A)``, checked on the ids' device without a host sync (graph-safe: a
    CUDA-graph capture records the check). On a GPU a bad id fails the stream asynchronously
    (a device-side assert with this message); on CPU it raises ValueError here, naming the id."""
    ok = ((adapter_ids >= -1) & (adapter_ids < n_adapters)).all()
    msg = (f"{where}: adapter_ids must lie in [-1, {n_adapters}) for a bank of {n_adapters} adapter(s) "
           f"(-1: no adapter); adapter_ids {_fmt(adapter_ids)}")
    if adapter_ids.device.type != "cpu":
        torch._assert_async(ok, msg)
        return
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())  # the error path: reading values is fine
        bad = lo if lo < -1 else hi
        raise ValueError(f"{where}: adapter_ids must lie in [-1, {n_adapters}) for a bank of {n_adapters} "
                         f"adapter(s) (-1: no adapter); got {bad} (adapter_ids {_fmt(adapter_ids)})") from None


def check_base_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], where: str) -> None:
    """The base layer's half of a mixed call: ``y = F.linear(u, weight, bias)``."""
    check_float("weight", weight, where)
    if bias is not None:
        check_float("bias", bias, where)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{where}: weight must be 2-D (d_out, d_in) with d_in = {x.shape[-1]} from x {_fmt(x)}, "
                         f"got weight {_fmt(weight)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{where}: bias must have shape ({weight.shape[0]},) to match weight {_fmt(weight)}, got "
                         f"bias {_fmt(bias)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        other = f", bias dtype {bias.dtype}" if bias is not None else ""
        raise TypeError(f"{where}: x dtype {x.dtype}, weight dtype {weight.dtype}{other} differ; cast them to one "
                        f"dtype or use torch.autocast")
    _check_device(where, x, [("weight", weight)] + ([("bias", bias)] if bias is not None else []))
