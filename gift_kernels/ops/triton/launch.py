"""The ``triton`` backend: launchers over the kernels in :mod:`kernels`.

The launchers own shapes, strides, buffers and tiles; the kernels take explicit strides.
Decode-size inputs (M <= 16) always take the fused forward: one row block, so every program
reads its W tile once and computes its rows of ``x W^T`` and of ``B = W phi`` from it;
nothing is recomputed. Which variant runs for larger M is chosen by
:func:`configs.fusion_mode` (``auto`` = split, the primary design; see benchmarks/NOTES.md for
the prediction of each). Tile configurations come from :mod:`configs`.

The input-side form (``input_fwd`` / ``input_bwd``: ``u = x + (x psi^T) phi^T`` for any base
layer) runs one kernel each way over row blocks, on a persistent grid sized by
:func:`input_programs`; ``prefers_input_form`` stays False (predicted dearer than the
epilogue kernels for dense layers: benchmarks/NOTES.md).

Dtypes: x, W, b, g in fp32 / fp16 / bf16 with fp32 accumulation (fp32 dots in IEEE
precision, like ``F.linear``); Theta may be wider (float32 with a bf16 base): it is loaded in
its own dtype and converted in-kernel, and its grads come back in its dtype. t, B and dt are
held in the rank-path dtype (:func:`gift_kernels.ops.dtypes.rank_dtype`). Other dtypes, and
tensors beyond the kernels' 32-bit offsets, are declined (:func:`declines`): the backend
chooser hands those calls to the torch backend and says so. Under ``TRITON_INTERPRET=1``
(set before triton is imported) the kernels run on CPU tensors; that is how CI checks their
arithmetic.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import triton

from ..dtypes import rank_dtype
from . import configs
from .kernels import (_gift_bwd_kernel, _gift_fwd_kernel, _gift_input_bwd_kernel, _gift_input_fwd_kernel,
                      _gift_skinny_kernel)

Tensor = torch.Tensor

# Whether the kernels were built for the interpreter: triton decides when a function is
# decorated, i.e. when the kernels module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_M = 8  # row blocks per group in the program order (L2 reuse of the W / g tiles)
_MAX_OFFSET = 2**31 - 1  # the kernels index with 32-bit offsets

gift_infer = None  # inference runs the forward kernel (it already reads W once at decode sizes)
from .mixed import mixed_bwd, mixed_fwd  # noqa: E402,F401  the mixed-adapter launchers (triton/mixed.py)


# ------------------------------------------------------- constexprs (shared with CI)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in IEEE fp32 when x is fp32, as F.linear does by default (tf32 would miss
    the fp32 tolerance); with 16-bit x the float32 rank-path dots use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fwd_meta(cfg: configs.Config, br: int, has_bias: bool, fused: bool, dtype: torch.dtype) -> dict:
    """Constexprs and launch options of ``_gift_fwd_kernel``, exactly as the launcher passes
    them (benchmarks/compile_kernels.py compiles with the same dict)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=br,
                GROUP_M=GROUP_M, HAS_BIAS=has_bias, FUSED=fused, DOT_PRECISION=dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def bwd_meta(cfg: configs.Config, br: int, fused: bool, dtype: torch.dtype) -> dict:
    """Constexprs of ``_gift_bwd_kernel``: cfg.block_n tiles dx's columns (the kernel's
    BLOCK_K), cfg.block_k the reduction over d_out (the kernel's BLOCK_N)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_N=cfg.block_k, BLOCK_R=br,
                GROUP_M=GROUP_M, FUSED=fused, DOT_PRECISION=dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def skinny_meta(cfg: configs.SkinnyConfig, br: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, DOT_PRECISION=dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fwd_args(x, weight, bias, phi, psi, t, wphi, y) -> tuple:
    """Positional arguments of ``_gift_fwd_kernel`` (``bias`` None: y stands in, unread)."""
    return (x, weight, bias if bias is not None else y, phi, psi, t, wphi, y,
            x.shape[0], weight.shape[0], x.shape[1], phi.shape[1],
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1),
            t.stride(0), t.stride(1), wphi.stride(0), wphi.stride(1), y.stride(0), y.stride(1))


def bwd_args(g, weight, wphi, dt, t, x, psi, dx, dphi_acc, dpsi_acc) -> tuple:
    """Positional arguments of ``_gift_bwd_kernel`` (``dt`` unread when fused)."""
    return (g, weight, wphi, dt, t, x, psi, dx, dphi_acc, dpsi_acc,
            x.shape[0], weight.shape[0], x.shape[1], psi.shape[0],
            g.stride(0), g.stride(1), weight.stride(0), weight.stride(1), wphi.stride(0), wphi.stride(1),
            dt.stride(0), dt.stride(1), t.stride(0), t.stride(1), x.stride(0), x.stride(1),
            psi.stride(0), psi.stride(1), dx.stride(0), dx.stride(1))


def skinny_args(a, b, out) -> tuple:
    """Positional arguments of ``_gift_skinny_kernel``."""
    return (a, b, out, a.shape[0], a.shape[1], b.shape[1],
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))


def input_meta(cfg: configs.InputConfig, br: int, dtype: torch.dtype, need_x: Optional[bool] = None) -> dict:
    """Constexprs and launch options of ``_gift_input_fwd_kernel`` (``need_x`` None) or
    ``_gift_input_bwd_kernel`` (``NEED_X``: whether dx is written)."""
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, DOT_PRECISION=dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if need_x is not None:
        meta["NEED_X"] = need_x
    return meta


def input_fwd_args(x, phi, psi, t, u) -> tuple:
    """Positional arguments of ``_gift_input_fwd_kernel``."""
    return (x, phi, psi, t, u, x.shape[0], x.shape[1], phi.shape[1],
            x.stride(0), x.stride(1), phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1),
            t.stride(0), t.stride(1), u.stride(0), u.stride(1))


def input_bwd_args(du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc) -> tuple:
    """Positional arguments of ``_gift_input_bwd_kernel`` (``dx`` unread and unwritten
    without NEED_X; any tensor of x's dtype stands in)."""
    return (du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc, x.shape[0], x.shape[1], phi.shape[1],
            du.stride(0), du.stride(1), x.stride(0), x.stride(1), t.stride(0), t.stride(1),
            phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1), dt.stride(0), dt.stride(1),
            dx.stride(0), dx.stride(1))


