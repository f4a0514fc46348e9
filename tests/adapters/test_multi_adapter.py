"""Several named GIFT adapters in one model (load_gift(..., adapter_name=)) and a per-sample
choice in one forward (mixed_adapters; PEFT's adapter_names= for GIFT through PEFT): each
sample's logits equal those of a model holding only its adapter; the refusals leave the model
unchanged; exported to LoRA, PEFT's own mixed batch agrees."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402

import gift_kernels  # noqa: E402
from gift_kernels.adapters import (  # noqa: E402
    GiftConfig, apply_gift, delete_gift_adapter, export_lora, gift_adapter_names, load_gift, merge_gift,
    mixed_adapters, save_gift,
)
from gift_kernels.nn import mixed  # noqa: E402
from gift_kernels.adapters.peft import GiftPeftConfig  # noqa: E402
from gift_kernels.nn import GiftLinear  # noqa: E402
from gift_testing import rel_err  # noqa: E402
from tiny_hf_models import gpt2, llama, randomize_thetas  # noqa: E402

TOL = 1e-5  # fp32, relative to max |logit|: the mixed op sums in another order than gift_linear
IDS = torch.randint(0, 60, (5, 7), generator=torch.Generator().manual_seed(0))
LLAMA = GiftConfig(rank=3, target_modules=["q_proj", "v_proj"])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def saved_adapter(tmp_path, factory, config, seed, name):
    model = apply_gift(factory(), config)
    randomize_thetas(model.gift_thetas["default"], seed=seed)
    return save_gift(model, tmp_path / name)


@pytest.fixture
def three(tmp_path):
    """A Llama holding adapters a (r=3), b (r=2, projection biases), c (r=3); their folders."""
    dirs = {
        "a": saved_adapter(tmp_path, llama, LLAMA, 1, "a"),
        "b": saved_adapter(tmp_path, llama, GiftConfig(rank=2, target_modules=["q_proj", "v_proj"], in_bias=True,
                                                       out_bias=True), 2, "b"),
        "c": saved_adapter(tmp_path, llama, LLAMA, 3, "c"),
    }
    model = load_gift(llama(), dirs["a"], adapter_name="a")
    load_gift(model, dirs["b"], adapter_name="b")
    load_gift(model, dirs["c"], adapter_name="c")
    return model, dirs


def per_sample_reference(dirs, names, factory=llama, ids=IDS):
    """Each sample through a model holding only its adapter (the base model for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        model = factory() if name == "__base__" else load_gift(factory(), dirs[name])
        rows.append(logits(model, ids[i:i + 1]))
    return torch.cat(rows)


def test_each_sample_gets_its_own_adapter(three):
    model, dirs = three
    assert gift_adapter_names(model) == ["a", "b", "c"]
    names = ["b", "__base__", "a", "c", "b"]
    want = per_sample_reference(dirs, names)
    with mixed_adapters(model, names):
        got = logits(model)
    assert rel_err(got, want) <= TOL
    assert rel_err(want[0], want[2]) > 1e-2  # the adapters differ: the test can fail
    # the layers are back: a plain forward is adapter a's
    assert all(isinstance(model.get_submodule(e.name), GiftLinear) for e in model._gift_state.entries)
    assert torch.equal(logits(model), logits(load_gift(llama(), dirs["a"])))


def test_stacked_gpt2(tmp_path):
    config = GiftConfig(rank=2, target_modules=["c_attn"], stacked={"c_attn": 3})
    dirs = {n: saved_adapter(tmp_path, gpt2, config, s, n) for n, s in (("x", 4), ("y", 5))}
    model = load_gift(gpt2(), dirs["x"], adapter_name="x")
    load_gift(model, dirs["y"], adapter_name="y")
    names = ["y", "x", "__base__", "y", "x"]
    with mixed_adapters(model, names):
        got = logits(model)
    assert rel_err(got, per_sample_reference(dirs, names, factory=gpt2)) <= TOL


def test_the_mixed_op_runs_once_per_layer(three, monkeypatch):
    model, _ = three
    calls = []
    real = mixed.gift_linear_mixed
    monkeypatch.setattr(mixed, "gift_linear_mixed", lambda *a: calls.append(a[3].shape) or real(*a))
    with mixed_adapters(model, ["c", "a", "a", "b", "c"]):
        logits(model)
    assert len(calls) == 4  # q_proj, v_proj in 2 layers; never once per adapter
    assert all(shape[0] == 3 for shape in calls)  # a bank of the 3 adapters of the batch, rank padded to 3


def test_the_row_layout_is_built_once_per_forward(three, monkeypatch):
    """The layers of one forward share its per-row ids, so the batch's row layout is built once
    per forward (not per layer), again for the next forward, and nothing stays owned after it
    (an exception inside a forward closes it too); the logits stay each sample's own."""
    from gift_kernels.ops import memo
    from gift_kernels.ops.mixed import segments

    model, dirs = three
    built = []
    real = segments._chunks
    monkeypatch.setattr(segments, "_chunks", lambda *a: built.append(1) or real(*a))
    names = ["c", "a", "__base__", "b", "c"]
    with mixed_adapters(model, names):
        got = logits(model)
        assert len(built) == 1  # 4 adapted layers, one layout
        logits(model)
        assert len(built) == 2
        assert not memo._stack()
        with pytest.raises(IndexError):
            model(torch.full_like(IDS, 10**6))  # an out-of-range token: the embedding raises inside the forward
        assert not memo._stack()
        again = logits(model)
    assert rel_err(got, per_sample_reference(dirs, names)) <= TOL
    assert torch.equal(got, again)


def test_each_bank_is_stacked_once_per_forward(three, monkeypatch):
    """Without grad, layers of one type share their Thetas, hence their bank: stacked once per
    type and forward (q_proj and v_proj: 2 stacks for 4 layers), again at the next forward; with
    grad, once per layer (non-reentrant checkpointing recomputes each layer on its own); the
    logits are each sample's own."""
    from gift_kernels.nn import mixed as nn_mixed

    model, dirs = three
    stacked = []
    real = nn_mixed.stack_bank
    monkeypatch.setattr(nn_mixed, "stack_bank", lambda thetas: stacked.append(len(thetas)) or real(thetas))
    names = ["c", "a", "__base__", "b", "c"]
    with mixed_adapters(model, names):
        got = logits(model)
        assert stacked == [3, 3]  # one bank of the 3 adapters per layer type
        logits(model)
        assert len(stacked) == 4
        model(IDS)  # with grad enabled: a bank per layer
        assert len(stacked) == 8
    assert rel_err(got, per_sample_reference(dirs, names)) <= TOL


def test_an_interrupted_forward_leaves_nothing_open_after_the_block(three):
    """Ctrl-C (a BaseException, which the model's forward hooks do not see) inside a forward:
    the block's exit closes what the forward opened, even while the traceback is kept (a REPL
    keeps it)."""
    from gift_kernels.ops import memo

    model, _ = three
    layer = model.get_submodule(model._gift_state.entries[0].name)

    def interrupt(*_):
        raise KeyboardInterrupt

    kept = []
    with mixed_adapters(model, ["a", "b", "c", "a", "b"]):
        handle = layer.register_forward_hook(interrupt)
        try:
            logits(model)
        except KeyboardInterrupt as exc:
            kept.append(exc)
        handle.remove()
        logits(model)  # still correct inside the block (the ids are the same batch's)
    assert kept and not memo._stack()


def _train_every_adapter(model):
    """Every adapter's Thetas trainable, the model in training mode; the batch's adapter names."""
    for n in ("a", "b", "c"):
        model.gift_thetas[n].requires_grad_(True)
    model.train()
    return ["c", "a", "__base__", "b", "c"]


def _theta_grads(model):
    """The Thetas' grads by parameter name, then cleared."""
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and "gift_thetas" in k}
    model.zero_grad(set_to_none=True)
    return out


