"""GIFT as a PEFT method: ``get_peft_model(model, GiftPeftConfig(...))``.

GIFT (Generative Interpretable Fine-Tuning) was published at ICML 2025 as WeGeFT
(Weight-Generative Fine-Tuning): C. Savadikar, X. Song and T. Wu, "WeGeFT: Weight-Generative
Fine-Tuning for Multi-Faceted Efficient Adaptation of Large Models", ICML 2025, PMLR 267,
arXiv 2312.00700 (v5). ``W_hat = W (I + phi psi)``, one Theta = (phi, psi) shared by every
layer of a type.

    from gift_kernels.adapters.peft import GiftPeftConfig   # importing it registers "GIFT" with PEFT
    from peft import PeftModel, get_peft_model

    model = get_peft_model(base, GiftPeftConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained("out/")
    model = PeftModel.from_pretrained(fresh_base, "out/")

How it is registered (see docs/peft.md for the versions): PEFT's ``register_peft_method``
refuses names missing from its ``PeftType`` enum, and extending an ``Enum`` at run time
means writing to private members. PEFT only ever uses the type as a key of four dicts
(``PEFT_TYPE_TO_{CONFIG,TUNER,PREFIX,MIXED_MODEL}_MAPPING``) and in ``==`` tests, and
``PeftType`` is a ``str`` enum whose members hash and compare as their value. So the config's
``peft_type`` is a member of our own one-member ``str`` enum, ``GiftPeftType.GIFT`` (==
``"GIFT"``), and :func:`register` puts it into those dicts, which is exactly what
``register_peft_method`` does after its name check.

The tuner follows PEFT's shared-parameter precedents (VB-LoRA, TinyLoRA): the Thetas live once
per adapter on the tuner, ``base_model.gift_thetas[adapter][key]``, and each tuner layer
``GiftPeftLayer`` registers the ones it uses in ``gift_theta[adapter]`` (aliases of the same
modules, so PEFT's per-layer ``set_adapter`` / ``requires_grad`` / dtype handling applies).
Checkpoints hold each Theta once: the tuner's save/load hooks drop the per-layer aliases on save
and fill them back in on load. Planning (targets, stacked splits, sharing keys, the one-d_in
check, the Thetas) is :mod:`gift_kernels.adapters.planning`'s, the same as ``apply_gift``'s;
merging is :mod:`gift_kernels.nn.merge`'s.

Several active adapters on one layer are exact: ``W (I + sum_a phi_a psi_a)`` is one GIFT call
with the Thetas concatenated along the rank. ``model(..., adapter_names=[...])`` gives each
sample its own adapter (``"__base__"``: none), as PEFT's LoRA does.
"""

from __future__ import annotations

import enum
import os
import warnings
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists

try:  # the "all-linear" shorthand (private helper; absent in some versions)
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
except ImportError:  # pragma: no cover
    _maybe_include_all_linear_layers = None
try:  # modules_to_save / trainable-token wrappers (peft >= 0.15)
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError:  # pragma: no cover
    AuxiliaryTrainingWrapper = ()

from ..nn import bases
from ..nn.bases import is_conv1d
from ..nn.layer import GiftLayer
from ..nn.mixed import shared_banks, token_ids
from ..nn.theta import GiftTheta
from ..ops import memo
from . import planning
from .config import DTYPES, FORMS, SHARING, check_stacked

__all__ = ["GiftPeftConfig", "GiftPeftLayer", "GiftPeftModel", "GiftPeftType", "register"]

BIAS = ("none", "all", "gift_only")


class GiftPeftType(str, enum.Enum):
    """Stands in for a ``peft.PeftType`` member: equal to, and hashing as, the string ``"GIFT"``."""

    GIFT = "GIFT"


