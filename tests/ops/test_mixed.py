"""Mixed-adapter batches: ``gift_linear_mixed`` / ``gift_input_mixed`` (one adapter of a bank
per row, -1 = the base layer alone) against the float64 spec, forward and every gradient; the
registered ops (opcheck, torch.compile fullgraph); bad input; and the Triton kernels under the
interpreter (in a subprocess, as tests/ops/test_triton.py does, bf16 ``tl.dot`` made exact
there as in that file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gift_kernels
from gift_kernels.ops import gift_input_mixed_ref, gift_linear_mixed_ref
from gift_testing import TOL, assert_close_to_ref, exact_bf16_dot_in_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def make_bank(m, k, n_adapters, r, *, dtype=F32, theta=None, seed=0, pattern="random", lead=()):
    """x (lead..., m, k), a bank phis (A, k, r) / psis (A, r, k) scaled so the adapter term is
    O(1), and ids of one of the patterns below."""
    g = torch.Generator().manual_seed(seed)
    theta = theta or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dt).requires_grad_(True)

    x = rnd(*lead, m, k)
    phis, psis = rnd(n_adapters, k, r, scale=k ** -0.5, dt=theta), rnd(n_adapters, r, k, scale=k ** -0.5, dt=theta)
    rows = int(torch.tensor(lead).prod()) * m if lead else m
    if pattern == "random":  # every id, -1 included, and adapter 1 unused
        ids = torch.randint(-1, n_adapters, (rows,), generator=g)
        ids[ids == 1] = 0
    elif pattern == "base":
        ids = torch.full((rows,), -1)
    elif pattern == "one":
        ids = torch.full((rows,), n_adapters - 1)
    elif pattern == "hot":  # one adapter takes most rows, a few others one row each
        ids = torch.zeros(rows, dtype=torch.int64)
        ids[: min(rows, n_adapters)] = torch.arange(min(rows, n_adapters)) - 1
    elif pattern == "distinct":  # decode: one row per adapter
        ids = torch.arange(rows) % n_adapters
    else:
        raise ValueError(pattern)
    return x, phis, psis, ids.reshape(*lead, m) if lead else ids


def check_mixed(fn, x, phis, psis, ids, dtype, *, weight=None, bias=None, seed=1):
    """fn's output and its grads of x, phis and psis against the float64 spec."""
    args = (x, weight, bias, phis, psis, ids) if weight is not None else (x, phis, psis, ids)
    out = fn(*args)
    assert out.dtype == x.dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.dtype)
    ref_in = [a.detach().double().requires_grad_(True) for a in (x, phis, psis)]
    if weight is not None:
        ref = gift_linear_mixed_ref(ref_in[0], weight, bias, ref_in[1], ref_in[2], ids)
    else:
        ref = gift_input_mixed_ref(*ref_in, ids)
    assert_close_to_ref(out, ref, dtype, "output")
    wants = torch.autograd.grad(ref, ref_in, grad.double())
    gots = torch.autograd.grad(out, [x, phis, psis], grad)
    for name, got, want, leaf in zip(("x", "phis", "psis"), gots, wants, (x, phis, psis)):
        assert got.dtype == leaf.dtype, name
        assert_close_to_ref(got, want, dtype, f"grad of {name}")
    return out, gots


CASES = [
    # (id, m, k, n, A, r, dtype, theta dtype, ids pattern)
    ("f32-odd", 37, 45, 29, 5, 7, F32, None, "random"),
    ("f64", 23, 17, 11, 3, 2, F64, None, "random"),
    ("bf16-theta32", 40, 24, 20, 4, 6, BF16, F32, "random"),
    ("f16-theta32", 33, 20, 18, 6, 4, F16, F32, "random"),
    ("all-base", 9, 12, 10, 3, 2, F32, None, "base"),
    ("one-adapter", 19, 13, 9, 4, 3, F32, None, "one"),
    ("hot-adapter", 50, 16, 12, 8, 3, F32, None, "hot"),
    ("one-row-per-adapter", 7, 16, 12, 7, 5, F32, None, "distinct"),
    ("r1-m1", 1, 5, 3, 2, 1, F32, None, "one"),
]


@pytest.mark.parametrize("m, k, n, a, r, dtype, theta, pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_linear_matches_float64_spec(m, k, n, a, r, dtype, theta, pattern):
    x, phis, psis, ids = make_bank(m, k, a, r, dtype=dtype, theta=theta, pattern=pattern)
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(n, k, generator=g, dtype=F64) * k ** -0.5).to(dtype)
    bias = torch.randn(n, generator=g, dtype=F64).to(dtype)
    check_mixed(gift_kernels.gift_linear_mixed, x, phis, psis, ids, dtype, weight=weight, bias=bias)
    assert gift_kernels.last_backend("cpu") == "torch"


