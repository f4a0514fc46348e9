"""``gift-kernels`` command line: ``bench`` (the main job) and ``info`` (which backends run here).

``bench`` is a thin driver over :mod:`gift_kernels.bench`: on the CPU, float32, the README's
shapes, 15 interleaved rounds on the host clock, one torch thread unless ``--threads`` asks for
more; on a GPU, bfloat16, the standard grid with CUDA-event timers (``benchmarks/gpu_check.py``
is the full GPU check). Every row is validated against a reference before it is timed.
Results: ``<out>/bench.{json,md,png}`` (``--quick``: ``bench-quick.*``, so a smoke run never
replaces a full run's report), rewritten after every shape; the last lines say where they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

LIST_SHAPE = (8, 16, 16, 2)  # a tiny problem: which rows exist depends on the device and dtype, not the size


def _shape(text: str):
    from .bench.shapes import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _device_and_dtype(args):
    import torch

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, ("bfloat16" if dev.type == "cuda" else "float32")


def _busy_warning(threads: int) -> Optional[str]:
    """A warning when the machine is busier than it has cores: timings would mostly measure the
    other load (the 1-minute load average against the cores)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"warning: load average {load:.1f} exceeds the {cores} cores: other work competes for the CPU, "
            f"timings ({threads} thread{'s' if threads != 1 else ''}) will be noisy and slow; rerun on a quiet "
            f"machine for figures to keep")


def list_rows(args) -> int:
    """The row names ``--only`` / ``--skip`` match on this device, and the rows that cannot run here."""
    from . import bench

    dev, dtype = _device_and_dtype(args)
    problem = bench.Problem(bench.Shape(*LIST_SHAPE), bench.DTYPES[dtype], dev)
    provs, skipped = bench.build(problem, bench.Selection())
    print(f"rows on {dev.type} ({dtype}); --only / --skip take glob patterns over these names "
          f"(frozen always runs: every ratio is to it):")
    for p in provs:
        print(f"  {p.name}" + (f"  ({p.note})" if p.note else ""))
    for name, why in skipped.items():
        print(f"  {name}  [not here: {why}]")
    return 0


def bench_main(args) -> int:
    import torch

    from . import bench

    dev, dtype = _device_and_dtype(args)
    cuda = dev.type == "cuda"
    threads = args.threads or 1
    busy = None
    if not cuda:
        torch.set_num_threads(threads)
        busy = _busy_warning(threads)
        if busy:
            print(busy, file=sys.stderr)
    shapes = args.shape or (bench.QUICK_SHAPES if args.quick else (bench.gpu_order() if cuda else bench.CPU_SHAPES))
    rounds = args.rounds or (3 if args.quick else (3 if cuda else 15))
    spec = bench.Spec(shapes=list(shapes), device=str(dev), dtype=dtype, rounds=rounds, budget_s=0.05,
                      timer="device" if cuda else "host", include=args.only or (), exclude=args.skip or ())
    timer = spec.make_timer()
    meta = {**bench.environment(dev), "dtype": spec.dtype, "timer": timer.name, "rounds": rounds}
    if busy:
        meta["warning"] = busy.removeprefix("warning: ")
    stem = "bench-quick" if args.quick else "bench"
    written = {}

    def on_update(results, stopped):
        targets = bench.gpu_targets(results) if cuda else bench.cpu_targets(results)
        report = {"title": f"gift_kernels benchmark ({dev.type}{', quick' if args.quick else ''})", "meta": meta,
                  "results": results, "targets": targets, "stopped": stopped}
        written.update(bench.write_report(report, args.out, stem,
                                          plot_png=stopped is not None or len(results) == len(shapes)))

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
        print(Path(written["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0 if out["stopped"] is None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark GIFT against frozen F.linear, the authors' code and PEFT LoRA")
    bench.add_argument("--out", default="results",
                       help="folder for bench.{json,md,png} (bench-quick.* with --quick); default: results")
    bench.add_argument("--rounds", type=_positive, default=None, help="interleaved rounds (default 15 CPU, 3 GPU, 3 --quick)")
    bench.add_argument("--shape", type=_shape, action="append", help="M,d_in,d_out,r instead of the default shapes "
                       "(repeatable)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--threads", type=_positive, default=None,
                       help="torch intra-op threads on the CPU (default 1: steadier timings, and what the targets mean)")
    bench.add_argument("--only", action="append", help="rows to run, glob over names (repeatable; frozen always runs; "
                       "names: --list-rows)")
    bench.add_argument("--skip", action="append", help="rows not to run, glob over names (repeatable; names: --list-rows)")
    bench.add_argument("--list-rows", action="store_true", help="print the row names on this device and exit")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, 3 rounds: a smoke run, written to bench-quick.* (never over a full run)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar, no report printed (only where it went)")
    sub.add_parser("info", help="which backends can run here, and why not")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "info":
        from . import explain

        print(explain())
        return 0
    if args.list_rows:
        return list_rows(args)
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
