"""The one planner: from a model and the targets a config matched, everything an adaptation
will do, checked before anything is changed.

Used by :func:`gift_kernels.apply_gift` / :func:`gift_kernels.load_gift` (targets matched by
:class:`GiftConfig`'s rules) and by the PEFT tuner (targets matched by PEFT's rules). Both get
the same split sizes of stacked projections, the same Theta sharing keys, the same one-d_in
check, the same Thetas, and the same refusals: targets that are not linear layers, targets
whose parent bypasses their forward (``nn.MultiheadAttention.out_proj``), a module reachable
under several names, tensors created under ``torch.inference_mode()``. Weights shared with
other modules (tied embeddings, two layers holding one Parameter) are recorded, so that merging
can refuse them by name.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn import bases
from ..nn.bases import is_conv1d
from ..nn.theta import GiftTheta, make_theta

THETAS_ATTR = "gift_thetas"  # the ModuleDict of Thetas (on the root for apply_gift, on the tuner for PEFT)


@dataclass
class PlanOptions:
    """What both configs reduce to."""

    rank: int
    sharing: str = "type"
    theta_dtype: Optional[torch.dtype] = None
    in_bias: bool = False
    out_bias: bool = False
    init_weights: bool = True
    stacked: Dict[str, Union[int, Sequence[int]]] = field(default_factory=dict)
    stacked_name: str = "stacked"  # how the option is called in the caller's config, for messages


@dataclass
class Target:
    name: str
    module: nn.Module  # the base layer (nn.Linear, Conv1D or a module base)
    type_label: str
    d_in: int
    d_out: int
    splits: Tuple[int, ...]
    theta_keys: Tuple[str, ...]
    shares_weight_with: Tuple[str, ...] = ()  # other modules holding this target's weight Parameter

    @property
    def transposed(self) -> bool:
        return is_conv1d(self.module)


@dataclass
class ThetaSpec:
    key: str
    d_in: int
    dtype: torch.dtype
    device: torch.device
    users: List[str]


@dataclass
class Plan:
    options: PlanOptions
    targets: List[Target]
    thetas: Dict[str, ThetaSpec]

    def build_thetas(self, device: Optional[torch.device] = None) -> nn.ModuleDict:
        """The Thetas, one per sharing key (``device`` overrides, e.g. ``meta`` for shapes only)."""
        o = self.options
        return nn.ModuleDict({
            key: make_theta(spec.d_in, o.rank, in_bias=o.in_bias, out_bias=o.out_bias, init_weights=o.init_weights,
                            device=device or spec.device, dtype=spec.dtype)
            for key, spec in self.thetas.items()
        })

    def theta_shapes(self) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
        """``"<key>.<param>" -> (shape, dtype)`` of every Theta tensor, without allocating."""
        out = {}
        for key, theta in self.build_thetas(torch.device("meta")).items():
            for pname, p in theta.named_parameters():
                out[f"{key}.{pname}"] = (p.shape, p.dtype)
        return out


def suffix_match(name: str, suffix: str) -> bool:
    """PEFT's rule for a target entry: the whole name, or its trailing dotted components."""
    return name == suffix or name.endswith("." + suffix)


def theta_key(text: str) -> str:
    return text.replace(".", "__")  # ModuleDict keys cannot contain '.'


def type_label(name: str, entries: Union[Sequence[str], str, None]) -> str:
    """The target type of a matched module: the most specific list entry it matches, else
    (a regex, PEFT's "all-linear") its last name component."""
    if entries is not None and not isinstance(entries, str):
        hits = [e for e in entries if suffix_match(name, e)]
        if hits:
            return max(hits, key=len)
    return name.rsplit(".", 1)[-1]


def layer_index(name: str, pattern: Optional[str]) -> Optional[int]:
    if pattern:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
    else:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return None if m is None else int(m.group(1))


def linear_names(model: nn.Module) -> List[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear(m)})


def is_linear(module: nn.Module) -> bool:
    """A base GIFT can adapt (:mod:`gift_kernels.nn.bases`)."""
    return bases.is_supported(module)


