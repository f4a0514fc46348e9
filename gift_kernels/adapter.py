"""Adapt a whole model with GIFT: choose layers by name, share Thetas, report, merge.

    model = apply_gift(model, GiftConfig(rank=16, target_modules=["query", "value"]))
    print(gift_report(model))          # trainable params, adapted modules, Thetas
    merge_gift(model)                  # plain nn.Linear / Conv1D layers, frozen speed
    unmerge_gift(model)                # back to the adapted model, bit for bit

What ``apply_gift`` does, in place:

- every module whose name matches ``target_modules`` (and ``layers``) is replaced by a
  :class:`~gift_kernels.modules.GiftLinear` (a plain ``nn.Linear`` target) or a
  :class:`~gift_kernels.modules.GiftFusedLinear` (a fused weight given split sizes in
  ``fused``, a transformers ``Conv1D``, or Thetas with projection biases). The new layer holds
  the original weight and bias Parameters (no copy), so the base model's state_dict keys do
  not change;
- the Thetas are registered once, on the root: ``model.gift_thetas`` (a ModuleDict, one entry
  per sharing group). Each adapted layer also registers the Theta(s) it uses as a submodule
  (``theta`` / ``thetas``), so ``model.state_dict()`` lists each Theta tensor once per layer
  that uses it, plus once under ``gift_thetas``: the same tensor under several keys, as with
  tied weights. ``model.parameters()`` and optimizers see each Theta once. Adapter
  checkpoints (:mod:`gift_kernels.checkpoint`) save only the ``gift_thetas.*`` keys;
  safetensors' ``save_file`` of the full state_dict would refuse the aliases (use
  ``save_model``, which drops them, or save the adapter only);
- every parameter is frozen except the Thetas and the modules named in
  ``trainable_modules`` (a classifier head, say).

Every check runs before anything is changed: on an error (a target that matches nothing, a
target that is not a linear layer, Thetas that would need two ``d_in``, an already adapted
model) the model is left exactly as it was.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .modules import GiftFusedLinear, GiftLinear, GiftTheta, GiftThetaWithBias, is_conv1d

__all__ = [
    "GiftConfig",
    "GiftReport",
    "apply_gift",
    "gift_report",
    "is_adapted",
    "merge_gift",
    "print_trainable_parameters",
    "unmerge_gift",
]

SHARING = ("type", "all", "layer")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

THETAS_ATTR = "gift_thetas"  # the root's ModuleDict of Thetas
_STATE_ATTR = "_gift_state"  # the root's bookkeeping (not a module: not in state_dict)
_UNMERGED_BUFFER = "gift_unmerged_weight"  # non-persistent buffer on a merged layer


@dataclass
class GiftConfig:
    """What to adapt and how. JSON-serialisable (:meth:`to_json` / :meth:`from_json`).

    Attributes:
        rank: r, the width of Theta = (phi: d_in x r, psi: r x d_in).
        target_modules: a list of module-name suffixes (``"query"`` matches
            ``encoder.layer.0.attention.self.query``; a dotted suffix such as
            ``"attention.output.dense"`` is allowed), or one regular expression matched against
            the whole module name. As in PEFT.
        layers: keep only targets in these layer indices (None: all layers).
        layers_pattern: the name of the layer list (``"layer"``, ``"layers"``, ``"h"``) whose
            index ``layers`` refers to; None takes the first number in the module name.
        sharing: ``"type"`` (the paper's default): one Theta per target type, i.e. per entry of
            ``target_modules`` (per last name component for a regex), shared across layers;
            ``"all"``: one Theta for every adapted projection; ``"layer"``: one per layer.
        theta_dtype: ``"float32"``, ``"bfloat16"``, ... ; None uses the adapted weights' dtype.
        in_bias, out_bias: the biases of GIFT's two projections (the authors'
            ``in_projection_bias`` / ``out_projection_bias``); see
            :class:`~gift_kernels.modules.GiftThetaWithBias`.
        fused: layers whose weight stacks several projections, by name suffix: the row split
            sizes (``{"qkv_proj": [4096, 1024, 1024]}``) or a number of equal chunks
            (``{"c_attn": 3}`` for GPT-2). Each chunk gets its own Theta.
        trainable_modules: modules (by name suffix) left trainable and saved with the adapter,
            e.g. ``["classifier"]``.
    """

    rank: int = 16
    target_modules: Union[List[str], str] = field(default_factory=list)
    layers: Optional[List[int]] = None
    layers_pattern: Optional[str] = None
    sharing: str = "type"
    theta_dtype: Optional[str] = None
    in_bias: bool = False
    out_bias: bool = False
    fused: Dict[str, Union[int, List[int]]] = field(default_factory=dict)
    trainable_modules: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, frozenset)):
            self.target_modules = sorted(self.target_modules)
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.trainable_modules, tuple):
            self.trainable_modules = list(self.trainable_modules)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"GiftConfig: rank must be an int >= 1, got {self.rank!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as exc:
                raise ValueError(f"GiftConfig: target_modules {tm!r} is not a valid regular expression: {exc}") from exc
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(f"GiftConfig: target_modules must be a non-empty list of names or a regex, got {tm!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"GiftConfig: sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.theta_dtype is not None and self.theta_dtype not in DTYPES:
            raise ValueError(f"GiftConfig: theta_dtype must be None or one of {sorted(DTYPES)}, got {self.theta_dtype!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = list(self.layers)
            if not self.layers or not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise ValueError(f"GiftConfig: layers must be a non-empty list of indices >= 0, got {self.layers!r}")
        if not isinstance(self.fused, dict):
            raise ValueError(f"GiftConfig: fused must be a dict of name -> split sizes, got {self.fused!r}")
        for name, spec in self.fused.items():
            ok = (isinstance(spec, int) and spec >= 1) or (
                isinstance(spec, (list, tuple)) and spec and all(isinstance(s, int) and s >= 1 for s in spec)
            )
            if not ok:
                raise ValueError(f"GiftConfig: fused[{name!r}] must be a chunk count >= 1 or a list of sizes, got {spec!r}")
        if not all(isinstance(t, str) and t for t in self.trainable_modules):
            raise ValueError(f"GiftConfig: trainable_modules must be a list of names, got {self.trainable_modules!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GiftConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GiftConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GiftConfig":
        return cls.from_dict(json.loads(text))

    def torch_theta_dtype(self) -> Optional[torch.dtype]:
        return None if self.theta_dtype is None else DTYPES[self.theta_dtype]


# --------------------------------------------------------------------------- planning
# Everything a call will change is worked out first (``_plan``) and checked; only then is the
# model touched (``_execute``). That is what leaves the model unchanged when an error is raised.


@dataclass
class _Target:
    name: str
    module: nn.Module
    type_label: str
    d_in: int
    d_out: int
    splits: Tuple[int, ...]
    theta_keys: Tuple[str, ...] = ()

    @property
    def transposed(self) -> bool:
        return is_conv1d(self.module)


@dataclass
class _ThetaSpec:
    key: str
    d_in: int
    dtype: torch.dtype
    device: torch.device
    users: List[str]


@dataclass
class _Plan:
    config: GiftConfig
    targets: List[_Target]
    thetas: Dict[str, _ThetaSpec]
    heads: List[str]


@dataclass
class _Entry:
    name: str
    original: nn.Module  # the layer that was replaced; holds the same Parameters as ``adapted``
    adapted: nn.Module


@dataclass
class _GiftState:
    config: GiftConfig
    entries: List[_Entry]
    heads: List[str]
    merged: bool = False


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _type_label(name: str, config: GiftConfig) -> Optional[str]:
    """The target type a module name matches, or None."""
    tm = config.target_modules
    if isinstance(tm, str):
        return name.rsplit(".", 1)[-1] if re.fullmatch(tm, name) else None
    hits = [entry for entry in tm if _suffix_match(name, entry)]
    return max(hits, key=len) if hits else None  # the most specific entry names the type


def _layer_index(name: str, pattern: Optional[str]) -> Optional[int]:
    if pattern:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
    else:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return None if m is None else int(m.group(1))


def _key(text: str) -> str:
    # ModuleDict keys cannot contain '.'
    return text.replace(".", "__")


def _state(model: nn.Module) -> Optional[_GiftState]:
    return model.__dict__.get(_STATE_ATTR)


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) already holds GIFT layers or Thetas."""
    return _state(model) is not None or any(
        isinstance(m, (GiftLinear, GiftFusedLinear, GiftTheta)) or hasattr(m, THETAS_ATTR) for m in model.modules()
    )


