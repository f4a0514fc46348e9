"""Tiny random Hugging Face models (BERT, Llama, GPT-2) built offline, and a Theta
randomiser, shared by the adapter and PEFT tests. Import after
``pytest.importorskip("transformers")``."""

from __future__ import annotations

import math

import torch
import transformers


def bert(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def randomize_thetas(thetas, seed: int = 1) -> None:
    """Fill every Theta parameter of ``thetas`` (a ModuleDict) with N(0, 1/d_in): a trained-looking adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in thetas.values():
            for p in theta.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(theta.in_features))
