"""Backend choice: env var, context manager, auto, explicit requests that cannot run, and
the report of what ran and why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gift_kernels
from gift_kernels.ops import plan
from gift_testing import make_inputs


def _run(inputs):
    return gift_kernels.gift_linear(*(inputs[a] for a in ("x", "weight", "bias", "phi", "psi")))


def test_auto_uses_torch_on_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv(plan.ENV_VAR, raising=False)
    _run(make_inputs(16, 64, 64, 8))
    assert gift_kernels.last_backend("cpu") == "torch"
    report = gift_kernels.explain(torch.device("cpu"))
    assert "requested: auto" in report
    assert "last ran: torch (auto: first choice for cpu; form input: the torch cost rule)" in report
    assert "cuda" in report and "only on cuda tensors" in report


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv(plan.ENV_VAR, "torch")
    assert plan.requested() == "torch"
    with gift_kernels.backend("auto"):
        assert plan.requested() == "auto"
        with gift_kernels.backend("torch"):
            assert plan.requested() == "torch"
        assert plan.requested() == "auto"
    assert plan.requested() == "torch"
    _run(make_inputs(2, 3, 4, 1))
    assert gift_kernels.last_backend("cpu") == "torch"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(KeyError):
        with gift_kernels.backend("torch"):
            raise KeyError("boom")
    assert not plan._override


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*choose one of"):
        with gift_kernels.backend("fast"):
            pass
    monkeypatch.setenv(plan.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"'bogus' from \$GIFT_KERNELS_BACKEND"):
        _run(make_inputs(2, 3, 4, 1))


def test_explicit_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with gift_kernels.backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but cannot run on cpu: .*only on cuda"):
            _run(make_inputs(2, 3, 4, 1))
    with gift_kernels.backend("triton"):
        with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
            _run(make_inputs(2, 3, 4, 1))


def test_a_backend_that_fails_to_load_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(plan._RUNTIMES, "cuda", "gift_kernels.ops.does_not_exist")
    monkeypatch.setattr(plan, "_loaded", {k: v for k, v in plan._loaded.items() if k != "cuda"})
    monkeypatch.setattr(plan, "_load_errors", {})
    ok, why = plan.supports("cuda", torch.device("cuda"))
    assert not ok and "could not be loaded" in why and "does_not_exist" in why


def test_import_never_fails_even_with_a_bad_env_var():
    env = dict(os.environ, GIFT_KERNELS_BACKEND="bogus")
    code = "import gift_kernels; print(gift_kernels.__version__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == gift_kernels.__version__
