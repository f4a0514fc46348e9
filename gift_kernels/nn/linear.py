"""``GiftLinear``: a frozen linear layer adapted with GIFT, a drop-in for the layer it wraps.

One class covers every case: an ``nn.Linear``, a transformers ``Conv1D`` (weight stored
``(d_in, d_out)``, read through a transposed view), a weight whose rows stack several
projections (a qkv ``nn.Linear`` or GPT-2's ``c_attn``: ``splits``), each row chunk with its
own Theta(s), and any other base linear in its input (a quantized layer: see
:mod:`gift_kernels.nn.bases`). Over a dense base it holds the wrapped layer's own
``weight``/``bias`` Parameters (no copy, the layer's state_dict keys); over any other base it
holds the layer itself as ``base_layer`` and runs it on ``x + (x psi^T) phi^T``. Either way,
plus ``theta`` (one chunk) or ``thetas`` (one per chunk). What it does with its base (forward,
mixed batches, merge) is :class:`~gift_kernels.nn.layer.GiftLayer`'s, shared with the PEFT layer.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.functional import FORMS
from . import bases
from .bases import is_conv1d
from .layer import GiftLayer
from .merge import original_module_base
from .mixed import SampleIds
from .module_base import module_form
from .stacked import check_theta
from .theta import GiftTheta, GiftThetaWithBias


class GiftLinear(GiftLayer):
    """``y = x (W (I + phi psi))^T + b`` with a frozen ``W``/``b`` and (possibly shared) Thetas.

    A drop-in for ``nn.Linear`` (or a ``Conv1D``): same ``weight``/``bias`` attributes and
    state_dict keys, plus ``theta.phi`` / ``theta.psi`` (one chunk) or ``thetas.<i>.*`` (one
    Theta per row chunk, ``splits``). Build one from an existing layer with
    :meth:`from_linear` / :meth:`from_module`; several layers may hold the same
    :class:`GiftTheta`. In a model adapted by :func:`~gift_kernels.apply_gift` the layers hold
    their Thetas by reference and the model's store owns them (:meth:`share_thetas`), so a shared
    Theta is saved once.

    :meth:`set_mixed` puts the layer in mixed mode (each sample through its own adapter's
    Thetas, what :func:`~gift_kernels.mixed_adapters` does for its block).

    ``form`` is passed to :func:`gift_linear` (``"auto"``: the backend picks the cheaper of the
    epilogue and input-side forms per call).

    :meth:`merge` folds GIFT into the weight for inference (the forward is then a plain
    ``F.linear``); :meth:`unmerge` restores the original weight bit for bit. The state_dict
    of a merged layer holds the *original* weight (a checkpoint is always in the unmerged
    format, so it loads into a fresh layer exactly); loading a state_dict into a merged
    layer is refused.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        theta: GiftTheta,
        bias: bool = True,
        *,
        form: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_theta(theta, in_features, "GiftLinear")
        _refuse_biased(theta, "GiftLinear")
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        b = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        # initialise like nn.Linear so a GiftLinear built from scratch is a usable layer
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if b is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(b, -bound, bound)
        self._setup(weight, b, [theta], (out_features,), transposed=False, form=form)

    def _setup(self, weight, bias, thetas, splits, *, transposed: bool, form: str) -> None:
        if form not in FORMS:
            raise ValueError(f"GiftLinear: form must be one of {FORMS}, got {form!r}")
        self.in_features = weight.shape[0] if transposed else weight.shape[1]
        self.out_features = weight.shape[1] if transposed else weight.shape[0]
        self.transposed = transposed
        self.splits = tuple(splits)
        self.form = form
        self.weight = weight
        self.bias = bias
        self._hold_thetas(thetas)
        self._init_merge_state()

    def _hold_thetas(self, thetas: Sequence[GiftTheta]) -> None:
        """Register the Thetas as this layer's submodules (``theta`` / ``thetas``): a layer on its own
        owns them. See :meth:`share_thetas` for layers whose Thetas a model's store owns."""
        self.__dict__["_theta_refs"] = None
        self.__dict__["_mixed"] = None
        if len(thetas) == 1:
            self.theta = thetas[0]
        else:
            self.thetas = nn.ModuleList(thetas)

    def share_thetas(self) -> None:
        """Hold the Thetas by reference, outside the module tree: their owner is a model's adapter
        store (``model.gift_thetas``, where :func:`~gift_kernels.apply_gift` registers each once).

        A Theta registered in every layer that shares it would be listed once per layer in
        ``state_dict``: safetensors (the Hugging Face Trainer's default format) refuses such shared
        storage, and a loaded checkpoint would assign it once per key. Held by reference, each Theta
        is saved and loaded once, through the store, and every layer reads that one module: loading
        a state dict, ``.to()``, FSDP2 and ``deepcopy`` (which copies the reference with the store)
        keep the layers tied. The layer's own ``parameters()`` / ``state_dict()`` no longer hold the
        Thetas; the model's do."""
        thetas = self.chunk_thetas
        self._modules.pop("theta", None)
        self._modules.pop("thetas", None)
        self.__dict__["_theta_refs"] = tuple(thetas)

    @classmethod
    def from_linear(cls, linear: nn.Linear, theta: GiftTheta, *, freeze: bool = True, form: str = "auto") -> "GiftLinear":
        """Wrap ``linear`` with ``theta``: its own weight/bias tensors (no copy) for a plain
        ``nn.Linear``; the layer itself, run as a black box (``base_layer``), for a quantized
        ``nn.Linear`` (bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, a torchao-quantized weight).

        ``freeze`` sets ``requires_grad=False`` on the wrapped weight and bias, as GIFT trains
        only Theta.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GiftLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        check_theta(theta, linear.in_features, f"GiftLinear.from_linear({linear})")
        _refuse_biased(theta, "GiftLinear.from_linear")
        return cls.from_module(linear, [theta], freeze=freeze, form=form)

    @classmethod
    def from_module(
        cls, module: nn.Module, thetas: Sequence[GiftTheta], splits: Optional[Sequence[int]] = None, *,
        freeze: bool = True, form: str = "auto",
    ) -> "GiftLinear":
        """Wrap a base layer with one Theta per row chunk (``splits``: the chunk sizes, default
        one chunk). Thetas may have projection biases (:class:`GiftThetaWithBias`).

        A dense ``nn.Linear`` / transformers ``Conv1D``: its own Parameters, no copy. Any other
        module with integer ``in_features`` / ``out_features`` whose forward is linear in its
        input (a quantized layer; docs/quantized.md) is held as ``base_layer`` and run on the
        transformed input. Bases GIFT cannot train through are refused, naming the module;
        nothing is changed on an error."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"GiftLinear.from_module: expected an nn.Module, got {type(module).__name__}")
        dense = bases.is_dense(module)
        if not dense and bases.module_features(module) is None:
            raise TypeError(f"GiftLinear.from_module: {bases.describe_rule(module)}")
        why = bases.refusal(module)
        if why:
            raise TypeError(f"GiftLinear.from_module: cannot adapt this {type(module).__name__}: {why}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if dense:
            layer._init_chunks(module.weight, module.bias, thetas, splits, transposed=is_conv1d(module), form=form)
        else:
            layer._init_module_base(module, thetas, splits, form=form)
        if freeze:
            for p in (module.parameters() if not dense else (layer.weight, layer.bias)):
                if p is not None and p.is_floating_point():
                    p.requires_grad_(False)
        return layer

    def _init_chunks(self, weight, bias, thetas, splits, *, transposed: bool, form: str) -> None:
        name = type(self).__name__
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"{name}: weight must be a 2-D tensor, got {getattr(weight, 'shape', weight)!r}")
        d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        thetas, splits = self._check_chunks(thetas, splits, d_in, d_out, f"weight {tuple(weight.shape)}, "
                                            f"transposed={transposed}")
        self._setup(weight, bias, thetas, splits, transposed=transposed, form=form)

    def _check_chunks(self, thetas, splits, d_in: int, d_out: int, what: str):
        name = type(self).__name__
        thetas = list(thetas)
        splits = tuple(int(s) for s in (splits or [d_out]))
        if not thetas or len(splits) != len(thetas) or sum(splits) != d_out or min(splits) < 1:
            raise ValueError(
                f"{name}: splits {list(splits)} must be positive, sum to d_out={d_out} and match the "
                f"{len(thetas)} Theta(s) given ({what})"
            )
        for i, theta in enumerate(thetas):
            check_theta(theta, d_in, f"{name} chunk {i}")
        return thetas, splits

    def _init_module_base(self, module: nn.Module, thetas, splits, *, form: str) -> None:
        """A base GIFT runs as a black box (a quantized layer, ...): see :func:`gift_module_forward`."""
        if form not in FORMS:
            raise ValueError(f"GiftLinear: form must be one of {FORMS}, got {form!r}")
        d_in, d_out = bases.module_features(module)
        thetas, splits = self._check_chunks(thetas, splits, d_in, d_out, f"{type(module).__name__} base")
        module_form(module, len(splits), form)  # refuses 'epilogue' without a dequantize
        self.in_features, self.out_features = d_in, d_out
        self.transposed = False
        self.splits = splits
        self.form = form
        self.base_layer = module
        self._hold_thetas(thetas)
        self._init_merge_state()
        bases.adopt(module)  # after every check: nothing changed on an error

    def __setattr__(self, name: str, value) -> None:
        if name in ("theta", "thetas") and self.__dict__.get("_theta_refs") is not None:
            # the layer would register it but keep reading the store's: refuse rather than ignore it
            raise AttributeError(f"GiftLinear: this layer's Thetas belong to its model's adapter store "
                                 f"(model.gift_thetas, apply_gift); change them there, not on the layer")
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        # over a module base, .weight / .bias are the base layer's (as PEFT's tuner layers do)
        if name in ("weight", "bias"):
            modules = self.__dict__.get("_modules", {})
            if "base_layer" in modules:
                return getattr(modules["base_layer"], name)
        if name in ("theta", "phi", "psi") and "_modules" in self.__dict__:
            self._single_theta(name)  # a stacked layer: say so (the property's error lands here)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ structure

    @property
    def chunk_thetas(self) -> List[GiftTheta]:
        """The Theta of each row chunk (registered here, or held by reference: :meth:`share_thetas`)."""
        refs = self.__dict__.get("_theta_refs")
        if refs is not None:
            return list(refs)
        return list(self._modules["thetas"]) if "thetas" in self._modules else [self._modules["theta"]]

    @property
    def theta(self) -> GiftTheta:
        """The Theta of a one-chunk layer."""
        return self._single_theta("theta")

    @property
    def thetas(self) -> List[GiftTheta]:
        """The Thetas of a stacked layer, one per row chunk."""
        return self.chunk_thetas

    @property
    def phi(self) -> Tensor:
        return self._single_theta("phi").phi

    @property
    def psi(self) -> Tensor:
        return self._single_theta("psi").psi

    def _single_theta(self, what: str) -> GiftTheta:
        thetas = self.chunk_thetas
        if len(thetas) != 1:
            raise AttributeError(f"GiftLinear.{what}: this layer has {len(thetas)} row chunks, one Theta each (.thetas)")
        return thetas[0]

    def module_base(self) -> Optional[nn.Module]:
        return self._modules.get("base_layer")

    def dense_weight(self) -> nn.Parameter:
        return self._parameters["weight"]

    @property
    def base_bias(self) -> Optional[Tensor]:
        return getattr(self.base_layer, "bias", None) if self.has_module_base else self.bias

    def chunks(self) -> List[Tuple[Tensor, Optional[Tensor], GiftTheta]]:
        """``[(W_c, b_c, theta_c)]`` per row chunk, from the original (pre-merge) weight (a module
        base is dequantized once per call)."""
        rows = self.weight_rows(original=True).split(self.splits, dim=0)
        bias = self.base_bias
        biases = bias.split(self.splits) if bias is not None else [None] * len(rows)
        return list(zip(rows, biases, self.chunk_thetas))

    def _per_chunk(self) -> List[List[GiftTheta]]:
        return [[t] for t in self.chunk_thetas]

    # ------------------------------------------------------------------ compute

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.__dict__.get("_mixed")
        if mixed is not None:
            adapters, sample_ids, where = mixed
            self._note_checkpointed(sample_ids, adapters)
            if adapters is None:  # every sample "__base__"
                return self.base_forward(x)
            # stacked per forward, from the Thetas' current values: an optimizer step inside the
            # block is seen by the next forward, and the bank follows this forward's grad mode
            return self.mixed_forward(x, sample_ids.rows(x, where), sample_ids.banks(adapters), self.splits)
        if self.__dict__.get("_unreplayed") and not torch.compiler.is_compiling():
            self._refuse_unmixed_recompute()
        if self.merged:
            return self.base_forward(x)
        return self.gift_forward(x, self._per_chunk(), self.splits, self.form)

    def _note_checkpointed(self, sample_ids: SampleIds, adapters) -> None:
        """Mixed mode under reentrant activation checkpointing (``use_reentrant=True``): the
        layer runs without grad inside a forward that trains (a model forward begun with grad,
        or a bank that requires grad) and is recomputed inside every backward of that graph,
        which must then find the layer still mixed. Remembers that one ran in this block (not a
        count: a graph kept with ``retain_graph`` is recomputed by each backward). Not while a
        graph is traced (a compiled graph holds no Python bookkeeping)."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or self.__dict__.get("_checkpointed"):
            return
        if torch._C._current_graph_task_id() != -1:  # inside a backward: a recompute
            return
        if sample_ids.forward_records_grad() or (adapters is not None and any(
                p.requires_grad for thetas in adapters for t in thetas for p in t.parameters())):
            self.__dict__["_checkpointed"] = True

    def _refuse_unmixed_recompute(self) -> None:
        """After a mixed block in which this layer ran checkpointed: inside a backward, this
        forward is a recompute, now unmixed (its gradients would be another adapter's): refused.
        Outside one, a new step has begun: forgotten."""
        if torch._C._current_graph_task_id() == -1:
            self.__dict__["_unreplayed"] = None
            return
        raise RuntimeError(
            f"{self.__dict__['_unreplayed']}: a forward run inside the mixed_adapters block under reentrant "
            f"activation checkpointing is being recomputed by backward() after the block ended, when the layer is "
            f"no longer mixed: its gradients would be the wrong adapter's. Call backward() inside the block (and the "
            f"backward of a forward run before the block, before the block)")

    def set_mixed(self, adapters: Optional[Sequence[Sequence[GiftTheta]]], sample_ids: SampleIds, where: str) -> None:
        """Mixed mode (what :func:`~gift_kernels.mixed_adapters` sets for its block): sample ``i``
        (dim 0 of the input) through adapter ``sample_ids.sample_ids[i]`` of ``adapters`` (per row chunk, the
        Thetas of the batch's adapters, stacked into a bank at each forward; -1, or
        ``adapters=None`` for every sample: the base alone), instead of this layer's own Thetas.
        ``where`` names the layer in errors. :meth:`clear_mixed` ends it."""
        if not isinstance(sample_ids, SampleIds):
            raise TypeError(f"{where}: sample_ids must be a gift_kernels.nn.mixed.SampleIds (one id per sample), got "
                            f"{type(sample_ids).__name__}")
        if self.merged:
            raise RuntimeError(f"{where}: the layer is merged; a mixed batch needs the unmerged weight")
        if self.__dict__.get("_mixed") is not None:
            raise RuntimeError(f"{where}: the layer is already in mixed mode (one mixed_adapters block at a time)")
        if adapters is not None and len(adapters) != len(self.splits):
            raise ValueError(f"{where}: {len(adapters)} chunk(s) of adapters for a layer of {len(self.splits)} row "
                             f"chunk(s)")
        self.__dict__["_mixed"] = (None if adapters is None else [list(a) for a in adapters], sample_ids, where)

    def clear_mixed(self) -> None:
        """Back to this layer's own Thetas (a checkpointed forward of the block not yet
        recomputed by its backward is remembered: its recompute would now be refused)."""
        mixed = self.__dict__.get("_mixed")
        if mixed is not None and self.__dict__.get("_checkpointed"):
            self.__dict__["_unreplayed"] = mixed[2]  # where: names the layer in the refusal
        self.__dict__["_checkpointed"] = False
        self.__dict__["_mixed"] = None

    @property
    def mixed(self) -> bool:
        """Whether the layer is in mixed mode (:meth:`set_mixed`)."""
        return self.__dict__.get("_mixed") is not None

    def merged_weight(self) -> Tensor:
        """``W_hat`` in the layout and dtype of ``self.weight`` (a new tensor; float32 ``(d_out,
        d_in)`` for a module base), from the original weight whether or not the layer is merged."""
        w_hat = self.merged_rows(self._per_chunk(), self.splits)
        if self.has_module_base:
            return w_hat
        w_hat = w_hat.to(self.weight.dtype)
        return w_hat.t().contiguous() if self.transposed else w_hat

    def merge_refusal(self) -> Optional[str]:
        """Why :meth:`merge` would fail on this layer (its base cannot take a merged weight), or None."""
        if self.merged:
            return "this layer is already merged; call unmerge() first"
        if self.mixed:
            return "this layer is in mixed mode (inside a mixed_adapters block); merge after the block"
        return bases.merge_refusal(self.base_layer) if self.has_module_base else None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Theta into the weight (in place) for inference. Keeps the original for an exact
        :meth:`unmerge`.

        A quantized base gets ``W_hat`` re-quantized in its own format (lossy: a
        :class:`~gift_kernels.nn.bases.LossyMergeWarning` states the measured error, also kept
        in ``merge_error``); its original quantized weight is kept, not re-derived, so unmerge
        is exact. A base that cannot take a merged weight is refused, unchanged."""
        why = self.merge_refusal()
        if why:
            raise (RuntimeError if self.merged or self.mixed else TypeError)(f"GiftLinear.merge: {why}")
        owner = f"GiftLinear({self.extra_repr()})" + (".merge" if self.has_module_base else "")
        self.fold_thetas(self._per_chunk(), self.splits, owner)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight exactly as it was before :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("GiftLinear.unmerge: this layer is not merged")
        self.restore_base()

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W_hat`` (a new tensor, exact: computed from the
        original, dequantized, weight; never re-quantized) and this layer's bias. ``dtype``:
        default the weight's for a dense base, the compute dtype for a module base
        (:func:`gift_kernels.nn.bases.theta_defaults`)."""
        w = self.merged_rows(self._per_chunk(), self.splits)
        bias = self.base_bias
        if dtype is None:
            dtype = bases.theta_defaults(self.base_layer)[0] if self.has_module_base else self.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(False if self.has_module_base else self.weight.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        return linear

    # ------------------------------------------------------------------ state dict: always unmerged
    # Over a module base, the state dict holds the base's own keys without "base_layer." (as a
    # dense GiftLinear holds nn.Linear's): an adapted model's keys are the base model's plus the
    # Thetas', merged or not. Loading accepts these keys (and the "base_layer." ones).

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.has_module_base:
            inner = prefix + "base_layer."
            for k in [k for k in out if k.startswith(inner)]:
                del out[k]
            self.write_base_state(out, prefix, keep_vars=keep_vars)
        return out

    def write_base_state(self, destination, prefix: str, *, keep_vars: bool = False) -> None:
        """Write the base's unmerged state into ``destination`` under ``prefix`` (the keys the
        base layer itself has there). What a model-level state_dict hook calls for a merged layer
        whose base stands in the model in its place."""
        if self.has_module_base:
            with original_module_base(self.base_layer, self.__dict__["_base_fold"]):
                self.base_layer.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        elif self.merged:
            w = self._original_weight
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and not self.has_module_base:
            self.write_base_state(destination, prefix, keep_vars=keep_vars)  # so it loads into a fresh layer exactly

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.merged:
            raise RuntimeError(
                f"GiftLinear.load_state_dict: {prefix or 'this layer'} is merged; call unmerge() before loading a "
                f"state dict (state dicts hold the unmerged weight)"
            )
        if self.has_module_base:
            inner, own = prefix + "base_layer.", (prefix + "theta.", prefix + "thetas.")
            for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith((inner,) + own)]:
                state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
            kind = bases.kind_of(self.base_layer)
            if kind is not None and kind.load_state is not None:
                kind.load_state(self.base_layer, state_dict, inner)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        thetas = self.chunk_thetas
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.base_bias is not None}, rank={thetas[0].rank}")
        if len(thetas) > 1:
            text += f", splits={list(self.splits)}"
        if self.transposed:
            text += ", transposed=True"
        return text + f", merged={self.merged}"


def _refuse_biased(theta: GiftTheta, where: str) -> None:
    if isinstance(theta, GiftThetaWithBias):
        raise TypeError(
            f"{where}: a GiftThetaWithBias adds its projection biases per row chunk; build the layer with "
            f"GiftLinear.from_module(module, [theta]), which applies them"
        )
