"""GIFT as a PEFT method: ``get_peft_model(model, GiftPeftConfig(...))``.

    import gift_kernels.peft_integration               # registers "GIFT" with PEFT
    from gift_kernels.peft_integration import GiftPeftConfig
    from peft import PeftModel, get_peft_model

    model = get_peft_model(base, GiftPeftConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained("out/")
    model = PeftModel.from_pretrained(fresh_base, "out/")

How it is registered (see docs/peft.md for the versions): PEFT's ``register_peft_method``
refuses names missing from its ``PeftType`` enum, and extending an ``Enum`` at run time
means writing to private members. PEFT only ever uses the type as a key of four
dicts (``PEFT_TYPE_TO_{CONFIG,TUNER,PREFIX,MIXED_MODEL}_MAPPING``) and in ``==`` tests,
and ``PeftType`` is a ``str`` enum whose members hash and compare as their value. So the
config's ``peft_type`` is a member of our own one-member ``str`` enum,
``GiftPeftType.GIFT`` (== ``"GIFT"``, with ``.value``/``.name`` like PEFT's members), and
:func:`register` puts it into those dicts, which is exactly what ``register_peft_method``
does after its name check. A saved ``adapter_config.json`` holds ``"peft_type": "GIFT"``,
which the string key finds again on load.

The tuner follows PEFT's shared-parameter precedents (VB-LoRA, TinyLoRA): the Thetas live
once per adapter on the tuner, ``base_model.gift_thetas[adapter][key]``, and each tuner layer
``GiftPeftLayer`` registers the ones it uses in ``gift_theta[adapter]`` (aliases of the same
modules, so PEFT's per-layer ``set_adapter`` / ``requires_grad`` / dtype handling applies).
Checkpoints hold each Theta once: the tuner's save/load hooks drop the per-layer aliases on
save and fill them back in on load.

Several active adapters on one layer are exact: ``W (I + sum_a phi_a psi_a)`` is one GIFT call
with the Thetas concatenated along the rank.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists

try:  # the "all-linear" shorthand (private helper; absent in some versions)
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
except ImportError:  # pragma: no cover
    _maybe_include_all_linear_layers = None

from .adapter import DTYPES, SHARING
from .modules import GiftTheta, GiftThetaWithBias, gift_linear_stacked, gift_stacked_merged_weight, is_conv1d

__all__ = ["GiftPeftConfig", "GiftPeftLayer", "GiftPeftModel", "GiftPeftType", "register"]


class GiftPeftType(str, enum.Enum):
    """Stands in for a ``peft.PeftType`` member: equal to, and hashing as, the string ``"GIFT"``."""

    GIFT = "GIFT"


PREFIX = "gift_"
_THETAS = "gift_thetas"  # on the tuner: ModuleDict[adapter] -> ModuleDict[key] -> GiftTheta
_LAYER_THETAS = "gift_theta"  # on each layer: ModuleDict[adapter] -> ModuleList[chunk] (aliases)


@dataclass
class GiftPeftConfig(PeftConfig):
    """PEFT config for GIFT. The fields mean what they mean in :class:`~gift_kernels.GiftConfig`;
    target matching (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``) follows PEFT's rules.

    ``sharing="type"`` keys a Theta by the ``target_modules`` entry a layer matched (by the
    last name component when ``target_modules`` is a regex).
    """

    r: int = field(default=16, metadata={"help": "GIFT rank"})
    target_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": "layers to adapt"})
    exclude_modules: Optional[Union[List[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[List[int], int]] = field(default=None)
    layers_pattern: Optional[Union[List[str], str]] = field(default=None)
    sharing: str = field(default="type", metadata={"help": "'type' | 'all' | 'layer'"})
    theta_dtype: Optional[str] = field(default=None)
    in_bias: bool = field(default=False)
    out_bias: bool = field(default=False)
    fused: Optional[Dict[str, Union[int, List[int]]]] = field(default=None)
    modules_to_save: Optional[List[str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GiftPeftType.GIFT
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"GiftPeftConfig: r must be an int >= 1, got {self.r!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"GiftPeftConfig: sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.theta_dtype is not None and self.theta_dtype not in DTYPES:
            raise ValueError(f"GiftPeftConfig: theta_dtype must be None or one of {sorted(DTYPES)}, got {self.theta_dtype!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)  # as LoraConfig; saved as a list


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


class GiftPeftLayer(nn.Module, BaseTunerLayer):
    """The tuner layer: wraps an ``nn.Linear`` or ``Conv1D`` (``base_layer``) and applies the
    active adapters' Thetas, one list per row chunk of the weight."""

    adapter_layer_names = (_LAYER_THETAS,)
    other_param_names = ("gift_splits",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, thetas: Sequence[GiftTheta], splits) -> None:
        nn.Module.__init__(self)
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(f"GiftPeftLayer: expected an nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = is_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        self.gift_theta = nn.ModuleDict()
        self.gift_splits: Dict[str, Tuple[int, ...]] = {}
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self.update_layer(adapter_name, thetas, splits)

    def update_layer(self, adapter_name: str, thetas: Sequence[GiftTheta], splits, inference_mode: bool = False):
        self.gift_theta[adapter_name] = nn.ModuleList(thetas)
        self.gift_splits[adapter_name] = tuple(splits)
        self.set_adapter(self.active_adapters)  # (no inference_mode argument before peft 0.18)
        if inference_mode:
            self.gift_theta[adapter_name].requires_grad_(False)

    def _weight_rows(self) -> Tensor:
        w = self.get_base_layer().weight
        return w.t() if self.transposed else w

    def _active(self) -> List[str]:
        return [a for a in self.active_adapters if a in self.gift_theta]

    def _chunk_thetas(self, adapters: Sequence[str]):
        splits = {self.gift_splits[a] for a in adapters}
        if len(splits) > 1:
            raise ValueError(
                f"GiftPeftLayer: adapters {list(adapters)} split this layer's rows differently ({sorted(splits)}); "
                f"activate them one at a time"
            )
        split = splits.pop()
        return [[self.gift_theta[a][c] for a in adapters] for c in range(len(split))], split

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        chunk_thetas, splits = self._chunk_thetas(adapters)
        return gift_linear_stacked(x, self._weight_rows(), self.get_base_layer().bias, chunk_thetas, splits)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not self.merged:
            # kept for an exact unmerge; a non-persistent buffer so .to() moves it and checkpoints skip it
            self.register_buffer("gift_unmerged_weight", base.weight.detach().clone(), persistent=False)
        original = self.gift_unmerged_weight
        rows = original.t() if self.transposed else original
        chunk_thetas, splits = self._chunk_thetas(self.merged_adapters + list(adapter_names))
        merged = gift_stacked_merged_weight(rows, chunk_thetas, splits).to(original.dtype)
        merged = merged.t() if self.transposed else merged
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"GiftPeftLayer.merge: NaNs or infs in the merged weight of adapter(s) {adapter_names}")
        base.weight.copy_(merged)
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("GiftPeftLayer.unmerge: already unmerged, nothing to do")
            return
        self.get_base_layer().weight.copy_(self._buffers.pop("gift_unmerged_weight"))
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """``W_hat - W`` for one adapter, in the base weight's layout (for PEFT utilities)."""
        rows = self._weight_rows()
        if self.merged:
            rows = self.gift_unmerged_weight.t() if self.transposed else self.gift_unmerged_weight
        chunk_thetas, splits = self._chunk_thetas([adapter_name])
        delta = (gift_stacked_merged_weight(rows, chunk_thetas, splits) - rows.float()).to(rows.dtype)
        return delta.t() if self.transposed else delta

    def __repr__(self) -> str:
        return "gift." + super().__repr__()


