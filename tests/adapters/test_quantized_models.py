"""Whole models with quantized layers: apply_gift / merge_gift / unmerge_gift / save_gift /
load_gift, and GIFT through PEFT (get_peft_model with GiftPeftConfig), over bitsandbytes and
torchao bases; refusals leave the model unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PeftModel, get_peft_model  # noqa: E402

from gift_kernels.adapters import GiftConfig, apply_gift, load_gift, merge_gift, save_gift, unmerge_gift  # noqa: E402
from gift_kernels.adapters.peft import GiftPeftConfig, GiftPeftLayer  # noqa: E402
from gift_kernels.nn import GiftLinear, bases  # noqa: E402
from gift_kernels.nn.bases import LossyMergeWarning  # noqa: E402
from gift_testing import TOL, rel_err  # noqa: E402
from quantized_bases import (BNB_CPU_PATHS, PACKABLE_SHAPE, KINDS, bnb_4bit_is_packed, force_bnb_cpu_path,  # noqa: E402
                             quantize_linears, same, same_state, torchao)

import tiny_hf_models  # noqa: E402
from tiny_hf_models import randomize_thetas  # noqa: E402

TARGETS = ("query", "value")
MODEL_KINDS = ["bnb-int8", "bnb-nf4", "torchao-int8", "torchao-int4"]  # torchao's NF4 needs d_in*d_out % 16384 == 0
IDS = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))


def quantized_bert(kind, seed=0):
    return quantize_linears(tiny_hf_models.bert(seed), kind, TARGETS)


def dense_twin(model):
    """The same model with every quantized target replaced by an nn.Linear holding its
    dequantized weight: the reference a quantized base must match."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS and not bases.is_dense(module):
            lin = nn.Linear(module.in_features, module.out_features)
            with torch.no_grad():
                lin.weight.copy_(bases.dense_weight(module, "twin"))
                lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


def logits(model, x=IDS):
    with torch.no_grad():
        return model(x).logits


def snapshot(model):
    return {"types": [(n, type(m)) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "state": model.state_dict(), "attrs": sorted(model.__dict__)}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"] and now["grad"] == snap["grad"] and now["attrs"] == snap["attrs"]
    assert same_state(now["state"], snap["state"])


class Affine(nn.Module):
    """A generic module base around a layer: in/out features and a linear forward, no registered kind."""

    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def config(**kw):
    kw.setdefault("task_type", "SEQ_CLS")  # the tiny BERT's classifier trains (no frozen-head warning)
    return GiftConfig(rank=4, target_modules=list(TARGETS), init_weights=False, **kw)


# ----------------------------------------------------------------------------- apply_gift


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_apply_gift_matches_the_dense_twin_and_trains(kind):
    model = quantized_bert(kind)
    twin = dense_twin(model)
    apply_gift(model, config())
    apply_gift(twin, config())
    randomize_thetas(model.gift_thetas["default"])
    twin.gift_thetas["default"].load_state_dict(model.gift_thetas["default"].state_dict())
    adapted = [m for m in model.modules() if isinstance(m, GiftLinear)]
    assert len(adapted) == 4 and all(m.has_module_base for m in adapted)
    # in eval mode bitsandbytes' 8-bit layer multiplies int8-quantized activations (measured
    # 7.4e-3 relative per layer); every other kind multiplies by the dequantized weight
    assert rel_err(logits(model), logits(twin)) <= (3e-2 if kind == "bnb-int8" else TOL[torch.float32])

    model.train()
    model(IDS).logits.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("gift_thetas.", "classifier.")) or ".theta." in n for n in trainable)
    assert all(model.gift_thetas["default"][k].phi.grad is not None for k in model.gift_thetas["default"])


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-int8"])
def test_state_dict_merge_unmerge_and_adapter_checkpoint(kind, tmp_path):
    base_keys = set(quantized_bert(kind).state_dict())
    model = apply_gift(quantized_bert(kind), config())
    randomize_thetas(model.gift_thetas["default"])
    y = logits(model)
    sd = model.state_dict()
    theta_keys = {k for k in sd if k.startswith("gift_thetas.") or ".theta." in k}
    assert set(sd) - theta_keys == base_keys  # the quantized base model's keys, unchanged

    with pytest.warns(LossyMergeWarning) as record:
        merge_gift(model)
    assert len(record) == 4  # one per re-quantized layer, each with its measured error
    assert all(not isinstance(m, GiftLinear) for m in model.modules())
    assert same_state({k: v for k, v in model.state_dict().items() if k in sd},
                      {k: v for k, v in sd.items() if k in model.state_dict()})
    assert set(sd) - theta_keys == set(model.state_dict()) - theta_keys
    y_merged = logits(model)
    assert 0 < rel_err(y_merged, y) < 0.5  # re-quantized W_hat: close, not equal
    with pytest.raises(RuntimeError, match="merged"):
        model.load_state_dict(sd)
    unmerge_gift(model)
    assert torch.equal(logits(model), y)
    assert same_state(model.state_dict(), sd)

    save_gift(model, tmp_path)
    fresh = load_gift(quantized_bert(kind), tmp_path)
    assert torch.equal(logits(fresh), y)


