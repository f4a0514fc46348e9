"""The CUDA C++ extension built for real by nvcc, on a machine without a GPU.

``scripts/build_cuda_extension.py`` builds csrc/ in ``.venv-cuda/`` (torch 2.14.1, a cu130
build; created on first use, reused after) for sm_80 and sm_90 with warnings as errors, loads
it through the ``cuda`` backend's launcher module and checks the registered schemas, dispatch
keys, fake implementations and the CPU-tensor error (see the script). A clean clone pays the
torch install and the full build once (minutes); later runs relink nothing and take seconds.

Also here: setup.py on this (CPU) torch skips the extension cleanly, and the backend module
refuses to import with a reason.

The build runs only when asked, ``GIFT_KERNELS_CUDA_BUILD_TEST=1``: it is its own step of
.ci/run (~3 min on 2 cores after the torch install), not part of the default ``pytest`` run
(docs/testing.md); asked for, it never skips: a build that fails, fails it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUILD_ENV = "GIFT_KERNELS_CUDA_BUILD_TEST"
BUILD_TIMEOUT_S = 900

build_when_asked = pytest.mark.skipif(
    os.environ.get(BUILD_ENV) != "1", reason=f"the nvcc build is .ci/run's own step ({BUILD_ENV}=1 runs it)"
)


@build_when_asked
def test_extension_builds_with_nvcc_and_registers_its_ops(tmp_path):
    out = tmp_path / "summary.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_cuda_extension.py"), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "GIFT_KERNELS_CUDA_ARCH_LIST": "8.0;9.0"},
    )
    log = (res.stdout + res.stderr)[-6000:]
    assert out.exists(), f"no summary written (exit {res.returncode}):\n{log}"
    summary = json.loads(out.read_text())
    assert summary["build"] == "ok", f"{summary['build']}\n{log}"
    failed = {k: v for k, v in summary["checks"].items() if v != "ok"}
    assert not failed, f"{failed}\n{log}"
    assert set(summary["checks"]) >= {
        "schemas match the Python ops",
        "CUDA kernels registered, none for the Python ops",
        "fake implementations",
        "CPU tensors get a clear error",
        "launcher module",
    }
    assert summary["arch"] == "8.0;9.0"
    assert res.returncode == 0, log


def _setup_py(*args, **env):
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_setup_py_skips_the_extension_on_cpu_torch():
    res = _setup_py("--version", GIFT_KERNELS_FORCE_CUDA_BUILD="0", GIFT_KERNELS_SKIP_CUDA_BUILD="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0.1.0"
    assert "not building the CUDA extension" in res.stderr and "CPU-only build" in res.stderr

    forced = _setup_py("--version", GIFT_KERNELS_FORCE_CUDA_BUILD="1")
    assert forced.returncode != 0
    assert "GIFT_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built" in forced.stderr

    skipped = _setup_py("--version", GIFT_KERNELS_SKIP_CUDA_BUILD="1")
    assert skipped.returncode == 0 and "not building" not in skipped.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_backend_module_refuses_to_import_with_a_reason():
    with pytest.raises(ImportError, match="CPU-only build"):
        importlib.import_module("gift_kernels.ops.cuda.extension")
