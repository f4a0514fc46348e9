"""GIFT from PEFT: get_peft_model with GiftPeftConfig, save_pretrained/from_pretrained, merge,
disable, several adapters, task heads, and agreement with gift_kernels.apply_gift."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from safetensors import safe_open  # noqa: E402

from gift_kernels.adapters import GiftConfig, apply_gift  # noqa: E402
from gift_kernels.adapters.peft import GiftPeftConfig, GiftPeftLayer, GiftPeftModel, GiftPeftType, register  # noqa: E402
from gift_testing import TOL, rel_err  # noqa: E402

import tiny_hf_models  # noqa: E402
from tiny_hf_models import gpt2, llama  # noqa: E402
from tiny_hf_models import randomize_thetas as randomize  # noqa: E402


def bert(seed=0):
    return tiny_hf_models.bert(seed, num_labels=3)


IDS = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, x=IDS):
    with torch.no_grad():
        return model(x).logits


def no_missing_key_warning(record):
    return not [w for w in record if "missing adapter keys" in str(w.message)]


def test_registered_under_its_own_type():
    register()  # idempotent
    assert PEFT_TYPE_TO_CONFIG_MAPPING["GIFT"] is GiftPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["GIFT"] is GiftPeftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["GIFT"] == "gift_"
    cfg = GiftPeftConfig(r=4, target_modules=["query"])
    assert cfg.peft_type == "GIFT" and cfg.peft_type.value == "GIFT" and cfg.peft_type is GiftPeftType.GIFT
    assert json.loads(json.dumps(cfg.to_dict(), default=list))["peft_type"] == "GIFT"
    with pytest.raises(ValueError, match="sharing"):
        GiftPeftConfig(target_modules=["q"], sharing="block")


def test_round_trip_with_a_task_head(tmp_path):
    base = bert()
    y0 = logits(base)
    cfg = GiftPeftConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(base), cfg)
    assert isinstance(model.base_model, GiftPeftModel)
    assert isinstance(model.base_model.model.bert.encoder.layer[0].attention.self.query, GiftPeftLayer)
    # the classifier head is trainable (modules_to_save), and is a fresh copy: logits start unchanged
    assert torch.equal(logits(model), y0)
    trainable, total = model.get_nb_trainable_parameters()
    thetas = model.base_model.gift_thetas["default"]
    assert trainable == 2 * (2 * 32 * 4) + (32 * 3 + 3)  # each shared Theta once, plus the head
    assert {id(p) for p in thetas.parameters()} <= {id(p) for p in model.parameters() if p.requires_grad}

    randomize(thetas)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(2)
    y1 = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GIFT" and saved["sharing"] == "type"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert [k for k in keys if "gift" in k] == [
        "base_model.gift_thetas.query.phi", "base_model.gift_thetas.query.psi",
        "base_model.gift_thetas.value.phi", "base_model.gift_thetas.value.psi",
    ]  # each Theta once, no per-layer copies, no adapter name
    assert any("classifier" in k for k in keys)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert no_missing_key_warning(record)
    assert torch.equal(logits(loaded), y1)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable_load = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable_load.base_model.gift_thetas.parameters())


@pytest.mark.parametrize(
    "factory,targets,stacked",
    [(bert, ["query", "value"], None), (llama, ["q_proj", "v_proj"], None), (gpt2, ["c_attn"], {"c_attn": 3})],
    ids=["bert", "llama", "gpt2"],
)
def test_agrees_with_apply_gift(tmp_path, factory, targets, stacked):
    base = factory()
    ours = apply_gift(copy.deepcopy(base), GiftConfig(rank=3, target_modules=targets, stacked=stacked or {}))
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=3, target_modules=targets, stacked=stacked))
    assert torch.equal(logits(model), logits(base))
    thetas = model.base_model.gift_thetas["default"]
    assert list(thetas) == list(ours.gift_thetas["default"])
    randomize(ours.gift_thetas["default"])
    with torch.no_grad():
        for k, t in thetas.items():
            for (_, p), (_, q) in zip(t.named_parameters(), ours.gift_thetas["default"][k].named_parameters()):
                p.copy_(q)
    assert torch.equal(logits(model), logits(ours))
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), logits(ours))


def test_merge_unmerge_disable_and_unload():
    base = gpt2()
    y0 = logits(base)
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=3, target_modules=["c_attn"], stacked={"c_attn": 3}))
    randomize(model.base_model.gift_thetas["default"])
    y1 = logits(model)
    model.merge_adapter()
    assert rel_err(logits(model), y1) <= 1e-5
    model.unmerge_adapter()
    assert torch.equal(logits(model), y1)
    assert torch.equal(model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight, base.transformer.h[0].attn.c_attn.weight)
    with model.disable_adapter():
        assert torch.equal(logits(model), y0)
    assert torch.equal(logits(model), y1)
    merged = model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert rel_err(logits(merged), y1) <= 1e-5


def test_two_adapters_switch_and_combine_exactly():
    base = bert()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["query"]), adapter_name="a")
    model.add_adapter("b", GiftPeftConfig(r=3, target_modules=["query"]))
    thetas = model.base_model.gift_thetas
    randomize(thetas["a"], seed=1)
    randomize(thetas["b"], seed=2)
    layer = model.base_model.model.bert.encoder.layer[1].attention.self.query
    x = torch.randn(4, 32, dtype=torch.float32)
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()

    def ref(*names):
        eye = torch.eye(32, dtype=torch.float64)
        delta = sum(thetas[n]["query"].phi.double() @ thetas[n]["query"].psi.double() for n in names)
        return F.linear(x.double(), w @ (eye + delta), b)

    assert rel_err(layer(x), ref("a")) <= TOL[torch.float32]
    model.set_adapter("b")
    assert rel_err(layer(x), ref("b")) <= TOL[torch.float32]
    assert all(p.requires_grad for p in thetas["b"].parameters())
    assert not any(p.requires_grad for p in thetas["a"].parameters())
    model.base_model.set_adapter(["a", "b"])
    assert rel_err(layer(x), ref("a", "b")) <= TOL[torch.float32]
    model.base_model.set_adapter("a")
    model.delete_adapter("b")
    assert list(thetas) == ["a"]
    assert rel_err(layer(x), ref("a")) <= TOL[torch.float32]


def test_training_step_updates_only_thetas():
    model = get_peft_model(bert(), GiftPeftConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("gift_theta" in n for n in trainable) and any("classifier" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # psi starts at zero: phi's gradient is zero on the first step
        opt.zero_grad()
        F.cross_entropy(model(IDS).logits, torch.tensor([0, 2])).backward()
        opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and any(n.endswith("psi") for n in changed)


def test_projection_biases_and_bf16_thetas_round_trip(tmp_path):
    base = llama()
    cfg = GiftPeftConfig(r=2, target_modules=["q_proj"], in_bias=True, out_bias=True, theta_dtype="bfloat16")
    model = get_peft_model(copy.deepcopy(base), cfg)
    theta = model.base_model.gift_thetas["default"]["q_proj"]
    assert theta.phi.dtype == torch.bfloat16  # an explicit theta_dtype wins over PEFT's autocast_adapter_dtype
    assert theta.in_bias is not None and theta.out_bias is not None
    randomize(model.base_model.gift_thetas["default"])
    y1 = logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), y1)


def test_all_linear_shorthand_gets_one_theta_per_layer_name():
    model = get_peft_model(llama(), GiftPeftConfig(r=2, target_modules="all-linear"))
    assert sorted(model.base_model.gift_thetas["default"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # lm_head excluded, as PEFT does
    assert model.base_model.gift_thetas["default"]["down_proj"].in_features == 48
    assert torch.equal(logits(model), logits(llama()))


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(bert(), GiftPeftConfig(target_modules=["qeury"]))
    model = bert()
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.LayerNorm' is a LayerNorm"):
        get_peft_model(model, GiftPeftConfig(target_modules=["query", "LayerNorm"]))
    with pytest.raises(ValueError, match=r"in_features=40.*in_features=32|in_features=32.*in_features=40"):
        get_peft_model(model, GiftPeftConfig(target_modules=["dense"]))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, GiftPeftConfig())
    assert [(n, type(m)) for n, m in model.named_modules()] == types  # checks ran before any replacement


def test_merging_a_tied_lm_head_is_refused_by_name():
    base = llama(tied=True)
    model = get_peft_model(base, GiftPeftConfig(r=2, target_modules=["lm_head"], init_weights=False))
    y = logits(model)
    embed = model.base_model.model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to \['model.embed_tokens'\]"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.embed_tokens.weight, embed)
    assert torch.equal(logits(model), y)


def test_from_pretrained_with_a_corrupt_file_leaves_the_base_unwrapped(tmp_path):
    model = get_peft_model(bert(), GiftPeftConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    base = bert()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, GiftPeftLayer) for m in base.modules())


def test_adapter_names_give_each_sample_its_own_adapter():
    base = bert()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["query", "value"],
                                                               init_weights=False), adapter_name="a")
    model.add_adapter("b", GiftPeftConfig(r=3, target_modules=["query"], init_weights=False))
    model.eval()
    mixed = model(IDS, adapter_names=["b", "__base__"]).logits
    model.set_adapter("b")
    assert torch.allclose(mixed[0], logits(model)[0], atol=1e-6)
    assert torch.allclose(mixed[1], logits(base)[1], atol=1e-6)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(IDS, adapter_names=["a", "c"])


def test_mixed_batch_ids_are_built_once_per_forward(monkeypatch):
    # on a GPU each host-built id tensor is a copy to the device: once per forward, not per layer
    import gift_kernels.adapters.peft as gift_peft

    base = bert()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["query", "value"],
                                                               init_weights=False), adapter_name="a")
    model.add_adapter("b", GiftPeftConfig(r=3, target_modules=["query"], init_weights=False))
    model.eval()
    built = []
    real = gift_peft._device_ids
    monkeypatch.setattr(gift_peft, "_device_ids", lambda values, device: built.append(values) or real(values, device))
    layers = sum(isinstance(m, GiftPeftLayer) for m in model.modules())
    mixed = model(IDS, adapter_names=["b", "__base__"]).logits
    # query layers: one token-id tensor for (b); value layers (no b): one row index per adapter name
    assert len(built) == 3 and layers >= 4, (built, layers)
    model.set_adapter("b")
    assert torch.allclose(mixed[0], logits(model)[0], atol=1e-6)
    assert torch.allclose(mixed[1], logits(base)[1], atol=1e-6)
    built.clear()
    model(IDS, adapter_names=["b", "__base__"])
    assert len(built) == 3  # a new forward builds its own (nothing kept between calls)


def test_mixed_batch_row_layout_is_built_once_per_forward(monkeypatch):
    """Every query layer of one mixed forward shares one row layout (the ids are the forward's
    own, never exposed) and, without grad, one stacked bank (the query Theta is shared by the
    layers); the next forward builds its own; the same under inference_mode."""
    from gift_kernels.nn import mixed as nn_mixed
    from gift_kernels.ops.mixed import segments

    base = bert()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["query"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", GiftPeftConfig(r=3, target_modules=["query"], init_weights=False))
    model.eval()
    built, stacked = [], []
    real = segments._chunks
    monkeypatch.setattr(segments, "_chunks", lambda *a: built.append(1) or real(*a))
    real_stack = nn_mixed.stack_bank
    monkeypatch.setattr(nn_mixed, "stack_bank", lambda thetas: stacked.append(1) or real_stack(thetas))
    layers = sum(isinstance(m, GiftPeftLayer) for m in model.modules())
    names = ["b", "a"]
    with torch.no_grad():  # serving; with grad, each layer stacks its own bank
        mixed = model(IDS, adapter_names=names).logits
    assert len(built) == 1 and len(stacked) == 1 and layers >= 2, (built, stacked, layers)
    with torch.inference_mode():
        again = model(IDS, adapter_names=names).logits
    assert len(built) == 2 and len(stacked) == 2 and torch.equal(again, mixed)
    for i, name in enumerate(names):
        model.set_adapter(name)
        assert torch.allclose(mixed[i], logits(model)[i], atol=1e-6), name


def test_explicit_theta_dtype_wins_and_none_follows_autocast_adapter_dtype():
    base = llama().to(torch.bfloat16)
    kept = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["q_proj"], theta_dtype="bfloat16"))
    assert kept.base_model.gift_thetas["default"]["q_proj"].phi.dtype == torch.bfloat16
    upcast = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["q_proj"]))
    assert upcast.base_model.gift_thetas["default"]["q_proj"].phi.dtype == torch.float32  # PEFT's default upcast
    same = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=2, target_modules=["q_proj"]),
                          autocast_adapter_dtype=False)
    assert same.base_model.gift_thetas["default"]["q_proj"].phi.dtype == torch.bfloat16
