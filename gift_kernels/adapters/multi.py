"""Several named GIFT adapters in one model, and one forward in which each sample has its own.

    model = load_gift(base, "adapters/support", adapter_name="support")   # the model's first adapter
    load_gift(model, "adapters/legal", adapter_name="legal")              # more adapters, same targets
    load_gift(model, "adapters/medical", adapter_name="medical")
    with mixed_adapters(model, ["legal", "__base__", "support", "legal"]):
        logits = model(input_ids).logits                                   # sample i through its adapter

A GIFT adapter is one Theta per layer *type* (shared by every layer of that type), so a bank of
A adapters costs A Thetas per type, not A low-rank pairs per layer: as many times less than a
bank of LoRA adapters as the model has layers of each type. In a mixed forward every adapted
layer runs :func:`gift_kernels.gift_linear_mixed`: one segmented skinny product pair on its
input for all the adapters of the batch, then one base GEMM for every sample.

Storage: the adapter applied by :func:`~gift_kernels.apply_gift` / :func:`~gift_kernels.load_gift`
stays in ``model.gift_thetas`` (named ``"default"`` unless ``load_gift(..., adapter_name=)``
named it); the others live in ``model.gift_adapters[name][key]`` (frozen, in the model's
state_dict, moved by ``.to()``). An added adapter must have been trained with the same targets
(``target_modules``, ``layers``, ``layers_pattern``, ``sharing``, ``stacked``) and Theta dtype;
its rank and projection biases may differ (a bank is zero-padded to its largest rank, which is
exact). Adapters that trained a head (``trainable_modules``, a task head) are refused: one
forward cannot switch heads per sample.

:func:`mixed_adapters` swaps each GIFT layer for a per-sample wrapper for the duration of the
block (as :func:`~gift_kernels.merge_gift` swaps layers) and puts the layers back on exit, even
on an error. One forward at a time per model: it is not thread-safe. ``"__base__"`` selects the
base model (no adapter). The adapters' banks are stacked once per block from the Thetas'
current values (never stale; differentiable, so multi-tenant training through the block gives
each adapter the gradient of its own samples).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.linear import GiftLinear
from ..nn.merge import chunk_bounds
from ..nn.theta import GiftTheta, GiftThetaWithBias, make_theta
from ..ops.functional import gift_input_mixed, gift_linear_mixed
from .config import TASK_HEADS
from .model import adapter_state
from .planning import THETAS_ATTR

__all__ = ["ADAPTERS_ATTR", "BASE", "Bank", "delete_gift_adapter", "gift_adapter_names", "mixed_adapters",
           "mixed_linear", "stack_bank"]

ADAPTERS_ATTR = "gift_adapters"  # on the root: ModuleDict[name] -> ModuleDict[key] -> GiftTheta
BASE = "__base__"  # as in PEFT's adapter_names: the base model, no adapter
DEFAULT = "default"
_NAME_ATTR = "_gift_adapter_name"  # model.__dict__: the name of the adapter in model.gift_thetas
_STRUCTURE = ("target_modules", "layers", "layers_pattern", "sharing", "stacked")


# --------------------------------------------------------------------------- banks and the mixed layer


@dataclass
class Bank:
    """The Thetas of the adapters of one batch for one layer type, stacked: ``phis (U, d_in, r)``,
    ``psis (U, r, d_in)`` (zero-padded to the largest rank) and, when some adapter has projection
    biases, ``directions (U, d_in)``: each adapter's ``psi^T b1 + b2`` (zero for the others)."""

    phis: Tensor
    psis: Tensor
    directions: Optional[Tensor] = None


def stack_bank(thetas: Sequence[GiftTheta]) -> Bank:
    """One :class:`Bank` from the Thetas of U adapters for one layer type (differentiable)."""
    rank = max(t.rank for t in thetas)
    dtype = thetas[0].phi.dtype
    for t in thetas[1:]:
        dtype = torch.promote_types(dtype, t.phi.dtype)  # a bank never narrows a Theta
    phis = torch.stack([F.pad(t.phi.to(dtype), (0, rank - t.rank)) for t in thetas])
    psis = torch.stack([F.pad(t.psi.to(dtype), (0, 0, 0, rank - t.rank)) for t in thetas])
    directions = None
    if any(isinstance(t, GiftThetaWithBias) for t in thetas):
        directions = torch.stack([t.token_direction().to(dtype) if isinstance(t, GiftThetaWithBias)
                                  else t.phi.new_zeros(t.in_features, dtype=dtype) for t in thetas])
    return Bank(phis, psis, directions)


