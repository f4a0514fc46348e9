"""The plan (gift_kernels.ops.plan): the form rule, ``auto``'s measurement with an injected
timer (CPU stands in for CUDA), nothing timed or tuned inside a capture or a compile trace, and
fp16 activations kept out of the input-side form (u could overflow where the merged layer is
finite), explicit forms honoured with or without grad."""

from __future__ import annotations

import pytest
import torch

import gift_kernels
from gift_kernels.ops import gift_linear_ref, plan
from gift_testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _fresh_plans():
    plan.clear()
    yield
    plan.clear()


def _inputs(m=8, n=16, k=32, r=4, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_(grad)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    phi = torch.randn(k, r, generator=g).requires_grad_(grad)
    psi = torch.randn(r, k, generator=g).requires_grad_(grad)
    return x, w, b, phi, psi


class FakeTimer:
    """Times by label from a table; runs each candidate once, as the real timer does."""

    def __init__(self, ms):
        self.ms, self.timed = ms, []

    def __call__(self, run, label):
        run()
        self.timed.append(label)
        return self.ms[label]


@pytest.mark.parametrize("winner", ["input/torch", "epilogue/torch"])
def test_auto_measures_the_candidates_once_and_keeps_the_winner(winner):
    loser = ({"input/torch", "epilogue/torch"} - {winner}).pop()
    timer = FakeTimer({winner: 1.0, loser: 2.0})
    x, w, b, phi, psi = _inputs()
    with plan.measuring(timer):
        for _ in range(3):
            y = gift_kernels.gift_linear(x, w, b, phi, psi)
            y.sum().backward()
        assert sorted(timer.timed) == ["epilogue/torch", "input/torch"], "each candidate timed once, once per key"
        chosen = plan.choose("gift_linear", x, w.shape[0], phi, training=True)
        assert chosen.label == winner and dict(chosen.timed) == {winner: 1.0, loser: 2.0}
        report = gift_kernels.explain(torch.device("cpu"))
        assert f"{winner} won" in report and "measured" in report and loser in report
        assert rel_err(y, gift_linear_ref(x, w, b, phi, psi)) <= TOL[torch.float32]
        # another kind of call (no grad) is another key: measured on its own
        with torch.no_grad():
            gift_kernels.gift_linear(x, w, b, phi, psi)
        assert len(timer.timed) == 4


def test_an_explicit_backend_or_form_is_never_timed():
    timer = FakeTimer({"input/torch": 1.0, "epilogue/torch": 2.0})
    x, w, b, phi, psi = _inputs()
    with plan.measuring(timer):
        gift_kernels.gift_linear(x, w, b, phi, psi, form="epilogue").sum().backward()
        with gift_kernels.backend("torch"):
            gift_kernels.gift_linear(x, w, b, phi, psi).sum().backward()
    assert timer.timed == []


@pytest.mark.parametrize("where", ["capture", "compile trace"])
def test_nothing_is_timed_inside_a_capture_or_trace(where, monkeypatch):
    """There the default runs (the input-side form on CUDA, the cost rule on CPU) and is not
    cached: the first call outside measures."""
    timer = FakeTimer({"input/torch": 2.0, "epilogue/torch": 1.0})
    x, w, b, phi, psi = _inputs()
    with plan.measuring(timer):
        with monkeypatch.context() as mp:
            mp.setattr(plan, "_no_timing_now", lambda device: True)
            p = plan.choose("gift_linear", x, w.shape[0], phi, training=True, trial=lambda p: None)
        assert timer.timed == [] and p.timed == () and not plan._plans
        p = plan.choose("gift_linear", x, w.shape[0], phi, training=True, trial=lambda p: None)
        assert p.label == "epilogue/torch" and len(timer.timed) == 2


def test_autotuning_never_runs_inside_a_capture_or_trace(monkeypatch):
    from gift_kernels.ops.tiles import runtime

    monkeypatch.setattr(runtime, "INTERPRETED", False)
    ran = []
    for capturing in ("torch.compiler.is_compiling",):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        cfg = runtime.autotune(("k", capturing), ["first", "second"], ran.append, lambda: None, torch.device("cpu"))
        assert cfg == "first" and ran == [] and ("k", capturing) not in runtime._tuned
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cfg = runtime.autotune(("k", "graph"), ["first", "second"], ran.append, lambda: None, torch.device("cuda"))
    assert cfg == "first" and ran == [] and ("k", "graph") not in runtime._tuned
    runtime._tuned[("k", "cached")] = "second"  # a key tuned before the capture keeps its winner
    assert runtime.autotune(("k", "cached"), ["first", "second"], ran.append, lambda: None,
                            torch.device("cuda")) == "second"


def test_the_cpu_form_rule():
    """Training: the torch cost rule (input side at small M and for square layers up to M ~ 2K
    at r 16, the epilogue beyond and for wide-in narrow-out layers at large M); no grad: the
    cheaper association; fp16: the epilogue."""
    cases = [((8, 64, 64, 4), True, "input"), ((4096, 64, 4096, 4), True, "epilogue"),
             ((1024, 1024, 1024, 16), True, "input"), ((4096, 1024, 1024, 16), True, "epilogue"),
             ((4096, 1024, 1024, 64), True, "input"), ((16, 4096, 1024, 16), True, "input"),
             ((1, 64, 64, 4), False, "input"), ((4096, 8, 4096, 4), False, "epilogue")]
    for (m, n, k, r), training, want in cases:
        x = torch.empty(m, k)
        phi = torch.empty(k, r)
        assert plan.choose("gift_linear", x, n, phi, training=training).form == want, (m, n, k, r, training)
        assert plan.traced_form("cpu", torch.float32, m, n, k, r, training) == want
    for training in (True, False):
        assert plan.choose("gift_linear", torch.empty(8, 32, dtype=torch.float16), 16, torch.empty(32, 4),
                           training=training).form == "epilogue"
    assert plan.traced_form("cuda", torch.bfloat16, 8, 16, 32, 4, True) == "input"
    assert plan.traced_form("cuda", torch.float16, 8, 16, 32, 4, True) == "epilogue"


def _fp16_u_overflows():
    """fp16 x and a float32 Theta with a large gain: u = x (I + phi psi)^T exceeds fp16's range
    while W is small enough that the merged layer's output (and every grad) stays finite."""
    x, w, b, phi, psi = _inputs(dtype=torch.float16, grad=False)
    with torch.no_grad():
        x.mul_(8)
        phi.mul_(100)
        psi.mul_(30)
        w.mul_(1e-3)
    u = x.double() + (x.double() @ psi.double().t()) @ phi.double().t()
    y = gift_linear_ref(x, w, b, phi, psi)
    assert u.abs().max() > 2 * 65504 and y.abs().max() < 65504 / 8
    return x, w, b, phi, psi


def test_explicit_input_form_overflows_on_these_inputs():
    """What the rule guards against (this test shows the inputs do trigger it)."""
    x, w, b, phi, psi = _fp16_u_overflows()
    with torch.no_grad():
        assert not torch.isfinite(gift_kernels.gift_linear(x, w, b, phi, psi, form="input")).all()


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("form", ["auto", "epilogue"])
def test_fp16_never_overflows_where_the_merged_layer_is_finite(form, grad):
    x, w, b, phi, psi = _fp16_u_overflows()
    ref = gift_linear_ref(x, w, b, phi, psi)
    if grad:
        x.requires_grad_(True), phi.requires_grad_(True), psi.requires_grad_(True)
        y = gift_kernels.gift_linear(x, w, b, phi, psi, form=form)
        y.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (x, phi, psi))
    else:
        with torch.no_grad():
            y = gift_kernels.gift_linear(x, w, b, phi, psi, form=form)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[torch.float16]


