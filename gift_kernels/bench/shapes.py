"""The benchmark's shapes: one list for the CPU bench, one grid for the GPU (written once;
benchmarks/roofline.py and benchmarks/gpu_check.py read it from here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..ops.tiles import DECODE_M  # imports no triton


@dataclass(frozen=True)
class Shape:
    m: int  # tokens
    d_in: int
    d_out: int
    r: int

    def __str__(self) -> str:
        return f"M={self.m} {self.d_in}x{self.d_out} r={self.r}"

    @property
    def decode(self) -> bool:
        """Decode-sized: the Triton launchers' one-row-block path (configs.DECODE_M)."""
        return self.m <= DECODE_M



# CPU (README's rows): the headline target shape first, then a decode shape and a wider layer.
# The CPU targets are checked on these two shapes only (elsewhere they would mean nothing).
CPU_HEADLINE = Shape(4096, 1024, 1024, 16)
CPU_DECODE = Shape(16, 1024, 1024, 16)
CPU_SHAPES: Tuple[Shape, ...] = (CPU_HEADLINE, CPU_DECODE, Shape(2048, 1024, 4096, 64))
QUICK_SHAPES: Tuple[Shape, ...] = (Shape(256, 128, 192, 16), Shape(4, 128, 128, 8))

# GPU (the design's standard shapes): Llama-style layers (d_in x d_out), training and decode
# token counts, two ranks.
LAYERS: Tuple[Tuple[int, int], ...] = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
TOKENS: Tuple[int, ...] = (8192, 2048, 16, 1)
RANKS: Tuple[int, ...] = (16, 64)
GPU_SHAPES: Tuple[Shape, ...] = tuple(Shape(m, d_in, d_out, r) for (d_in, d_out) in LAYERS for m in TOKENS for r in RANKS)

# the shapes the targets are checked on, timed first so that a run cut short still answers them
HEADLINE_R16 = Shape(8192, 4096, 4096, 16)
HEADLINE_R64 = Shape(8192, 4096, 4096, 64)
DECODE_HEADLINE: Tuple[Shape, ...] = (Shape(1, 4096, 4096, 16), Shape(16, 4096, 4096, 16))
HEADLINE: Tuple[Shape, ...] = (HEADLINE_R16, HEADLINE_R64) + DECODE_HEADLINE

# the GPU check's dry run on the CPU: tiny, odd, one decode shape
DRY_SHAPES: Tuple[Shape, ...] = (Shape(64, 48, 40, 4), Shape(1, 48, 40, 4), Shape(33, 40, 24, 3))


def gpu_order(shapes=GPU_SHAPES) -> Tuple[Shape, ...]:
    """The GPU grid with the headline shapes first (each once)."""
    return tuple(HEADLINE) + tuple(s for s in shapes if s not in HEADLINE)


def parse_shape(text: str) -> Shape:
    """``"M,d_in,d_out,r"`` -> Shape (the CLI's and gpu_check's --shape)."""
    try:
        m, d_in, d_out, r = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"shape must be M,d_in,d_out,r (e.g. 4096,1024,1024,16), got {text!r}") from None
    if min(m, d_in, d_out, r) < 1:
        raise ValueError(f"shape {text!r}: every size must be >= 1")
    return Shape(m, d_in, d_out, r)
