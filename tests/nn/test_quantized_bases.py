"""GIFT over quantized base layers run as black boxes: bitsandbytes Linear8bitLt and Linear4bit
(NF4, FP4), torchao-quantized nn.Linear (Int8WeightOnly, IntxWeightOnly int4, NF4).

Every kind against a float64 reference built from the base's own dequantized weight (forward
and the grads of x, phi, psi and the projection biases), the memory GIFT adds to what the base
saves, stacked row chunks, merge (lossy, warned, measured) / unmerge (exact) / export, state
dict, deepcopy, the clustering head, and the refusals."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gift_kernels import GiftLinear, GiftTheta, GiftThetaWithBias
from gift_kernels.interpret import cluster_head, record_cluster_scores
from gift_kernels.nn import bases
from gift_kernels.nn.bases import LossyMergeWarning
from gift_testing import TOL, rel_err
from quantized_bases import (BNB_CPU_PATHS, KINDS, PACKABLE_SHAPE, bnb_4bit_is_packed, force_bnb_cpu_path,
                             gift_reference, graph_storage_bytes, make_base, module_tensors, same_state, torchao)

ALL = list(KINDS)
R = 4


def theta(d_in, *, biased=False, seed=1, rank=R):
    torch.manual_seed(seed)
    if biased:
        return GiftThetaWithBias(d_in, rank, init_weights=False)
    return GiftTheta(d_in, rank, init_weights=False)


def adapted(kind, *, biased=False, splits=None, form="auto", seed=0):
    base, lin = make_base(kind, seed=seed)
    d_in, d_out = KINDS[kind].shape
    n = 1 if splits is None else len(splits)
    thetas = [theta(d_in, biased=biased, seed=seed + 1 + i) for i in range(n)]
    layer = GiftLinear.from_module(base, thetas, splits, form=form)
    return layer, base, thetas


def x_of(kind, *lead, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, KINDS[kind].shape[0], generator=g)


def check_against_reference(layer, base, thetas, x, splits=None, *, out_tol=TOL[torch.float32]):
    d_out = layer.out_features
    bounds, start = [], 0
    for size in (splits or [d_out]):
        bounds.append((start, start + size))
        start += size
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    w = bases.dense_weight(base, "test")
    y_ref, grads_ref = gift_reference(x, w, getattr(base, "bias", None),
                                      [(t, a, b) for t, (a, b) in zip(thetas, bounds)], grad_out=g)
    params = [p for t in thetas for _, p in t.named_parameters()]
    names = ["x"] + [f"theta{i}.{n}" for i, t in enumerate(thetas) for n, _ in t.named_parameters()]
    grads = torch.autograd.grad(y, [x] + params, g)
    assert y.dtype == x.dtype
    err = rel_err(y, y_ref)
    assert err <= out_tol, f"output: relative error {err:.2e} > {out_tol:.1e}"
    for name, got, ref in zip(names, grads, grads_ref):
        err = rel_err(got, ref)
        assert err <= TOL[torch.float32], f"grad of {name}: relative error {err:.2e} > {TOL[torch.float32]:.1e}"


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ALL)
def test_forward_and_every_grad_match_the_dequantized_reference(kind):
    layer, base, thetas = adapted(kind, biased=True)
    layer.train()  # bitsandbytes 8-bit: the training path multiplies by the dequantized weight
    check_against_reference(layer, base, thetas, x_of(kind, 2, 5))


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-int8"])
def test_from_linear_and_non_contiguous_input(kind):
    base, _ = make_base(kind)
    t = theta(KINDS[kind].shape[0])
    layer = GiftLinear.from_linear(base, t)
    assert layer.has_module_base and layer.base_layer is base
    assert layer.weight is base.weight and layer.bias is base.bias  # .weight / .bias are the base's
    x = x_of(kind, 6, 3).transpose(0, 1)  # (3, 6, d_in), not contiguous
    check_against_reference(layer, base, [t], x)


def test_bnb_int8_eval_mode_quantizes_activations_but_grads_are_exact():
    # eval(): bitsandbytes' MatMul8bitLt multiplies int8 activations (measured: forward 7.4e-3
    # relative to the dequantized weight); its input gradient uses the dequantized weight
    layer, base, thetas = adapted("bnb-int8")
    layer.eval()
    check_against_reference(layer, base, thetas, x_of("bnb-int8", 9), out_tol=2e-2)


def test_starts_at_the_base_layer():
    base, _ = make_base("bnb-nf4")
    layer = GiftLinear.from_linear(base, GiftTheta(base.in_features, R))  # psi = 0: W_hat = W
    x = x_of("bnb-nf4", 4)
    assert torch.equal(layer(x), base(x))


def test_bf16_compute_4bit_base_with_float32_theta():
    from quantized_bases import bnb_4bit

    lin = nn.Linear(24, 10)
    q = bnb_4bit("nf4", compute_dtype=torch.bfloat16)(lin)
    t = theta(24)
    layer = GiftLinear.from_linear(q, t)
    x = torch.randn(3, 24, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y_ref, grads_ref = gift_reference(x, bases.dense_weight(q, "t"), q.bias, [(t, 0, 10)], grad_out=g)
    assert rel_err(y, y_ref) <= TOL[torch.bfloat16]
    gx, gphi = torch.autograd.grad(y, [x, t.phi], g)
    assert gphi.dtype == torch.float32  # Theta's grads in Theta's dtype
    assert rel_err(gx, grads_ref[0]) <= TOL[torch.bfloat16] and rel_err(gphi, grads_ref[1]) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("form", ["input", "auto", "epilogue"])
@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-int4"])
def test_stacked_row_chunks(kind, form):
    d_out = KINDS[kind].shape[1]
    splits = [10, d_out - 22, 12]
    layer, base, thetas = adapted(kind, splits=splits, form=form, biased=(form == "auto"))
    calls = []
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    check_against_reference(layer, base, thetas, x_of(kind, 2, 4), splits)
    handle.remove()
    # the input-side form runs the base once per chunk; the epilogue form (auto with several
    # chunks) once, adding each chunk's (x psi^T)(W_c phi)^T from the dequantized weight
    assert len(calls) == (3 if form == "input" else 1)


def test_epilogue_needs_a_dequantize():
    base = Affine(12, 5)
    with pytest.raises(ValueError, match="form='epilogue' needs the base's weight"):
        GiftLinear.from_module(base, [theta(12)], form="epilogue")
    layer = GiftLinear.from_module(base, [theta(12), theta(12, seed=2)], [2, 3])  # auto: one call per chunk
    x = torch.randn(3, 12)
    w = base.w.detach()
    ref = torch.cat([x @ (w[a:b] @ (torch.eye(12) + t.phi @ t.psi)).t() for t, (a, b) in
                     zip(layer.chunk_thetas, [(0, 2), (2, 5)])], -1)
    assert rel_err(layer(x), ref) <= TOL[torch.float32]


# ----------------------------------------------------------------------------- memory


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("kind", ALL)
def test_saved_for_backward_gift_adds_x_and_t_only(kind):
    """What GIFT's own ops save (seen by saved_tensors_hooks) beyond what the base saves on its
    own: x (the caller's tensor, no copy), t = x psi^T (M x r), and Theta's own parameters."""
    layer, base, (t,) = adapted(kind)
    layer.train()
    m = 11
    x = x_of(kind, m).requires_grad_(True)
    _, by_base = _saved(lambda: base(x))
    _, by_gift = _saved(lambda: layer(x))
    extra = [s for s in by_gift]
    for s in by_base:  # the base saves the same things for u as for x
        hit = next(i for i, e in enumerate(extra) if e.shape == s.shape and e.dtype == s.dtype)
        extra.pop(hit)
    d_in = x.shape[-1]
    shapes = sorted(tuple(e.shape) for e in extra)
    assert shapes == sorted([(m, d_in), (m, R), (d_in, R), (R, d_in)]), shapes
    x_saved = next(e for e in extra if tuple(e.shape) == (m, d_in))
    assert x_saved.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # x itself, not a copy
    params = {p.data_ptr() for p in t.parameters()}
    assert {e.data_ptr() for e in extra if e.shape in (t.phi.shape, t.psi.shape)} <= params


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4"])
def test_bnb_memory_accounting(kind):
    """bitsandbytes keeps what it saves as ctx attributes (invisible to the hooks): count every
    tensor the autograd graph keeps alive. The 8-bit layer keeps its input (now u instead of
    x: one M x d_in activation more than the base alone); the 4-bit one does not (its input
    gradient needs only the weight). Beyond that, GIFT keeps t (M x r): nothing M x d_out."""
    layer, base, (t,) = adapted(kind)
    layer.train()
    m = 13
    x = x_of(kind, m).requires_grad_(True)
    mine = module_tensors(layer) + [x]
    alone = graph_storage_bytes(base(x), exclude=mine)
    with_gift = graph_storage_bytes(layer(x), exclude=mine)
    d_in = x.shape[-1]
    base_keeps_input = kind == "bnb-int8"
    expected = m * R * 4 + (m * d_in * 4 if base_keeps_input else 0)
    assert sum(alone.values()) == 0  # the base alone keeps only its own weight and the caller's x
    assert sum(with_gift.values()) == expected, (with_gift, expected)


def test_bnb_int8_large_training_calls_take_the_epilogue_form():
    """bitsandbytes' 8-bit layer keeps its whole input for backward: from EPILOGUE_MIN_ROWS rows
    a training call runs the base on x itself (alive anyway) and adds (x psi^T)(W phi)^T from
    the dequantized weight, so the graph keeps only t beyond the base's own; correct to the
    float64 reference. Small calls and inference stay input-side."""
    from gift_kernels.nn.module_base import module_form
    from gift_kernels.ops.plan import EPILOGUE_MIN_ROWS

    layer, base, thetas = adapted("bnb-int8")
    layer.train()
    m = EPILOGUE_MIN_ROWS + 3
    assert module_form(base, 1, "auto", rows=m, training=True) == "epilogue"
    assert module_form(base, 1, "auto", rows=m - 4, training=True) == "input"
    assert module_form(base, 1, "auto", rows=m, training=False) == "input"
    x = x_of("bnb-int8", m).requires_grad_(True)
    kept = graph_storage_bytes(layer(x), exclude=module_tensors(layer) + [x])
    assert sum(kept.values()) == m * R * 4
    check_against_reference(layer, base, thetas, x_of("bnb-int8", 3, m // 3 + 1))


# ----------------------------------------------------------------------------- merge / export


@pytest.mark.parametrize("kind", ALL)
def test_merge_is_warned_and_measured_unmerge_is_exact(kind):
    layer, base, thetas = adapted(kind)
    x = x_of(kind, 6)
    sd = layer.state_dict()
    y0 = layer(x).detach()
    w0 = bases.dense_weight(base, "t")
    w_hat = layer.merged_weight()
    with pytest.warns(LossyMergeWarning, match=r"differs from the exact W_hat by [0-9.e+-]+ relative"):
        layer.merge()
    assert layer.merged
    w_m = bases.dense_weight(base, "t")  # the re-quantized W_hat the merged layer computes with
    err, err_update = layer.merge_error
    assert err == pytest.approx(float((w_m.double() - w_hat.double()).norm() / w_hat.double().norm()), rel=1e-4)
    assert err_update == pytest.approx(float((w_m.double() - w_hat.double()).norm() / (w_hat - w0).double().norm()),
                                       rel=1e-4)
    assert 0 < err < 0.2  # the measured quantization error of each format (docs/quantized.md)
    y_m = layer(x).detach()
    ref = F.linear(x.double(), w_m.double(), base.bias.double())
    assert rel_err(y_m, ref) <= TOL[torch.float32]
    # the state dict always holds the unmerged weight; loading into a merged layer is refused
    assert same_state(layer.state_dict(), sd)
    with pytest.raises(RuntimeError, match="is merged; call unmerge"):
        layer.load_state_dict(sd)
    assert layer.merged and torch.equal(layer(x), y_m)
    for _ in range(3):  # exact, however often: the original quantized weight is kept, not re-derived
        layer.unmerge()
        assert torch.equal(layer(x), y0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LossyMergeWarning)
            layer.merge()
        assert torch.equal(layer(x), y_m)
    layer.unmerge()
    assert same_state(layer.state_dict(), sd)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("kind", ALL)
def test_to_linear_exports_w_hat_without_loss(kind):
    layer, base, thetas = adapted(kind, biased=True)
    x = x_of(kind, 5)
    dense = layer.to_linear()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    assert rel_err(dense(x), layer(x)) <= TOL[torch.float32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyMergeWarning)
        layer.merge()
    assert torch.equal(layer.to_linear().weight, dense.weight)  # from the original weight, merged or not
    layer.unmerge()


@pytest.mark.parametrize("kind", ["torchao-int8", "torchao-int4", "torchao-nf4"])
def test_torchao_requantize_is_what_quantize_gives(kind):
    """A merged torchao weight is re-quantized as torchao's quantize_ with the original config
    would quantize W_hat: the same codes and scales."""
    base, _ = make_base(kind)
    w_hat = bases.dense_weight(base, "t") * 1.01 + 0.001
    lin = nn.Linear(base.in_features, base.out_features)
    with torch.no_grad():
        lin.weight.copy_(w_hat)
    reference = KINDS[kind].quantize(lin)
    bases.kind_of(base).requantize(base, w_hat)
    got, want = base.weight, reference.weight
    assert type(got) is type(want)
    names, _ = want.__tensor_flatten__()
    for n in names:
        assert torch.equal(getattr(got, n), getattr(want, n)), n


class Affine(nn.Module):
    """A generic module base: linear in x, no registered kind (GIFT can train through it, not merge it)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.w = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in), requires_grad=False)

    def forward(self, x):
        return x @ self.w.t()


