"""The op layer's guarantees (docs/guarantees.md): higher-order gradients are exact or refused,
the rank-r path cannot overflow fp16 where the merged layer does not, the backend override is
safe across threads, odd inputs (sparse, meta, None) get clear answers."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import gift_kernels
from gift_kernels import GiftLinear, GiftTheta
from gift_kernels.ops import plan
from gift_kernels.ops import gift_linear_ref
from gift_testing import assert_close_to_ref, check_against_reference, make_inputs, reference

FORMS = ["epilogue", "input"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "train_base"])
def test_eager_second_derivatives_match_float64_dense_reference(form, train_base):
    inp = make_inputs(6, 5, 7, 3, dtype=torch.float64)
    x, w, b, phi, psi = (inp[k] for k in ("x", "weight", "bias", "phi", "psi"))
    if train_base:
        w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        args, ref_f = (x, w, b, phi, psi), gift_linear_ref

        def f(*a):
            return gift_kernels.gift_linear(*a, form=form)
    else:
        args = (x, phi, psi)

        def f(x_, phi_, psi_):
            return gift_kernels.gift_linear(x_, w, b, phi_, psi_, form=form)

        def ref_f(x_, phi_, psi_):
            return gift_linear_ref(x_, w, b, phi_, psi_)

    assert torch.autograd.gradgradcheck(f, args)
    # and the Hessian-vector products equal the dense formula's, not just a self-consistent number
    g = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad(f(*args), args, g, create_graph=True)
    ref = torch.autograd.grad(ref_f(*args), args, g, create_graph=True)
    v = [torch.randn_like(t) for t in ours]
    # (the bias enters no first derivative: its second derivative is zero, materialized)
    second = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ours, v)), args, materialize_grads=True)
    second_ref = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ref, v)), args, materialize_grads=True)
    for i, (a, c) in enumerate(zip(second, second_ref)):
        assert_close_to_ref(a, c, torch.float64, f"second derivative w.r.t. input {i}")


@pytest.mark.parametrize("form", FORMS)
def test_second_derivatives_when_only_the_base_trains(form):
    """A frozen adapter, the base layer training (x, Theta without grad): gradgradcheck on W, b."""
    inp = make_inputs(6, 5, 7, 3, dtype=torch.float64)
    x, phi, psi = (inp[k].detach() for k in ("x", "phi", "psi"))
    w, b = inp["weight"].detach().requires_grad_(True), inp["bias"].detach().requires_grad_(True)

    def f(w_, b_):
        return gift_kernels.gift_linear(x, w_, b_, phi, psi, form=form)

    assert torch.autograd.gradcheck(f, (w, b))
    assert torch.autograd.gradgradcheck(f, (w, b))


def test_registered_ops_refuse_a_second_backward_by_name():
    inp = make_inputs(5, 4, 6, 2, dtype=torch.float64)
    x, w, b, phi, psi = (inp[k] for k in ("x", "weight", "bias", "phi", "psi"))
    y = torch.ops.gift_kernels.gift_linear_fwd(x, w, b, phi, psi)[0]
    (g,) = torch.autograd.grad(y.sum(), phi, create_graph=True)
    with pytest.raises(RuntimeError, match="gift_kernels::gift_linear_bwd: higher-order gradients"):
        torch.autograd.grad(g.sum(), psi)
    u = torch.ops.gift_kernels.gift_input_fwd(x, phi, psi)[0]
    (g,) = torch.autograd.grad(u.sum(), phi, create_graph=True)
    with pytest.raises(RuntimeError, match="gift_kernels::gift_input_bwd: higher-order gradients"):
        torch.autograd.grad(g.sum(), psi)


@pytest.mark.parametrize("form", FORMS)
def test_fp16_rank_path_does_not_overflow_where_the_merged_layer_does_not(form):
    """x psi^T is ~1e5 (beyond fp16's 65504) while W phi is tiny: the merged layer's output
    is ordinary, and so must GIFT's be, in value and gradients (float32 Theta)."""
    torch.manual_seed(0)
    m, n, k, r = 9, 12, 64, 2
    x = (torch.randn(m, k) * 300).half().requires_grad_(True)
    w = (torch.randn(n, k) * k**-0.5).half()
    b = torch.randn(n).half()
    phi = (torch.randn(k, r) * 1e-5).requires_grad_(True)
    psi = (torch.ones(r, k) * 32.0).requires_grad_(True)
    assert (x.detach().float() @ psi.detach().t()).abs().max() > 65504  # t itself overflows fp16
    inputs = {"x": x, "weight": w, "bias": b, "phi": phi, "psi": psi}
    with gift_kernels.backend("torch"):
        y = gift_kernels.gift_linear(x, w, b, phi, psi, form=form)
    assert torch.isfinite(y).all()
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).half()
    y_ref, grads_ref = reference(inputs, grad_out)
    assert_close_to_ref(y, y_ref, torch.float16, "output")
    grads = torch.autograd.grad(y, [x, phi, psi], grad_out)
    for name, g in zip(("x", "phi", "psi"), grads):
        assert torch.isfinite(g).all(), name
        assert_close_to_ref(g, grads_ref[name], torch.float16, f"grad of {name}")