def test_merge_gift_refuses_an_unmergeable_base_and_rolls_back_a_failure(monkeypatch):
    model = quantized_bert("bnb-int8")
    # one target is a generic module base (no registered kind): trained through, not mergeable
    layer0 = model.bert.encoder.layer[0].attention.self
    layer0.value = Affine(layer0.value)
    apply_gift(model, config())
    randomize_thetas(model.gift_thetas["default"])
    y = logits(model)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"merge_gift: 'bert.encoder.layer.0.attention.self.value': cannot merge "
                                        r"into a Affine base"):
        merge_gift(model)
    assert_unchanged(model, snap)

    # a re-quantization that fails midway: the layers merged so far are unmerged again
    model = apply_gift(quantized_bert("bnb-int8"), config())
    randomize_thetas(model.gift_thetas["default"])
    y = logits(model)
    kind = bases.kind_of(model.bert.encoder.layer[1].attention.self.value.base_layer)
    count = []

    def flaky(m, w_hat):
        count.append(1)
        if len(count) == 3:
            raise MemoryError("no memory left to re-quantize")
        kind.requantize(m, w_hat)

    patched = bases.BaseKind(**{**kind.__dict__, "requantize": flaky})
    monkeypatch.setattr(bases, "_KINDS", [patched] + list(bases._KINDS))
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyMergeWarning)
        with pytest.raises(MemoryError):
            merge_gift(model)
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), y)


@pytest.mark.parametrize("config_name", ["int8-dynamic", "int4-dynamic"])
def test_apply_gift_refuses_dynamic_activation_quantization(config_name):
    model = tiny_hf_models.bert(0)
    layer = model.bert.encoder.layer[1].attention.self
    layer.value = torchao(config_name)(layer.value)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"target 'bert.encoder.layer.1.attention.self.value' \(Linear\) cannot be "
                                        r"adapted: its torchao weight .* quantizes the layer's input dynamically"):
        apply_gift(model, config())
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- PEFT