def test_generic_module_base_trains_but_cannot_merge():
    base = Affine(12, 5)
    t = theta(12)
    layer = GiftLinear.from_module(base, [t])
    x = torch.randn(4, 12, requires_grad=True)
    y = layer(x)
    ref = x @ (base.w @ (torch.eye(12) + t.phi @ t.psi)).t()
    assert rel_err(y, ref) <= TOL[torch.float32]
    y.sum().backward()
    assert t.phi.grad is not None and x.grad is not None
    with pytest.raises(TypeError, match="cannot merge into a Affine base"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(TypeError, match="does not expose its weight as a dense matrix"):
        layer.to_linear()
    with pytest.raises(TypeError, match="does not expose its weight"):
        cluster_head(layer)


def test_a_base_without_input_gradient_is_refused_on_first_forward():
    class Detaching(Affine):
        def forward(self, x):
            return x.detach() @ self.w.t()

    layer = GiftLinear.from_module(Detaching(12, 5), [theta(12)])
    with pytest.raises(RuntimeError, match="gives no gradient with respect to its input"):
        layer(torch.randn(3, 12))
    with torch.no_grad():  # inference is fine
        layer(torch.randn(3, 12))


def test_bnb_int8_merge_refuses_an_unquantized_layer():
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(16, 8)
    q = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())  # never moved to a device: quantized lazily on the first forward
    layer = GiftLinear.from_linear(q, theta(16))
    w_before = q.weight.detach().clone()
    with pytest.raises(TypeError, match="not quantized yet"):
        layer.merge()
    assert torch.equal(q.weight, w_before) and not layer.merged


