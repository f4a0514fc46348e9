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
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import plan as plans
from ..ops.dtypes import rank_dtype
from ..ops.plan import EPILOGUE_MIN_ROWS  # noqa: F401  (the module rule's row threshold)
from ..ops.functional import FORMS, gift_input, gift_linear
from . import bases
from .bases import is_conv1d
from .merge import (ModuleFold, chunk_bounds, fold, fold_module_base, merged_weight, original_module_base, restore,
                    restore_module_base)
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
        outs.append(_with_token_direction(gift_linear(x, w, b, phi, psi, form=form), x, thetas))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

# --------------------------------------------------------------------------- module bases


# bases whose output was seen to depend on their input through autograd, per training mode
_INPUT_GRAD_OK: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _reaches(start, target, limit: int = 4096) -> bool:
    """Whether autograd node ``target`` is reachable from ``start`` (never expanding ``target``:
    the search stays inside the base layer's own graph). Past ``limit`` nodes: assume yes."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        if len(seen) > limit:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def check_input_grad(base: nn.Module, u: Tensor, y: Tensor) -> None:
    """Refuse a base whose output does not depend on its input through autograd (a layer that
    quantizes its input without a backward, such as torchao's dynamic-activation configs):
    Theta would silently get no gradient. Checked once per base and training mode."""
    if not torch.is_grad_enabled() or not u.requires_grad or torch.compiler.is_compiling():
        return
    ok = _INPUT_GRAD_OK.get(base)
    if ok is not None and base.training in ok:
        return
    if not (y.requires_grad and _reaches(y.grad_fn, u.grad_fn)):
        raise RuntimeError(
            f"GiftLinear: the {type(base).__name__} base layer gives no gradient with respect to its input (its output "
            f"does not depend on its input through autograd), so GIFT's Theta would get none; a base must be "
            f"differentiable in its input (docs/quantized.md)"
        )
    _INPUT_GRAD_OK.setdefault(base, set()).add(base.training)


class _DequantizedEpilogue(torch.autograd.Function):
    """``(x psi^T)(W_c phi)^T`` for rows ``[start, stop)`` of a module base's dequantized weight:
    GIFT's epilogue term without a dense weight kept anywhere. ``W`` is dequantized in forward
    and again in backward, transiently; saved: x (the caller's) and ``t = x psi^T`` (M x r)."""

    @staticmethod
    def forward(ctx, x2, phi, psi, base, dequantize, start, stop):
        rd = rank_dtype(x2.dtype, phi.dtype)
        w = dequantize(base)[start:stop].to(rd)
        t = x2.to(rd) @ psi.to(rd).t()
        ctx.save_for_backward(x2, t, phi, psi)
        ctx.base, ctx.dequantize, ctx.rows = base, dequantize, (start, stop)
        return (t @ (w @ phi.to(rd)).t()).to(x2.dtype)

    @staticmethod
    def backward(ctx, g):
        x2, t, phi, psi = ctx.saved_tensors
        rd = t.dtype
        start, stop = ctx.rows
        w = ctx.dequantize(ctx.base)[start:stop].to(rd)
        g = g.to(rd)
        need_x, need_phi, need_psi = ctx.needs_input_grad[:3]
        dx = dphi = dpsi = None
        if need_x or need_psi:
            dt = g @ (w @ phi.to(rd))  # M x r
            if need_x:
                dx = (dt @ psi.to(rd)).to(x2.dtype)
            if need_psi:
                dpsi = (dt.t() @ x2.to(rd)).to(psi.dtype)
        if need_phi:
            dphi = (w.t() @ (g.t() @ t)).to(phi.dtype)
        return dx, dphi, dpsi, None, None, None, None


def module_form(base: nn.Module, n_chunks: int, form: str, *, rows: int = 0, training: bool = False) -> str:
    """The form a module base runs in: ``"input"`` (``base(x + (x psi^T) phi^T)``, one base call
    per row chunk) or ``"epilogue"`` (one base call on x plus each chunk's ``(x psi^T)(W_c phi)^T``
    from the dequantized weight, recomputed in backward). ``"auto"``: the plan's rule
    (:func:`gift_kernels.ops.plan.module_form`)."""
    kind = bases.kind_of(base)
    can = kind is not None and kind.dequantize is not None
    if form == "epilogue" and not can:
        raise ValueError(f"GiftLinear: form='epilogue' needs the base's weight as a dense matrix; a "
                         f"{type(base).__name__} base has no registered dequantize (gift_kernels.nn.bases), use "
                         f"form='input' or 'auto'")
    return plans.module_form(form, can_dequantize=can, keeps_input=can and kind.keeps_input, n_chunks=n_chunks,
                             rows=rows, training=training)


def gift_module_forward(base: nn.Module, x: Tensor, chunk_thetas: Sequence[Sequence[GiftTheta]],
                        splits: Sequence[int], *, form: str = "auto") -> Tensor:
    """GIFT over a module base run as a black box (a quantized layer): each row chunk ``c`` of
    its output gets ``W_c (I + sum_a phi_a psi_a)`` over its Thetas (several Thetas: several
    adapters, concatenated along the rank), plus the per-token scalar of any
    :class:`GiftThetaWithBias`. See :func:`module_form` for the two forms."""
    n = len(splits)
    training = torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for thetas in chunk_thetas for th in thetas for p in (th.phi, th.psi)))
    form = module_form(base, n, form, rows=x.numel() // max(x.shape[-1], 1), training=training)
    bounds = chunk_bounds(splits)
    if form == "epilogue":
        y = base(x)
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), d_in)
        dequantize = bases.kind_of(base).dequantize
        outs = []
        for (start, stop), thetas in zip(bounds, chunk_thetas):
            yc = y[..., start:stop] if n > 1 else y
            if thetas:
                phi, psi = concat_thetas(thetas)
                delta = _DequantizedEpilogue.apply(x2, phi, psi, base, dequantize, start, stop)
                yc = yc + delta.view(*lead, stop - start).to(yc.dtype)
            outs.append(_with_token_direction(yc, x, thetas))
        return outs[0] if n == 1 else torch.cat(outs, dim=-1)
    plain = None  # base(x), shared by every chunk without a Theta
    outs = []
    for (start, stop), thetas in zip(bounds, chunk_thetas):
        if thetas:
            phi, psi = concat_thetas(thetas)
            u = gift_input(x, phi, psi)
            y = base(u)
            check_input_grad(base, u, y)
        else:
            plain = base(x) if plain is None else plain
            y = plain
        yc = y[..., start:stop] if n > 1 else y
        outs.append(_with_token_direction(yc, x, thetas))
    return outs[0] if n == 1 else torch.cat(outs, dim=-1)