def test_input_form_with_leading_dims_and_per_token_ids():
    x, phis, psis, ids = make_bank(6, 14, 3, 4, lead=(2, 3))
    assert ids.shape == (2, 3, 6)
    u, _ = check_mixed(gift_kernels.gift_input_mixed, x, phis, psis, ids, F32)
    assert u.shape == x.shape
    u_flat = gift_kernels.gift_input_mixed(x, phis, psis, ids.reshape(-1))  # flattened ids are the same call
    assert torch.equal(u, u_flat)


def test_rows_match_single_adapter_gift_linear_and_base_rows_the_plain_layer():
    x, phis, psis, ids = make_bank(30, 16, 4, 3, pattern="random")
    weight, bias = torch.randn(11, 16) / 4, torch.randn(11)
    y = gift_kernels.gift_linear_mixed(x, weight, bias, phis, psis, ids)
    for a in range(-1, 4):
        rows = ids == a
        if not rows.any():
            continue
        if a < 0:
            want = torch.nn.functional.linear(x[rows], weight, bias)
        else:
            want = gift_kernels.gift_linear(x[rows], weight, bias, phis[a], psis[a])
        assert_close_to_ref(y[rows], want.double(), F32, f"rows of adapter {a}")


def test_unused_adapters_get_zero_grads_and_nothing_is_modified():
    x, phis, psis, ids = make_bank(12, 10, 4, 2, pattern="one")  # only adapter 3
    before = [t.detach().clone() for t in (x, phis, psis, ids)]
    u = gift_kernels.gift_input_mixed(x, phis, psis, ids)
    u.sum().backward()
    assert phis.grad[:3].abs().max() == 0 and psis.grad[:3].abs().max() == 0
    assert phis.grad[3].abs().max() > 0 and psis.grad[3].abs().max() > 0
    for t, b in zip((x, phis, psis, ids), before):
        assert torch.equal(t.detach(), b)


def test_double_backward_matches_the_spec():
    """create_graph=True: the grads are differentiable (second derivatives as the float64 spec's)."""
    x, phis, psis, ids = make_bank(9, 6, 3, 2, dtype=F64)
    g = torch.randn(9, 6, dtype=F64, generator=torch.Generator().manual_seed(2))

    def second(fn, leaves):
        grads = torch.autograd.grad(fn(*leaves, ids), leaves, g, create_graph=True)
        return torch.autograd.grad(sum((d * d).sum() for d in grads), leaves)

    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, phis, psis)]
    for got, want in zip(second(gift_kernels.gift_input_mixed, [x, phis, psis]),
                         second(gift_input_mixed_ref, ref_leaves)):
        assert_close_to_ref(got, want, F64, "second derivative")


def test_registered_ops_pass_opcheck():
    x, phis, psis, ids = make_bank(13, 9, 4, 3)
    torch.library.opcheck(torch.ops.gift_kernels.gift_mixed_fwd, (x, phis, psis, ids))
    u, t = torch.ops.gift_kernels.gift_mixed_fwd(x.detach(), phis.detach(), psis.detach(), ids)
    for needs in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.gift_kernels.gift_mixed_bwd,
                              (torch.randn_like(u), x.detach(), t, phis.detach(), psis.detach(), ids, needs))


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    x, phis, psis, ids = make_bank(12, 16, 3, 4)
    weight, bias = torch.randn(10, 16) / 4, torch.randn(10)

    def layer(x, phis, psis, ids):
        return torch.relu(gift_kernels.gift_linear_mixed(x, weight, bias, phis, psis, ids)).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(layer(x, phis, psis, ids), (x, phis, psis))
    compiled_grads = torch.autograd.grad(compiled(x, phis, psis, ids), (x, phis, psis))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


# ------------------------------------------------------------------ bad input


def _bad(**changes):
    x, phis, psis, ids = make_bank(6, 4, 3, 2)
    args = dict(x=x, weight=torch.randn(5, 4), bias=torch.randn(5), phis=phis, psis=psis, adapter_ids=ids)
    args.update(changes)
    return args