def _require_state(model: nn.Module, what: str) -> _GiftState:
    state = _state(model)
    if state is None:
        raise ValueError(f"{what}: {_model_name(model)} was not adapted with apply_gift (no {THETAS_ATTR} on it)")
    return state


def _check_not_adapted(model: nn.Module, what: str) -> None:
    if _state(model) is not None or hasattr(model, THETAS_ATTR):
        raise ValueError(
            f"{what}: {_model_name(model)} is already adapted (it has {THETAS_ATTR}); apply or load GIFT on a fresh "
            f"copy of the base model"
        )
    for name, m in model.named_modules():
        if isinstance(m, (GiftLinear, GiftFusedLinear, GiftTheta)):
            raise ValueError(
                f"{what}: {_model_name(model)} already holds GIFT module {name!r} ({type(m).__name__}); apply or load "
                f"GIFT on a fresh copy of the base model"
            )


def _linear_names(model: nn.Module) -> List[str]:
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))}
    )
    return names


def _splits_for(name: str, d_out: int, config: GiftConfig, what: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    for key, spec in config.fused.items():
        if _suffix_match(name, key):
            if isinstance(spec, int):
                if d_out % spec:
                    raise ValueError(
                        f"{what}: fused[{key!r}] asks for {spec} equal chunks of {name!r}, whose d_out={d_out} "
                        f"is not divisible by {spec}"
                    )
                return (d_out // spec,) * spec, key
            if sum(spec) != d_out:
                raise ValueError(
                    f"{what}: fused[{key!r}] splits {list(spec)} of {name!r} sum to {sum(spec)}, but its "
                    f"d_out is {d_out}"
                )
            return tuple(spec), key
    return (d_out,), None


def _plan(model: nn.Module, config: GiftConfig, what: str = "apply_gift") -> _Plan:
    if not isinstance(config, GiftConfig):
        raise TypeError(f"{what}: config must be a GiftConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    _check_not_adapted(model, what)

    matched: List[Tuple[str, nn.Module, str]] = []
    entry_hits: Dict[str, int] = {}
    outside_layers: Dict[str, int] = {}
    seen_layers: set = set()
    for name, module in model.named_modules():
        if not name:
            continue
        label = _type_label(name, config)
        if label is None:
            continue
        entry_hits[label] = entry_hits.get(label, 0) + 1
        if config.layers is not None:
            idx = _layer_index(name, config.layers_pattern)
            if idx is not None:
                seen_layers.add(idx)
            if idx is None or idx not in config.layers:
                outside_layers[label] = outside_layers.get(label, 0) + 1
                continue
        matched.append((name, module, label))

    # targets that match nothing: name each one (a typo in one of two names is still an error)
    entries = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
    for entry in entries:
        if isinstance(config.target_modules, list) and entry_hits.get(entry, 0) == 0:
            raise ValueError(
                f"{what}: target {entry!r} matches no module of {_model_name(model)}; linear layers there are named "
                f"{_linear_names(model)}"
            )
    if isinstance(config.target_modules, str) and not entry_hits:
        raise ValueError(
            f"{what}: target regex {config.target_modules!r} matches no module name of {_model_name(model)} (it must "
            f"match the whole dotted name); linear layers there are named {_linear_names(model)}"
        )
    if config.layers is not None:
        missing = sorted(set(config.layers) - seen_layers)
        if missing:
            raise ValueError(
                f"{what}: layers {missing} do not exist among the targets of {_model_name(model)} (layer indices "
                f"found{' under ' + repr(config.layers_pattern) if config.layers_pattern else ''}: {sorted(seen_layers)})"
            )
    if not matched:
        raise ValueError(f"{what}: no target of {_model_name(model)} lies in layers {config.layers}")

    # every target must be a linear map; nested targets would be adapted twice
    for name, module, _ in matched:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(
                f"{what}: target {name!r} is a {type(module).__name__}, not a linear layer (nn.Linear or transformers "
                f"Conv1D); narrow target_modules"
            )
    names = [n for n, _, _ in matched]
    aliases: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    for name, module, _ in matched:
        if len(aliases[id(module)]) > 1:
            raise ValueError(
                f"{what}: target {name!r} is one module object reachable under several names "
                f"{aliases[id(module)]}; it cannot be replaced consistently"
            )

    # fused specs must name an adapted layer
    for key in config.fused:
        if not any(_suffix_match(n, key) for n in names):
            raise ValueError(f"{what}: fused[{key!r}] matches none of the adapted layers {names}")

    theta_dtype = config.torch_theta_dtype()
    targets: List[_Target] = []
    thetas: Dict[str, _ThetaSpec] = {}
    for name, module, label in matched:
        w = module.weight
        d_in, d_out = (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])
        splits, _ = _splits_for(name, d_out, config, what)
        if config.sharing == "all":
            base = "all"
        elif config.sharing == "type":
            base = _key(label)
        else:
            base = _key(name)
        keys = tuple(base if len(splits) == 1 or config.sharing == "all" else f"{base}__chunk{i}" for i in range(len(splits)))
        targets.append(_Target(name, module, label, d_in, d_out, splits, keys))
        for key in keys:
            spec = thetas.get(key)
            if spec is None:
                thetas[key] = _ThetaSpec(key, d_in, theta_dtype or w.dtype, w.device, [name])
                continue
            if spec.d_in != d_in:
                first = spec.users[0]
                raise ValueError(
                    f"{what}: {name!r} (in_features={d_in}) and {first!r} (in_features={spec.d_in}) would share "
                    f"Theta {key!r} (sharing={config.sharing!r}), but a shared Theta needs one d_in; use "
                    f"sharing='layer' or separate target names"
                )
            if spec.device != w.device:
                raise ValueError(
                    f"{what}: {name!r} is on {w.device} and {spec.users[0]!r} on {spec.device}; layers sharing "
                    f"Theta {key!r} must be on one device (or use sharing='layer')"
                )
            if name not in spec.users:
                spec.users.append(name)

    heads: List[str] = []
    for entry in config.trainable_modules:
        hits = [n for n, _ in model.named_modules() if n and _suffix_match(n, entry)]
        if not hits:
            raise ValueError(f"{what}: trainable module {entry!r} matches no module of {_model_name(model)}")
        for h in hits:
            clash = [n for n in names if n == h or n.startswith(h + ".")]
            if clash:
                raise ValueError(
                    f"{what}: trainable module {h!r} contains adapted layer {clash[0]!r}; a module is either "
                    f"adapted or trained whole"
                )
            if h not in heads:
                heads.append(h)
    # a head inside another head is saved with it
    heads = [h for h in heads if not any(h.startswith(o + ".") for o in heads)]
    return _Plan(copy.deepcopy(config), targets, thetas, heads)


def _make_theta(spec: _ThetaSpec, config: GiftConfig) -> GiftTheta:
    factory = {"device": spec.device, "dtype": spec.dtype}
    if config.in_bias or config.out_bias:
        return GiftThetaWithBias(spec.d_in, config.rank, in_bias=config.in_bias, out_bias=config.out_bias, **factory)
    return GiftTheta(spec.d_in, config.rank, **factory)


def _execute(model: nn.Module, plan: _Plan) -> _GiftState:
    config = plan.config
    model.requires_grad_(False)
    thetas = nn.ModuleDict({key: _make_theta(spec, config) for key, spec in plan.thetas.items()})
    entries = []
    for t in plan.targets:
        chunk_thetas = [thetas[k] for k in t.theta_keys]
        plain = isinstance(t.module, nn.Linear) and len(t.splits) == 1 and not (config.in_bias or config.out_bias)
        if plain:
            adapted = GiftLinear.from_linear(t.module, chunk_thetas[0])
        else:
            adapted = GiftFusedLinear.from_module(t.module, chunk_thetas, t.splits)
        parent_name, _, child = t.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapted)
        entries.append(_Entry(t.name, t.module, adapted))
    setattr(model, THETAS_ATTR, thetas)
    for h in plan.heads:
        model.get_submodule(h).requires_grad_(True)
    state = _GiftState(config, entries, list(plan.heads))
    model.__dict__[_STATE_ATTR] = state
    return state


def apply_gift(model: nn.Module, config: GiftConfig) -> nn.Module:
    """Adapt ``model`` in place with GIFT and return it.

    Only the Thetas (``model.gift_thetas``) and the ``trainable_modules`` require grad
    afterwards. Raises, leaving the model untouched, when a target matches nothing or is not a
    linear layer, when layers sharing a Theta differ in ``in_features``, or when the model is
    already adapted.
    """
    _execute(model, _plan(model, config))
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
    state = _require_state(model, "gift_report")
    params = list(model.parameters())  # deduplicated: an aliased Theta counts once
    thetas = getattr(model, THETAS_ATTR)
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


@torch.no_grad()
def merge_gift(model: nn.Module) -> nn.Module:
    """Fold every Theta into its layer's weight and put the original layer types back.

    Afterwards the model holds the original ``nn.Linear`` / ``Conv1D`` objects (now with
    ``W + (W phi) psi`` in their weight), so a forward costs what the frozen model costs. The
    pre-merge weights are kept as a non-persistent buffer on each layer (moved by ``.to()``,
    not in the state_dict) so that :func:`unmerge_gift` restores them bit for bit.
    """
    state = _require_state(model, "merge_gift")
    if state.merged:
        raise RuntimeError(f"merge_gift: {_model_name(model)} is already merged; call unmerge_gift first")
    merged = [e.adapted.merged_weight() for e in state.entries]  # all computed before anything changes
    for entry, w_hat in zip(state.entries, merged):
        weight = entry.original.weight
        entry.original.register_buffer(_UNMERGED_BUFFER, weight.detach().clone(), persistent=False)
        weight.copy_(w_hat)
        parent_name, _, child = entry.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, entry.original)
    state.merged = True
    return model


@torch.no_grad()
def unmerge_gift(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_gift`: restore the exact pre-merge weights and the adapted layers."""
    state = _require_state(model, "unmerge_gift")
    if not state.merged:
        raise RuntimeError(f"unmerge_gift: {_model_name(model)} is not merged")
    for entry in state.entries:
        original = entry.original
        original.weight.copy_(original._buffers.pop(_UNMERGED_BUFFER))
        parent_name, _, child = entry.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, entry.adapted)
    state.merged = False
    return model


def _adapter_state(model: nn.Module, what: str) -> _GiftState:
    """For :mod:`gift_kernels.checkpoint`."""
    return _require_state(model, what)
