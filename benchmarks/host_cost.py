"""Host cost of the package's Python per fwd+bwd, each backend and form, beside plain F.linear.

    python benchmarks/host_cost.py [--json PATH] [--iters N] [--no-triton] [--smoke]

Runs on the CPU. The Triton paths run with TRITON_INTERPRET=1 (set here, before triton is
imported) and their kernels stubbed by the package's testing hook, so the figure is the
Python around the kernels: plans, tiles, buffers, grids, autograd (gift_kernels.bench.host_cost).
Time it on a quiet machine, one thread; record figures in benchmarks/NOTES.md with date and
machine. ``--smoke`` runs a few iterations only (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows here as JSON")
    ap.add_argument("--iters", type=int, default=50, help="calls per path per round")
    ap.add_argument("--rounds", type=int, default=80, help="rounds, each timing every path once (interleaved)")
    ap.add_argument("--no-triton", action="store_true", help="torch backend only (no interpreter)")
    ap.add_argument("--smoke", action="store_true", help="a few iterations: check the script, time nothing")
    args = ap.parse_args(argv)
    if not args.no_triton:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(ROOT))
    import torch

    from gift_kernels.bench import host_cost

    torch.set_num_threads(1)
    iters, warmup, repeats = (3, 2, 1) if args.smoke else (args.iters, 20, args.rounds)
    table = host_cost.rows(iters=iters, warmup=warmup, repeats=repeats)
    print(host_cost.to_markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
