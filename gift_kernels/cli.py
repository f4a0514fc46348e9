"""``gift-kernels`` command line: ``bench`` (the main job) and ``info`` (which backends run here).

``bench`` is a thin driver over :mod:`gift_kernels.bench`: on the CPU, float32, the README's
shapes, 15 interleaved rounds on the host clock; on a GPU, bfloat16, the standard grid with
CUDA-event timers (``benchmarks/gpu_check.py`` is the full GPU check). Every row is validated
against a reference before it is timed. Results: ``<out>/bench.{json,md,png}``, rewritten after
every shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _shape(text: str):
    from .bench.shapes import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bench_main(args) -> int:
    import torch

    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    shapes = args.shape or (bench.QUICK_SHAPES if args.quick else (bench.gpu_order() if cuda else bench.CPU_SHAPES))
    rounds = args.rounds or (3 if args.quick else (3 if cuda else 15))
    spec = bench.Spec(shapes=list(shapes), device=str(dev), dtype="bfloat16" if cuda else "float32", rounds=rounds,
                      budget_s=0.05, timer="device" if cuda else "host", include=args.only or (),
                      exclude=args.skip or ())
    timer = spec.make_timer()
    meta = {**bench.environment(dev), "dtype": spec.dtype, "timer": timer.name, "rounds": rounds}

    def on_update(results, stopped):
        targets = bench.gpu_targets(results) if cuda else bench.cpu_targets(results)
        report = {"title": f"gift_kernels benchmark ({dev.type})", "meta": meta, "results": results,
                  "targets": targets, "stopped": stopped}
        bench.write_report(report, args.out, "bench", plot_png=stopped is not None or len(results) == len(shapes))

    try:
        from tqdm import tqdm  # the bench extra
    except ImportError:
        tqdm = None
    if tqdm is None or args.quiet:
        out = bench.run(spec, on_update=on_update)
    else:
        with tqdm(total=rounds * len(shapes), desc="gift-kernels bench", unit="round") as bar:
            out = bench.run(spec, on_update=on_update, progress=lambda rnd: bar.update(1))
    if not args.quiet:
        print(Path(args.out, "bench.md").read_text())
    return 0 if out["stopped"] is None else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gift-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark GIFT against frozen F.linear, the authors' code and PEFT LoRA")
    bench.add_argument("--out", default="results", help="folder for bench.json / bench.md / bench.png")
    bench.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15 CPU, 3 GPU)")
    bench.add_argument("--shape", type=_shape, action="append", help="M,d_in,d_out,r (repeatable)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    bench.add_argument("--only", action="append", help="rows to run, glob over names (repeatable; frozen always runs)")
    bench.add_argument("--skip", action="append", help="rows not to run, glob over names (repeatable)")
    bench.add_argument("--quick", action="store_true", help="small shapes, 3 rounds: a smoke run")
    bench.add_argument("--quiet", action="store_true")
    sub.add_parser("info", help="which backends can run here, and why not")
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import explain

        print(explain())
        return 0
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
