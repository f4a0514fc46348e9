"""torch.autocast with GIFT: float32 base weights and float32 Theta, compute in bfloat16.

What a user expects, as with ``nn.Linear`` under autocast: the output in the autocast dtype,
the GEMMs in that dtype (no silent float32 upcast), and every grad in its parameter's own
dtype -- float32 Theta grads, float32 master Theta. A registered op is opaque to autocast,
so ``gift_kernels.ops.functional._autocast`` casts x, W, b before the op; Theta is cast inside
the kernels. These tests check the launcher receives bf16 tensors (the Triton/CUDA backends
have no autocast of their own) and that every GEMM the profiler records runs in bf16.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gift_kernels
from gift_kernels import GiftLinear, GiftTheta, gift_linear
from gift_kernels.adapters import GiftConfig, apply_gift
from gift_kernels.ops import plan
from gift_kernels.ops.linear import torch as torch_gift
from gift_testing import TOL, assert_close_to_ref, make_inputs, reference
from tiny_transformer import intra_op_threads, lm_loss, make_batch, make_model, theta_params

BF16 = torch.bfloat16
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _gift_layer(d_in=24, d_out=20, rank=4, bias=True, seed=0, form="auto"):
    torch.manual_seed(seed)
    theta = GiftTheta(d_in, rank)
    with torch.no_grad():
        theta.psi.normal_(0, d_in**-0.5)  # non-zero, so phi's grad is too
    return GiftLinear.from_linear(nn.Linear(d_in, d_out, bias=bias), theta, form=form)


def _gemm_events(fn, tmp_path):
    """(name, input dims, input types) of every GEMM-like aten op ``fn`` runs, from the
    profiler's chrome trace (forward and backward; nested dispatches included)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return [
        (e["name"], e["args"].get("Input Dims"), e["args"].get("Input type"))
        for e in events
        if e.get("name") in GEMMS
    ]


class _LauncherSpy:
    """Records the dtypes the torch backend's launchers receive."""

    def __init__(self, monkeypatch):
        self.fwd, self.bwd = [], []
        fwd, bwd = torch_gift.gift_fwd, torch_gift.gift_bwd

        def spy_fwd(x, weight, bias, phi, psi):
            self.fwd.append({"x": x.dtype, "weight": weight.dtype, "bias": None if bias is None else bias.dtype,
                             "phi": phi.dtype, "psi": psi.dtype})  # fmt: skip
            return fwd(x, weight, bias, phi, psi)

        def spy_bwd(grad_y, x, t, B, weight, phi, psi, needs):
            self.bwd.append({"grad_y": grad_y.dtype, "x": x.dtype, "weight": weight.dtype})
            return bwd(grad_y, x, t, B, weight, phi, psi, needs)

        monkeypatch.setattr(torch_gift, "gift_fwd", spy_fwd)
        monkeypatch.setattr(torch_gift, "gift_bwd", spy_bwd)
        monkeypatch.setattr(plan, "_plans", {})  # plans hold their launchers: decide again, with the spies
        monkeypatch.setattr(plan, "_validated", {})  # (and the validated calls, which hold plans too)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cpu_bf16_dtypes_and_launcher_inputs(bias, monkeypatch):
    layer = _gift_layer(bias=bias, form="epilogue")
    spy = _LauncherSpy(monkeypatch)
    x = torch.randn(3, 5, 24, requires_grad=True)
    with gift_kernels.backend("torch"), torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    with gift_kernels.backend("torch"):
        y.float().sum().backward()
    assert layer.weight.dtype == torch.float32 and layer.theta.phi.dtype == torch.float32, "autocast changed a parameter"
    assert layer.theta.phi.grad.dtype == torch.float32 and layer.theta.psi.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32  # autograd undoes the cast of x
    assert layer.weight.grad is None
    # the base GEMM's operands reach the kernel in bf16; Theta stays float32 (the kernel casts it)
    assert spy.fwd == [{"x": BF16, "weight": BF16, "bias": BF16 if bias else None, "phi": torch.float32,
                        "psi": torch.float32}]  # fmt: skip
    assert spy.bwd == [{"grad_y": BF16, "x": BF16, "weight": BF16}]


def test_cpu_bf16_every_gemm_runs_in_bf16(tmp_path):
    layer = _gift_layer()
    x = torch.randn(15, 24, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=BF16):
            y = layer(x)
        y.float().sum().backward()

    events = _gemm_events(step, tmp_path)
    # base forward x W^T (15x24 @ 24x20) and the input-grad g W (15x20 @ 20x24) are there
    dims = [d for _, d, _ in events]
    assert any(d[1:3] == [[15, 24], [24, 20]] for d in dims), dims
    assert any(d[:2] == [[15, 20], [20, 24]] for d in dims), dims
    not_bf16 = [(n, d, t) for n, d, t in events if any(tt != "c10::BFloat16" for tt in t if tt != "Scalar")]
    assert not not_bf16, f"GEMMs not in bf16 under autocast: {not_bf16}"