def test_a_failed_requantization_leaves_the_layer_unchanged(monkeypatch):
    layer, base, _ = adapted("bnb-int8")
    x = x_of("bnb-int8", 3)
    y0 = layer(x)
    kind = bases.kind_of(base)

    def broken(module, w_hat):
        module.weight = nn.Parameter(torch.zeros(1), requires_grad=False)  # half-done, then fails
        raise MemoryError("out of memory while re-quantizing")

    patched = bases.BaseKind(**{**kind.__dict__, "requantize": broken})
    monkeypatch.setattr(bases, "_KINDS", [patched] + [k for k in bases._KINDS if k is not kind])
    with pytest.raises(MemoryError):
        layer.merge()
    assert not layer.merged and torch.equal(layer(x), y0)


# ----------------------------------------------------------------------------- state dict, copies


@pytest.mark.parametrize("kind", ALL)
def test_state_dict_keys_are_the_bases_and_round_trip(kind):
    layer, base, thetas = adapted(kind, biased=True)
    x = x_of(kind, 4)
    layer.train()
    y = layer(x)  # after a forward (bitsandbytes 8-bit moves its codes then)
    sd = layer.state_dict()
    base_keys = list(base.state_dict())
    assert sorted(sd) == sorted(base_keys + [f"theta.{n}" for n, _ in thetas[0].named_parameters()])
    fresh, _, _ = adapted(kind, biased=True, seed=5)  # other weights, other Theta
    fresh.train()
    fresh(x)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    if kind in ("bnb-nf4", "bnb-fp4"):
        return  # bitsandbytes' own Linear4bit.load_state_dict refuses its quant-state keys (GIFT rebuilds them)
    again = make_base(kind, seed=9)[0]  # the base's keys load into a bare base: the base model's format
    again.load_state_dict({k: sd[k] for k in base_keys})
    assert torch.equal(again(x), base(x))