def test_reentrant_checkpointing_backward_after_the_block_is_refused(three):
    """Reentrant activation checkpointing recomputes each layer inside backward: after the block
    the layers are no longer mixed, and the recompute would give one adapter's gradients to
    every sample. Refused by name; inside the block the grads equal an uncheckpointed run's,
    and a later ordinary checkpointed step is not refused."""
    model, _ = three
    names = _train_every_adapter(model)
    with mixed_adapters(model, names):
        model(IDS).logits.square().mean().backward()
    want = _theta_grads(model)
    assert {k.split(".")[1] for k in want} == {"a", "b", "c"}  # every adapter of the batch
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    try:
        with mixed_adapters(model, names):
            model(IDS).logits.square().mean().backward()
        got = _theta_grads(model)
        assert got.keys() == want.keys()
        assert all(rel_err(got[k], want[k]) <= TOL for k in want)
        refused = r"mixed_adapters: layer .* recomputed by backward\(\) after the block"
        with mixed_adapters(model, names):
            loss = model(IDS).logits.square().mean()
        with pytest.raises(RuntimeError, match=refused):
            loss.backward()
        model.zero_grad(set_to_none=True)
        with mixed_adapters(model, names):  # a kept graph is recomputed by every backward
            loss = model(IDS).logits.square().mean()
            loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=refused):
            loss.backward()
        model.zero_grad(set_to_none=True)
        with mixed_adapters(model, names):  # the inner model called directly: the model's hooks do not run
            loss = model.model(IDS).last_hidden_state.square().mean()
        with pytest.raises(RuntimeError, match=refused):
            loss.backward()
        model.zero_grad(set_to_none=True)
        model(IDS).logits.square().mean().backward()  # an ordinary step: the layers' own adapter
        assert set(k.split(".")[1] for k in _theta_grads(model)) == {"a"}
    finally:
        model.gradient_checkpointing_disable()