PREFIX = "gift_"
_THETAS = planning.THETAS_ATTR  # on the tuner: ModuleDict[adapter] -> ModuleDict[key] -> GiftTheta
_LAYER_THETAS = "gift_theta"  # on each layer: ModuleDict[adapter] -> ModuleList[chunk] (aliases)


@dataclass
class GiftPeftConfig(PeftConfig):
    """PEFT config for GIFT. The fields mean what they mean in :class:`~gift_kernels.GiftConfig`;
    target matching (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``) follows PEFT's rules.

    ``sharing="type"`` keys a Theta by the ``target_modules`` entry a layer matched (by the
    last name component when ``target_modules`` is a regex). ``init_weights`` has PEFT's
    meaning: True is the authors' init (psi = 0: outputs unchanged), False draws psi like phi
    (for tests). ``bias`` is LoRA's option: ``"none"``, ``"all"`` (every bias of the model
    trains) or ``"gift_only"`` (the biases of the adapted layers train). ``theta_dtype``, when
    given, is kept whatever ``autocast_adapter_dtype`` says; when None, Thetas take the base
    weights' dtype and PEFT's ``autocast_adapter_dtype`` (default True) upcasts 16-bit ones to
    float32.
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
    stacked: Optional[Dict[str, Union[int, List[int]]]] = field(default=None)
    modules_to_save: Optional[List[str]] = field(default=None)
    init_weights: bool = field(default=True)
    bias: str = field(default="none", metadata={"help": "'none' | 'all' | 'gift_only'"})
    form: str = field(default="auto", metadata={"help": "'auto' | 'epilogue' | 'input'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GiftPeftType.GIFT
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"GiftPeftConfig: r must be an int >= 1, got {self.r!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"GiftPeftConfig: sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.theta_dtype is not None and self.theta_dtype not in DTYPES:
            raise ValueError(f"GiftPeftConfig: theta_dtype must be None or one of {sorted(DTYPES)}, got {self.theta_dtype!r}")
        if self.bias not in BIAS:
            raise ValueError(f"GiftPeftConfig: bias must be one of {BIAS}, got {self.bias!r}")
        if self.form not in FORMS:
            raise ValueError(f"GiftPeftConfig: form must be one of {FORMS}, got {self.form!r}")
        if self.stacked is not None:
            check_stacked(self.stacked, "GiftPeftConfig")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)  # as LoraConfig; saved as a list

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's config loader, plus a check of the adapter file beside it before anything is
        injected: ``PeftModel.from_pretrained`` wraps the base model before it reads the weights,
        so a corrupt file would otherwise leave the model wrapped. The file PEFT will read
        (``adapter_model.safetensors``, else ``adapter_model.bin``) must load; its Theta shapes
        are kept on the config and checked against the plan before injection
        (:func:`_check_saved_shapes`). A hub id (no local directory) is left to PEFT."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        for name in _WEIGHT_FILES:
            weights = Path(path) / name
            if weights.exists():
                config.__dict__[_SAVED_SHAPES] = (weights, _saved_theta_shapes(weights))
                break
        return config


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order for a local directory
_SAVED_SHAPES = "_gift_saved_theta_shapes"  # not a dataclass field: never saved with the config
_WHAT_LOAD = "PeftModel.from_pretrained"


def _saved_theta_shapes(weights: Path) -> Dict[str, Tuple[int, ...]]:
    """``{"<key>.<param>": shape}`` of the Thetas in a PEFT adapter file (either format), with an
    error naming the file if it cannot be read."""
    if weights.suffix == ".safetensors":
        from .checkpoint import read_safetensors

        tensors, _ = read_safetensors(weights, _WHAT_LOAD)
    else:
        from .checkpoint import check_writable_file

        check_writable_file(weights, _WHAT_LOAD)
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file, none naming it
            raise ValueError(f"{_WHAT_LOAD}: {weights} is not a readable PyTorch state dict (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise ValueError(f"{_WHAT_LOAD}: {weights} does not hold a state dict of tensors")
    marker = f"{_THETAS}."
    return {k.split(marker, 1)[1]: tuple(v.shape) for k, v in tensors.items() if marker in k}


def _check_saved_shapes(config: "GiftPeftConfig", plan: planning.Plan) -> None:
    """Before injection: the Thetas in the file ``config`` was loaded beside are exactly the ones
    the plan builds, with their shapes (a wrong rank ``r`` or a truncated tensor is refused with
    the model untouched). Nothing to check for a config made in code."""
    saved = config.__dict__.pop(_SAVED_SHAPES, None)
    if saved is None:
        return
    weights, shapes = saved
    expected = {k: tuple(shape) for k, (shape, _) in plan.theta_shapes().items()}
    unexpected, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    if unexpected or missing:
        raise ValueError(f"{_WHAT_LOAD}: {weights} holds Theta(s) {unexpected[:4]} the config builds nowhere and lacks "
                         f"{missing[:4]} on this model; it was saved from a different model or config")
    for k, shape in shapes.items():
        if shape != expected[k]:
            raise ValueError(f"{_WHAT_LOAD}: Theta tensor {k!r} has shape {shape} in {weights} but the config "
                             f"(r={config.r}) builds {expected[k]} on this model; the file or its "
                             f"adapter_config.json was edited, or they come from different saves")


def _adapter_names_hook(module, args, kwargs, adapter_names, ids_cache=None):
    kwargs["adapter_names"] = adapter_names
    if ids_cache is not None:
        kwargs[_IDS_CACHE] = ids_cache
    return args, kwargs


# kwarg of a GIFT layer's forward inside ``model(..., adapter_names=...)``: the id tensors of this
# forward, shared by every layer, so the host builds and copies them once, not once per layer
_IDS_CACHE = "_gift_ids_cache"


def _device_ids(values: List[int], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``; to a GPU through pinned memory, so the copy
    does not wait for the work already queued on the stream."""
    ids = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