@pytest.mark.parametrize("kind", ALL)
def test_deepcopy_is_independent(kind):
    layer, base, thetas = adapted(kind)
    x = x_of(kind, 4)
    y = layer(x).detach()
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyMergeWarning)
        clone.merge()
    assert torch.equal(layer(x), y) and not layer.merged  # merging the copy leaves the original alone
    merged_copy = copy.deepcopy(clone)
    merged_copy.unmerge()
    clone.unmerge()
    assert torch.equal(clone(x), y) and torch.equal(merged_copy(x), y)
    xg = x.clone().requires_grad_(True)
    clone(xg).sum().backward()
    assert clone.theta.phi.grad is not None and layer.theta.phi.grad is None


# ----------------------------------------------------------------------------- interpretability


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-nf4"])
def test_cluster_head_reads_the_dequantized_weight_once_per_recording(kind, monkeypatch):
    layer, base, (t,) = adapted(kind)
    dense = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(bases.dense_weight(base, "t"))
        dense.bias.copy_(base.bias)
    twin = GiftLinear.from_linear(dense, t)
    g_q, _ = cluster_head(layer)
    g_d, _ = cluster_head(twin)
    assert rel_err(g_q, g_d) <= TOL[torch.float32]

    kind_obj = bases.kind_of(base)
    calls = []
    counting = bases.BaseKind(**{**kind_obj.__dict__,
                                 "dequantize": lambda m: calls.append(1) or kind_obj.dequantize(m)})
    monkeypatch.setattr(bases, "_KINDS", [counting] + [k for k in bases._KINDS if k is not kind_obj])
    model = nn.Sequential(layer)
    x = x_of(kind, 2, 5)
    with torch.no_grad(), record_cluster_scores(model) as rec:
        for _ in range(3):
            model(x)
    assert len(calls) == 1  # dequantized once for the three forwards
    assert len(rec.calls["0"]) == 3
    ref = x @ g_d
    assert rel_err(rec.scores("0"), ref) <= TOL[torch.float32]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("config", ["int8-dynamic", "int4-dynamic"])
