"""Fault injection for the benchmark's crash-isolation tests (never shipped): a row hook
(``Spec.row_hook = "bench_faults:inject"``) that makes a chosen row of a chosen shape raise a
fatal device error, kill its process, or hang. The plan travels to the worker processes in the
environment: ``GIFT_BENCH_FAULTS`` = JSON list of ``{"shape": index, "provider": row, "how":
"raise" | "exit" | "hang"}``; tests/support must be on the workers' PYTHONPATH (:func:`env`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Sequence

HOOK = "bench_faults:inject"
PLAN_ENV = "GIFT_BENCH_FAULTS"
SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]


def env(plan: Sequence[dict], base: Dict[str, str] = None) -> Dict[str, str]:
    """The environment of a process whose benchmark workers run ``plan``."""
    base = dict(os.environ if base is None else base)
    path = os.pathsep.join([str(ROOT), str(SUPPORT)] + ([base["PYTHONPATH"]] if base.get("PYTHONPATH") else []))
    return {**base, "PYTHONPATH": path, PLAN_ENV: json.dumps(list(plan))}


def inject(shape: int, provider: str, phase: str) -> None:
    for fault in json.loads(os.environ.get(PLAN_ENV, "[]")):
        if fault["shape"] != shape or fault["provider"] != provider:
            continue
        if fault["how"] == "exit":
            os._exit(139)  # as a segfaulting CUDA driver would
        if fault["how"] == "hang":
            time.sleep(10**6)  # as a kernel that never returns would: the time limit must end it
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected at {provider})")