def test_cpu_bf16_values_match_an_explicit_bf16_call_and_the_reference():
    inp = make_inputs(17, 20, 24, 4, dtype=torch.float32)  # float32 x, W, b, Theta
    with torch.autocast("cpu", dtype=BF16):
        y = gift_linear(inp["x"], inp["weight"], inp["bias"], inp["phi"], inp["psi"])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(BF16)
    grads = torch.autograd.grad(y, [inp["phi"], inp["psi"], inp["x"]], grad_out)

    # the same call with x, W, b cast by hand and float32 Theta: bit for bit
    xb = inp["x"].detach().to(BF16).requires_grad_(True)
    y_hand = gift_linear(xb, inp["weight"].to(BF16), inp["bias"].to(BF16), inp["phi"], inp["psi"])
    grads_hand = torch.autograd.grad(y_hand, [inp["phi"], inp["psi"], xb], grad_out)
    assert torch.equal(y, y_hand)
    for g, g_hand in zip(grads, grads_hand):
        assert torch.equal(g, g_hand.to(g.dtype))

    # and within bf16 rounding of the float64 reference (on the bf16-rounded inputs)
    ref_in = {k: (None if v is None else v.detach().to(BF16).to(torch.float32)) for k, v in inp.items()}
    for k in ("phi", "psi"):
        ref_in[k] = inp[k].detach()
    for k in ("x", "phi", "psi"):
        ref_in[k].requires_grad_(True)
    y_ref, grads_ref = reference(ref_in, grad_out)
    assert_close_to_ref(y, y_ref, BF16, "output")
    for name, g in zip(("phi", "psi", "x"), grads):
        assert_close_to_ref(g, grads_ref[name], BF16, f"grad of {name}")


def test_cpu_bf16_at_init_equals_nn_linear_under_autocast():
    # psi = 0 at init: the adapted layer must give what the frozen nn.Linear gives under autocast
    torch.manual_seed(0)
    linear = nn.Linear(24, 20)
    layer = GiftLinear.from_linear(linear, GiftTheta(24, 4))
    x = torch.randn(9, 24)
    with torch.autocast("cpu", dtype=BF16):
        y, y_linear = layer(x), linear(x)
    assert y.dtype == y_linear.dtype == BF16
    assert torch.equal(y, y_linear)


def test_cpu_bf16_through_a_model_with_stacked_chunks(tmp_path):
    # apply_gift's stacked GiftLinear (one Theta per row chunk) takes the same path
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.out = nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)

    torch.manual_seed(0)
    model = apply_gift(Attn(), GiftConfig(rank=4, target_modules=["qkv", "out"], stacked={"qkv": 3}, theta_dtype="float32"))
    x = torch.randn(2, 7, 16)

    def step():
        with torch.autocast("cpu", dtype=BF16):
            y = model(x)
        assert y.dtype == BF16
        y.float().sum().backward()

    events = _gemm_events(step, tmp_path)
    not_bf16 = [(n, d, t) for n, d, t in events if any(tt != "c10::BFloat16" for tt in t if tt != "Scalar")]
    assert not not_bf16, f"GEMMs not in bf16 under autocast: {not_bf16}"
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads.values()), grads


def test_cpu_bf16_training_step_of_a_transformer():
    # a whole adapted model: bf16 logits, float32 loss and Theta grads close to a float32 run
    model = make_model()
    ids, targets = make_batch(4, seq=8)
    params = theta_params(model)
    grads32 = torch.autograd.grad(lm_loss(model, ids, targets), list(params.values()))
    with torch.autocast("cpu", dtype=BF16):
        logits = model(ids)
        loss = lm_loss(model, ids, targets)
    assert logits.dtype == BF16 and loss.dtype == torch.float32
    grads16 = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g16, g32 in zip(params.items(), grads16, grads32):
        assert g16.dtype == torch.float32, name
        # bf16 activations through a 2-block model: a few bf16 ulps of the largest grad
        err = (g16 - g32).abs().max() / g32.abs().max()
        assert err < 4 * TOL[BF16], f"{name}: bf16 grads differ from float32 by {err:.2e} (relative to max)"


def test_cpu_bf16_compiled_matches_eager():
    # Dynamo traces the autocast context and the cast in functional._autocast: no graph break
    model = make_model()
    block = model.blocks[0]
    x = torch.randn(2, 7, 32)

    def fwd(t):
        with torch.autocast("cpu", dtype=BF16):
            return block(t), block.q(t)  # (float32 residual stream + bf16 branches, a bf16 GIFT output)

    torch._dynamo.reset()
    try:
        out, q = torch.compile(fwd, fullgraph=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()
    out_eager, q_eager = fwd(x)
    assert q.dtype == q_eager.dtype == BF16
    assert out.dtype == out_eager.dtype
    assert torch.equal(q, q_eager)
    torch.testing.assert_close(out, out_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "auto"])
def test_cuda_bf16_dtypes_and_values(backend):
    ok, why = gift_kernels.ops.plan.supports(backend, torch.device("cuda")) if backend != "auto" else (True, "")
    if not ok:
        pytest.skip(f"backend {backend} unavailable on cuda: {why}")
    layer = _gift_layer(d_in=64, d_out=48, rank=8).cuda()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    with gift_kernels.backend(backend), torch.autocast("cuda", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    with gift_kernels.backend(backend):
        y.float().sum().backward()
    assert layer.theta.phi.grad.dtype == torch.float32 and layer.theta.psi.grad.dtype == torch.float32
    with gift_kernels.backend("torch"):
        y_hand = gift_linear(x.detach().to(BF16), layer.weight.to(BF16), layer.bias.to(BF16), layer.phi, layer.psi)
    torch.testing.assert_close(y, y_hand, rtol=2 * TOL[BF16], atol=2 * TOL[BF16] * y_hand.abs().max().item())
