"""gift_linear (torch backend) against the float64 reference: forward, every gradient,
odd shapes, dtypes, layouts, gradcheck, and what autograd keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gift_kernels import gift_linear
from gift_kernels.ops.linear import torch as torch_gift
from gift_testing import TOL, check_against_reference, make_inputs, rel_err
from gift_kernels.ops import gift_linear_ref

SHAPES = [  # (M, d_out, d_in, r)
    (1, 1, 1, 1),
    (37, 130, 77, 1),
    (5, 7, 3, 4),
    (64, 96, 200, 16),
    (130, 33, 64, 64),
]
SHAPE_IDS = [f"M{m}-N{n}-K{k}-r{r}" for m, n, k, r in SHAPES]

DTYPES = [  # (activation/weight dtype, Theta dtype)
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
DTYPE_IDS = [f"{str(a)[6:]}-theta_{str(b)[6:]}" for a, b in DTYPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(shape, dtypes, bias):
    dtype, theta_dtype = dtypes
    inputs = make_inputs(*shape, dtype=dtype, theta_dtype=theta_dtype, bias=bias)
    check_against_reference(gift_linear, inputs, compute_dtype=dtype)


def gift_linear_via_op(x, weight, bias, phi, psi):
    """The registered op with its registered autograd (what torch.compile and other libraries use)."""
    y = torch.ops.gift_kernels.gift_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, phi, psi)[0]
    return y.view(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=SHAPE_IDS[1:4])
@pytest.mark.parametrize("dtypes", DTYPES[1:3], ids=DTYPE_IDS[1:3])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable"])
def test_registered_op_autograd_matches_reference(shape, dtypes, train_base):
    dtype, theta_dtype = dtypes
    inputs = make_inputs(*shape, dtype=dtype, theta_dtype=theta_dtype, train_base=train_base, lead=(2,))
    check_against_reference(gift_linear_via_op, inputs, compute_dtype=dtype)


def test_registered_op_gradcheck_float64():
    inputs = make_inputs(6, 5, 7, 3, dtype=torch.float64, train_base=True)
    args = tuple(inputs[n] for n in ("x", "weight", "bias", "phi", "psi"))
    assert torch.autograd.gradcheck(gift_linear_via_op, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_trainable_weight_and_bias_grads(dtype):
    inputs = make_inputs(19, 23, 29, 3, dtype=dtype, train_base=True)
    check_against_reference(gift_linear, inputs, compute_dtype=dtype)


@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["3d", "4d"])
def test_leading_dims(lead):
    inputs = make_inputs(11, 17, 13, 2, lead=lead)
    y = gift_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
    assert y.shape == (*lead, 11, 17)
    check_against_reference(gift_linear, inputs, compute_dtype=torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced_3d"])
def test_non_contiguous_x(layout):
    inputs = make_inputs(24, 10, 12, 3)
    base = inputs["x"].detach()
    if layout == "transposed":  # (K, M) storage viewed as (M, K)
        x = base.t().contiguous().t()
    elif layout == "strided":  # every other row of a taller matrix
        x = torch.cat([base, base], dim=1)[:, ::2]
    else:  # a slice of a 3-D tensor along the last dim
        x = torch.cat([base, base], dim=-1).view(2, 12, 24)[..., :12]
    assert not x.is_contiguous()
    inputs["x"] = x.detach().requires_grad_(True)
    check_against_reference(gift_linear, inputs, compute_dtype=torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(bias):
    inputs = make_inputs(6, 5, 7, 3, dtype=torch.float64, bias=bias, train_base=True)
    args = tuple(inputs[n] for n in ("x", "weight", "bias", "phi", "psi"))
    assert torch.autograd.gradcheck(gift_linear, args, eps=1e-6, atol=1e-8)


def test_empty_batch_returns_empty_and_zero_grads():
    inputs = make_inputs(0, 6, 5, 2, train_base=True)
    y = gift_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
    assert y.shape == (0, 6)
    y.sum().backward()
    assert inputs["x"].grad.shape == (0, 5)
    for name in ("weight", "bias", "phi", "psi"):
        grad = inputs[name].grad
        assert grad is not None and grad.shape == inputs[name].shape
        assert torch.count_nonzero(grad) == 0, f"grad of {name} should be zero for an empty batch"


@pytest.mark.parametrize("shape", [(16, 96, 80, 8), (3, 5, 7, 2), (200, 2, 64, 4), (1, 33, 17, 1)],
                         ids=["decode-prologue", "small", "narrow-epilogue", "M1"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_inference_path_matches_reference(shape, dtypes):
    """Under no_grad (and with nothing requiring grad) the backend may re-associate."""
    dtype, theta_dtype = dtypes
    inputs = make_inputs(*shape, dtype=dtype, theta_dtype=theta_dtype, lead=(2,))
    args = [inputs[n] for n in ("x", "weight", "bias", "phi", "psi")]
    with torch.no_grad():
        y = gift_linear(*args)
    assert y.dtype == dtype and not y.requires_grad
    ref = gift_linear_ref(*args).detach()
    assert rel_err(y, ref) <= TOL[dtype]
    frozen = [a.detach() for a in args]  # nothing requires grad, grad mode on
    assert rel_err(gift_linear(*frozen), ref) <= TOL[dtype]


def test_inference_at_decode_size_skips_B():
    """M = r: the no-grad path's FLOPs are the frozen GEMM's plus 4MKr (no 2NKr for B = W phi)."""
    m, n, k, r = 16, 256, 384, 16
    inputs = make_inputs(m, n, k, r)
    x, w, b, phi, psi = (inputs[k_].detach() for k_ in ("x", "weight", "bias", "phi", "psi"))
    assert _mm_flops(lambda: gift_linear(x, w, b, phi, psi)) == 2 * m * n * k + 4 * m * k * r


def test_zero_d_in_gives_the_bias():
    x, w, b = torch.randn(2, 4, 0), torch.randn(3, 0), torch.randn(3)
    phi, psi = torch.randn(0, 2), torch.randn(2, 0)
    y = gift_linear(x, w, b, phi, psi)
    assert y.shape == (2, 4, 3)
    assert torch.equal(y, b.expand(2, 4, 3))


def test_zero_psi_is_the_frozen_layer_exactly():
    inputs = make_inputs(33, 21, 17, 4)
    with torch.no_grad():
        inputs["psi"].zero_()
    y = gift_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
    assert torch.equal(y, F.linear(inputs["x"], inputs["weight"], inputs["bias"]))


def test_shared_theta_grads_are_the_sum_over_layers():
    k, r = 20, 4
    shared = make_inputs(8, 12, k, r, seed=1)
    phi, psi = shared["phi"], shared["psi"]
    layers = [make_inputs(8, n, k, r, seed=s) for s, n in ((2, 12), (3, 9), (4, 31))]

    loss = sum(gift_linear(l["x"], l["weight"], l["bias"], phi, psi).square().sum() for l in layers)
    loss.backward()
    expected_phi = torch.zeros_like(phi)
    expected_psi = torch.zeros_like(psi)
    for l in layers:
        p = phi.detach().double().requires_grad_(True)
        q = psi.detach().double().requires_grad_(True)
        out = gift_linear_ref(l["x"].detach(), l["weight"], l["bias"], p, q).square().sum()
        gp, gq = torch.autograd.grad(out, (p, q))
        expected_phi += gp.float()
        expected_psi += gq.float()
    assert rel_err(phi.grad, expected_phi) <= TOL[torch.float32]
    assert rel_err(psi.grad, expected_psi) <= TOL[torch.float32]


def _saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_autograd_saves_only_x_t_B_and_parameters():
    m, n, k, r = 96, 80, 64, 8
    inputs = make_inputs(m, n, k, r)
    x, w, b, phi, psi = (inputs[k_] for k_ in ("x", "weight", "bias", "phi", "psi"))
    _, saved = _saved_tensors(lambda: gift_linear(x, w, b, phi, psi, form="epilogue"))
    params = {p.untyped_storage().data_ptr() for p in (w, b, phi, psi)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    shapes = sorted(tuple(t.shape) for t in extra)
    # x itself (a view, no copy), t = x psi^T and B = W phi
    assert shapes == sorted([(m, k), (m, r), (n, r)]), shapes
    x_saved = [t for t in extra if tuple(t.shape) == (m, k)][0]
    assert x_saved.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), "x was copied"


def test_input_form_saves_only_x_and_t_beyond_the_base_layer():
    """The input-side form keeps x and t = x psi^T; F.linear over a frozen W keeps only W."""
    m, n, k, r = 96, 80, 64, 8
    inputs = make_inputs(m, n, k, r)
    x, w, b, phi, psi = (inputs[k_] for k_ in ("x", "weight", "bias", "phi", "psi"))
    _, saved = _saved_tensors(lambda: gift_linear(x, w, b, phi, psi, form="input"))
    params = {p.untyped_storage().data_ptr() for p in (w, b, phi, psi)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert sorted(tuple(t.shape) for t in extra) == sorted([(m, k), (m, r)])
    x_saved = [t for t in extra if tuple(t.shape) == (m, k)][0]
    assert x_saved.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), "x was copied"


@pytest.mark.parametrize("trains", ["all", "weight", "bias"])
def test_input_form_keeps_only_what_the_wanted_grads_need(trains):
    """As the two-node graph (the op, then F.linear on u) would: x and t when x or Theta wants a
    grad, u when W trains (dW = g^T u), nothing for a bias alone; every grad against float64."""
    m, n, k, r = 96, 80, 64, 8
    inputs = make_inputs(m, n, k, r, train_base=True)
    if trains != "all":  # a frozen adapter: only the base (or its bias) trains
        for name in ("x", "phi", "psi", "weight", "bias"):
            inputs[name] = inputs[name].detach().requires_grad_(name == trains)
    x, w, b, phi, psi = (inputs[k_] for k_ in ("x", "weight", "bias", "phi", "psi"))
    y, saved = _saved_tensors(lambda: gift_linear(x, w, b, phi, psi, form="input"))
    params = {p.untyped_storage().data_ptr() for p in (w, b, phi, psi)}
    extra = sorted(tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in params)
    want = {"all": [(m, k), (m, k), (m, r)], "weight": [(m, k)], "bias": []}[trains]
    assert extra == sorted(want)
    if trains == "all":
        assert sum(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved) == 1
    check_against_reference(lambda *a: gift_linear(*a, form="input"), inputs, compute_dtype=torch.float32)


class _MatmulFlops(TorchDispatchMode):
    """Counts 2*m*n*k for every (add)mm, in-place variants included (FlopCounterMode skips addmm_)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def _mm_flops(fn) -> int:
    with _MatmulFlops() as counter:
        fn()
    return counter.flops


