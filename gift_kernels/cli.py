"""``gift-kernels`` command line: ``bench`` (the main job) and ``info`` (which backends run here)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _shape(text: str):
    from .bench.harness import Shape

    try:
        m, d_in, d_out, r = (int(v) for v in text.lower().split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be M,d_in,d_out,r (e.g. 4096,1024,1024,16), got {text!r}")
    return Shape(m, d_in, d_out, r)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gift-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark GIFT against frozen F.linear, the authors' code and PEFT LoRA")
    bench.add_argument("--out", default="results", help="folder for bench.json / bench.md / bench.png")
    bench.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11 CPU, 25 GPU)")
    bench.add_argument("--shape", type=_shape, action="append", help="M,d_in,d_out,r (repeatable)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    bench.add_argument("--quick", action="store_true", help="small shapes, 3 rounds: a smoke run")
    bench.add_argument("--quiet", action="store_true")
    sub.add_parser("info", help="which backends can run here, and why not")
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import explain

        print(explain())
        return 0

    from .bench.harness import Shape, run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    shapes = args.shape
    rounds = args.rounds
    if args.quick:
        shapes = shapes or [Shape(256, 128, 192, 16), Shape(4, 128, 128, 8)]
        rounds = rounds or 3
    run(out_dir=args.out, rounds=rounds, shapes=shapes, device=args.device, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