def splits_for(name: str, d_out: int, options: PlanOptions, what: str) -> Tuple[int, ...]:
    """Row chunk sizes of target ``name``: from the first ``stacked`` entry it matches, else one chunk."""
    for key, spec in options.stacked.items():
        if not suffix_match(name, key):
            continue
        where = f"{options.stacked_name}[{key!r}]"
        if isinstance(spec, int):
            if d_out % spec:
                raise ValueError(f"{what}: {where} asks for {spec} equal chunks of {name!r}, whose d_out={d_out} is "
                                 f"not divisible by {spec}")
            return (d_out // spec,) * spec
        if sum(spec) != d_out:
            raise ValueError(f"{what}: {where} splits {list(spec)} of {name!r} sum to {sum(spec)}, but its d_out is "
                             f"{d_out}")
        return tuple(spec)
    return (d_out,)


def _parent_bypasses(model: nn.Module, name: str) -> Optional[str]:
    """Why a target's parent computes with its weight without calling it (None: it calls it)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (f"its parent {parent_name or type(model).__name__!r} is an nn.MultiheadAttention, which reads "
                f"out_proj.weight directly (F.multi_head_attention_forward) and never calls out_proj, so GIFT there "
                f"would have no effect and no gradient")
    return None


_BLIND_TO_A_TOKEN_CONSTANT = (nn.Softmax, nn.LogSoftmax, nn.LayerNorm)
_PASS_THROUGH = (nn.Dropout, nn.Identity)


def bias_blind_spot(model: nn.Module, name: str) -> Optional[str]:
    """The module after target ``name`` (its next registered sibling, past dropout) when that
    module cannot see a per-token constant added to all its inputs (softmax, log-softmax, layer
    norm over the last axis); None when none is detected. GIFT's projection biases add exactly
    such a constant, ``x . (psi^T b1 + b2)``, so there they get zero gradient."""
    parent_name, _, child = name.rpartition(".")
    siblings = list(model.get_submodule(parent_name).named_children())
    names = [n for n, _ in siblings]
    if child not in names:
        return None
    for sib_name, sib in siblings[names.index(child) + 1:]:
        if isinstance(sib, _PASS_THROUGH):
            continue
        if isinstance(sib, _BLIND_TO_A_TOKEN_CONSTANT):
            if isinstance(sib, (nn.Softmax, nn.LogSoftmax)) and sib.dim not in (-1, None):
                return None
            return f"{parent_name + '.' if parent_name else ''}{sib_name} ({type(sib).__name__})"
        return None
    return None


def _inference_tensors(module: nn.Module) -> List[str]:
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_inference()]


def check_trainable_modules(model: nn.Module, names: Iterable[str], what: str) -> None:
    for name in names:
        bad = _inference_tensors(model.get_submodule(name))
        if bad:
            raise RuntimeError(
                f"{what}: trainable module {name!r} holds tensors created under torch.inference_mode() ({bad[:3]}); "
                f"they cannot be trained. Build or load the model outside inference_mode"
            )


def plan(model: nn.Module, matched: Sequence[Tuple[str, nn.Module, str]], options: PlanOptions, what: str) -> Plan:
    """Plan the adaptation of ``matched`` = ``[(name, base layer, type label)]`` in ``model``:
    every target checked, then its row chunks and Theta keys, then the Thetas' shapes checked
    across the layers that share them. Raises before anything is built."""
    _check_targets(model, matched, options, what)
    targets, thetas = _targets_and_thetas(model, matched, options, what)
    if options.in_bias or options.out_bias:
        _warn_bias_blind_spots(model, targets, what)
    return Plan(options, targets, thetas)


def _check_targets(model: nn.Module, matched: Sequence[Tuple[str, nn.Module, str]], options: PlanOptions,
                   what: str) -> None:
    """No layer of the model blocks gradients; each target is a linear layer GIFT can train
    through, reached under one name, called by its parent, free of inference tensors; each
    ``stacked`` entry names an adapted layer."""
    names = [n for n, _, _ in matched]
    aliases: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    blocker = bases.grad_blocker(model)  # anywhere in the model: it would cut off the Thetas before it
    if blocker:
        raise TypeError(f"{what}: module {blocker[0]!r} cannot be trained through: {blocker[1]}")
    for name, module, _ in matched:
        if not is_linear(module):
            raise TypeError(
                f"{what}: target {name!r} is a {type(module).__name__}, not a linear layer (nn.Linear, transformers "
                f"Conv1D, a quantized linear, or a module with in_features/out_features whose forward is linear in "
                f"its input); narrow target_modules"
            )
        refused = bases.refusal(module)
        if refused:
            raise TypeError(f"{what}: target {name!r} ({type(module).__name__}) cannot be adapted: {refused}; narrow "
                            f"target_modules or quantize it differently")
        if len(aliases[id(module)]) > 1:
            raise ValueError(
                f"{what}: target {name!r} is one module object reachable under several names "
                f"{aliases[id(module)]}; it cannot be replaced consistently"
            )
        why = _parent_bypasses(model, name)
        if why:
            raise TypeError(f"{what}: target {name!r} cannot be adapted: {why}; narrow target_modules")
        bad = _inference_tensors(module)
        if bad:
            raise RuntimeError(
                f"{what}: target {name!r} holds tensors created under torch.inference_mode() ({bad}); autograd "
                f"cannot save them for GIFT's backward. Build or load the model outside inference_mode"
            )
    for key in options.stacked:
        if not any(suffix_match(n, key) for n in names):
            raise ValueError(f"{what}: {options.stacked_name}[{key!r}] matches none of the adapted layers {names}")


def _theta_keys(name: str, label: str, n_chunks: int, options: PlanOptions) -> Tuple[str, ...]:
    """The store keys of a target's Thetas, one per row chunk (shared ones repeat across targets)."""
    if options.sharing == "all":
        return ("all",) * n_chunks
    base = theta_key(label) if options.sharing == "type" else theta_key(name)
    return tuple(base if n_chunks == 1 else f"{base}__chunk{i}" for i in range(n_chunks))


def _targets_and_thetas(model: nn.Module, matched: Sequence[Tuple[str, nn.Module, str]], options: PlanOptions,
                        what: str) -> Tuple[List[Target], Dict[str, ThetaSpec]]:
    """The planned targets and the Theta of each key; layers sharing a key need one d_in and device."""
    holders: Dict[int, List[Tuple[str, nn.Module]]] = {}  # Parameter id -> every (module name, module) holding it
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append((mname or "<root>", module))
    targets: List[Target] = []
    thetas: Dict[str, ThetaSpec] = {}
    for name, module, label in matched:
        d_in, d_out = bases.features(module)
        if options.rank > d_in:  # phi and psi alone would outnumber the entries of a dense update of W
            raise ValueError(f"{what}: rank {options.rank} is larger than target {name!r}'s in_features {d_in} "
                             f"({type(module).__name__}); GIFT's rank must be at most d_in (use rank <= {d_in}, or "
                             f"narrow target_modules)")
        w_dtype, w_device = bases.theta_defaults(module)
        splits = splits_for(name, d_out, options, what)
        keys = _theta_keys(name, label, len(splits), options)
        w = getattr(module, "weight", None)
        shared = tuple(dict.fromkeys(h for h, m in holders.get(id(w), []) if m is not module)) if w is not None else ()
        targets.append(Target(name, module, label, d_in, d_out, splits, keys, shared))
        for key in keys:
            spec = thetas.get(key)
            if spec is None:
                thetas[key] = ThetaSpec(key, d_in, options.theta_dtype or w_dtype, w_device, [name])
                continue
            if spec.d_in != d_in:
                raise ValueError(
                    f"{what}: {name!r} (in_features={d_in}) and {spec.users[0]!r} (in_features={spec.d_in}) would "
                    f"share Theta {key!r} (sharing={options.sharing!r}), but a shared Theta needs one d_in; use "
                    f"sharing='layer' or separate target names"
                )
            if spec.device != w_device:
                raise ValueError(
                    f"{what}: {name!r} is on {w_device} and {spec.users[0]!r} on {spec.device}; layers sharing "
                    f"Theta {key!r} must be on one device (or use sharing='layer')"
                )
            if name not in spec.users:
                spec.users.append(name)
    return targets, thetas


def _warn_bias_blind_spots(model: nn.Module, targets: Sequence[Target], what: str) -> None:
    blind = [(t.name, b) for t in targets if (b := bias_blind_spot(model, t.name)) is not None]
    if blind:
        warnings.warn(
            f"{what}: GIFT's projection biases (in_bias / out_bias) add a per-token constant to every output of a "
            f"layer; {', '.join(f'{n!r} feeds {b}' for n, b in blind)}, which cannot see such a constant, so "
            f"there those biases get zero gradient (docs/adapter.md)",
            UserWarning,
            stacklevel=4,
        )


def theta_of(thetas: nn.ModuleDict, target: Target) -> List[GiftTheta]:
    return [thetas[k] for k in target.theta_keys]