def test_rank_factors_are_held_in_float32_for_16_bit_x():
    inp = make_inputs(7, 5, 8, 3, dtype=torch.bfloat16, theta_dtype=torch.float32)
    x, w, b, phi, psi = (inp[k].detach() if inp[k] is not None else None for k in ("x", "weight", "bias", "phi", "psi"))
    y, t, B = torch.ops.gift_kernels.gift_linear_fwd(x, w, b, phi, psi)
    assert y.dtype == torch.bfloat16 and t.dtype == torch.float32 and B.dtype == torch.float32
    u, t = torch.ops.gift_kernels.gift_input_fwd(x, phi, psi)
    assert u.dtype == torch.bfloat16 and t.dtype == torch.float32


def test_backend_contexts_closed_out_of_order_in_two_threads():
    entered_a, entered_b, exit_a, done_a = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with gift_kernels.backend("torch"):
            entered_a.set()
            exit_a.wait(10)
        done_a.set()

    def thread_b():
        entered_a.wait(10)
        with gift_kernels.backend("auto"):
            entered_b.set()
            exit_a.set()  # A leaves first, while B's context is still open
            done_a.wait(10)
            seen["inside_b"] = plan.requested()
        seen["after_b"] = list(plan._override)

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start(), tb.start()
    ta.join(20), tb.join(20)
    assert seen["inside_b"] == "auto"  # A's exit removed A's entry, not B's
    assert seen["after_b"] == []


@pytest.mark.parametrize("bad", [None, 3, ["torch"]])
def test_backend_name_must_be_a_string(bad):
    with pytest.raises(TypeError, match=r"gift_kernels.backend\(\) must be a str"):
        with gift_kernels.backend(bad):
            pass


def test_sparse_input_is_refused_by_name():
    inp = make_inputs(4, 3, 5, 2)
    xs = inp["x"].detach().to_sparse()
    with pytest.raises(TypeError, match=r"gift_linear: x must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        gift_kernels.gift_linear(xs, inp["weight"], inp["bias"], inp["phi"], inp["psi"])
    with pytest.raises(TypeError, match="gift_input: phi must be a dense"):
        gift_kernels.gift_input(inp["x"], inp["phi"].detach().to_sparse(), inp["psi"])


def test_meta_tensors_propagate_shapes_like_f_linear():
    with torch.device("meta"):
        layer = GiftLinear.from_linear(torch.nn.Linear(16, 8), GiftTheta(16, 4))
        x = torch.empty(3, 5, 16, requires_grad=True)
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast knows no meta device: left alone
            y2 = layer(x)
    assert y.device.type == "meta" and y.shape == F.linear(x, layer.weight).shape == (3, 5, 8)
    assert y2.shape == (3, 5, 8)
    y.sum().backward()
    assert layer.theta.psi.grad.shape == (4, 16) and layer.theta.psi.grad.device.type == "meta"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_both_forms_with_float32_theta_stay_within_the_dtype_tolerance(dtype, form):
    inp = make_inputs(11, 9, 13, 4, dtype=dtype, theta_dtype=torch.float32)
    check_against_reference(lambda *a: gift_kernels.gift_linear(*a, form=form), inp, compute_dtype=dtype)
