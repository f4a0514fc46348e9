"""Shared test setup: the helper modules in tests/support are importable by name
(``from gift_testing import ...``), and the markers are registered in pyproject.toml:

- ``gpu``: needs a CUDA device (skipped here; run by benchmarks/gpu_check.py on the GPU machine);
- ``interpreter``: runs Triton kernels under ``TRITON_INTERPRET=1`` in subprocesses.
"""

import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
