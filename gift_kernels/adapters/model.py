"""Adapt a whole model with GIFT: choose layers by name, share Thetas, report, merge.

    model = apply_gift(model, GiftConfig(rank=16, target_modules=["query", "value"]))
    print(gift_report(model))          # trainable params, adapted modules, Thetas
    merge_gift(model)                  # plain nn.Linear / Conv1D layers, frozen speed
    unmerge_gift(model)                # back to the adapted model, bit for bit

What ``apply_gift`` does, in place:

- every module whose name matches ``target_modules`` (and ``layers``) is replaced by a
  :class:`~gift_kernels.nn.GiftLinear` (one Theta, or one per row chunk of a stacked weight
  or for Thetas with projection biases). The new layer holds the original weight and bias
  Parameters (no copy), so the base model's state_dict keys do not change;
- the Thetas are registered once, in the model's adapter store on the root:
  ``model.gift_thetas[adapter][key]`` (adapter ``"default"`` unless ``load_gift(...,
  adapter_name=)`` names it; one ``key`` per sharing group), the layout of the PEFT tuner's
  store too. Further named adapters (:mod:`gift_kernels.adapters.multi`) are added beside it.
  Each adapted layer holds the Theta(s) it uses by reference, outside the
  module tree (:meth:`~gift_kernels.nn.GiftLinear.share_thetas`), so ``model.state_dict()``,
  ``named_parameters()`` and optimizers see each Theta tensor once, under ``gift_thetas.*``:
  safetensors (the Hugging Face Trainer's checkpoints, ``save_pretrained``) accepts the state
  dict, and loading one writes into the Parameters every layer reads, so the layers stay tied;
- every parameter is frozen except the Thetas and the modules named in
  ``trainable_modules`` (or implied by ``task_type``); a task head that stays frozen is
  named in a warning.

Every check runs before anything is changed (:mod:`gift_kernels.adapters.planning`): on an
error the model is left exactly as it was.

Merging: :func:`merge_gift` folds every Theta into its layer's weight and puts the original
layer objects back; the pre-merge weights stay with the GIFT layers (outside the module tree,
not in the state_dict). While merged, ``model.state_dict()`` still holds the *unmerged* weights
and the Thetas (a state dict is always a GIFT checkpoint that loads exactly into a fresh
adapted model), and ``load_state_dict`` is refused until :func:`unmerge_gift`. A target whose
weight is shared with another module (tied embeddings, two layers holding one Parameter) is
adapted normally but cannot be merged: merging would change the other module too.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import bases
from ..nn.linear import GiftLinear
from ..nn.theta import GiftTheta
from . import planning
from .config import TASK_HEADS, GiftConfig
from .planning import THETAS_ATTR, Plan, PlanOptions, suffix_match

__all__ = [
    "GiftReport",
    "apply_gift",
    "gift_report",
    "is_adapted",
    "merge_gift",
    "print_trainable_parameters",
    "unmerge_gift",
]

_STATE_ATTR = "_gift_state"  # the root's bookkeeping (not a module: not in state_dict)
# heads a task model gets fresh from transformers (a warning names them when they stay frozen)
_KNOWN_HEADS = ("classifier", "score", "qa_outputs")


@dataclass
class AdapterPlan:
    """A :class:`planning.Plan` plus what only apply_gift has: the config and the trainable heads."""

    config: GiftConfig
    plan: Plan
    heads: List[str]


@dataclass
class _Entry:
    name: str
    original: nn.Module  # the layer that was replaced; holds the same Parameters as ``adapted``
    adapted: GiftLinear
    shares_weight_with: Tuple[str, ...]


@dataclass
class _GiftState:
    config: GiftConfig
    entries: List[_Entry]
    heads: List[str]
    adapter: str = "default"  # the adapter in the store whose Thetas the layers hold
    merged: bool = False
    mixed: bool = False  # inside a mixed_adapters block (adapters/multi.py)


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _state(model: nn.Module) -> Optional[_GiftState]:
    return model.__dict__.get(_STATE_ATTR)


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) already holds GIFT layers or Thetas."""
    return _state(model) is not None or any(
        isinstance(m, (GiftLinear, GiftTheta)) or hasattr(m, THETAS_ATTR) for m in model.modules()
    )


def adapter_state(model: nn.Module, what: str) -> _GiftState:
    """The bookkeeping of a model adapted by :func:`apply_gift`, or a clear error."""
    state = _state(model)
    if state is None:
        raise ValueError(f"{what}: {_model_name(model)} was not adapted with apply_gift (no {THETAS_ATTR} on it)")
    return state