def test_non_reentrant_checkpointing_inside_the_block_gives_the_same_grads(three):
    """Non-reentrant checkpointing recomputes a layer's saved tensors in backward, one layer at
    a time: what the layer saved (its own bank's stacking included: with grad, banks are not
    shared between layers) must come out of its recompute alike, or torch raises."""
    model, _ = three
    names = _train_every_adapter(model)

    def grads():
        with mixed_adapters(model, names):
            model(IDS).logits.square().mean().backward()
        return _theta_grads(model)

    want = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        got = grads()
    finally:
        model.gradient_checkpointing_disable()
    assert got.keys() == want.keys() and {k.split(".")[1] for k in want} == {"a", "b", "c"}
    assert all(rel_err(got[k], want[k]) <= TOL for k in want)


def test_multi_tenant_training_gives_each_adapter_its_own_grads(three, tmp_path):
    model, dirs = three
    for theta in model.gift_thetas["c"].values():
        theta.requires_grad_(True)
    with mixed_adapters(model, ["a", "c", "a", "__base__", "c"]):
        model(IDS).logits.square().sum().backward()
    single = load_gift(llama(), dirs["c"])
    single(IDS[[1, 4]]).logits.square().sum().backward()
    for key, theta in model.gift_thetas["c"].items():
        torch.testing.assert_close(theta.phi.grad, single.gift_thetas["default"][key].phi.grad, rtol=1e-4, atol=1e-6)
    assert model.gift_thetas["b"]["q_proj"].phi.grad is None  # b had no sample and is frozen


def test_an_optimizer_step_inside_the_block_is_seen_by_the_next_forward(three):
    """Training through a block: each forward uses the Thetas' current values, so after a step
    the outputs inside the block equal the outputs after it (no bank kept from the entry)."""
    model, _ = three
    params = [p for theta in model.gift_thetas["c"].values() for p in (theta.phi, theta.psi)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=5.0)
    names = ["a", "c", "__base__", "c", "b"]
    with torch.no_grad():  # the block entered without grad: its forwards still train
        ctx = mixed_adapters(model, names)
        ctx.__enter__()
    try:
        before = logits(model)
        for _ in range(2):
            opt.zero_grad()
            model(IDS).logits.square().mean().backward()
            opt.step()
        inside = logits(model)
    finally:
        ctx.__exit__(None, None, None)
    assert (inside - before).abs().max() > 0  # the steps moved c (a bank kept from the entry: exactly 0)
    with mixed_adapters(model, names):
        again = logits(model)
    torch.testing.assert_close(inside, again, rtol=0, atol=0)


