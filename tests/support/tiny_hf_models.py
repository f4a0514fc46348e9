"""Tiny random Hugging Face models (BERT, Llama, GPT-2) built offline, shared by the adapter
and PEFT tests (plus the Theta randomiser of gift_testing, re-exported). Import after
``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
import transformers

from gift_testing import randomize_thetas  # noqa: F401  (re-exported: the tests import it from here too)


def bert(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def llama(tied: bool = False):
    """``tied=True``: lm_head shares the input embeddings' weight (tie_word_embeddings)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()
