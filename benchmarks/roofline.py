"""Roofline predictions for the Triton GIFT kernels on the standard shapes (docs/design.md, section 4).

Each kernel's time is predicted as ``max(FLOPs / peak, DRAM bytes / bandwidth)`` against an
H100's measured ceilings (~790 TFLOP/s bf16 dense, ~3.0 TB/s copy bandwidth), then summed
over the kernels a path launches. Counted: every tensor-core FLOP the kernel issues
(including the rank-r products the fused variants recompute once per tile) and each
operand read / result written once from / to DRAM (tiles re-read from L2 are free).
Not counted: launch latency (~2-4 us per kernel without CUDA graphs, which dominates at
decode sizes), the lower tensor-core efficiency of rank-16 dots, atomics traffic in L2.
So these are lower bounds: a GPU run that lands far above one says where to look.

    python benchmarks/roofline.py           # writes benchmarks/ROOFLINE.md
    from roofline import predict            # beside measured times in the GPU check

``predict(m, d_in, d_out, r, path)`` returns per-kernel and total microseconds for the
forward and the backward (input + Theta gradients) of GIFT and of the frozen layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_FLOPS = 790e12  # bf16 dense, H100 measured
PEAK_BYTES = 3.0e12  # copy bandwidth, H100 measured

from gift_kernels.bench.shapes import LAYERS as SHAPES, RANKS  # noqa: E402  (d_in x d_out; the one grid)
from gift_kernels.bench.shapes import TOKENS as _TOKENS  # noqa: E402

TOKENS = tuple(sorted(_TOKENS))


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float

    @property
    def us(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES) * 1e6

    @property
    def bound(self) -> str:
        return "compute" if self.flops / PEAK_FLOPS >= self.bytes / PEAK_BYTES else "memory"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(kernel: str, m: int, n: int, k: int, r: int, fused: bool):
    """The tile the autotuner tries first on sm_90 for this problem (bf16, fp32 Theta)."""
    from gift_kernels.ops import tiles as cf

    return cf.candidates(kernel, (9, 0), 2, 4, m, n, k, cf.block_r(r), fused)[0]


def kernels(m: int, d_in: int, d_out: int, r: int, path: str, e: int = 2, te: int = 4) -> Dict[str, List[Kernel]]:
    """The kernels a path launches, forward and backward. ``path``: ``split`` or ``fused``
    (decode sizes always run fused, as the launcher does); ``frozen`` = F.linear and its
    input gradient. ``e`` / ``te``: bytes per element of x, W, y / of Theta."""
    from gift_kernels.ops import tiles as cf

    M, K, N = m, d_in, d_out
    x, w, y = M * K * e, N * K * e, M * N * e
    if path == "frozen":
        return {"fwd": [Kernel("F.linear", 2 * M * N * K, x + w + y)],
                "bwd": [Kernel("g W", 2 * M * N * K, y + w + x)]}
    fused = path == "fused" or (M <= cf.DECODE_M and r <= cf.MAX_FUSED_R)
    theta = 2 * K * r * te
    t, b = M * r * e, N * r * e
    fwd: List[Kernel] = []
    bwd: List[Kernel] = []
    cfg = _tiles("fwd", M, N, K, r, fused)
    if fused:
        recompute = 2 * M * K * r * _cdiv(N, cfg.block_n) + 2 * N * K * r * _cdiv(M, cfg.block_m)
        fwd.append(Kernel(f"fwd fused {cfg}", 2 * M * N * K + recompute + 2 * M * N * r, x + w + y + theta + t + b))
    else:
        fwd.append(Kernel("skinny t = x psi^T", 2 * M * K * r, x + K * r * te + t))
        fwd.append(Kernel("skinny B = W phi", 2 * N * K * r, w + K * r * te + b))
        fwd.append(Kernel(f"fwd split {cfg}", 2 * M * N * K + 2 * M * N * r, x + w + y + t + b))
    cfg = _tiles("bwd", M, K, N, r, fused)
    theta_grads = 2 * K * r * 4  # fp32 buffers
    extra = 3 * 2 * M * K * r  # dx += dt psi, dpsi = dt^T x, dphi = (g W)^T t
    if fused:
        recompute = 2 * M * N * r * _cdiv(K, cfg.block_n)
        bwd.append(Kernel(f"bwd fused {cfg}", 2 * M * N * K + recompute + extra,
                          y + w + b + x + t + K * r * te + x + theta_grads))
    else:
        bwd.append(Kernel("skinny dt = g B", 2 * M * N * r, y + b + t))
        bwd.append(Kernel(f"bwd split {cfg}", 2 * M * N * K + extra,
                          y + w + t + t + x + K * r * te + x + theta_grads))
    return {"fwd": fwd, "bwd": bwd}


def predict(m: int, d_in: int, d_out: int, r: int, path: str = "split") -> Dict[str, float]:
    """Predicted microseconds: ``fwd``, ``bwd``, ``both`` for ``path`` and the frozen layer's
    ``frozen_fwd``, ``frozen_bwd``, ``frozen_both``, and the ratios ``*_ratio``."""
    ks = kernels(m, d_in, d_out, r, path)
    fz = kernels(m, d_in, d_out, r, "frozen")
    out = {d: sum(k.us for k in ks[d]) for d in ("fwd", "bwd")}
    out["both"] = out["fwd"] + out["bwd"]
    for d in ("fwd", "bwd"):
        out[f"frozen_{d}"] = sum(k.us for k in fz[d])
    out["frozen_both"] = out["frozen_fwd"] + out["frozen_bwd"]
    for d in ("fwd", "bwd", "both"):
        out[f"{d}_ratio"] = out[d] / out[f"frozen_{d}"]
    return out


def table(paths=("split", "fused")) -> str:
    lines = [
        "# Roofline predictions (bf16, fp32 Theta, H100 ceilings)",
        "",
        "Generated by `python benchmarks/roofline.py` from `benchmarks/roofline.py` (see its",
        f"docstring for what is counted). Ceilings: {PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
        f"{PEAK_BYTES / 1e12:.1f} TB/s. Times in microseconds,",
        "lower bounds without launch latency; ratio = GIFT / frozen layer (F.linear forward,",
        "input-gradient GEMM backward). Decode sizes (M <= 16) run the fused kernel in both",
        "columns, as the launcher does. These are predictions, not measurements.",
        "",
        "| d_in x d_out | M | r | frozen fwd | frozen bwd | " +
        " | ".join(f"{p} fwd | {p} bwd | {p} both/frozen" for p in paths) + " |",
        "|---|---|---|---|---|" + "---|---|---|" * len(paths),
    ]
    for d_in, d_out in SHAPES:
        for m in TOKENS:
            for r in RANKS:
                cells = []
                base = None
                for p in paths:
                    pr = predict(m, d_in, d_out, r, p)
                    base = pr
                    cells.append(f"{pr['fwd']:.1f} | {pr['bwd']:.1f} | {pr['both_ratio']:.3f}")
                lines.append(f"| {d_in}x{d_out} | {m} | {r} | {base['frozen_fwd']:.1f} | {base['frozen_bwd']:.1f} | "
                             + " | ".join(cells) + " |")
    lines += ["", "Per-kernel breakdown for the headline shape (M = 8192, 4096 x 4096):", ""]
    for r in RANKS:
        for p in paths:
            for d, ks in kernels(8192, 4096, 4096, r, p).items():
                for k in ks:
                    lines.append(f"- r={r} {p} {d}: {k.name}: {k.flops / 1e9:.1f} GFLOP, {k.bytes / 2**20:.1f} MiB, "
                                 f"{k.us:.1f} us ({k.bound}-bound)")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    out = ROOT / "benchmarks" / "ROOFLINE.md"
    out.write_text(table())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