def test_module_form_rule_lives_in_the_plan():
    kw = dict(can_dequantize=True, keeps_input=True, rows=plan.EPILOGUE_MIN_ROWS)
    assert plan.module_form("auto", n_chunks=1, training=True, **kw) == "epilogue"
    assert plan.module_form("auto", n_chunks=1, training=False, **kw) == "input"
    assert plan.module_form("auto", n_chunks=2, training=False, **kw) == "epilogue"
    assert plan.module_form("auto", n_chunks=2, training=True, can_dequantize=False, keeps_input=False,
                            rows=10**6) == "input"
    assert plan.module_form("input", n_chunks=2, training=True, **kw) == "input"


def test_a_call_beyond_32bit_offsets_never_reuses_a_plan_made_for_one_within(monkeypatch):
    """The M bucket alone would reuse a plan (e.g. a Triton one) made for a call whose tensors
    fit 32-bit offsets for a call in the same bucket whose tensors do not, skipping the
    backend's size check: whether the call fits is part of the key."""
    from gift_kernels.ops import checks

    monkeypatch.setattr(checks, "MAX_OFFSET", 200)  # stands in for 2**31 - 1
    small, large = torch.randn(5, 32), torch.randn(8, 32)  # 160 and 256 elements, one M bucket
    phi = torch.randn(32, 4)
    assert not checks.exceeds_offsets("gift_input", small, 32) and checks.exceeds_offsets("gift_input", large, 32)
    plan.choose("gift_input", small, 32, phi, training=False)
    plan.choose("gift_input", large, 32, phi, training=False)
    assert len(plan._plans) == 2


def test_a_traced_graph_takes_the_eager_plans_form_at_every_m():
    """M is bucketed in the plan's key (rounded up to a power of two), so the CPU form rule is
    evaluated at the bucket, traced or not: a compiled graph with a dynamic M gives the eager
    call's bits on both sides of a bucket boundary of the rule (square 1024 layer, r 16: input
    side up to M 1024, the epilogue beyond)."""
    from gift_kernels import gift_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g) / 32
    phi, psi = torch.randn(1024, 16, generator=g) / 32, torch.randn(16, 1024, generator=g) / 32
    phi.requires_grad_(True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: gift_linear(x, w, None, phi, psi), backend=backend, dynamic=True,
                                 fullgraph=True)
        for m, want in ((700, "input"), (1500, "epilogue"), (3000, "epilogue")):
            x = torch.randn(m, 1024, generator=g)
            assert plan.choose("gift_linear", x, 1024, phi, training=True).form == want, m
            assert plan.traced_form("cpu", torch.float32, m, 1024, 1024, 16, True) == want, m
            eager = gift_linear(x, w, None, phi, psi)
            assert torch.equal(compiled(x), eager), m
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2  # one graph per side of the boundary, guarded on M