def test_torch_backend_adds_no_dense_delta_or_second_gemm():
    """The torch backend's FLOPs are the frozen layer's plus the skinny products only."""
    m, n, k, r = 512, 256, 384, 16
    inputs = make_inputs(m, n, k, r, train_base=False)
    x, w, b, phi, psi = (inputs[k_].detach() for k_ in ("x", "weight", "bias", "phi", "psi"))
    # t = x psi^T, B = W phi, y += t B^T
    fwd = _mm_flops(lambda: torch_gift.gift_fwd(x, w, b, phi, psi))
    assert fwd == 2 * m * n * k + 2 * r * (m * k + n * k + m * n)
    y, t, B = torch_gift.gift_fwd(x, w, b, phi, psi)
    g = torch.randn_like(y)
    bwd = _mm_flops(lambda: torch_gift.gift_bwd(g, x, t, B, w, phi, psi, (True, False, False, True, True)))
    # dx = g W + (g B) psi, dpsi = dt^T x, dphi = W^T (g^T t)
    assert bwd == 2 * m * n * k + 2 * r * (m * n + m * k + m * k + m * n + n * k)


@pytest.mark.parametrize("form", ["epilogue", "input"])
@pytest.mark.parametrize("shape", [(5, 40, 24, 3), (50, 12, 30, 4), (1, 9, 7, 2)], ids=lambda s: "M{}-N{}-K{}-r{}".format(*s))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32), (torch.float64, torch.float64)],
                         ids=["f32", "bf16-theta32", "f16-theta32", "f64"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "train_base"])
