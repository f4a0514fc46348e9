"""Activation checkpointing through GIFT layers: Theta gets the same grads as without it.

The classic PEFT failure: ``checkpoint(..., use_reentrant=True)`` runs the block under
``no_grad`` and reaches its parameters only through its tensor inputs. With frozen input
embeddings (every GIFT fine-tune) no input requires grad, so the shared Theta's grads from
the checkpointed blocks are lost -- an error when nothing else is trainable, silently when
a trainable head follows. ``gift_kernels.training.enable_input_require_grads`` (the
equivalent of transformers' method of that name) is the fix; non-reentrant checkpointing
does not need it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gift_kernels.adapters import GiftConfig, apply_gift
from gift_kernels.adapters.training import enable_input_require_grads
from tiny_transformer import intra_op_threads, lm_loss, make_batch, make_model, theta_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _theta_grads(model, ids, targets):
    for p in model.parameters():
        p.grad = None
    lm_loss(model, ids, targets).backward()
    return {f"gift_thetas.{k}.{n}": getattr(t, n).grad for k, t in model.gift_thetas["default"].items() for n in ("phi", "psi")}


def _assert_same_grads(grads, ref):
    assert grads.keys() == ref.keys()
    for name, g_ref in ref.items():
        assert g_ref is not None and g_ref.abs().max() > 0, f"vacuous: reference grad of {name} is zero"
        assert grads[name] is not None, f"{name}: no grad under checkpointing"
        # recomputation repeats the same float ops in the same order
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("adapter", ["apply_gift", "hand"])
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointing_keeps_theta_grads_with_frozen_embeddings(mode, adapter):
    model = make_model(adapter=adapter)
    assert not model.embed.weight.requires_grad
    ids, targets = make_batch(3, seq=7)
    ref = _theta_grads(model, ids, targets)
    model.checkpointing = mode
    if mode == "reentrant":
        enable_input_require_grads(model)
    _assert_same_grads(_theta_grads(model, ids, targets), ref)


def test_reentrant_without_input_grads_loses_theta_grads():
    # shows what enable_input_require_grads fixes, so the test above cannot pass vacuously
    model = make_model()
    ids, targets = make_batch(3, seq=7)
    ref = _theta_grads(model, ids, targets)
    model.checkpointing = "reentrant"
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = lm_loss(model, ids, targets)
    # everything trainable sits inside the checkpointed blocks: loud
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()

    # a trainable head after the blocks: silent, Theta just gets no grad
    model.head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        grads = _theta_grads(model, ids, targets)
    assert model.head.weight.grad is not None
    assert all(g is None for g in grads.values()), "reentrant checkpointing unexpectedly reached Theta"

    handle = enable_input_require_grads(model)
    _assert_same_grads(_theta_grads(model, ids, targets), ref)
    handle.remove()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        assert all(g is None for g in _theta_grads(model, ids, targets).values()), "handle.remove() did not undo it"


def test_checkpointing_gives_the_same_input_grad():
    # a checkpointed block inside a larger trainable graph: dx must match as well
    model = make_model()
    block = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g)
    grad_out = torch.randn(2, 5, 32, generator=g)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        for p in block.parameters():
            p.grad = None
        fn(xi).backward(grad_out)
        return xi.grad, {n: p.grad.clone() for n, p in theta_params(block).items()}

    dx_ref, ref = run(block)
    for reentrant in (False, True):
        dx, grads = run(lambda t: checkpoint(block, t, use_reentrant=reentrant))
        torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-7)
        _assert_same_grads(grads, ref)


class _NoEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _TwoEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = nn.Embedding(8, 4)
        self.tokens = nn.Embedding(8, 4)

    def get_input_embeddings(self):
        return self.tokens


def test_enable_input_require_grads_finds_the_embeddings():
    model = _TwoEmbeddings()
    model.requires_grad_(False)
    handle = enable_input_require_grads(model)
    ids = torch.tensor([[1, 2]])
    assert model.tokens(ids).requires_grad, "get_input_embeddings() is the module to hook"
    assert not model.positions(ids).requires_grad
    handle.remove()
    assert not model.tokens(ids).requires_grad

    handle = enable_input_require_grads(model, embeddings=model.positions)
    assert model.positions(ids).requires_grad and not model.tokens(ids).requires_grad
    handle.remove()

    with pytest.raises(ValueError, match="_NoEmbedding has no get_input_embeddings"):
        enable_input_require_grads(_NoEmbedding())


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    apply_gift(model, GiftConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for theta in model.gift_thetas["default"].values():
            theta.psi.copy_(torch.randn(theta.psi.shape, generator=g) * 0.2)
    return model.train()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hugging_face_gradient_checkpointing(use_reentrant):
    # transformers' own switch: it hooks the input embeddings itself (v5 does, for input_ids models)
    model = _tiny_llama()
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref = grads()
    assert len(ref) == 6 and len(calls) == 1  # phi and psi of three shared Thetas
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    got = grads()
    assert len(calls) == 2, "the adapted layer was not recomputed in backward: checkpointing is off"
    _assert_same_grads(got, ref)
