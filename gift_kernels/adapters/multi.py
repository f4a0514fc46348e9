"""Several named GIFT adapters in one model, and one forward in which each sample has its own.

    model = load_gift(base, "adapters/support", adapter_name="support")   # the model's first adapter
    load_gift(model, "adapters/legal", adapter_name="legal")              # more adapters, same targets
    load_gift(model, "adapters/medical", adapter_name="medical")
    with mixed_adapters(model, ["legal", "__base__", "support", "legal"]):
        logits = model(input_ids).logits                                   # sample i through its adapter

A GIFT adapter is one Theta per layer *type* (shared by every layer of that type), so a bank of
A adapters costs A Thetas per type, not A low-rank pairs per layer: as many times less than a
bank of LoRA adapters as the model has layers of each type. In a mixed forward every adapted
layer runs :func:`gift_kernels.gift_linear_mixed` (:mod:`gift_kernels.nn.mixed`): one segmented
skinny product pair on its input for all the adapters of the batch, then one base GEMM for every
sample.

Storage: one adapter store, ``model.gift_thetas[name][key]`` (the PEFT tuner's layout). The
adapter applied by :func:`~gift_kernels.apply_gift` / :func:`~gift_kernels.load_gift` (named
``"default"`` unless ``load_gift(..., adapter_name=)`` named it) is the one the layers hold: it
trains, saves and merges. The added ones sit beside it (frozen, in the model's state_dict,
moved by ``.to()``). An added adapter must have been trained with the same targets
(``target_modules``, ``layers``, ``layers_pattern``, ``sharing``, ``stacked``) and Theta dtype;
its rank and projection biases may differ (a bank is zero-padded to its largest rank, which is
exact). Adapters that trained a head (``trainable_modules``, a task head) are refused: one
forward cannot switch heads per sample.

:func:`mixed_adapters` puts each GIFT layer in its mixed mode for the duration of the block
(:meth:`~gift_kernels.nn.GiftLinear.set_mixed`: the same layer, no other class) and back on
exit, even on an error; :func:`~gift_kernels.merge_gift` and a nested block are refused inside
it. One forward at a time per model: it is not thread-safe. ``"__base__"`` selects the
base model (no adapter). Each layer stacks the adapters' banks at every forward from the
Thetas' current values (an optimizer step inside the block is seen by the next forward;
differentiable, so multi-tenant training through the block gives each adapter the gradient of
its own samples); with activation checkpointing, backward must run inside the block (a
checkpointed layer recomputed after it would no longer be mixed: refused under reentrant
checkpointing, torch's ``CheckpointError`` under non-reentrant). The layers of one forward of
``model`` share its per-row ids, so the row layout of the batch is built once per forward
(:class:`~gift_kernels.nn.mixed.SampleIds`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Sequence

import torch
from torch import nn

from ..nn.mixed import SampleIds
from ..nn.theta import make_theta
from .checkpoint import check_base, check_saved_tensors, read_checkpoint
from .config import TASK_HEADS
from .model import adapter_state, adapter_store, layer_thetas
from .planning import THETAS_ATTR

__all__ = ["BASE", "add_adapter", "delete_gift_adapter", "gift_adapter_names", "mixed_adapters"]

BASE = "__base__"  # as in PEFT's adapter_names: the base model, no adapter
_STRUCTURE = ("target_modules", "layers", "layers_pattern", "sharing", "stacked")


# --------------------------------------------------------------------------- named adapters


def check_adapter_name(name, what: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"{what}: adapter_name must be a non-empty str without '.' and not {BASE!r}, got {name!r}")


def gift_adapter_names(model: nn.Module) -> List[str]:
    """The adapters ``model`` holds: the one its layers hold first, then the added ones."""
    state = adapter_state(model, "gift_adapter_names")
    return [state.adapter] + [n for n in adapter_store(model).keys() if n != state.adapter]


def adapter_thetas(model: nn.Module, name: str, what: str = "gift_kernels") -> nn.ModuleDict:
    """``key -> GiftTheta`` of adapter ``name``."""
    names = gift_adapter_names(model)
    if name not in names:
        raise ValueError(f"{what}: {type(model).__name__} has no GIFT adapter {name!r}; it has {names}")
    return adapter_store(model)[name]


def delete_gift_adapter(model: nn.Module, name: str) -> None:
    """Remove an added adapter (the one the layers hold cannot be removed this way)."""
    what = "delete_gift_adapter"
    adapter_thetas(model, name, what)
    state = adapter_state(model, what)
    if name == state.adapter:
        raise ValueError(f"{what}: {name!r} is the adapter the layers hold; only added adapters can be deleted")
    if state.mixed:
        raise RuntimeError(f"{what}: {type(model).__name__} is inside a mixed_adapters block; delete after the block")
    del adapter_store(model)[name]


def add_adapter(model: nn.Module, src: Path, name: str, *, strict: bool = True) -> nn.Module:
    """``load_gift(model, src, adapter_name=name)`` on an adapted model: adds the adapter saved in
    ``src`` beside the ones it holds, frozen. Checks everything before the model is changed (see
    the module docstring for what must match)."""
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
    for key, current in layer_thetas(model, what).items():
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
    adapter_store(model)[name] = thetas
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
    thetas = layer_thetas(model, what)
    key_of = {id(t): k for k, t in thetas.items()}
    device = next(iter(thetas.values())).phi.device
    sample_ids = torch.tensor([used.index(a) if a != BASE else -1 for a in adapter_names], device=device)
    per_adapter = [adapter_thetas(model, a, what) for a in used]
    if state.mixed:
        raise RuntimeError(f"{what}: {type(model).__name__} is already inside a mixed_adapters block (one at a time "
                           f"per model)")
    for entry in state.entries:
        if model.get_submodule(entry.name) is not entry.adapted:
            raise RuntimeError(f"{what}: layer {entry.name!r} is not the GIFT layer apply_gift put there (the model "
                               f"was changed)")
    ids = SampleIds(sample_ids)
    state.mixed = True
    handles = []
    try:
        for entry in state.entries:
            adapters = [[p[key_of[id(t)]] for p in per_adapter] for t in entry.adapted.chunk_thetas] if used else None
            entry.adapted.set_mixed(adapters, ids, f"{what}: layer {entry.name!r}")
        # each forward of the model opens the ids its layers share (closed on an exception too)
        handles.append(model.register_forward_pre_hook(lambda *_: ids.open()))
        handles.append(model.register_forward_hook(lambda *_: ids.close(), always_call=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        ids.reset()
        for entry in state.entries:
            entry.adapted.clear_mixed()
        state.mixed = False