def adapter_store(model: nn.Module) -> nn.ModuleDict:
    """``model.gift_thetas``: adapter name -> (key -> GiftTheta)."""
    return getattr(model, THETAS_ATTR)


def layer_thetas(model: nn.Module, what: str) -> nn.ModuleDict:
    """``key -> GiftTheta`` of the adapter the layers hold (the one trained, saved, merged)."""
    return adapter_store(model)[adapter_state(model, what).adapter]


def _check_not_adapted(model: nn.Module, what: str) -> None:
    if _state(model) is not None or hasattr(model, THETAS_ATTR):
        raise ValueError(
            f"{what}: {_model_name(model)} is already adapted (it has {THETAS_ATTR}); apply or load GIFT on a fresh "
            f"copy of the base model"
        )
    for name, m in model.named_modules():
        if isinstance(m, (GiftLinear, GiftTheta)):
            raise ValueError(
                f"{what}: {_model_name(model)} already holds GIFT module {name!r} ({type(m).__name__}); apply or load "
                f"GIFT on a fresh copy of the base model"
            )


def _match(model: nn.Module, config: GiftConfig, what: str) -> List[Tuple[str, nn.Module, str]]:
    """``[(name, module, type label)]`` of the modules ``config`` targets; names what matches nothing."""
    tm = config.target_modules
    matched, entry_hits, seen_layers = [], {}, set()
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(tm, str):
            if not re.fullmatch(tm, name):
                continue
            label = planning.type_label(name, None)
        else:
            if not any(suffix_match(name, e) for e in tm):
                continue
            label = planning.type_label(name, tm)
        entry_hits[label] = entry_hits.get(label, 0) + 1
        if config.layers is not None:
            idx = planning.layer_index(name, config.layers_pattern)
            if idx is not None:
                seen_layers.add(idx)
            if idx is None or idx not in config.layers:
                continue
        matched.append((name, module, label))

    linear = planning.linear_names(model)
    if isinstance(tm, str):
        if not entry_hits:
            raise ValueError(
                f"{what}: target regex {tm!r} matches no module name of {_model_name(model)} (it must match the whole "
                f"dotted name); linear layers there are named {linear}"
            )
    else:  # name each entry that matches nothing (a typo in one of two names is still an error)
        for entry in tm:
            if entry_hits.get(entry, 0) == 0:
                raise ValueError(f"{what}: target {entry!r} matches no module of {_model_name(model)}; linear layers "
                                 f"there are named {linear}")
    if config.layers is not None:
        missing = sorted(set(config.layers) - seen_layers)
        if missing:
            under = f" under {config.layers_pattern!r}" if config.layers_pattern else ""
            raise ValueError(f"{what}: layers {missing} do not exist among the targets of {_model_name(model)} (layer "
                             f"indices found{under}: {sorted(seen_layers)})")
    if not matched:
        raise ValueError(f"{what}: no target of {_model_name(model)} lies in layers {config.layers}")
    return matched


def _heads(model: nn.Module, config: GiftConfig, targets: List[str], what: str) -> List[str]:
    """The trainable modules: ``trainable_modules`` plus the task type's heads present in the model."""
    heads: List[str] = []
    modules = [n for n, _ in model.named_modules() if n]
    wanted = [(e, True) for e in config.trainable_modules]
    wanted += [(e, False) for e in TASK_HEADS.get(config.task_type, ()) if e not in config.trainable_modules]
    for entry, required in wanted:
        hits = [n for n in modules if suffix_match(n, entry)]
        if not hits and required:
            raise ValueError(f"{what}: trainable module {entry!r} matches no module of {_model_name(model)}")
        for h in hits:
            clash = [n for n in targets if n == h or n.startswith(h + ".")]
            if clash:
                raise ValueError(f"{what}: trainable module {h!r} contains adapted layer {clash[0]!r}; a module is "
                                 f"either adapted or trained whole")
            if h not in heads:
                heads.append(h)
    if config.task_type in TASK_HEADS and TASK_HEADS[config.task_type] and not heads:
        raise ValueError(f"{what}: task_type={config.task_type!r} but {_model_name(model)} has none of its heads "
                         f"{list(TASK_HEADS[config.task_type])}; name the head in trainable_modules")
    # a head inside another head is saved with it
    return [h for h in heads if not any(h.startswith(o + ".") for o in heads)]