def _with_token_direction(y: Tensor, x: Tensor, thetas: Sequence[GiftTheta]) -> Tensor:
    v = token_direction(thetas)
    return y if v is None else y + (x @ v.to(x.dtype)).to(y.dtype).unsqueeze(-1)


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
        if len(thetas) == 1:
            self.theta = thetas[0]
        else:
            self.thetas = nn.ModuleList(thetas)
        self.register_buffer("_original_weight", None, persistent=False)
        self._base_fold: Optional[ModuleFold] = None  # the exact original state of a merged module base

    def __getattr__(self, name: str):
        # over a module base, .weight / .bias are the base layer's (as PEFT's tuner layers do)
        if name in ("weight", "bias"):
            modules = self.__dict__.get("_modules", {})
            if "base_layer" in modules:
                return getattr(modules["base_layer"], name)
        return super().__getattr__(name)

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
        """The weight as ``(d_out, d_in)`` (a view for Conv1D; for a module base, its dequantized
        weight, float32, a new tensor); ``original``: the pre-merge weight."""
        if self.has_module_base:
            with original_module_base(self.base_layer, self._base_fold if original else None):
                return bases.dense_weight(self.base_layer, "GiftLinear.weight_rows")
        w = self._original_weight if (original and self.merged) else self.weight
        return w.t() if self.transposed else w

    def base_state_key(self) -> Optional[tuple]:
        """Changes whenever the original weight does (module bases; None: dense, or unknown)."""
        if not self.has_module_base:
            return None
        with original_module_base(self.base_layer, self._base_fold):
            return bases.state_key(self.base_layer)

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

    @property
    def merged(self) -> bool:
        return self._original_weight is not None or self.__dict__.get("_base_fold") is not None

    # ------------------------------------------------------------------ compute

    def forward(self, x: Tensor) -> Tensor:
        if self.has_module_base:
            if self.merged:
                return self.base_layer(x)
            return gift_module_forward(self.base_layer, x, [[t] for t in self.chunk_thetas], self.splits,
                                       form=self.form)
        if self.merged:
            return F.linear(x, self.weight_rows(), self.bias)
        thetas = self.chunk_thetas
        if len(thetas) == 1 and not isinstance(thetas[0], GiftThetaWithBias):
            return gift_linear(x, self.weight_rows(), self.bias, thetas[0].phi, thetas[0].psi, form=self.form)
        return gift_linear_stacked(x, self.weight_rows(), self.bias, [[t] for t in thetas], self.splits,
                                   form=self.form)

    def merged_weight(self) -> Tensor:
        """``W_hat`` in the layout and dtype of ``self.weight`` (a new tensor; float32 ``(d_out,
        d_in)`` for a module base), from the original weight whether or not the layer is merged."""
        w_hat = merged_weight(self.weight_rows(original=True), [[t] for t in self.chunk_thetas], self.splits)
        if self.has_module_base:
            return w_hat
        w_hat = w_hat.to(self.weight.dtype)
        return w_hat.t().contiguous() if self.transposed else w_hat

    def merge_refusal(self) -> Optional[str]:
        """Why :meth:`merge` would fail on this layer (its base cannot take a merged weight), or None."""
        if self.merged:
            return "this layer is already merged; call unmerge() first"
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
            raise (RuntimeError if self.merged else TypeError)(f"GiftLinear.merge: {why}")
        if self.has_module_base:
            rows = self.weight_rows()
            w_hat = merged_weight(rows, [[t] for t in self.chunk_thetas], self.splits)
            self._base_fold = fold_module_base(self.base_layer, rows, w_hat, f"GiftLinear({self.extra_repr()}).merge")
            return
        self._original_weight = fold(self.weight, self.merged_weight(), f"GiftLinear({self.extra_repr()})")

    @property
    def merge_error(self) -> Optional[Tuple[float, float]]:
        """For a merged module base: ``(||Q(W_hat) - W_hat|| / ||W_hat||, ... / ||W_hat - W||)``."""
        f = self.__dict__.get("_base_fold")
        return None if f is None else (f.error, f.error_of_update)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight exactly as it was before :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("GiftLinear.unmerge: this layer is not merged")
        if self.has_module_base:
            restore_module_base(self.base_layer, self._base_fold)
            self._base_fold = None
            return
        restore(self.weight, self._original_weight)
        self._original_weight = None

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W_hat`` (a new tensor, exact: computed from the
        original, dequantized, weight; never re-quantized) and this layer's bias. ``dtype``:
        default the weight's for a dense base, the compute dtype for a module base
        (:func:`gift_kernels.nn.bases.theta_defaults`)."""
        w = merged_weight(self.weight_rows(original=True), [[t] for t in self.chunk_thetas], self.splits)
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
            with original_module_base(self.base_layer, self._base_fold):
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
