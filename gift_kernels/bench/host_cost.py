"""Host cost: microseconds of the package's own Python per fwd+bwd, beside a plain ``F.linear``.

At the shapes a GPU runs fast (a decode step, a 0.75 ms headline fwd+bwd on an H100), every
microsecond of Python per call is time the GPU waits. This measures it on the CPU: tiny shapes
(so ATen's arithmetic costs next to nothing) and, for the Triton paths, the kernels stubbed
through the package's testing hook (:func:`gift_kernels.ops.plan.stubbed_kernels`, with
``TRITON_INTERPRET=1`` set before triton is imported): every line of the package's Python runs
(plan lookup, tiles, buffers, grids, autograd), no kernel does. Target: at most
:data:`TARGET_RATIO` times the plain layer's fwd+bwd.

:func:`paths` lists what can be measured in this process; :func:`rows` times them all,
interleaved. ``benchmarks/host_cost.py`` is the driver. Figures depend on the
machine and its load: record them with date and machine (benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..ops import plan as plans
from ..ops.functional import gift_linear, gift_linear_mixed

TARGET_RATIO = 3.0
SHAPE = (4, 32, 32, 4)  # (M, d_out, d_in, r): small enough that ATen's own work is negligible
ADAPTERS = 3  # the mixed rows: a bank of this many adapters


@dataclass(frozen=True)
class Path:
    """One measured path: ``op`` ("gift_linear" or "gift_mixed"; "F.linear": the plain layer;
    "GiftLinear": the module, against "nn.Linear") on ``backend`` in ``form``, with x and W in
    ``dtype`` (Theta float32, as under autocast)."""

    op: str
    backend: str
    form: str
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.backend}-{self.form}" + ("" if self.dtype == "float32" else f"-{self.dtype}")


def plain(dtype: str = "float32") -> Path:
    """The baseline: a plain ``F.linear`` fwd+bwd."""
    return Path("F.linear", "torch", "plain", dtype)


def baseline(path: Path) -> Path:
    """What ``path`` is compared with: ``F.linear``, or an ``nn.Linear`` module for the module row."""
    return Path("nn.Linear", "torch", "plain", path.dtype) if path.op == "GiftLinear" else plain(path.dtype)


def paths() -> List[Path]:
    """The paths this process can run on CPU tensors: the torch backend always, the Triton
    backend when the kernels were built for the interpreter, in float32 and (its kernels being
    stubbed, so nothing is computed) bfloat16, the GPU's case: on the CPU, float32 takes the
    split launches (3-5 per call), bfloat16 at decode size the fused ones (1-2)."""
    out = []
    for be, dtypes in (("torch", ("float32",)), ("triton", ("float32", "bfloat16"))):
        if not plans.supports(be, torch.device("cpu"))[0]:
            continue
        for dt in dtypes:
            out += [Path("gift_linear", be, f, dt) for f in ("epilogue", "input")] + [Path("gift_mixed", be, "input", dt)]
        out.append(Path("GiftLinear", be, "auto"))  # what a model's layer pays: the module around the op
    return out


def _inputs(seed: int = 0, dtype: str = "float32"):
    m, n, k, r = SHAPE
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dt).requires_grad_(True)
    w, b = torch.randn(n, k, generator=g).to(dt), torch.randn(n, generator=g).to(dt)
    phi = torch.randn(k, r, generator=g).requires_grad_(True)
    psi = torch.randn(r, k, generator=g).requires_grad_(True)
    phis = torch.randn(ADAPTERS, k, r, generator=g).requires_grad_(True)
    psis = torch.randn(ADAPTERS, r, k, generator=g).requires_grad_(True)
    ids = torch.arange(m) % (ADAPTERS + 1) - 1  # every adapter and the base: every branch runs
    return dict(x=x, w=w, b=b, phi=phi, psi=psi, phis=phis, psis=psis, ids=ids, g=torch.ones(m, n, dtype=dt))


def step_fn(path: Path) -> Callable[[], None]:
    """One fwd+bwd of ``path`` on fixed tiny inputs."""
    t = _inputs(dtype=path.dtype)
    x, w, b, g = t["x"], t["w"], t["b"], t["g"]
    if path.op == "F.linear":
        return lambda: F.linear(x, w, b).backward(g)
    if path.op in ("nn.Linear", "GiftLinear"):
        layer = _module(path.op, t)
        return lambda: layer(x).backward(g)
    if path.op == "gift_mixed":
        return lambda: gift_linear_mixed(x, w, b, t["phis"], t["psis"], t["ids"]).backward(g)
    return lambda: gift_linear(x, w, b, t["phi"], t["psi"], form=path.form).backward(g)


def _module(op: str, t) -> torch.nn.Module:
    """A frozen ``nn.Linear`` or a :class:`~gift_kernels.GiftLinear` over it, on ``_inputs``' tensors."""
    from ..nn import GiftLinear, make_theta

    w, b = t["w"], t["b"]
    linear = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    if op == "nn.Linear":
        return linear
    theta = make_theta(w.shape[1], t["phi"].shape[1])
    with torch.no_grad():
        theta.phi.copy_(t["phi"])
        theta.psi.copy_(t["psi"])
    return GiftLinear.from_linear(linear, theta)