def token_ids(x: Tensor, sample_ids: Tensor, where: str) -> Tensor:
    """Per-row ids of ``x (batch, ..., d_in)`` from one id per sample (dim 0)."""
    if x.dim() < 2 or x.shape[0] != sample_ids.shape[0]:
        raise ValueError(f"{where}: got input of shape {tuple(x.shape)} but {sample_ids.shape[0]} adapter name(s); "
                         f"a mixed batch needs the samples along dim 0 of every adapted layer's input")
    per_sample = math.prod(x.shape[1:-1])
    return sample_ids.to(x.device).repeat_interleave(per_sample)


def mixed_linear(
    x: Tensor, ids: Tensor, banks: Sequence[Bank], splits: Sequence[int], *,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, base_layer: Optional[nn.Module] = None,
) -> Tensor:
    """One adapted layer on a mixed batch: row chunk ``c`` of the output (``splits``) through
    ``banks[c]``, row ``i`` of ``x`` through adapter ``ids[i]`` of the banks (-1: none).

    Over a dense ``weight (d_out, d_in)`` / ``bias``: :func:`gift_linear_mixed` per chunk; over
    a module base (``base_layer``, run as a black box): ``base_layer(gift_input_mixed(...))``
    per chunk (chunks times the base's cost, as :class:`~gift_kernels.nn.GiftLinear` does).
    """
    ids = ids.reshape(x.shape[:-1])
    outs = []
    for (start, stop), bank in zip(chunk_bounds(splits), banks):
        if base_layer is not None:
            y = base_layer(gift_input_mixed(x, bank.phis, bank.psis, ids))
            if len(splits) > 1:
                y = y[..., start:stop]
        else:
            b = None if bias is None else bias[start:stop]
            y = gift_linear_mixed(x, weight[start:stop], b, bank.phis, bank.psis, ids)
        if bank.directions is not None:  # the projection biases: a per-row scalar x . v_a
            v = torch.cat([bank.directions.new_zeros(1, x.shape[-1]), bank.directions])[ids + 1]
            y = y + (x * v.to(x.dtype)).sum(-1, keepdim=True).to(y.dtype)
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class _MixedGiftLayer(nn.Module):
    """A GIFT layer for the duration of :func:`mixed_adapters`: each sample through its adapter."""

    def __init__(self, layer: GiftLinear, banks: Optional[List[Bank]], sample_ids: Tensor, name: str) -> None:
        super().__init__()
        self.layer = layer
        self.banks = banks
        self.sample_ids = sample_ids
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if self.banks is None:  # every sample "__base__"
            if layer.has_module_base:
                return layer.base_layer(x)
            return F.linear(x, layer.weight_rows(), layer.bias)
        ids = token_ids(x, self.sample_ids, f"mixed_adapters: layer {self.name!r}")
        if layer.has_module_base:
            return mixed_linear(x, ids, self.banks, layer.splits, base_layer=layer.base_layer)
        return mixed_linear(x, ids, self.banks, layer.splits, weight=layer.weight_rows(), bias=layer.bias)


# --------------------------------------------------------------------------- named adapters


def check_adapter_name(name, what: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"{what}: adapter_name must be a non-empty str without '.' and not {BASE!r}, got {name!r}")


def set_default_name(model: nn.Module, name: str) -> None:
    model.__dict__[_NAME_ATTR] = name


def _default_name(model: nn.Module) -> str:
    return model.__dict__.get(_NAME_ATTR, DEFAULT)


def gift_adapter_names(model: nn.Module) -> List[str]:
    """The adapters ``model`` holds: the one in ``model.gift_thetas`` first, then the added ones."""
    adapter_state(model, "gift_adapter_names")
    extra = list(getattr(model, ADAPTERS_ATTR).keys()) if ADAPTERS_ATTR in model._modules else []
    return [_default_name(model)] + extra


def adapter_thetas(model: nn.Module, name: str, what: str = "gift_kernels") -> nn.ModuleDict:
    """``key -> GiftTheta`` of adapter ``name``."""
    names = gift_adapter_names(model)
    if name not in names:
        raise ValueError(f"{what}: {type(model).__name__} has no GIFT adapter {name!r}; it has {names}")
    if name == _default_name(model):
        return getattr(model, THETAS_ATTR)
    return getattr(model, ADAPTERS_ATTR)[name]


def delete_gift_adapter(model: nn.Module, name: str) -> None:
    """Remove an added adapter (the one in ``model.gift_thetas`` cannot be removed this way)."""
    what = "delete_gift_adapter"
    adapter_thetas(model, name, what)
    if name == _default_name(model):
        raise ValueError(f"{what}: {name!r} is the adapter the layers hold (model.{THETAS_ATTR}); only added adapters "
                         f"can be deleted")
    del getattr(model, ADAPTERS_ATTR)[name]