class GiftPeftLayer(GiftLayer, BaseTunerLayer):
    """The tuner layer: a thin shell over :class:`~gift_kernels.nn.layer.GiftLayer` (the one
    implementation of a GIFT layer's forward, mixed batches, merge and unmerge, shared with
    :class:`~gift_kernels.nn.GiftLinear`) that wraps an ``nn.Linear``, ``Conv1D`` or quantized
    layer (``base_layer``) and picks the active adapters' Thetas, one list per row chunk of the
    weight."""

    adapter_layer_names = (_LAYER_THETAS,)
    other_param_names = ("gift_splits",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, thetas: Sequence[GiftTheta], splits,
                 form: str = "auto") -> None:
        nn.Module.__init__(self)
        if not planning.is_linear(base_layer):
            raise TypeError(f"GiftPeftLayer: expected an nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = is_conv1d(base_layer)
        self.in_features, self.out_features = bases.features(base_layer)  # (a packed 4-bit weight has no such shape)
        self._init_merge_state()
        self.form = form
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

    # where GiftLayer finds the base
    def module_base(self) -> Optional[nn.Module]:
        base = self.get_base_layer()
        return None if bases.is_dense(base) else base

    def dense_weight(self) -> nn.Parameter:
        return self.get_base_layer().weight

    @property
    def base_bias(self) -> Optional[Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

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

    def _gift(self, x: Tensor, adapters: Sequence[str], *args, **kwargs) -> Tensor:
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        chunk_thetas, splits = self._chunk_thetas(adapters)
        return self.gift_forward(x, chunk_thetas, splits, self.form)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        ids_cache = kwargs.pop(_IDS_CACHE, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
            return self._mixed_batch_forward(x, adapter_names, *args, ids_cache=ids_cache, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._gift(x, self._active(), *args, **kwargs)

    def _mixed_batch_forward(self, x: Tensor, adapter_names: Sequence[str], *args,
                             ids_cache: Optional[Dict[tuple, object]] = None, **kwargs) -> Tensor:
        """Each sample (along dim 0) through its own adapter; ``"__base__"`` (or an adapter this
        layer does not have) through the base layer. One segmented GIFT call per row chunk for
        all the adapters of the batch, then one base call for every sample
        (:meth:`GiftLayer.mixed_forward`); a loop over adapters only when they split this
        layer's rows differently. ``ids_cache``: the forward's id tensors and stacked banks, shared
        by its layers (keyed by what decides them: layers with the same adapters and input rows
        reuse one id tensor, layers of one type one bank)."""
        if len(adapter_names) != x.shape[0]:  # PEFT's message for this case (its tests match it)
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {x.shape[0]} respectively.")
        cache = {} if ids_cache is None else ids_cache
        mine = [a for a in dict.fromkeys(adapter_names) if a in self.gift_theta]
        if mine and len({self.gift_splits[a] for a in mine}) == 1:
            splits = self.gift_splits[mine[0]]
            banks = shared_banks(None if ids_cache is None else cache,
                                 [[self.gift_theta[a][c] for a in mine] for c in range(len(splits))])
            key = ("tokens", tuple(mine), x.device, tuple(x.shape[:-1]))
            ids = cache.get(key)
            if ids is None:
                sample_ids = _device_ids([mine.index(a) if a in self.gift_theta else -1 for a in adapter_names],
                                         x.device)
                ids = cache[key] = memo.own(token_ids(x, sample_ids, "GiftPeftLayer"))
            return self.mixed_forward(x, ids, banks, splits)
        out = None
        for name in dict.fromkeys(adapter_names):
            key = ("samples", name, x.device)
            idx = cache.get(key)
            if idx is None:
                idx = cache[key] = _device_ids([i for i, a in enumerate(adapter_names) if a == name], x.device)
            adapters = [name] if name in self.gift_theta else []
            y = self._gift(x.index_select(0, idx), adapters, *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out.index_copy_(0, idx, y)
        return out

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.gift_theta]  # adapters this layer lacks: skipped
        if not adapter_names:
            return
        chunk_thetas, splits = self._chunk_thetas(self.merged_adapters + list(adapter_names))
        owner = f"GiftPeftLayer({type(self.get_base_layer()).__name__}).merge of adapter(s) {adapter_names}"
        self.fold_thetas(chunk_thetas, splits, owner, check_finite=safe_merge)
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("GiftPeftLayer.unmerge: already unmerged, nothing to do")
            return
        self.restore_base()
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """``W_hat - W`` for one adapter, in the base weight's layout (for PEFT utilities)."""
        rows = self.weight_rows(original=True)  # a module base: dequantized, float32 (d_out, d_in)
        chunk_thetas, splits = self._chunk_thetas([adapter_name])
        delta = (self.merged_rows(chunk_thetas, splits) - rows.to(torch.float64 if rows.dtype == torch.float64
                                                                  else torch.float32)).to(rows.dtype)
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
        bases.adopt(model)  # e.g. keeps bitsandbytes 4-bit layers out of their gradient-less CPU packing

    def _plan_adapter(self, model: nn.Module, config: GiftPeftConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            raise ValueError("GiftPeftConfig: specify target_modules (GIFT guesses no default targets)")
        # "all-linear": PEFT expands it to full module names; the type is then the last name part
        by_last_name = isinstance(config.target_modules, str)
        if _maybe_include_all_linear_layers is not None:
            config = _maybe_include_all_linear_layers(config, model)
        entries = None if by_last_name else sorted(config.target_modules)
        matched = []
        wrapped: List[str] = []  # the insides of existing GIFT layers are never targets
        for name, module in model.named_modules():
            if any(name.startswith(w) for w in wrapped):
                continue
            if isinstance(module, GiftPeftLayer):
                wrapped.append(name + ".")
            if not name or not self._check_target_module_exists(config, name):
                continue
            if isinstance(module, BaseTunerLayer) and not isinstance(module, GiftPeftLayer):
                raise TypeError(f"GIFT: {name!r} is already a {type(module).__name__} of another PEFT method")
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            matched.append((name, base, planning.type_label(name, entries)))
        options = planning.PlanOptions(
            rank=config.r, sharing=config.sharing, theta_dtype=DTYPES.get(config.theta_dtype),
            in_bias=config.in_bias, out_bias=config.out_bias, init_weights=config.init_weights,
            stacked=config.stacked or {},
        )
        plan = planning.plan(model, matched, options, "GIFT")
        _check_saved_shapes(self.peft_config[adapter_name], plan)  # before anything is injected
        if _THETAS not in self._modules:
            self.gift_thetas = nn.ModuleDict()
        if "_gift_plans" not in self.__dict__:
            self._gift_plans: Dict[str, Dict[str, planning.Target]] = {}
        self.gift_thetas[adapter_name] = plan.build_thetas()
        self._gift_plans[adapter_name] = {t.name: t for t in plan.targets}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        planned = self._gift_plans[adapter_name][current_key]
        thetas = planning.theta_of(self.gift_thetas[adapter_name], planned)
        if isinstance(target, GiftPeftLayer):
            target.update_layer(adapter_name, thetas, planned.splits, inference_mode=config.inference_mode)
            return
        new = GiftPeftLayer(target, adapter_name, thetas, planned.splits, form=config.form)
        if adapter_name not in self.active_adapters:
            new.gift_theta[adapter_name].requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """An explicit ``theta_dtype`` is kept; otherwise PEFT's rule (16-bit adapters upcast)."""
        if self.peft_config[adapter_name].theta_dtype is not None:
            return
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])``: one adapter per sample, as PEFT's LoRA offers."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if any(isinstance(m, GiftPeftLayer) and m.merged for m in self.modules()):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
        known = set(self.gift_thetas.keys()) if _THETAS in self._modules else set()
        unknown = {a for a in adapter_names if a != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        handles, names, ids_cache = [], list(adapter_names), {}
        for module in self.modules():
            if isinstance(module, GiftPeftLayer):
                hook = partial(_adapter_names_hook, adapter_names=names, ids_cache=ids_cache)
            elif AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
                hook = partial(_adapter_names_hook, adapter_names=names)
            else:
                continue
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with memo.scope():  # the layers' id tensors (built below, never exposed): one row layout per forward
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        holders: Dict[int, List[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            for p in module._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), []).append(name)
        for name, module in self.model.named_modules():
            if isinstance(module, GiftPeftLayer):
                refused = bases.merge_refusal(module.get_base_layer())  # a quantized base that cannot take W_hat
                if refused:
                    raise ValueError(f"GIFT: {name!r}: {refused}")
                others = [h for h in holders.get(id(module.get_base_layer().weight), [])
                          if h != name + ".base_layer" and not h.startswith(name + ".")]
                if others:
                    raise ValueError(f"GIFT: {name!r}'s weight is tied to {others}; merging would change those modules "
                                     f"too. Keep the model unmerged or untie the weights first")

    # ------------------------------------------------------------------ BaseTuner methods that
    # were abstract in older peft (written out so the class also instantiates there)
    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        return check_target_module_exists(peft_config, key)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("GiftPeftConfig: specify target_modules (GIFT guesses no default targets)")
        return peft_config

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
            f"gift_kernels.adapters.peft: peft {_peft_version()} lacks the tuner save/load hooks of peft 0.21; "
            f"get_peft_model works but save_pretrained/from_pretrained will fail. Upgrade peft, or save with "
            f"gift_kernels.save_gift after gift_kernels.apply_gift",
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
                f"gift_kernels.adapters.peft: PEFT already has a method registered as 'GIFT' ({current!r}); "
                f"not overriding it"
            )
        registry[key] = value


register()
