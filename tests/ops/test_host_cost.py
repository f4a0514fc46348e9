"""The hot path's host discipline, on CPU: after warm-up, a fwd+bwd reads no package metadata
and performs no host sync (``aten._local_scalar_dense``, seen by a dispatch mode), for the torch
backend and the Triton backend (interpreted, kernels stubbed by the package's testing hook),
both forms, the mixed op and the ``GiftLinear`` module; the plan is decided once per kind of
call and carried to backward; the host-cost driver runs.

Like tests/ops/test_triton.py, the Triton half needs TRITON_INTERPRET=1 before triton is
imported: in the ordinary process ``test_interpreted_half`` runs this file again in a subprocess
with it set.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gift_kernels
from gift_kernels.bench import host_cost
from gift_kernels.ops import plan

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = Path(__file__).resolve().parents[2]

# the torch backend's mixed path lays the rows out by adapter from counts it reads on the host
# (CPU tensors: nothing to wait for); the no-sync guarantee is the GPU paths' (Triton)
HOST_COUNTS = {"gift_mixed-torch-input"}


class SyncCounter(TorchDispatchMode):
    """Records every op that copies a device value to the host."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _paths(backend):
    return [p for p in host_cost.paths() if p.backend == backend]


def _check_hot_path(path, monkeypatch):
    fn = host_cost.step_fn(path)
    with host_cost.running(path):
        fn()
        fn()  # warm-up: plans decided, tiles cached
        lookups = []
        real = importlib.metadata.version

        def counting(name, *a, **k):
            lookups.append(name)
            return real(name, *a, **k)

        monkeypatch.setattr(importlib.metadata, "version", counting)
        decided = len(plan._plans)
        with SyncCounter() as mode:
            fn()
        monkeypatch.setattr(importlib.metadata, "version", real)
    assert lookups == [], f"{path.name}: package metadata read on the hot path: {lookups}"
    assert len(plan._plans) == decided, f"{path.name}: a warm call decided a new plan"
    if path.name not in HOST_COUNTS:
        assert mode.syncs == [], f"{path.name}: host syncs on the hot path: {mode.syncs}"


def test_the_detectors_detect(monkeypatch):
    """The checks below can fail: a metadata read and an item() are seen."""
    with SyncCounter() as mode:
        torch.ones(2).sum().item()
    assert mode.syncs
    seen = []
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: seen.append(name) or real(name))
    from gift_kernels.ops import tiles

    tiles.triton_version.cache_clear()
    tiles.triton_version()
    assert seen == ["triton"]
    tiles.triton_version()
    assert seen == ["triton"], "the triton version is read once per process"


if not INTERPRETED:

    @pytest.mark.parametrize("path", _paths("torch"), ids=lambda p: p.name)
    def test_torch_hot_path_reads_no_metadata_and_syncs_nothing(path, monkeypatch):
        _check_hot_path(path, monkeypatch)

    def test_the_plan_is_decided_once_and_carried_to_backward(monkeypatch):
        """Forward and backward of a warm call: no decision at all; forward finds its plan with
        one lookup of the validated call (``known``: no checks, no ``choose``), backward asks
        nothing (the plan is carried)."""
        t = host_cost._inputs()
        calls = []
        real = plan._decide
        monkeypatch.setattr(plan, "_decide", lambda *a: calls.append(a[1]) or real(*a))
        plan.clear()
        for _ in range(3):
            y = gift_kernels.gift_linear(t["x"], t["w"], t["b"], t["phi"], t["psi"])
            y.backward(t["g"])
        assert calls == ["gift_linear"]
        looked, chosen = [], []
        real_known, real_choose = plan.known, plan.choose
        monkeypatch.setattr(plan, "known", lambda *a, **k: looked.append(a[0]) or real_known(*a, **k))
        monkeypatch.setattr(plan, "choose", lambda *a, **k: chosen.append(a[0]) or real_choose(*a, **k))
        y = gift_kernels.gift_linear(t["x"], t["w"], t["b"], t["phi"], t["psi"])
        assert looked == ["gift_linear"] and chosen == []
        y.backward(t["g"])
        assert looked == ["gift_linear"] and chosen == [], "backward asked the plan again"

    def test_host_cost_driver_smoke(tmp_path):
        out = tmp_path / "host.json"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_cost.py"), "--smoke", "--no-triton",
                               "--json", str(out)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "gift_linear-torch-epilogue" in proc.stdout and "plain us" in proc.stdout
        import json

        rows = json.loads(out.read_text())
        assert {r["path"] for r in rows} == {"gift_linear-torch-epilogue", "gift_linear-torch-input",
                                             "gift_mixed-torch-input", "GiftLinear-torch-auto"}
        assert all(r["host_us"] > 0 and r["plain_us"] > 0 for r in rows)

    @pytest.mark.interpreter
    def test_interpreted_half():
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIFT_KERNELS_", "TRITON_"))}
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

else:

    @pytest.mark.parametrize("path", _paths("triton"), ids=lambda p: p.name)
    def test_triton_hot_path_reads_no_metadata_and_syncs_nothing(path, monkeypatch):
        _check_hot_path(path, monkeypatch)

    def test_stubbed_kernels_launch_nothing(monkeypatch):
        """Under the hook no kernel runs (the launch point returns at once) yet every launcher
        line runs and returns correctly shaped outputs."""
        from gift_kernels.ops.tiles import runtime

        launched = []
        monkeypatch.setattr(runtime, "_run_kernel", lambda *a: launched.append(a))
        t = host_cost._inputs()
        with plan.backend("triton"):
            with plan.stubbed_kernels():
                y = gift_kernels.gift_linear(t["x"], t["w"], t["b"], t["phi"], t["psi"], form="epilogue")
                y.backward(t["g"])
            assert launched == [] and y.shape == (t["x"].shape[0], t["w"].shape[0])
            y = gift_kernels.gift_linear(t["x"].detach(), t["w"], t["b"], t["phi"].detach(), t["psi"].detach(),
                                         form="input")
            assert launched, "without the hook the kernels are launched"