def peft_config(**kw):
    return GiftPeftConfig(r=4, target_modules=list(TARGETS), init_weights=False, **kw)


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-int8"])
def test_peft_over_quantized_bases_matches_apply_gift(kind, tmp_path):
    base = quantized_bert(kind)
    ours = apply_gift(copy.deepcopy(base), config())
    model = get_peft_model(base, peft_config())
    layers = [m for m in model.modules() if isinstance(m, GiftPeftLayer)]
    assert len(layers) == 4 and all(not bases.is_dense(m.get_base_layer()) for m in layers)
    thetas = model.base_model.gift_thetas["default"]
    randomize_thetas(thetas)
    ours.gift_thetas["default"].load_state_dict(thetas.state_dict())
    y = logits(model)
    assert torch.equal(y, logits(ours))

    model.train()
    model(IDS).logits.sum().backward()
    assert all(t.phi.grad is not None for t in thetas.values())
    model.eval()

    with pytest.warns(LossyMergeWarning):
        model.merge_adapter()
    y_merged = logits(model)
    assert 0 < rel_err(y_merged, y) < 0.5
    model.unmerge_adapter()
    assert torch.equal(logits(model), y)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_bert(kind), tmp_path)
    assert torch.equal(logits(loaded), y)

    with pytest.warns(LossyMergeWarning):
        plain = loaded.merge_and_unload()
    q = plain.bert.encoder.layer[0].attention.self.query
    assert not bases.is_dense(q) and bases.kind_of(q) is not None  # the quantized layer, W_hat re-quantized
    assert torch.equal(logits(plain), y_merged)


def test_peft_refuses_dynamic_activation_quantization_and_unmergeable_bases():
    model = tiny_hf_models.bert(0)
    layer = model.bert.encoder.layer[1].attention.self
    layer.query = torchao("int8-dynamic")(layer.query)
    snap = snapshot(model)
    with pytest.raises(TypeError, match="quantizes the layer's input dynamically"):
        get_peft_model(model, peft_config())
    assert_unchanged(model, snap)

    model = quantized_bert("bnb-nf4")
    model.bert.encoder.layer[0].attention.self.value = Affine(model.bert.encoder.layer[0].attention.self.value)
    model = get_peft_model(model, peft_config())
    y = logits(model)
    with pytest.raises(ValueError, match=r"GIFT: .*layer.0.attention.self.value'?: cannot merge into a Affine base"):
        model.merge_adapter()
    assert not any(m.merged for m in model.modules() if isinstance(m, GiftPeftLayer))
    assert torch.equal(logits(model), y)


@pytest.mark.parametrize("kind", ["bnb-int8", "torchao-int8"])
def test_peft_mixed_batch_over_a_quantized_base_with_16bit_activations(kind):
    # the mixed path runs the quantized layer itself, as the one-adapter path does (it used to hand
    # the dequantized float32 weight to the dense mixed op, which refused the bf16 activations)
    base = quantize_linears(tiny_hf_models.bert(0).to(torch.bfloat16), kind, TARGETS)
    model = get_peft_model(base, peft_config(theta_dtype="bfloat16"))
    model.add_adapter("other", peft_config(theta_dtype="bfloat16"))
    for name in ("default", "other"):
        randomize_thetas(model.base_model.gift_thetas[name])
    ids = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    names = ["other", "__base__", "default"]
    model.eval()
    with torch.no_grad():
        got = model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                want = model(ids[i:i + 1]).logits
            assert got.dtype == torch.bfloat16
            assert rel_err(got[i:i + 1], want) <= TOL[torch.bfloat16], f"sample {i} ({name})"


# ----------------------------------------------------------------------------- bitsandbytes' CPU paths


