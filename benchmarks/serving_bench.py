"""Serving benchmarks: mixed-adapter batches, adapter file sizes, bank memory.

Driver for :mod:`gift_kernels.bench.serving` (its docstring says what is measured and how).
The committed CPU run: ``python benchmarks/serving_bench.py --out benchmarks/results/cpu``.
"""

import sys

from gift_kernels.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