def test_dynamic_activation_quantization_is_refused(config):
    base = torchao(config)(nn.Linear(64, 16))
    with pytest.raises(TypeError, match="quantizes the layer's input dynamically.*no gradient"):
        GiftLinear.from_linear(base, theta(64))


def test_torchao_int4_weight_only_on_cpu():
    """torchao's Int4WeightOnlyConfig has no CPU kernel in any packing format (the research run:
    PLAIN / PRESHUFFLED need mslk, PLAIN_INT32 is not on CPU, TILE_PACKED_TO_4D needs CUDA):
    quantize_ itself fails here, so there is no layer to adapt. Where it works, it is a torchao
    weight with dequantize(), trained through like the others."""
    try:
        base = torchao("int4-tinygemm")(nn.Linear(64, 16).to(torch.bfloat16))
        base(torch.randn(2, 64, dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001 - whatever torchao raises for a missing kernel
        pytest.skip(f"torchao Int4WeightOnlyConfig does not run on this machine ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120]})")
    layer = GiftLinear.from_linear(base, theta(64, seed=1).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None


def test_unquantized_4bit_layer_and_non_linear_modules_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(16, 8, quant_type="nf4")  # never moved to a device: not quantized
    with pytest.raises(TypeError, match="Linear4bit is not quantized yet"):
        GiftLinear.from_linear(q, theta(16))
    with pytest.raises(TypeError, match="a LayerNorm is not a layer GIFT can adapt"):
        GiftLinear.from_module(nn.LayerNorm(16), [theta(16)])
    base, _ = make_base("bnb-int8")
    with pytest.raises(ValueError, match="in_features=20 .* but the layer has in_features=45"):
        GiftLinear.from_linear(base, theta(20))
    layer = GiftLinear.from_linear(base, theta(45))
    with pytest.raises(ValueError, match="gift_input: phi must have shape"):
        layer(torch.randn(3, 44))


# ----------------------------------------------------------------------------- bitsandbytes' CPU paths


def packable_nf4(path):
    base, _ = make_base("bnb-nf4", shape=PACKABLE_SHAPE)
    return force_bnb_cpu_path(base, path)


def x_packable(*lead, seed=3):
    return torch.randn(*lead, PACKABLE_SHAPE[0], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", BNB_CPU_PATHS)
def test_bnb_4bit_eval_no_grad_forward_then_training_grads_are_exact(path):
    """A baseline evaluation (eval mode, no_grad) before training: on the packed path
    bitsandbytes would repack the weight and every later Theta gradient would be zero. GIFT keeps
    its base unpacked, so the grads after it are the reference's."""
    base = packable_nf4(path)
    th = theta(PACKABLE_SHAPE[0])
    layer = GiftLinear.from_module(base, [th]).eval()
    with torch.no_grad():
        y_eval = layer(x_packable(5))
    assert not bnb_4bit_is_packed(base)
    layer.train()
    check_against_reference(layer, base, [th], x_packable(2, 3))
    layer.zero_grad()
    layer(x_packable(4)).square().sum().backward()
    assert th.phi.grad.abs().sum() > 0 and th.psi.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x_packable(5)), y_eval)


def test_bnb_4bit_packed_before_adaptation_is_refused_unchanged():
    base = packable_nf4("packed")
    with torch.no_grad():
        base.eval()(x_packable(3))  # what a baseline evaluation before apply_gift does
    assert bnb_4bit_is_packed(base)
    weight, qs = base.weight, base.weight.quant_state
    with pytest.raises(TypeError, match=r"GiftLinear.from_module: .*Linear4bit.*CPU inference packing.*Adapt the model "
                                        r"before any eval-mode no_grad forward"):
        GiftLinear.from_module(base, [theta(PACKABLE_SHAPE[0])])
    assert base.weight is weight and base.weight.quant_state is qs and base.support_avx512bf16_for_cpu


def test_bnb_4bit_training_forward_through_a_base_packed_since_adaptation_is_refused():
    base = packable_nf4("packed")
    layer = GiftLinear.from_module(base, [theta(PACKABLE_SHAPE[0])])
    assert not base.support_avx512bf16_for_cpu  # adaptation turned the packing off
    base.support_avx512bf16_for_cpu = True  # the user turns it back on and runs the base alone
    with torch.no_grad():
        base.eval()(x_packable(3))
    assert bnb_4bit_is_packed(base)
    layer.train()
    with pytest.raises(RuntimeError, match=r"GiftLinear: cannot train through this Linear4bit base: .*CPU inference "
                                           r"packing"):
        layer(x_packable(2))
    with torch.no_grad():  # inference through it still runs (the packed kernel is bitsandbytes' own)
        assert torch.isfinite(layer.eval()(x_packable(2))).all()