class TwoLayers(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.q, self.v = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def packable_nf4_model(path):
    torch.manual_seed(0)
    return force_bnb_cpu_path(quantize_linears(TwoLayers(*PACKABLE_SHAPE), "bnb-nf4", ("q", "v")), path)


def packable_x(seed=0):
    return torch.randn(3, 5, PACKABLE_SHAPE[0], generator=torch.Generator().manual_seed(seed))


def qv_config():
    return GiftConfig(rank=4, target_modules=["q", "v"], init_weights=False)


@pytest.mark.parametrize("path", BNB_CPU_PATHS)
@pytest.mark.parametrize("via", ["apply_gift", "peft"])
def test_baseline_evaluation_before_training_keeps_theta_grads(path, via):
    """eval() + no_grad forward (a baseline evaluation, generate) after adaptation, then training:
    every Theta gets the gradient it gets without the evaluation."""
    def adapt(model):
        if via == "apply_gift":
            return apply_gift(model, qv_config()), lambda m: m.gift_thetas["default"]
        return (get_peft_model(model, GiftPeftConfig(r=4, target_modules=["q", "v"], init_weights=False)),
                lambda m: m.base_model.gift_thetas["default"])

    grads = []
    for evaluate_first in (False, True):
        model, thetas_of = adapt(packable_nf4_model(path))
        torch.manual_seed(1)
        randomize_thetas(thetas_of(model))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(packable_x(1))
            assert not any(bnb_4bit_is_packed(m) for m in model.modules() if type(m).__name__ == "Linear4bit")
        model.train()
        model(packable_x()).square().sum().backward()
        grads.append({k: (t.phi.grad.clone(), t.psi.grad.clone()) for k, t in thetas_of(model).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2
    for k in grads[0]:
        assert all(g.abs().sum() > 0 for g in grads[0][k])
        assert all(torch.equal(a, b) for a, b in zip(grads[0][k], grads[1][k])), k


@pytest.mark.parametrize("via", ["apply_gift", "peft"])
def test_a_base_packed_before_adaptation_is_refused_unchanged(via):
    model = packable_nf4_model("packed")
    with torch.no_grad():
        model.eval()(packable_x())
    assert bnb_4bit_is_packed(model.q)
    # (not snapshot(): bitsandbytes' state_dict() unpacks the layer it reads)
    snap = [(n, type(m), getattr(m, "weight", None), bnb_4bit_is_packed(m) if n in ("q", "v") else None)
            for n, m in model.named_modules()], [(n, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(TypeError, match=r"module 'q' cannot be trained through: this Linear4bit has its weight in "
                                        r"bitsandbytes' CPU inference packing.*Adapt the model before any eval-mode "
                                        r"no_grad forward"):
        if via == "apply_gift":
            apply_gift(model, qv_config())
        else:
            get_peft_model(model, GiftPeftConfig(r=4, target_modules=["q", "v"]))
    assert snap == ([(n, type(m), getattr(m, "weight", None), bnb_4bit_is_packed(m) if n in ("q", "v") else None)
                     for n, m in model.named_modules()], [(n, p.requires_grad) for n, p in model.named_parameters()])
    assert model.q.support_avx512bf16_for_cpu and model.v.support_avx512bf16_for_cpu


@pytest.mark.parametrize("via", ["apply_gift", "peft"])
def test_frozen_4bit_layers_outside_the_targets_count_too(via):
    """Gradients of the Thetas before a frozen 4-bit layer pass through it: a packed one is refused
    (named) at adaptation, and adaptation keeps every 4-bit layer of the model unpacked."""
    def adapt(model):
        if via == "apply_gift":
            return apply_gift(model, GiftConfig(rank=4, target_modules=["q"], init_weights=False)), \
                lambda m: m.gift_thetas["default"]["q"]
        return (get_peft_model(model, GiftPeftConfig(r=4, target_modules=["q"], init_weights=False)),
                lambda m: m.base_model.gift_thetas["default"]["q"])

    model = packable_nf4_model("packed")
    with torch.no_grad():
        model.v.eval()(packable_x())  # only the frozen layer after the target
    with pytest.raises(TypeError, match=r"module 'v' cannot be trained through: this Linear4bit has its weight in "
                                        r"bitsandbytes' CPU inference packing"):
        adapt(model)
    assert not any(isinstance(m, (GiftLinear, GiftPeftLayer)) for m in model.modules())

    grads = []
    for evaluate_first in (False, True):
        model, theta_of = adapt(packable_nf4_model("packed"))
        if evaluate_first:
            with torch.no_grad():
                model.eval()(packable_x(1))
            assert not bnb_4bit_is_packed(model.get_submodule("base_model.model.v" if via == "peft" else "v"))
        model.train()
        model(packable_x()).square().sum().backward()
        grads.append(theta_of(model).phi.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
