"""torch.compile of GIFT-adapted models without graph breaks, and opcheck of the registered ops.

``gift_linear`` calls the registered ``torch.ops.gift_kernels.gift_linear_fwd`` when Dynamo
traces it (its fake impl gives shapes, its registered autograd calls ``gift_linear_bwd``), so
``fullgraph=True`` must hold: it raises on any graph break. Inductor compiles (C++ on CPU) are
the slow part, so one transformer block goes through inductor and the whole model through
``aot_eager`` (the same Dynamo + AOTAutograd tracing, without code generation).
"""

from __future__ import annotations

import pytest
import torch

import gift_kernels
from gift_testing import make_inputs
from tiny_transformer import intra_op_threads, lm_loss, make_batch, make_model, theta_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield

# inductor reorders and fuses float32 reductions (layer norm, softmax, the Theta grad sums)
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block_inputs(seed=0):
    model = make_model(seed)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(2, 7, 32, generator=g, requires_grad=True)  # odd sequence length
    grad_out = torch.randn(2, 7, 32, generator=g)
    return model, block, x, grad_out


def _run(fn, model, x, grad_out):
    """``fn(x)`` forward and backward; the Theta grads, read from ``model``'s adapter store (the
    block's layers hold its Thetas by reference, not as parameters of their own)."""
    x = x.detach().clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = fn(x)
    y.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in theta_params(model).items()}
    return y.detach(), x.grad, grads


def test_block_has_no_graph_break():
    _, block, x, _ = _block_inputs()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the adapted projections reach the graph as the registered ops (the epilogue or the
    # input-side form, whichever the cost rule picks), six of them
    ops = torch.ops.gift_kernels
    gift_op = (ops.gift_linear_fwd, ops.gift_linear_fwd.default, ops.gift_input_fwd, ops.gift_input_fwd.default)
    calls = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(t in gift_op for t in calls) == 6, calls


def test_block_inductor_fullgraph_matches_eager():
    model, block, x, grad_out = _block_inputs()
    y_ref, dx_ref, grads_ref = _run(block, model, x, grad_out)
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    y, dx, grads = _run(compiled, model, x, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dx, dx_ref, rtol=RTOL, atol=ATOL)
    assert grads.keys() == grads_ref.keys() and len(grads) == 12  # phi and psi of q/k/v/o/up/down
    for name in grads_ref:
        assert grads_ref[name].abs().max() > 0, f"vacuous: eager grad of {name} is zero"
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_whole_model_fullgraph_matches_eager_with_shared_theta():
    # every block adds into the same Theta grads: the compiled backward must sum them all
    model = make_model(3)
    ids, targets = make_batch(3, seq=9, seed=4)
    loss_ref = lm_loss(model, ids, targets)
    grads_ref = torch.autograd.grad(loss_ref, list(theta_params(model).values()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = lm_loss(compiled, ids, targets)
    grads = torch.autograd.grad(loss, list(theta_params(model).values()))
    torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=ATOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


def test_compiled_graph_follows_the_backend_choice():
    # the backend is picked inside the op at run time: one graph, no recompile on a switch
    import torch._dynamo.testing  # a submodule: not imported by torch itself (the test passed only after others)

    _, block, x, _ = _block_inputs()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    with gift_kernels.backend("torch"):
        y1 = compiled(x)
    y2 = compiled(x)
    assert counter.frame_count == 1
    torch.testing.assert_close(y1, y2)


# ---------------------------------------------------------------------------- opcheck

OPCHECK_CASES = [
    # (m, n, k, r, dtype, theta_dtype, bias)
    (5, 7, 11, 3, torch.float32, None, True),
    (5, 7, 11, 3, torch.float32, None, False),
    (1, 16, 8, 1, torch.float64, None, True),
    (13, 9, 24, 4, torch.bfloat16, torch.float32, True),
    (13, 9, 24, 4, torch.float16, torch.float32, False),
]


def _case_id(case):
    m, n, k, r, dtype, theta_dtype, bias = case
    td = "" if theta_dtype is None else f"-theta_{str(theta_dtype)[6:]}"
    return f"{m}x{n}x{k}-r{r}-{str(dtype)[6:]}{td}-{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_id)
def test_opcheck_fwd(case):
    m, n, k, r, dtype, theta_dtype, bias = case
    inp = make_inputs(m, n, k, r, dtype=dtype, theta_dtype=theta_dtype, bias=bias, train_base=True)
    args = (inp["x"], inp["weight"], inp["bias"], inp["phi"], inp["psi"])
    with gift_kernels.backend("torch"):
        torch.library.opcheck(torch.ops.gift_kernels.gift_linear_fwd.default, args)


BWD_NEEDS = {"theta+x": (True, False, False, True, True), "all": (True, True, True, True, True), "psi": (False, False, False, False, True)}
BWD_CASES = [
    pytest.param(case, needs, id=f"{_case_id(case)}-{name}")
    for case in OPCHECK_CASES
    for name, needs in BWD_NEEDS.items()
    if case[-1] or not needs[2]  # a bias grad only where there is a bias
]


@pytest.mark.parametrize("case, needs", BWD_CASES)
def test_opcheck_bwd(case, needs):
    m, n, k, r, dtype, theta_dtype, bias = case
    inp = make_inputs(m, n, k, r, dtype=dtype, theta_dtype=theta_dtype, bias=bias)
    x, w, phi, psi = (inp[n].detach() for n in ("x", "weight", "phi", "psi"))
    with gift_kernels.backend("torch"):
        _, t, B = torch.ops.gift_kernels.gift_linear_fwd(x, w, inp["bias"], phi, psi)
        grad_y = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(dtype)
        args = (grad_y, x, t, B, w, phi, psi, list(needs))
        torch.library.opcheck(torch.ops.gift_kernels.gift_linear_bwd.default, args)