BAD = {
    "id-too-large": (lambda: _bad(adapter_ids=torch.tensor([0, 1, 2, 3, 0, 0])), ValueError,
                     r"adapter_ids must lie in \[-1, 3\).*got 3"),
    "id-below-minus-one": (lambda: _bad(adapter_ids=torch.tensor([0, -2, 0, 0, 0, 0])), ValueError, r"got -2"),
    "ids-float": (lambda: _bad(adapter_ids=torch.zeros(6)), TypeError, r"adapter_ids must be int64.*float32"),
    "ids-int32": (lambda: _bad(adapter_ids=torch.zeros(6, dtype=torch.int32)), TypeError, r"int64 \(use \.long\(\)\)"),
    "ids-per-sample-not-broadcast": (lambda: _bad(x=torch.randn(2, 3, 4), adapter_ids=torch.zeros(2, dtype=torch.long)),
                                     ValueError, r"one id per row of x: shape \(2, 3\) or \(6,\).*nothing is broadcast"),
    "phis-2d": (lambda: _bad(phis=torch.randn(4, 2)), ValueError, r"phis must be a 3-D bank \(A, d_in, r\).*\(4, 2\)"),
    "phis-d-in": (lambda: _bad(phis=torch.randn(3, 5, 2)), ValueError, r"phis must have shape \(A, d_in, r\) with d_in = 4"),
    "psis-shape": (lambda: _bad(psis=torch.randn(2, 2, 4)), ValueError, r"psis must have shape \(A, r, d_in\) = \(3, 2, 4\)"),
    "bank-dtypes": (lambda: _bad(psis=torch.randn(3, 2, 4, dtype=F64)), TypeError, r"phis dtype torch.float32 differs "
                    r"from psis dtype torch.float64"),
    "empty-bank": (lambda: _bad(phis=torch.randn(0, 4, 2), psis=torch.randn(0, 2, 4)), ValueError, r"at least one adapter"),
    "bank-device": (lambda: _bad(phis=torch.randn(3, 4, 2, device="meta")), ValueError, r"phis is on meta"),
    "ids-device": (lambda: _bad(adapter_ids=torch.zeros(6, dtype=torch.long, device="meta")), ValueError,
                   r"adapter_ids is on meta"),
    "weight-dtype": (lambda: _bad(weight=torch.randn(5, 4, dtype=F64)), TypeError, r"gift_linear_mixed: x dtype "
                     r"torch.float32, weight dtype torch.float64"),
    "weight-d-in": (lambda: _bad(weight=torch.randn(5, 3)), ValueError, r"weight must be 2-D \(d_out, d_in\) with d_in = 4"),
    "bias-shape": (lambda: _bad(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    "x-int": (lambda: _bad(x=torch.ones(6, 4, dtype=torch.long)), TypeError, r"x must be a floating-point"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_naming_the_tensor(case):
    make, exc, pattern = BAD[case]
    args = make()
    with pytest.raises(exc, match=pattern):
        gift_kernels.gift_linear_mixed(**args)


def test_registered_op_checks_ids_too():
    x, phis, psis, _ = make_bank(4, 4, 2, 2)
    with pytest.raises(ValueError, match=r"gift_mixed op: adapter_ids must lie in \[-1, 2\)"):
        torch.ops.gift_kernels.gift_mixed_fwd(x.detach(), phis.detach(), psis.detach(), torch.tensor([0, 5, 0, 0]))


# ------------------------------------------------------------------ Triton, interpreted

def check_nan_stays_in_its_tenant():
    """A NaN (and an inf) in one sample's input or upstream grad reaches nothing of another
    adapter: its rows' outputs and dx, and every other adapter's Theta grads stay finite. The
    layout pads adapter 1's chunk with copies of row 0 (adapter 0's row, the poisoned one)."""
    k, r, a = 12, 3, 3
    ids = torch.tensor([0, 0, 0, 1, 2, -1])
    g = torch.Generator().manual_seed(7)
    for poison in ("x", "grad"):
        x = torch.randn(6, k, generator=g)
        grad = torch.randn(6, k, generator=g)
        (x if poison == "x" else grad)[0, 0] = float("nan")
        (x if poison == "x" else grad)[0, 1] = float("inf")
        x.requires_grad_(True)
        phis = (torch.randn(a, k, r, generator=g) / 4).requires_grad_(True)
        psis = (torch.randn(a, r, k, generator=g) / 4).requires_grad_(True)
        u = gift_kernels.gift_input_mixed(x, phis, psis, ids)
        u.backward(grad)
        clean = ids != 0
        assert torch.isfinite(u[clean]).all() and torch.isfinite(x.grad[clean]).all(), poison
        for name, bank in (("phis", phis), ("psis", psis)):
            assert torch.isfinite(bank.grad[1:]).all(), f"{poison}: a NaN of adapter 0 reached {name}.grad of 1, 2"


def test_a_nan_in_one_sample_never_reaches_another_adapter():
    with gift_kernels.backend("torch"):
        check_nan_stays_in_its_tenant()


if not INTERPRETED:

    @pytest.mark.interpreter
    def test_triton_kernels_interpreted():
        """Run this file's interpreter tests in a subprocess with TRITON_INTERPRET=1."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIFT_KERNELS_", "TRITON_"))}
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "support"), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted_"]
        proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"interpreted mixed-kernel tests failed:\n{out[-6000:]}"
        assert " passed" in out and "skipped" not in out and "deselected" in out, out[-2000:]

else:
    exact_bf16_dot_in_interpreter()
    from gift_kernels.ops.mixed import torch as torch_backend
    from gift_kernels.ops.mixed import triton as triton_mixed

    TRITON_CASES = [
        ("f32-odd", 37, 45, 5, 7, F32, None, "random"),
        ("f16", 33, 40, 4, 16, F16, None, "random"),
        ("f16-theta32", 30, 24, 6, 5, F16, F32, "random"),
        ("r70-rank-chunks", 20, 24, 3, 70, F32, None, "random"),
        ("decode-one-row-per-adapter", 9, 40, 9, 4, F16, F32, "distinct"),
        ("prefill-hot-adapter-64-row-blocks", 150, 20, 6, 3, F32, None, "hot"),
        ("all-base", 8, 16, 2, 3, F32, None, "base"),
        ("bf16-theta32", 30, 24, 6, 5, BF16, F32, "random"),
        ("bf16-decode-one-row-per-adapter", 9, 40, 9, 4, BF16, F32, "distinct"),
        ("f16-r40-decode-rank-tile-64", 9, 72, 3, 40, F16, None, "random"),  # the shrink's 16 x 32 tile
        ("bf16-r48-decode-rank-tile-64", 12, 40, 2, 48, BF16, BF16, "random"),
    ]

    @pytest.mark.parametrize("m, k, a, r, dtype, theta, pattern", [pytest.param(*c[1:], id=c[0]) for c in TRITON_CASES])
    def test_interpreted_kernels_match_float64_spec(m, k, a, r, dtype, theta, pattern):
        x, phis, psis, ids = make_bank(m, k, a, r, dtype=dtype, theta=theta, pattern=pattern)
        with gift_kernels.backend("triton"):
            check_mixed(gift_kernels.gift_input_mixed, x, phis, psis, ids, dtype)
            assert gift_kernels.last_backend("cpu") == "triton"

    def test_interpreted_strided_x_and_linear():
        x, phis, psis, ids = make_bank(21, 30, 4, 6)
        base = torch.randn(42, 90, generator=torch.Generator().manual_seed(3))
        xs = base[::2, 1::3].requires_grad_(True)
        assert not xs.is_contiguous() and xs.shape == x.shape
        weight, bias = torch.randn(17, 30) / 6, torch.randn(17)
        with gift_kernels.backend("triton"):
            check_mixed(gift_kernels.gift_linear_mixed, xs, phis, psis, ids, F32, weight=weight, bias=bias)

    @pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True), (True, True, True)],
                             ids=["x", "theta", "psi", "all"])
    def test_interpreted_backward_needs_match_torch_backend(needs):
        x, phis, psis, ids = (t.detach() for t in make_bank(23, 38, 5, 7, dtype=F16, theta=F32))
        u, t = triton_mixed.mixed_fwd(x, phis, psis, ids)
        g = torch.randn(u.shape, generator=torch.Generator().manual_seed(5)).to(F16)
        got = triton_mixed.mixed_bwd(g, x, t, phis, psis, ids, needs)
        want = torch_backend.mixed_bwd(g.float(), x.float(), t, phis, psis, ids, needs)
        for name, need, a, b in zip(("x", "phis", "psis"), needs, got, want):
            if not need:
                assert a is None, name
            else:
                assert_close_to_ref(a, b.double(), F16, f"grad of {name}")

    def test_interpreted_nan_in_one_sample_never_reaches_another_adapter():
        with gift_kernels.backend("triton"):
            check_nan_stays_in_its_tenant()

    def test_interpreted_m0():
        x, phis, psis, ids = make_bank(0, 8, 2, 3)
        with gift_kernels.backend("triton"):
            u = gift_kernels.gift_input_mixed(x, phis, psis, ids)
            u.sum().backward()
        assert u.shape == (0, 8) and phis.grad.abs().max() == 0


def test_chunk_layout_uses_the_bank_as_is_only_when_chunk_a_is_adapter_a():
    from gift_kernels.ops.mixed.segments import chunks

    # 6 chunks for 6 adapters, but adapter 0 spans three of them and 1 and 5 are absent
    skewed = torch.tensor([2, 4, 4, 0, 0, 0, -1, 3, 2, 0, 4, 3, -1, 0, 0, 2, -1, 0, 4, 2, -1, -1, 0, 0, 0, 0, -1, 0,
                           0, 0, 3, 2, 0])
    ch = chunks(skewed, 6)
    assert ch.n_chunks == 6 and not ch.identity
    assert ch.adapted == int((skewed >= 0).sum()) and ch.valid.sum() == ch.adapted
    every = torch.tensor([3, 0, 1, 2, 0, -1, 1, 2, 3])
    ch = chunks(every, 4)
    assert ch.identity and ch.chunk_adapters.tolist() == [0, 1, 2, 3]
    assert chunks(torch.full((5,), 2), 4).single == 2 and chunks(every, 4).single == -1


def test_the_row_layout_is_built_once_per_call_and_never_reused_across_calls(monkeypatch):
    """An eager mixed call builds its row layout once, in forward, and its backward reuses it;
    the next call builds its own (ids can get new contents under the same tensor object and
    version: through .data, an alias, a reused buffer), so an in-place change between calls is
    followed (against the spec)."""
    from gift_kernels.ops.mixed import segments

    built = []
    real_chunks = segments._chunks
    monkeypatch.setattr(segments, "_chunks", lambda *a: built.append(1) or real_chunks(*a))
    x, phis, psis, ids = make_bank(6, 10, 3, 2, lead=(2,))  # ids (2, 6): a view of a 1-D tensor
    gift_kernels.gift_input_mixed(x, phis, psis, ids).sum().backward()
    assert len(built) == 1
    with torch.no_grad():
        ids.data.copy_((ids + 2) % 3 - 1)  # every row changes adapter; .data: no version bump
    check_mixed(gift_kernels.gift_input_mixed, x, phis, psis, ids, F32)
    assert len(built) == 2


def test_compiled_calls_never_see_another_calls_layout():
    """Inductor hands a freed intermediate's buffer (same tensor object, same version) to the
    next ids it computes: two mixed calls in one compiled graph, the second's ids computed
    inside it, match the spec (a layout cached on the ids object returned the first call's)."""
    g = torch.Generator().manual_seed(0)
    phis, psis = torch.randn(3, 16, 2, generator=g), torch.randn(3, 2, 16, generator=g)
    x, tok = torch.randn(8, 16, generator=g), torch.arange(8)

    def two_calls(x, tok):
        u = gift_kernels.gift_input_mixed(x, phis, psis, (tok * 2) % 3)
        ids2 = (tok + (u.sum() > 1e9).long()) % 3  # computed in the graph, after the first ids are dead
        return gift_kernels.gift_input_mixed(u, phis, psis, ids2)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(two_calls, backend="inductor")(x, tok)
    finally:
        torch._dynamo.reset()
    p64, s64 = phis.double(), psis.double()
    want = gift_input_mixed_ref(gift_input_mixed_ref(x.double(), p64, s64, (tok * 2) % 3), p64, s64, tok % 3)
    assert_close_to_ref(got, want, F32, "two compiled mixed calls")


def test_backward_reuses_the_layout_only_for_its_own_forward_and_then_frees_it():
    """Checkpointed (non-reentrant), the backward recomputes t from the ids' contents at that
    time: a .data rewrite in between must not meet the forward's layout (grads as the spec run
    the same way); after a plain backward the call's layout is freed."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    x0, p0, q0 = torch.randn(12, 8, generator=g), torch.randn(3, 8, 2, generator=g), torch.randn(3, 2, 8, generator=g)
    grad = torch.randn(12, 8, generator=g)
    old, new = torch.tensor([0, 1, 2, -1] * 3), torch.tensor([2, -1, 0, 0] * 3)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_(True) for t in (x0, p0, q0)]
        ids = old.clone()
        u = checkpoint(fn, *leaves, ids, use_reentrant=False)
        ids.data.copy_(new)  # no version bump
        u.backward(grad.to(dtype))
        return [t.grad for t in leaves]

    for name, got, want in zip(("x", "phis", "psis"), run(gift_kernels.gift_input_mixed, F32),
                               run(gift_input_mixed_ref, F64)):
        assert_close_to_ref(got, want, F32, f"grad of {name}")

    x, phis, psis, ids = make_bank(6, 10, 3, 2)
    u = gift_kernels.gift_input_mixed(x, phis, psis, ids)
    node = u.grad_fn
    assert node.ids_memo is not None and node.ids_memo.entries
    u.sum().backward()
    assert node.ids_memo is None
