"""A tiny decoder-only transformer adapted with GIFT, for the training-at-scale tests (DDP,
FSDP2, torch.compile, checkpointing, autocast).

One Theta per layer type (q, k, v, o, up, down), shared by every block and held once at the
root as ``model.gift_thetas["default"]`` -- the layout that trips naive distributed integrations (one
parameter used by many layers). Adapted through ``apply_gift`` (the default) or by hand from
``GiftTheta`` + ``GiftLinear.from_linear`` (``adapter="hand"``), which builds the same layout
without the adapter.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gift_kernels import GiftLinear, GiftTheta
from gift_kernels.adapters import GiftConfig, apply_gift

ATTN = ("q", "k", "v", "o")
MLP = ("up", "down")
TYPES = ATTN + MLP


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in ATTN)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, d_ff)
        self.down = nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 61, d: int = 32, heads: int = 4, d_ff: int = 48, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        # how each block is run: None, "reentrant" or "non_reentrant" activation checkpointing
        self.checkpointing: Optional[str] = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            if self.checkpointing is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(self.ln_f(x))


def adapt_by_hand(model: TinyLM, rank: int = 4, *, theta_dtype: Optional[torch.dtype] = None, seed: int = 0) -> TinyLM:
    """Freeze ``model`` and put GIFT on every q/k/v/o/up/down layer, one shared Theta per type.

    psi is drawn at random (not the zero init) so that every Theta grad is non-zero and a
    test comparing grads can fail.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    first = model.blocks[0]
    g = torch.Generator().manual_seed(seed)
    thetas = nn.ModuleDict()
    for name in TYPES:
        d_in = getattr(first, name).in_features
        theta = GiftTheta(d_in, rank, dtype=theta_dtype or first.q.weight.dtype)
        with torch.no_grad():
            theta.phi.copy_(torch.randn(theta.phi.shape, generator=g) * d_in**-0.5)
            theta.psi.copy_(torch.randn(theta.psi.shape, generator=g) * d_in**-0.5)
        thetas[name] = theta
    model.gift_thetas = nn.ModuleDict({"default": thetas})  # the layout of apply_gift's store
    for block in model.blocks:
        for name in TYPES:
            setattr(block, name, GiftLinear.from_linear(getattr(block, name), thetas[name]))
    return model


def adapt_with_apply_gift(model: TinyLM, rank: int = 4, *, seed: int = 0) -> TinyLM:
    """``apply_gift`` on the same layers, then phi and psi drawn as in :func:`adapt_by_hand`
    (apply_gift's psi starts at zero, which would make every phi grad zero)."""
    apply_gift(model, GiftConfig(rank=rank, target_modules=list(TYPES)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in model.gift_thetas["default"].values():
            d_in = theta.in_features
            theta.phi.copy_(torch.randn(theta.phi.shape, generator=g) * d_in**-0.5)
            theta.psi.copy_(torch.randn(theta.psi.shape, generator=g) * d_in**-0.5)
    return model


def make_model(seed: int = 0, *, adapter: str = "apply_gift", **kw) -> TinyLM:
    """The same frozen backbone and Thetas for a given seed, in every process."""
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    if adapter == "apply_gift":
        return adapt_with_apply_gift(model, seed=seed + 1)
    if adapter == "hand":
        return adapt_by_hand(model, seed=seed + 1)
    raise ValueError(f"make_model: adapter must be 'apply_gift' or 'hand', got {adapter!r}")


def theta_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The trainable parameters, each once (named_parameters drops the shared duplicates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_batch(n: int, seq: int = 8, vocab: int = 61, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run with ``n`` intra-op threads. The tests' matrices are tiny: on a shared 2-core
    machine a second OpenMP thread only adds barrier waits, which cost seconds per test
    when the cores are busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