def test_each_form_explicitly_every_gradient(form, shape, dtypes, train_base):
    """Both forms asked for by name, M below and above d_out (the epilogue backward takes dphi
    from g W when M < d_out, from W^T dB otherwise), against the float64 spec."""
    dtype, theta = dtypes
    inputs = make_inputs(*shape, dtype=dtype, theta_dtype=theta, train_base=train_base)
    check_against_reference(lambda *a: gift_linear(*a, form=form), inputs, compute_dtype=dtype)


def _graph_nodes(y):
    """The names of every node of y's autograd graph (walked from y.grad_fn)."""
    seen, stack, names = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


@pytest.mark.parametrize("form", ["epilogue", "input"])
def test_leading_dims_add_no_node_to_the_graph(form):
    """x (2, 5, K): the op flattens inside its autograd Function, so the graph holds one node
    (the input side's base GEMM inside it) and the leaves, nothing more (each reshape, view
    or separate GEMM node costs host time on every call)."""
    inputs = make_inputs(5, 6, 7, 2, lead=(2,))
    x, w, b, phi, psi = (inputs[n] for n in ("x", "weight", "bias", "phi", "psi"))
    y = gift_linear(x, w, b, phi, psi, form=form)
    op = "GiftInputLinearFunctionBackward" if form == "input" else "GiftLinearFunctionBackward"
    assert _graph_nodes(y) == sorted([op, "AccumulateGrad", "AccumulateGrad", "AccumulateGrad"])


@pytest.mark.parametrize("form", ["epilogue", "input"])
@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_the_output_can_be_modified_in_place(form, lead):
    """``y += residual`` on the op's output (not a view created inside a custom Function, which
    autograd would refuse to modify), with every grad still the float64 reference's."""
    inputs = make_inputs(5, 6, 7, 2, lead=lead)

    def with_residual(x, w, b, phi, psi):
        y = gift_linear(x, w, b, phi, psi, form=form)
        y += 1.0
        return y

    def ref(x, w, b, phi, psi):
        return gift_linear_ref(x, w, b, phi, psi) + 1.0

    y = with_residual(*(inputs[n] for n in ("x", "weight", "bias", "phi", "psi")))
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want_in = [inputs[n].detach().double().requires_grad_(True) for n in ("x", "phi", "psi")]
    want = ref(want_in[0], inputs["weight"].double(), inputs["bias"].double(), *want_in[1:])
    assert rel_err(y, want) <= TOL[torch.float32]
    got = torch.autograd.grad(y, [inputs[n] for n in ("x", "phi", "psi")], grad.float())
    for name, g, w in zip(("x", "phi", "psi"), got, torch.autograd.grad(want, want_in, grad)):
        assert rel_err(g, w) <= TOL[torch.float32], name