def add_adapter(model: nn.Module, src: Path, name: str, *, strict: bool = True) -> nn.Module:
    """``load_gift(model, src, adapter_name=name)`` on an adapted model: checks everything before
    the model is changed (see the module docstring for what must match)."""
    from .checkpoint import check_base, check_saved_tensors, read_checkpoint

    what = f"load_gift({src}, adapter_name={name!r})"
    state = adapter_state(model, what)
    if name in gift_adapter_names(model):
        raise ValueError(f"{what}: {type(model).__name__} already has an adapter named {name!r}; delete it first "
                         f"(delete_gift_adapter) or choose another name")
    config, saved, ten_path, base = read_checkpoint(src, what)
    ours = state.config.to_dict()
    theirs = config.to_dict()
    for field_name in _STRUCTURE:
        if ours[field_name] != theirs[field_name]:
            raise ValueError(f"{what}: the adapter was trained with {field_name}={theirs[field_name]!r} but "
                             f"{type(model).__name__}'s adapters use {ours[field_name]!r}; adapters mixed in one "
                             f"model must adapt the same layers the same way")
    heads = list(config.trainable_modules) + list(TASK_HEADS.get(config.task_type, ()))
    if heads or any(not k.startswith(THETAS_ATTR + ".") for k in saved):
        raise ValueError(f"{what}: the adapter trained head module(s) {heads or sorted(saved)[:3]}; one forward cannot "
                         f"switch heads per sample. Load it on its own model (load_gift on a fresh base model)")
    thetas = nn.ModuleDict()
    expected = {}
    for key, current in getattr(model, THETAS_ATTR).items():
        theta = make_theta(current.in_features, config.rank, in_bias=config.in_bias, out_bias=config.out_bias,
                           device=current.phi.device, dtype=current.phi.dtype)  # one dtype per bank
        thetas[key] = theta
        for pname, p in theta.named_parameters():
            expected[f"{THETAS_ATTR}.{key}.{pname}"] = (p.shape, current.phi.dtype)
    check_saved_tensors(saved, expected, ten_path, model, config, strict, what)
    check_base(base, {e.name: (e.adapted.in_features, e.adapted.out_features) for e in state.entries}, ten_path,
               model, what)
    with torch.no_grad():
        for key, theta in thetas.items():
            for pname, p in theta.named_parameters():
                p.copy_(saved[f"{THETAS_ATTR}.{key}.{pname}"])
    thetas.requires_grad_(False)
    if ADAPTERS_ATTR not in model._modules:
        setattr(model, ADAPTERS_ATTR, nn.ModuleDict())
    getattr(model, ADAPTERS_ATTR)[name] = thetas
    return model


# --------------------------------------------------------------------------- the mixed forward


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, sample ``i`` of every forward of ``model`` (dim 0 of each adapted
    layer's input) runs through adapter ``adapter_names[i]`` (``"__base__"``: no adapter).

    Refused, with the model unchanged, if the model is merged, if it trained a head, or if a
    name is unknown. Each forward inside the block must have ``len(adapter_names)`` samples.
    """
    what = "mixed_adapters"
    state = adapter_state(model, what)
    if state.merged:
        raise RuntimeError(f"{what}: {type(model).__name__} is merged (merge_gift); unmerge_gift(model) first")
    if state.heads:
        raise ValueError(f"{what}: {type(model).__name__} trained head module(s) {state.heads}, which every sample "
                         f"would share (\"__base__\" samples included); per-sample adapters need frozen heads")
    if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
        raise TypeError(f"{what}: adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    known = gift_adapter_names(model)
    unknown = sorted({a for a in adapter_names if a != BASE} - set(known))
    if unknown:
        raise ValueError(f"{what}: {type(model).__name__} has no GIFT adapter(s) {unknown}; it has {known} (and "
                         f"{BASE!r} for none)")
    used = [a for a in dict.fromkeys(adapter_names) if a != BASE]
    thetas = getattr(model, THETAS_ATTR)
    key_of = {id(t): k for k, t in thetas.items()}
    device = next(iter(thetas.values())).phi.device
    sample_ids = torch.tensor([used.index(a) if a != BASE else -1 for a in adapter_names], device=device)
    banks: Optional[Dict[str, Bank]] = None
    if used:
        per_adapter = [adapter_thetas(model, a, what) for a in used]
        banks = {key: stack_bank([p[key] for p in per_adapter]) for key in thetas}
    swapped = []
    try:
        for entry in state.entries:
            parent_name, _, child = entry.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if getattr(parent, child) is not entry.adapted:
                raise RuntimeError(f"{what}: layer {entry.name!r} is not the GIFT layer apply_gift put there (nested "
                                   f"mixed_adapters blocks, or the model was changed)")
            layer_banks = None if banks is None else [banks[key_of[id(t)]] for t in entry.adapted.chunk_thetas]
            setattr(parent, child, _MixedGiftLayer(entry.adapted, layer_banks, sample_ids, entry.name))
            swapped.append((parent, child, entry.adapted))
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