# ------------------------------------------------------------------------ tuning

_capability: Dict[int, Tuple[int, int]] = {}
_sizes: Dict[int, Tuple[int, int]] = {}
_tuned: Dict[tuple, object] = {}


def _device_capability(device: torch.device) -> Tuple[int, int]:
    """Compute capability, queried on first launch (never at import). The interpreter
    uses the Hopper table (its configs only change tile sizes)."""
    if device.type != "cuda":
        return (9, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capability:
        _capability[idx] = torch.cuda.get_device_capability(idx)
    return _capability[idx]


def _device_sizes(device: torch.device) -> Tuple[int, int]:
    """(SM count, L2 bytes), queried on first launch."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sizes:
        props = torch.cuda.get_device_properties(idx)
        _sizes[idx] = (props.multi_processor_count, props.L2_cache_size)
    return _sizes[idx]


INTERPRETED_PROGRAMS = 2  # under the interpreter: several row blocks per program, so the loop over them runs


def input_programs(x: Tensor, block_m: int, m: int, k: int) -> int:
    """Grid of the input-side kernels (persistent over row blocks). Enough programs to
    stream (at least one per SM), few enough that the row blocks in flight fit in half the
    L2 -- the second pass over a row block (x forward, du backward) then reads L2, not HBM
    -- and at most 4 per SM."""
    blocks = triton.cdiv(m, block_m)
    if not x.is_cuda:
        return min(blocks, INTERPRETED_PROGRAMS)
    sms, l2 = _device_sizes(x.device)
    per_sm = max(1, min(4, (l2 // 2) // (sms * block_m * k * x.element_size())))
    return min(blocks, sms * per_sm)


def _autotune(key: tuple, cands: list, launch: Callable[[object], None], reset: Callable[[], None]):
    """The configuration for ``key``: the only candidate, the first under the interpreter,
    else the fastest by ``triton.testing.do_bench`` (timed once per key, on the call's own
    tensors; ``reset`` then clears what the timed launches accumulated into)."""
    if len(cands) == 1 or INTERPRETED:
        return cands[0]
    if key not in _tuned:
        times = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20) for c in cands]
        _tuned[key] = cands[min(range(len(cands)), key=times.__getitem__)]
        reset()
    return _tuned[key]


def uses_fused(x: Tensor, theta: Tensor, m: int, r: int) -> bool:
    """Whether the low-rank terms are computed inside the big GEMM (fused) or by the
    skinny kernel (split). fp32 always runs split (its FMA-path dots leave no registers for
    the in-loop rank accumulators), and so does any rank without a kept fused tile."""
    br = configs.block_r(r)
    if r > configs.MAX_FUSED_R or not configs.can_fuse(_device_capability(x.device), x.element_size(),
                                                        theta.element_size(), br, m):
        return False
    if m <= configs.DECODE_M:
        return True  # one row block: W is read once and nothing is recomputed
    return configs.fusion_mode() == "fused"


def _gemm_config(kernel: str, key: tuple, x: Tensor, theta: Tensor, m: int, n: int, k: int, br: int,
                 fused: bool, launch, reset) -> configs.Config:
    fixed = configs.fixed_config()
    if fixed is not None:
        return fixed
    cands = configs.candidates(kernel, _device_capability(x.device), x.element_size(), theta.element_size(),
                               m, n, k, br, fused)
    return _autotune(key, cands, launch, reset)


# ------------------------------------------------------------------------ backend interface


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why these kernels cannot run on ``device`` (None when they can)."""
    device = torch.device(device)
    if device.type == "cpu":
        if not INTERPRETED:
            return ("the Triton kernels were built for the GPU: TRITON_INTERPRET was not 1 when "
                    "gift_kernels.ops.triton was imported")
        return None
    if device.type != "cuda":
        return f"the Triton kernels run on cuda tensors (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if INTERPRETED:
        return "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors only"
    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    cap = _device_capability(device)
    if cap < (8, 0):
        return f"needs compute capability >= 8.0 (sm_80), device has {cap[0]}.{cap[1]}"
    return None


def _span(t: Tensor) -> int:
    """The largest element offset a kernel computes for ``t`` from its strides."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0


def declines(op: str, x: Tensor, n: int) -> Optional[str]:
    """Why one call cannot run on these kernels (None: it can). ``gift_input``'s tensors are
    x-sized (u, du, dx) and Theta; ``gift_linear`` has (M, d_out) and (d_out, d_in) too."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} has no Triton kernel"
    m, k = x.shape
    sizes = (m * k,) if op == "gift_input" else (m * n, m * k, n * k)
    if max(_span(x), *sizes) > _MAX_OFFSET:
        what = f"x {tuple(x.shape)}" if op == "gift_input" else f"x {tuple(x.shape)}, d_out {n}"
        return f"tensors of 2**31 or more elements ({what}) exceed the kernels' 32-bit offsets"
    return None


def _offsets_fit(t: Tensor, where: str, name: str) -> Tensor:
    """``t`` itself, or a contiguous copy when its strides reach beyond 32-bit offsets (a
    view into a much larger buffer); refused if even the copy does not fit."""
    if _span(t) <= _MAX_OFFSET:
        return t
    if t.numel() > _MAX_OFFSET:
        raise RuntimeError(f"{where}: {name} {tuple(t.shape)} has 2**31 or more elements, beyond the Triton "
                           f"kernels' 32-bit offsets; use the torch backend")
    return t.contiguous()


def prefers_input_form(m: int, n: int, k: int, r: int) -> bool:
    """Never, until a GPU run says otherwise: predicted, the input-side kernels add 2-3 passes
    over x forward and 3-4 over du/x backward against the epilogue kernels' one pass over x,
    W and g each (benchmarks/NOTES.md), and at decode the fused epilogue reads W once."""
    return False


def _device_ctx(t: Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _skinny(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` (rows x r) by ``_gift_skinny_kernel``; b may be a transposed view."""
    m, k = a.shape
    r = b.shape[1]
    br = configs.block_r(r)
    fixed = configs.fixed_config()
    if fixed is not None:
        cfg = configs.SkinnyConfig(fixed.block_m, fixed.block_k, fixed.num_warps, fixed.num_stages)
    else:
        cfg = configs.skinny_candidates(_device_capability(a.device), a.element_size(), b.element_size(), br)[0]
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(r, br))
    _gift_skinny_kernel[grid](*skinny_args(a, b, out), **skinny_meta(cfg, br, a.dtype))
    return out


def gift_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)`` (any strides). Returns ``(y, t, B)``."""
    m, k = x.shape
    n, r = weight.shape[0], phi.shape[1]
    rd = rank_dtype(x.dtype, phi.dtype)
    y = x.new_empty(m, n)
    t = x.new_empty(m, r, dtype=rd)
    wphi = x.new_empty(n, r, dtype=rd)
    if m == 0 or n == 0 or k == 0:  # nothing to launch: y = b, t and B are zero
        if bias is not None:
            y.copy_(bias.expand(m, n))
        else:
            y.zero_()
        return y, t.zero_(), wphi.zero_()

    fused = uses_fused(x, phi, m, r)
    br = configs.rank_tile(r, fused)
    with _device_ctx(x):
        if not fused:
            _skinny(x, psi.t(), t)
            _skinny(weight, phi, wphi)

        def launch(cfg):
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
            _gift_fwd_kernel[grid](*fwd_args(x, weight, bias, phi, psi, t, wphi, y),
                                   **fwd_meta(cfg, br, bias is not None, fused, x.dtype))

        key = ("fwd", x.device.index, configs.m_bucket(m), n, k, br, x.dtype, phi.dtype, bias is not None, fused)
        cfg = _gemm_config("fwd", key, x, phi, m, n, k, br, fused, launch, lambda: None)
        launch(cfg)
    return y, t, wphi


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
    """Backward. ``needs`` = which of (x, weight, bias, phi, psi) want a gradient.

    dx, dphi and dpsi come from one kernel (plus, in the split variant, one skinny pass
    over g for dt); dW and db, needed only when the base layer trains, use torch ops.
    """
    need_x, need_w, need_b, need_phi, need_psi = needs
    g = grad_y
    m, k = x.shape
    n, r = weight.shape[0], phi.shape[1]
    out_dtype, rd = x.dtype, t.dtype
    dx = dw = db = dphi = dpsi = None

    if m == 0 or n == 0 or k == 0:
        if need_x:
            dx = torch.zeros_like(x)
        if need_phi:
            dphi = torch.zeros_like(phi)
        if need_psi:
            dpsi = torch.zeros_like(psi)
    elif need_x:
        # dphi and dpsi ride along even if unwanted: a frozen Theta with a wanted dx is rare
        fused = uses_fused(x, psi, m, r)
        br = configs.rank_tile(r, fused)
        dx = x.new_empty(m, k)
        dphi_acc = torch.zeros(k, r, device=x.device, dtype=torch.float32)
        dpsi_acc = torch.zeros(r, k, device=x.device, dtype=torch.float32)
        with _device_ctx(x):
            dt = t  # placeholder pointer of the rank dtype when fused (never read)
            if not fused:
                dt = _skinny(g, B, x.new_empty(m, r, dtype=rd))

            def launch(cfg):
                grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k, cfg.block_n),)
                _gift_bwd_kernel[grid](*bwd_args(g, weight, B, dt, t, x, psi, dx, dphi_acc, dpsi_acc),
                                       **bwd_meta(cfg, br, fused, out_dtype))

            def reset():  # timed launches accumulated into the Theta grads
                dphi_acc.zero_()
                dpsi_acc.zero_()

            key = ("bwd", x.device.index, configs.m_bucket(m), n, k, br, out_dtype, psi.dtype, fused)
            cfg = _gemm_config("bwd", key, x, psi, m, k, n, br, fused, launch, reset)
            launch(cfg)
        if need_phi:
            dphi = dphi_acc.to(phi.dtype)
        if need_psi:
            dpsi = dpsi_acc.to(psi.dtype)
    elif need_phi or need_psi:
        # no dx wanted (e.g. the first adapted layer): the g W GEMM would only serve dphi,
        # so take the skinny route instead, each product one pass over g, x or W
        if need_psi:
            with _device_ctx(x):
                dt = _skinny(g, B, x.new_empty(m, r, dtype=rd))
            dpsi = torch.mm(dt.t(), x.to(rd)).to(psi.dtype)
        if need_phi:
            dphi = torch.mm(weight.to(rd).t(), torch.mm(g.to(rd).t(), t)).to(phi.dtype)

    if need_w:
        dw = torch.mm(g.t(), x) if m else torch.zeros_like(weight)
        if m:
            dw.add_(torch.mm(torch.mm(g.to(rd).t(), t), phi.to(rd).t()).to(out_dtype))
    if need_b:
        db = g.sum(0)
    return dx, dw, db, dphi, dpsi


# ------------------------------------------------------------------ input-side form


def _input_config(kernel: str, key: tuple, x: Tensor, theta: Tensor, m: int, k: int, br: int, launch,
                  reset) -> configs.InputConfig:
    fixed = configs.fixed_config()
    if fixed is not None:
        return configs.InputConfig(fixed.block_m, fixed.block_k, fixed.num_warps, fixed.num_stages)
    cands = configs.input_candidates(kernel, _device_capability(x.device), x.element_size(), theta.element_size(),
                                     br, m, k)
    return _autotune(key, cands, launch, reset)


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = x + (x psi^T) phi^T`` on 2-D ``x (M, K)`` (any strides) by ``_gift_input_fwd_kernel``:
    one pass over x for t, one more (from L2) writing u. Returns ``(u, t)``, t in the rank dtype."""
    m, k = x.shape
    r = phi.shape[1]
    u = x.new_empty(m, k)
    t = x.new_empty(m, r, dtype=rank_dtype(x.dtype, phi.dtype))
    if m == 0 or k == 0:  # u = x (no elements when k = 0), t = x psi^T = 0
        return u.copy_(x), t.zero_()
    phi = _offsets_fit(phi, "gift_input", "phi")
    psi = _offsets_fit(psi, "gift_input", "psi")
    br = configs.input_rank_tile(r, x.element_size())
    with _device_ctx(x):

        def launch(cfg):
            grid = (input_programs(x, cfg.block_m, m, k),)
            _gift_input_fwd_kernel[grid](*input_fwd_args(x, phi, psi, t, u), **input_meta(cfg, br, x.dtype))

        key = ("input_fwd", x.device.index, configs.m_bucket(m), k, br, x.dtype, phi.dtype)
        launch(_input_config("input_fwd", key, x, phi, m, k, br, launch, lambda: None))
    return u, t


def input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[Tensor], ...]:
    """Backward of the input-side form by ``_gift_input_bwd_kernel``: one pass over du for
    ``dt = du phi`` and ``dphi = du^T t``, one over x (and du, for ``dx = du + dt psi``) for
    ``dpsi = dt^T x``. ``needs`` = which of (x, phi, psi) want a gradient; dphi and dpsi ride
    along when only one of them (or only dx) is wanted. Returns ``(dx, dphi, dpsi)``, None
    where not needed."""
    need_x, need_phi, need_psi = needs
    if not (need_x or need_phi or need_psi):
        return None, None, None
    m, k = x.shape
    r = phi.shape[1]
    if m == 0 or k == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(phi) if need_phi else None,
                torch.zeros_like(psi) if need_psi else None)
    du = _offsets_fit(grad_u, "gift_input backward", "grad_u")
    phi = _offsets_fit(phi, "gift_input backward", "phi")
    psi = _offsets_fit(psi, "gift_input backward", "psi")
    br = configs.input_rank_tile(r, x.element_size())
    dx = x.new_empty(m, k) if need_x else x  # x stands in for the pointer when no dx is written
    dt = x.new_empty(m, r, dtype=t.dtype)
    dphi_acc = torch.zeros(k, r, device=x.device, dtype=torch.float32)
    dpsi_acc = torch.zeros(r, k, device=x.device, dtype=torch.float32)
    with _device_ctx(x):

        def launch(cfg):
            grid = (input_programs(x, cfg.block_m, m, k),)
            _gift_input_bwd_kernel[grid](*input_bwd_args(du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc),
                                         **input_meta(cfg, br, x.dtype, need_x))

        def reset():  # timed launches accumulated into the Theta grads
            dphi_acc.zero_()
            dpsi_acc.zero_()

        key = ("input_bwd", x.device.index, configs.m_bucket(m), k, br, x.dtype, phi.dtype, need_x)
        launch(_input_config("input_bwd", key, x, phi, m, k, br, launch, reset))
    return (dx if need_x else None, dphi_acc.to(phi.dtype) if need_phi else None,
            dpsi_acc.to(psi.dtype) if need_psi else None)
