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
    """One measured path: ``op`` ("gift_linear" or "gift_mixed") on ``backend`` in ``form``."""

    op: str
    backend: str
    form: str

    @property
    def name(self) -> str:
        return f"{self.op}-{self.backend}-{self.form}"


def paths() -> List[Path]:
    """The paths this process can run on CPU tensors: the torch backend always, the Triton
    backend when the kernels were built for the interpreter."""
    out = []
    for be in ("torch", "triton"):
        if not plans.supports(be, torch.device("cpu"))[0]:
            continue
        out += [Path("gift_linear", be, f) for f in ("epilogue", "input")] + [Path("gift_mixed", be, "input")]
    return out


def _inputs(seed: int = 0):
    m, n, k, r = SHAPE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).requires_grad_(True)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    phi = torch.randn(k, r, generator=g).requires_grad_(True)
    psi = torch.randn(r, k, generator=g).requires_grad_(True)
    phis = torch.randn(ADAPTERS, k, r, generator=g).requires_grad_(True)
    psis = torch.randn(ADAPTERS, r, k, generator=g).requires_grad_(True)
    ids = torch.arange(m) % (ADAPTERS + 1) - 1  # every adapter and the base: every branch runs
    return dict(x=x, w=w, b=b, phi=phi, psi=psi, phis=phis, psis=psis, ids=ids, g=torch.ones(m, n))


def step_fn(path: Optional[Path]) -> Callable[[], None]:
    """One fwd+bwd of ``path`` (None: the plain ``F.linear`` layer) on fixed tiny inputs."""
    t = _inputs()
    x, w, b, g = t["x"], t["w"], t["b"], t["g"]
    if path is None:
        return lambda: F.linear(x, w, b).backward(g)
    if path.op == "gift_mixed":
        return lambda: gift_linear_mixed(x, w, b, t["phis"], t["psis"], t["ids"]).backward(g)
    return lambda: gift_linear(x, w, b, t["phi"], t["psi"], form=path.form).backward(g)


@contextlib.contextmanager
def running(path: Optional[Path]):
    """The context ``path`` runs in: its backend, and the Triton kernels stubbed."""
    with contextlib.ExitStack() as stack:
        if path is not None:
            stack.enter_context(plans.backend(path.backend))
            if path.backend == "triton":
                stack.enter_context(plans.stubbed_kernels())
        yield


def _mean_us(fn: Callable[[], None], path: Optional[Path], iters: int) -> float:
    with running(path):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6


def rows(*, iters: int = 200, warmup: int = 20, repeats: int = 7) -> List[Dict[str, object]]:
    """One row per path: its host microseconds per fwd+bwd, the plain layer's, and their ratio.
    Interleaved: each round times every path (and the plain layer) once, ``iters`` calls each;
    a row reports the median over rounds of its time and of its ratio to the plain layer in the
    same round (what the target is checked on)."""
    todo: List[Optional[Path]] = [None] + paths()
    fns = [step_fn(p) for p in todo]
    for p, fn in zip(todo, fns):
        with running(p):
            for _ in range(warmup):
                fn()
    per_round = [[_mean_us(fn, p, iters) for p, fn in zip(todo, fns)] for _ in range(repeats)]
    out = []
    for i, p in enumerate(todo[1:], start=1):
        us = statistics.median(r[i] for r in per_round)
        ratio = statistics.median(r[i] / r[0] for r in per_round)
        out.append(dict(path=p.name, op=p.op, backend=p.backend, form=p.form, stubbed=p.backend == "triton",
                        host_us=round(us, 1), plain_us=round(statistics.median(r[0] for r in per_round), 1),
                        ratio=round(ratio, 2), within_target=ratio <= TARGET_RATIO, rounds=repeats))
    return out


def to_markdown(table: List[Dict[str, object]]) -> str:
    m, n, k, r = SHAPE
    lines = [f"Host cost per fwd+bwd (CPU, M {m}, {n}x{k}, r {r}; Triton kernels stubbed), target <= "
             f"{TARGET_RATIO:g}x plain F.linear", "",
             "| path | host us | plain us | ratio (median of rounds) | within target |", "|---|---:|---:|---:|---|"]
    for row in table:
        lines.append(f"| {row['path']} | {row['host_us']} | {row['plain_us']} | {row['ratio']} | "
                     f"{'yes' if row['within_target'] else 'NO'} |")
    return "\n".join(lines)
