"""What `pip install gift_kernels` promises: triton is a dependency only where it has wheels (the
CPU path never imports it), and each extra brings what its documented use needs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(names):
    return {Requirement(r).name: Requirement(r) for r in names}


def test_triton_is_required_only_where_it_has_wheels():
    project = _project()
    triton = _requirements(project["dependencies"])["triton"]
    linux = {"sys_platform": "linux", "platform_system": "Linux"}
    for machine in ("x86_64", "aarch64"):
        assert triton.marker.evaluate({**linux, "platform_machine": machine})
    assert not triton.marker.evaluate({**linux, "platform_machine": "ppc64le"})
    assert not triton.marker.evaluate({"sys_platform": "darwin", "platform_machine": "arm64"})
    assert not triton.marker.evaluate({"sys_platform": "win32", "platform_machine": "AMD64"})
    assert _requirements(project["optional-dependencies"]["triton"])["triton"].marker is None


def test_extras_bring_what_their_use_needs():
    extras = {name: _requirements(reqs) for name, reqs in _project()["optional-dependencies"].items()}
    assert "transformers" in extras["quant"]  # the README's quantized example loads a model through transformers
    for name in ("bench", "test", "examples"):  # GIFT saves / loads through PEFT only from 0.21
        spec = extras[name]["peft"].specifier
        assert "0.21.0" in spec and "0.20.9" not in spec and "0.22.0" not in spec, (name, str(spec))


BLOCK_TRITON = textwrap.dedent("""
    import importlib.abc, sys
    tried = []
    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                tried.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoTriton())

    import torch
    import gift_kernels as gk
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    phi, psi = torch.randn(12, 3, generator=gen), torch.randn(3, 12, generator=gen)
    x.requires_grad_(True)
    y = gk.gift_linear(x, w, b, phi, psi)
    y.sum().backward()
    xd, wd, bd, phid, psid = (t.detach().double() for t in (x, w, b, phi, psi))
    want = xd @ (wd @ (torch.eye(12, dtype=torch.float64) + phid @ psid)).T + bd
    assert (y.double() - want).abs().max() < 1e-4, (y.double() - want).abs().max()
    assert x.grad is not None
    gk.explain()  # `gift-kernels info` says why triton cannot run, without importing it
    assert not tried and "triton" not in sys.modules, f"the CPU path tried to import {tried}"
    print("no triton import tried")
""")


def test_cpu_path_runs_without_triton():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", BLOCK_TRITON], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no triton import tried" in done.stdout