class GiftPeftModel(BaseTuner):
    """PEFT tuner for GIFT (see the module docstring)."""

    prefix: str = PREFIX
    tuner_layer_cls = GiftPeftLayer
    target_module_mapping: Dict[str, List[str]] = {}  # no guessing: target_modules is required
    uses_shared_state: bool = True

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # plan the whole adapter (Theta keys, d_in per shared Theta) before PEFT replaces anything
        self._plan_adapter(model, self.peft_config[adapter_name], adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _plan_adapter(self, model: nn.Module, config: GiftPeftConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            raise ValueError("GiftPeftConfig: specify target_modules (GIFT guesses no default targets)")
        # "all-linear": PEFT expands it to full module names; the type is then the last name part
        by_last_name = isinstance(config.target_modules, str) and config.target_modules == "all-linear"
        if _maybe_include_all_linear_layers is not None:
            config = _maybe_include_all_linear_layers(config, model)
        if _THETAS not in self._modules:
            self.gift_thetas = nn.ModuleDict()
        if "_gift_plans" not in self.__dict__:
            self._gift_plans: Dict[str, Dict[str, Tuple[Tuple[int, ...], Tuple[str, ...]]]] = {}
        plan: Dict[str, Tuple[Tuple[int, ...], Tuple[str, ...]]] = {}
        specs: Dict[str, Tuple[int, torch.dtype, torch.device, str]] = {}
        theta_dtype = DTYPES.get(config.theta_dtype) if config.theta_dtype else None
        wrapped: List[str] = []  # the insides of existing GIFT layers are never targets
        for name, module in model.named_modules():
            if any(name.startswith(w) for w in wrapped):
                continue
            if isinstance(module, GiftPeftLayer):
                wrapped.append(name + ".")
            if not name or not self._check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(module, BaseTunerLayer) and not isinstance(module, GiftPeftLayer):
                raise TypeError(f"GIFT: {name!r} is already a {type(module).__name__} of another PEFT method")
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise TypeError(
                    f"GIFT: target {name!r} is a {type(base).__name__}, not an nn.Linear or Conv1D; narrow target_modules"
                )
            w = base.weight
            d_in, d_out = (w.shape[0], w.shape[1]) if is_conv1d(base) else (w.shape[1], w.shape[0])
            splits = (d_out,)
            for key, spec in (config.fused or {}).items():
                if _suffix_match(name, key):
                    splits = (d_out // spec,) * spec if isinstance(spec, int) else tuple(spec)
                    if sum(splits) != d_out:
                        raise ValueError(f"GIFT: fused[{key!r}] = {spec!r} does not split {name!r} (d_out={d_out})")
                    break
            if config.sharing == "all":
                label = "all"
            elif config.sharing == "layer":
                label = name.replace(".", "__")
            elif by_last_name or isinstance(config.target_modules, str):
                label = name.rsplit(".", 1)[-1]
            else:
                label = next(
                    (t for t in sorted(config.target_modules, key=len, reverse=True) if _suffix_match(name, t)),
                    name.rsplit(".", 1)[-1],
                ).replace(".", "__")
            keys = tuple(label if len(splits) == 1 or config.sharing == "all" else f"{label}__chunk{i}" for i in range(len(splits)))
            for key in keys:
                prev = specs.get(key)
                if prev is None:
                    specs[key] = (d_in, theta_dtype or w.dtype, w.device, name)
                elif prev[0] != d_in:
                    raise ValueError(
                        f"GIFT: {name!r} (in_features={d_in}) and {prev[3]!r} (in_features={prev[0]}) would share "
                        f"Theta {key!r} (sharing={config.sharing!r}); a shared Theta needs one d_in"
                    )
            plan[name] = (splits, keys)
        thetas = nn.ModuleDict()
        for key, (d_in, dtype, device, _) in specs.items():
            factory = {"device": device, "dtype": dtype}
            if config.in_bias or config.out_bias:
                thetas[key] = GiftThetaWithBias(d_in, config.r, in_bias=config.in_bias, out_bias=config.out_bias, **factory)
            else:
                thetas[key] = GiftTheta(d_in, config.r, **factory)
        self.gift_thetas[adapter_name] = thetas
        self._gift_plans[adapter_name] = plan

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        splits, keys = self._gift_plans[adapter_name][current_key]
        thetas = [self.gift_thetas[adapter_name][k] for k in keys]
        if isinstance(target, GiftPeftLayer):
            target.update_layer(adapter_name, thetas, splits, inference_mode=config.inference_mode)
            return
        new = GiftPeftLayer(target, adapter_name, thetas, splits)
        if adapter_name not in self.active_adapters:
            new.gift_theta[adapter_name].requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    # ------------------------------------------------------------------ BaseTuner methods that
    # were abstract in older peft (written out so the class also instantiates there)
    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        return check_target_module_exists(peft_config, key)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("GiftPeftConfig: specify target_modules (GIFT guesses no default targets)")
        return peft_config

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        if getattr(BaseTuner._mark_only_adapters_as_trainable, "__isabstractmethod__", False):
            for name, p in model.named_parameters():  # what LoRA did on those versions
                if self.prefix not in name:
                    p.requires_grad = False
        else:
            super()._mark_only_adapters_as_trainable(model)
        for adapter, thetas in self.gift_thetas.items():
            trainable = adapter in self.active_adapters and not self.peft_config[adapter].inference_mode
            thetas.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.gift_thetas:
            del self.gift_thetas[adapter_name]
        self._gift_plans.pop(adapter_name, None)

    # ------------------------------------------------------------------ checkpoints
    # Model keys: canonical  base_model.gift_thetas.<adapter>.<key>.<param>
    #             alias      base_model.model.<layer>.gift_theta.<adapter>.<chunk>.<param>
    # Checkpoint keys: the canonical ones without the adapter name; aliases are not saved.

    @staticmethod
    def _is_alias(key: str) -> bool:
        return _LAYER_THETAS in key.split(".")

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        full = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in full.items() if not cls._is_alias(k)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in (_THETAS, _LAYER_THETAS) and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # give each per-layer alias the tensor of its canonical Theta, so nothing reads as missing
        tuners = [(n, m) for n, m in model.named_modules() if isinstance(m, GiftPeftModel)]
        if not tuners:
            return remapped
        tuner_name, tuner = tuners[0]
        if adapter_name not in tuner.gift_thetas:
            return remapped
        where = {id(t): k for k, t in tuner.gift_thetas[adapter_name].items()}
        canon_prefix = f"{tuner_name}.{_THETAS}.{adapter_name}" if tuner_name else f"{_THETAS}.{adapter_name}"
        for name, layer in model.named_modules():
            if not isinstance(layer, GiftPeftLayer) or adapter_name not in layer.gift_theta:
                continue
            for i, theta in enumerate(layer.gift_theta[adapter_name]):
                for pname, _ in theta.named_parameters():
                    canon = f"{canon_prefix}.{where[id(theta)]}.{pname}"
                    if canon in remapped:
                        remapped[f"{name}.{_LAYER_THETAS}.{adapter_name}.{i}.{pname}"] = remapped[canon]
        return remapped


def _peft_version() -> str:
    import peft

    return getattr(peft, "__version__", "?")


def register() -> None:
    """Make ``"GIFT"`` known to PEFT (idempotent; runs on import of this module).

    Fills PEFT's method registries directly, as ``peft.utils.register_peft_method`` does,
    because that function accepts only names already in ``peft.PeftType``.
    """
    from peft import mapping

    if not hasattr(BaseTuner, "_get_adapter_state_dict"):
        # peft < 0.21 picks what to save by matching config.peft_type against list(PeftType)
        # and raises "Unknown PEFT type" for any other type; training still works
        warnings.warn(
            f"gift_kernels.peft_integration: peft {_peft_version()} lacks the tuner save/load hooks of peft 0.21; "
            f"get_peft_model works but save_pretrained/from_pretrained will fail. Upgrade peft, or save with "
            f"gift_kernels.checkpoint.save_gift after gift_kernels.apply_gift",
            stacklevel=2,
        )
    key = GiftPeftType.GIFT
    for registry, value in (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, GiftPeftConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, GiftPeftModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, PREFIX),
    ):
        current = registry.get(key)
        if current is not None and current is not value:
            raise RuntimeError(
                f"gift_kernels.peft_integration: PEFT already has a method registered as 'GIFT' ({current!r}); "
                f"not overriding it"
            )
        registry[key] = value


register()
