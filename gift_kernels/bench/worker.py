"""A benchmark worker process: ``python -m gift_kernels.bench.worker SPEC EVENTS``.

Runs :func:`gift_kernels.bench.run.run` on the JSON :class:`Spec` in SPEC and appends one JSON
line per event to EVENTS (``start`` before each row's step, ``shape`` with each finished
shape, ``fatal`` after a fatal device error), flushed as they happen, for
:func:`gift_kernels.bench.run.run_isolated` to read. Exit status 3 after a fatal device error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .run import FATAL_EXIT, Spec, run


def work(spec_path: str, events_path: str) -> int:
    spec = Spec.from_json(Path(spec_path).read_text())
    with open(events_path, "a") as f:
        def events(ev):
            f.write(json.dumps(ev, default=str) + "\n")
            f.flush()

        out = run(spec, events=events)
    stopped = out["stopped"] or ""
    return FATAL_EXIT if stopped.startswith("fatal device error") else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m gift_kernels.bench.worker SPEC.json EVENTS.jsonl", file=sys.stderr)
        return 2
    code = work(*argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a broken CUDA context can hang an orderly interpreter exit


if __name__ == "__main__":
    sys.exit(main())
