"""``GiftLinear``: a frozen linear layer adapted with GIFT, a drop-in for the layer it wraps.

One class covers every case: an ``nn.Linear``, a transformers ``Conv1D`` (weight stored
``(d_in, d_out)``, read through a transposed view), a weight whose rows stack several
projections (a qkv ``nn.Linear`` or GPT-2's ``c_attn``: ``splits``), each row chunk with its
own Theta(s), and any other base linear in its input (a quantized layer: see
:mod:`gift_kernels.nn.bases`). Over a dense base it holds the wrapped layer's own
``weight``/``bias`` Parameters (no copy, the layer's state_dict keys); over any other base it
holds the layer itself as ``base_layer`` and runs it on ``x + (x psi^T) phi^T``. Either way,
plus ``theta`` (one chunk) or ``thetas`` (one per chunk).
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.functional import FORMS, gift_input, gift_linear
from . import bases
from .bases import is_conv1d
from .merge import chunk_bounds, fold, merged_weight, restore
from .theta import GiftTheta, GiftThetaWithBias


def check_theta(theta, in_features: int, where: str) -> None:
    if not isinstance(theta, GiftTheta):
        raise TypeError(f"{where}: theta must be a GiftTheta, got {type(theta).__name__}")
    if theta.in_features != in_features:
        raise ValueError(
            f"{where}: theta has in_features={theta.in_features} (phi {tuple(theta.phi.shape)}) but the layer "
            f"has in_features={in_features}; a shared Theta needs one d_in"
        )


def concat_thetas(thetas: Sequence[GiftTheta]) -> Tuple[Tensor, Tensor]:
    """(phi, psi) of several Thetas acting on one weight: ``W (I + sum_a phi_a psi_a)`` is
    ``W (I + [phi_1 .. phi_n] [psi_1; ..; psi_n])``, one GIFT call of rank ``sum r_a``."""
    if len(thetas) == 1:
        return thetas[0].phi, thetas[0].psi
    dt = thetas[0].phi.dtype
    phi = torch.cat([t.phi.to(dt) for t in thetas], dim=1)
    psi = torch.cat([t.psi.to(dt) for t in thetas], dim=0)
    return phi, psi


def token_direction(thetas: Sequence[GiftTheta]) -> Optional[Tensor]:
    """The summed ``psi^T b1 + b2`` of the Thetas with projection biases, or None."""
    dirs = [t.token_direction() for t in thetas if isinstance(t, GiftThetaWithBias)]
    if not dirs:
        return None
    v = dirs[0]
    for d in dirs[1:]:
        v = v + d.to(v.dtype)
    return v


def gift_linear_stacked(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    chunk_thetas: Sequence[Sequence[GiftTheta]],
    splits: Sequence[int],
    *,
    form: str = "auto",
) -> Tensor:
    """GIFT on a weight whose rows stack several projections (a qkv weight), each row chunk
    with its own Theta(s).

    ``weight`` is ``(d_out, d_in)`` (a transposed view of a Conv1D weight is fine: row slices
    of it are strided views, no copy on the torch backend). Chunk ``c`` covers rows
    ``splits[:c].sum() ..`` and gets ``W_c (I + sum_a phi_a psi_a)`` over its Thetas
    (several Thetas = several adapters, concatenated along the rank), plus the per-token
    scalar of any :class:`GiftThetaWithBias`. A chunk with no Theta is a plain linear map.

    Cost over :func:`gift_linear`: with more than one chunk, one ``torch.cat`` pass over y.
    """
    if sum(splits) != weight.shape[0] or len(splits) != len(chunk_thetas):
        raise ValueError(
            f"gift_linear_stacked: splits {list(splits)} must sum to weight's d_out ({weight.shape[0]}, weight "
            f"{tuple(weight.shape)}) and give one Theta list per chunk ({len(chunk_thetas)} given)"
        )
    outs = []
    for (start, stop), thetas in zip(chunk_bounds(splits), chunk_thetas):
        w = weight[start:stop]
        b = None if bias is None else bias[start:stop]
        if not thetas:
            outs.append(F.linear(x, w, b))
            continue
        phi, psi = concat_thetas(thetas)
        y = gift_linear(x, w, b, phi, psi, form=form)
        v = token_direction(thetas)
        if v is not None:
            y = y + (x @ v.to(x.dtype)).to(y.dtype).unsqueeze(-1)
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class GiftLinear(nn.Module):
    """``y = x (W (I + phi psi))^T + b`` with a frozen ``W``/``b`` and (possibly shared) Thetas.

    A drop-in for ``nn.Linear`` (or a ``Conv1D``): same ``weight``/``bias`` attributes and
    state_dict keys, plus ``theta.phi`` / ``theta.psi`` (one chunk) or ``thetas.<i>.*`` (one
    Theta per row chunk, ``splits``). Build one from an existing layer with
    :meth:`from_linear` / :meth:`from_module`; several layers may hold the same
    :class:`GiftTheta`.

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
        if len(thetas) == 1:
            self.theta = thetas[0]
        else:
            self.thetas = nn.ModuleList(thetas)
        # the pre-merge weight; a non-persistent buffer so .to() moves it and state_dict ignores it
        self.register_buffer("_original_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, theta: GiftTheta, *, freeze: bool = True, form: str = "auto") -> "GiftLinear":
        """Wrap ``linear``'s own weight/bias tensors (no copy) with ``theta``.

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
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D`` (its own Parameters, no copy), with
        one Theta per row chunk (``splits``: the chunk sizes, default one chunk). Thetas may have
        projection biases (:class:`GiftThetaWithBias`)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if bases.is_dense(module):
            layer._init_chunks(module.weight, module.bias, thetas, splits, transposed=is_conv1d(module), form=form)
        elif bases.module_features(module) is not None:
            layer._init_module_base(module, thetas, splits, form=form)
        else:
            raise TypeError(f"GiftLinear.from_module: {bases.describe_rule(module)}")
        if freeze:
            for p in (layer.base_layer.parameters() if layer.has_module_base else (layer.weight, layer.bias)):
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
        """A base GIFT runs as a black box on the transformed input (a quantized layer, ...)."""
        d_in, d_out = bases.module_features(module)
        thetas, splits = self._check_chunks(thetas, splits, d_in, d_out, f"{type(module).__name__} base")
        if form == "epilogue":
            raise ValueError(f"GiftLinear: form='epilogue' needs a dense weight; a {type(module).__name__} base runs "
                             f"the input-side form")
        self.in_features, self.out_features = d_in, d_out
        self.transposed = False
        self.splits = splits
        self.form = "input"
        self.base_layer = module
        if len(thetas) == 1:
            self.theta = thetas[0]
        else:
            self.thetas = nn.ModuleList(thetas)
        self.register_buffer("_original_weight", None, persistent=False)
        self._base_snapshot = None  # the exact original state of a merged module base

    # ------------------------------------------------------------------ structure

    @property
    def chunk_thetas(self) -> List[GiftTheta]:
        """The Theta of each row chunk."""
        return list(self.thetas) if "thetas" in self._modules else [self.theta]

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

    @property
    def has_module_base(self) -> bool:
        """Whether the base is a module GIFT runs as a black box (``base_layer``), not a dense weight."""
        return "base_layer" in self._modules

    def weight_rows(self, *, original: bool = False) -> Tensor:
        """The weight as ``(d_out, d_in)`` (a view for Conv1D; the dequantized weight of a module
        base); ``original``: the pre-merge weight."""
        if self.has_module_base:
            if original and self.merged:
                raise RuntimeError("GiftLinear.weight_rows: a merged module base holds its merged weight only; "
                                   "unmerge() first")
            return bases.dense_weight(self.base_layer, "GiftLinear.weight_rows")
        w = self._original_weight if (original and self.merged) else self.weight
        return w.t() if self.transposed else w

    @property
    def base_bias(self) -> Optional[Tensor]:
        return getattr(self.base_layer, "bias", None) if self.has_module_base else self.bias

    def chunks(self) -> List[Tuple[Tensor, Optional[Tensor], GiftTheta]]:
        """``[(W_c, b_c, theta_c)]`` per row chunk, from the original (pre-merge) weight."""
        rows = self.weight_rows(original=True).split(self.splits, dim=0)
        bias = self.base_bias
        biases = bias.split(self.splits) if bias is not None else [None] * len(rows)
        return list(zip(rows, biases, self.chunk_thetas))

    @property
    def merged(self) -> bool:
        return self._original_weight is not None or getattr(self, "_base_snapshot", None) is not None

    # ------------------------------------------------------------------ compute

    def forward(self, x: Tensor) -> Tensor:
        if self.has_module_base:
            return self.base_layer(x) if self.merged else self._forward_module_base(x)
        if self.merged:
            return F.linear(x, self.weight_rows(), self.bias)
        thetas = self.chunk_thetas
        if len(thetas) == 1 and not isinstance(thetas[0], GiftThetaWithBias):
            return gift_linear(x, self.weight_rows(), self.bias, thetas[0].phi, thetas[0].psi, form=self.form)
        return gift_linear_stacked(x, self.weight_rows(), self.bias, [[t] for t in thetas], self.splits,
                                   form=self.form)

    def _forward_module_base(self, x: Tensor) -> Tensor:
        """``base(x + (x psi^T) phi^T)``; with several row chunks, one base call per chunk (each
        chunk's rows of its own transformed input: chunks times the base's cost)."""
        outs = []
        for (start, stop), theta in zip(chunk_bounds(self.splits), self.chunk_thetas):
            y = self.base_layer(gift_input(x, theta.phi, theta.psi))
            if len(self.splits) > 1:
                y = y[..., start:stop]
            v = token_direction([theta])
            if v is not None:
                y = y + (x @ v.to(x.dtype)).to(y.dtype).unsqueeze(-1)
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def merged_weight(self) -> Tensor:
        """``W_hat`` in the layout and dtype of ``self.weight`` (a new tensor), from the
        original weight whether or not the layer is merged."""
        w_hat = merged_weight(self.weight_rows(original=True), [[t] for t in self.chunk_thetas], self.splits)
        if self.has_module_base:
            return w_hat  # float32 (d_out, d_in): the base's own format is the base kind's business
        w_hat = w_hat.to(self.weight.dtype)
        return w_hat.t().contiguous() if self.transposed else w_hat

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Theta into the weight (in place) for inference. Keeps a copy of the original."""
        if self.merged:
            raise RuntimeError("GiftLinear.merge: this layer is already merged; call unmerge() first")
        if self.has_module_base:
            kind = bases.kind_of(self.base_layer)
            if kind is None or kind.requantize is None or kind.snapshot is None:
                raise TypeError(f"GiftLinear.merge: cannot merge into a {type(self.base_layer).__name__} base (no "
                                f"registered way to write a merged weight into it); use to_linear() for a dense copy")
            w_hat = self.merged_weight()
            snapshot = kind.snapshot(self.base_layer)
            kind.requantize(self.base_layer, w_hat)
            self._base_snapshot = snapshot
            return
        self._original_weight = fold(self.weight, self.merged_weight(), f"GiftLinear({self.extra_repr()})")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight exactly as it was before :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("GiftLinear.unmerge: this layer is not merged")
        if self.has_module_base:
            bases.kind_of(self.base_layer).restore(self.base_layer, self._base_snapshot)
            self._base_snapshot = None
            return
        restore(self.weight, self._original_weight)
        self._original_weight = None

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight rows (a new tensor) and this layer's bias."""
        w = merged_weight(self.weight_rows(original=True), [[t] for t in self.chunk_thetas], self.splits)
        bias = self.base_bias
        dtype = w.dtype if self.has_module_base else self.weight.dtype  # a module base exports float32
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # the checkpoint holds the original weight, so it loads into a fresh layer exactly
            w = self._original_weight
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.merged:
            raise RuntimeError(
                f"GiftLinear.load_state_dict: {prefix or 'this layer'} is merged; call unmerge() before loading a "
                f"state dict (state dicts hold the unmerged weight)"
            )
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
            f"GiftLinear.from_module(module, [theta]) (formerly GiftFusedLinear), which applies them"
        )


class GiftFusedLinear(GiftLinear):
    """Deprecated spelling of :class:`GiftLinear` with stacked row chunks ("fused" now means
    only the fused Triton kernels). ``GiftFusedLinear(weight, bias, thetas, splits,
    transposed=...)`` and ``GiftFusedLinear.from_module(...)`` build a :class:`GiftLinear`."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], thetas: Sequence[GiftTheta],
                 splits: Sequence[int], *, transposed: bool = False) -> None:
        warnings.warn("GiftFusedLinear is deprecated: use GiftLinear.from_module (one class for one or several "
                      "stacked row chunks)", DeprecationWarning, stacklevel=2)
        nn.Module.__init__(self)
        self._init_chunks(weight, bias, thetas, splits, transposed=transposed, form="auto")