@contextlib.contextmanager
def running(path: Path):
    """The context ``path`` runs in: its backend, and the Triton kernels stubbed."""
    with contextlib.ExitStack() as stack:
        if path.op not in ("F.linear", "nn.Linear"):
            stack.enter_context(plans.backend(path.backend))
            if path.backend == "triton":
                stack.enter_context(plans.stubbed_kernels())
        yield


def _mean_us(fn: Callable[[], None], path: Path, iters: int) -> float:
    with running(path):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6


def rows(*, iters: int = 50, warmup: int = 20, repeats: int = 80) -> List[Dict[str, object]]:
    """One row per path: its host microseconds per fwd+bwd, the plain layer's (same dtype), and
    their ratio. Interleaved: each round times every path and each plain layer once, ``iters``
    calls each; a row reports the median over rounds of its time and of its ratio to the plain
    layer in the same round (what the target is checked on). Many short rounds: the machine's
    speed drifts over seconds (a shared VM), and a ratio within a round of well under a second
    follows it where one over long rounds does not."""
    measured = paths()
    todo = list(dict.fromkeys(baseline(p) for p in measured)) + measured
    fns = [step_fn(p) for p in todo]
    for p, fn in zip(todo, fns):
        with running(p):
            for _ in range(warmup):
                fn()
    per_round = [dict(zip(todo, (_mean_us(fn, p, iters) for p, fn in zip(todo, fns)))) for _ in range(repeats)]
    out = []
    for p in measured:
        base = baseline(p)
        ratio = statistics.median(r[p] / r[base] for r in per_round)
        out.append(dict(path=p.name, op=p.op, backend=p.backend, form=p.form, dtype=p.dtype,
                        stubbed=p.backend == "triton", host_us=round(statistics.median(r[p] for r in per_round), 1),
                        plain_us=round(statistics.median(r[base] for r in per_round), 1), ratio=round(ratio, 2),
                        within_target=ratio <= TARGET_RATIO, rounds=repeats))
    return out


def to_markdown(table: List[Dict[str, object]]) -> str:
    m, n, k, r = SHAPE
    lines = [f"Host cost per fwd+bwd (CPU, M {m}, {n}x{k}, r {r}, Theta float32; Triton kernels stubbed), target <= "
             f"{TARGET_RATIO:g}x plain F.linear (the GiftLinear rows: x an nn.Linear module)", "",
             "| path | host us | plain us | ratio (median of rounds) | within target |", "|---|---:|---:|---:|---|"]
    for row in table:
        lines.append(f"| {row['path']} | {row['host_us']} | {row['plain_us']} | {row['ratio']} | "
                     f"{'yes' if row['within_target'] else 'NO'} |")
    return "\n".join(lines)