def test_refusals_leave_the_model_unchanged(three, tmp_path):
    model, dirs = three
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = saved_adapter(tmp_path, llama, GiftConfig(rank=3, target_modules=["q_proj"]), 6, "other")
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] but .* use \['q_proj', 'v_proj'\]"):
        load_gift(model, other, adapter_name="d")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        load_gift(model, dirs["a"], adapter_name="b")
    with pytest.raises(ValueError, match="adapter_name must be"):
        load_gift(model, dirs["a"], adapter_name="__base__")
    with pytest.raises(ValueError, match=r"load_gift\(.*\): LlamaForCausalLM is already adapted; to add this adapter "
                                         r"beside the ones it holds pass adapter_name="):
        load_gift(model, dirs["a"])  # no silent replacement of the adapter the layers hold
    headed = saved_adapter(tmp_path, llama, GiftConfig(rank=3, target_modules=["q_proj", "v_proj"],
                                                       trainable_modules=["lm_head"]), 7, "headed")
    with pytest.raises(ValueError, match="trained head module"):
        load_gift(model, headed, adapter_name="h")
    with pytest.raises(ValueError, match=r"no GIFT adapter\(s\) \['z'\]"):
        with mixed_adapters(model, ["a", "z"]):
            pass
    with pytest.raises(ValueError, match="got input of shape .* but 3 adapter name"):
        with mixed_adapters(model, ["a", "b", "c"]):
            logits(model)  # 5 samples
    assert gift_adapter_names(model) == ["a", "b", "c"]
    assert all(isinstance(model.get_submodule(e.name), GiftLinear) for e in model._gift_state.entries)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    delete_gift_adapter(model, "c")
    assert gift_adapter_names(model) == ["a", "b"]
    with pytest.raises(ValueError, match="only added adapters"):
        delete_gift_adapter(model, "a")
    merge_gift(model)
    with pytest.raises(RuntimeError, match="merged"):
        with mixed_adapters(model, ["a"] * 5):
            pass


def test_merge_inside_a_mixed_block_is_refused(three):
    model, _ = three
    want = logits(model)
    names = ["a", "b", "__base__", "c", "a"]
    with mixed_adapters(model, names):
        mixed = logits(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"merge_gift: .* mixed_adapters"):
            merge_gift(model)
        with pytest.raises(RuntimeError, match=r"mixed_adapters: .* already inside a mixed_adapters block"):
            with mixed_adapters(model, names):
                pass
        assert not model._gift_state.merged
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(logits(model), mixed)  # still mixed
    assert all(isinstance(model.get_submodule(e.name), GiftLinear) for e in model._gift_state.entries)
    assert torch.equal(logits(model), want)
    merge_gift(model)  # outside the block: allowed, and the model is really merged
    assert not any(isinstance(m, GiftLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def test_model_with_a_trained_head_is_refused():
    model = apply_gift(llama(), GiftConfig(rank=2, target_modules=["q_proj"], trainable_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"trained head module\(s\) \['lm_head'\]"):
        with mixed_adapters(model, ["default"] * 5):
            pass


def test_added_adapter_exports_and_peft_lora_mixed_batch_agrees(three, tmp_path):
    """The same adapters exported to LoRA, PEFT's own adapter_names= mixed batch: the same logits."""
    model, dirs = three
    base = llama()
    for name in ("a", "b", "c"):
        export_lora(model, tmp_path / f"lora_{name}", adapter_name=name)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora_a", adapter_name="a")
    lora.load_adapter(tmp_path / "lora_b", adapter_name="b")
    lora.load_adapter(tmp_path / "lora_c", adapter_name="c")
    names = ["c", "b", "__base__", "a", "b"]
    with torch.no_grad():
        want = lora(IDS, adapter_names=names).logits
    with mixed_adapters(model, names):
        got = logits(model)
    assert rel_err(got, want) <= TOL


def test_peft_mixed_batch_uses_the_mixed_op(monkeypatch):
    base = llama()
    model = get_peft_model(copy.deepcopy(base), GiftPeftConfig(r=3, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", GiftPeftConfig(r=2, target_modules=["q_proj", "v_proj"], out_bias=True))
    model.add_adapter("q_only", GiftPeftConfig(r=2, target_modules=["q_proj"]))
    for name, seed in (("default", 1), ("other", 2), ("q_only", 3)):
        randomize_thetas(model.base_model.gift_thetas[name], seed=seed)
    model.eval()
    names = ["other", "default", "__base__", "q_only", "other"]
    want = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want.append(logits(model, IDS[i:i + 1]))
        else:
            model.set_adapter(name)
            want.append(logits(model, IDS[i:i + 1]))
    calls = []
    real = mixed.gift_linear_mixed
    monkeypatch.setattr(mixed, "gift_linear_mixed", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = model(IDS, adapter_names=names).logits
    assert rel_err(got, torch.cat(want)) <= TOL
    assert len(calls) == 4  # one per adapted layer, for the 3 adapters at once