def _warn_frozen_heads(model: nn.Module, heads: List[str], targets: List[str], what: str) -> None:
    frozen = [n for n, _ in model.named_modules()
              if n and n.rsplit(".", 1)[-1] in _KNOWN_HEADS
              and not any(n == h or n.startswith(h + ".") or h.startswith(n + ".") for h in heads)
              and not any(t == n or t.startswith(n + ".") for t in targets)]
    if frozen:
        warnings.warn(
            f"{what}: {_model_name(model)} has task head(s) {frozen} that will stay frozen (GIFT trains only the "
            f"Thetas and trainable_modules); a freshly initialised head must train: pass task_type='SEQ_CLS' (or the "
            f"model's task) or trainable_modules={[f.rsplit('.', 1)[-1] for f in frozen]}",
            UserWarning,
            stacklevel=3,
        )


def plan_adapter(model: nn.Module, config: GiftConfig, what: str = "apply_gift") -> AdapterPlan:
    """Everything :func:`apply_gift` will do to ``model``, checked; the model is not touched."""
    if not isinstance(config, GiftConfig):
        raise TypeError(f"{what}: config must be a GiftConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential):  # its forward calls every child: the store would run as a layer
        raise TypeError(f"{what}: {_model_name(model)} is an nn.Sequential, whose forward calls every child, "
                        f"so it cannot hold the Theta store ({THETAS_ATTR}); wrap it in a module that calls it "
                        f"and adapt that")
    _check_not_adapted(model, what)
    matched = _match(model, config, what)
    options = PlanOptions(rank=config.rank, sharing=config.sharing, theta_dtype=config.torch_theta_dtype(),
                          in_bias=config.in_bias, out_bias=config.out_bias, init_weights=config.init_weights,
                          stacked=config.stacked)
    p = planning.plan(model, matched, options, what)
    targets = [t.name for t in p.targets]
    heads = _heads(model, config, targets, what)
    planning.check_trainable_modules(model, heads, what)
    return AdapterPlan(copy.deepcopy(config), p, heads)


def _state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """While merged, report what the unmerged model would: the GIFT layers' own entries (the
    original weights), so a state dict is always the same checkpoint."""
    state = _state(module)
    if state is None or not state.merged:
        return
    keep_vars = any(isinstance(v, nn.Parameter) for v in state_dict.values())
    # each merged layer's keys are replaced, in place and in order, by the GIFT layer's own
    # (a dict equal to the unmerged one, key order included)
    layers = {f"{prefix}{e.name}.": e.adapted.state_dict(prefix=f"{prefix}{e.name}.", keep_vars=keep_vars)
              for e in state.entries}
    items, done = list(state_dict.items()), set()
    state_dict.clear()
    for key, value in items:
        owner = next((p for p in layers if key.startswith(p)), None)
        if owner is None:
            state_dict[key] = value
        elif owner not in done:
            done.add(owner)
            state_dict.update(layers[owner])
    for owner in layers:  # a layer with no keys of its own in the merged model, in model order
        if owner not in done:
            state_dict.update(layers[owner])


def _load_state_dict_pre_hook(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
    state = _state(module)
    if state is not None and state.merged:
        raise RuntimeError(f"load_state_dict: {_model_name(module)} is merged (merge_gift); call unmerge_gift(model) "
                           f"before loading a state dict (state dicts hold the unmerged weights)")


def execute(model: nn.Module, ap: AdapterPlan, adapter_name: str = "default") -> _GiftState:
    """Carry out a plan from :func:`plan_adapter` (nothing in it can fail on a checked plan); the
    Thetas become adapter ``adapter_name`` of the store."""
    config = ap.config
    model.requires_grad_(False)
    bases.adopt(model)  # e.g. keeps bitsandbytes 4-bit layers out of their gradient-less CPU packing
    thetas = ap.plan.build_thetas()
    entries = []
    for t in ap.plan.targets:
        adapted = GiftLinear.from_module(t.module, planning.theta_of(thetas, t), t.splits, form=config.form)
        adapted.share_thetas()  # registered once, in the store below
        parent_name, _, child = t.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapted)
        entries.append(_Entry(t.name, t.module, adapted, t.shares_weight_with))
    setattr(model, THETAS_ATTR, nn.ModuleDict({adapter_name: thetas}))
    for h in ap.heads:
        model.get_submodule(h).requires_grad_(True)
    state = _GiftState(config, entries, list(ap.heads), adapter_name)
    model.__dict__[_STATE_ATTR] = state
    model.register_state_dict_post_hook(_state_dict_hook)
    model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    return state


def apply_gift(model: nn.Module, config: GiftConfig) -> nn.Module:
    """Adapt ``model`` in place with GIFT and return it.

    Only the Thetas (``model.gift_thetas["default"]``) and the ``trainable_modules`` (plus the task head
    of ``task_type``) require grad afterwards. Raises, leaving the model untouched, when a
    target matches nothing, is not a linear layer or is bypassed by its parent, when layers
    sharing a Theta differ in ``in_features``, or when the model is already adapted. Warns
    when a task head (``classifier``, ``score``, ``qa_outputs``) stays frozen.
    """
    ap = plan_adapter(model, config)
    _warn_frozen_heads(model, ap.heads, [t.name for t in ap.plan.targets], "apply_gift")
    execute(model, ap)
    return model


# --------------------------------------------------------------------------- report


@dataclass
class GiftReport:
    """Trainable parameters (PEFT-style) and what was adapted."""

    trainable: int
    total: int
    theta_params: int
    head_params: int
    adapted: List[str]
    thetas: Dict[str, Tuple[int, int]]  # key -> (d_in, rank)
    heads: List[str]
    merged: bool

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def line(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    def __str__(self) -> str:
        lines = [self.line()]
        lines.append(f"Thetas ({self.theta_params:,} params): " + ", ".join(f"{k} {d}x{r}" for k, (d, r) in self.thetas.items()))
        if self.heads:
            lines.append(f"trainable modules ({self.head_params:,} params): {', '.join(self.heads)}")
        lines.append(f"adapted modules ({len(self.adapted)}{', merged' if self.merged else ''}):")
        lines.extend(f"  {n}" for n in self.adapted)
        return "\n".join(lines)


def gift_report(model: nn.Module) -> GiftReport:
    """Count trainable parameters (each shared Theta once) and list the adapted modules."""
    state = adapter_state(model, "gift_report")
    params = list(model.parameters())  # deduplicated: an aliased Theta counts once
    thetas = layer_thetas(model, "gift_report")
    head_params = sum(p.numel() for h in state.heads for p in model.get_submodule(h).parameters())
    return GiftReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        theta_params=sum(p.numel() for p in thetas.parameters()),
        head_params=head_params,
        adapted=[e.name for e in state.entries],
        thetas={k: (t.in_features, t.rank) for k, t in thetas.items()},
        heads=list(state.heads),
        merged=state.merged,
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-liner: ``trainable params: ... || all params: ... || trainable%: ...``."""
    print(gift_report(model).line())


# --------------------------------------------------------------------------- merge


def _check_mergeable(model: nn.Module, state: _GiftState, what: str) -> None:
    for entry in state.entries:
        refused = entry.adapted.merge_refusal()  # a quantized base that cannot take a merged weight
        if refused:
            raise TypeError(f"{what}: {entry.name!r}: {refused}")
        if entry.shares_weight_with:
            raise RuntimeError(
                f"{what}: {entry.name!r}'s weight is the same Parameter as that of {list(entry.shares_weight_with)} "
                f"(tied or shared weights); merging GIFT into it would change those modules too. Keep the model "
                f"unmerged, or untie the weights before apply_gift (e.g. model.{entry.name}.weight = "
                f"nn.Parameter(model.{entry.name}.weight.detach().clone()))"
            )


@torch.no_grad()
def merge_gift(model: nn.Module) -> nn.Module:
    """Fold every Theta into its layer's weight and put the original layer types back.

    Afterwards the model holds the original ``nn.Linear`` / ``Conv1D`` objects (now with
    ``W_hat`` in their weight), so a forward costs what the frozen model costs. A quantized base
    gets ``W_hat`` re-quantized (lossy: a ``LossyMergeWarning`` per layer states the error;
    unmerge stays exact; docs/quantized.md). Refused, with the model unchanged, when a target's
    weight is tied to another module or its base cannot take a merged weight.
    """
    state = adapter_state(model, "merge_gift")
    if state.merged:
        raise RuntimeError(f"merge_gift: {_model_name(model)} is already merged; call unmerge_gift first")
    if state.mixed:  # the block would end holding GIFT layers in a model that says it is merged
        raise RuntimeError(f"merge_gift: {_model_name(model)} is inside a mixed_adapters block; merge after the block")
    _check_mergeable(model, state, "merge_gift")
    done = []
    try:
        for entry in state.entries:
            entry.adapted.merge()
            done.append(entry)
    except BaseException:  # leave the model as it was (a re-quantization that failed midway)
        for entry in reversed(done):
            entry.adapted.unmerge()
        raise
    for entry in state.entries:
        parent_name, _, child = entry.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, entry.original)
    state.merged = True
    return model


@torch.no_grad()
def unmerge_gift(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_gift`: restore the exact pre-merge weights and the adapted layers."""
    state = adapter_state(model, "unmerge_gift")
    if not state.merged:
        raise RuntimeError(f"unmerge_gift: {_model_name(model)} is not merged")
    for entry in state.entries:
        entry.adapted.unmerge()
        parent_name, _, child = entry.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, entry.adapted)
    state.merged = False
    return model
