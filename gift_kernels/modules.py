"""Modules: ``GiftTheta`` (one shared Theta = (phi, psi)) and ``GiftLinear`` (a drop-in for
``nn.Linear`` that applies a frozen weight through GIFT)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import gift_linear


class GiftTheta(nn.Module):
    """GIFT's trainable parameters Theta = (phi, psi), shared by every layer that uses it.

    ``W_hat = W (I + phi psi)`` with ``phi: (in_features, rank)`` and ``psi: (rank,
    in_features)``. Initialised as the authors do: ``phi`` like the weight of
    ``nn.Linear(in_features, rank)`` (transposed), ``psi`` zeros, so an adapted layer
    starts exactly at the pretrained one.

    ``dtype`` may be wider than the layers' (float32 Theta with bf16 weights): outputs stay
    in the activation dtype, grads land in Theta's dtype.
    """

    def __init__(self, in_features: int, rank: int, *, device=None, dtype=None) -> None:
        super().__init__()
        if in_features < 1 or rank < 1:
            raise ValueError(f"GiftTheta: in_features and rank must be >= 1, got {in_features} and {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.rank = rank
        self.phi = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.psi = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear(in_features, rank).weight is (rank, in_features) with kaiming_uniform(a=sqrt(5)),
        # i.e. U(-1/sqrt(in_features), 1/sqrt(in_features)); phi is that weight transposed.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.phi.uniform_(-bound, bound)
            self.psi.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


class GiftLinear(nn.Module):
    """``y = x (W (I + phi psi))^T + b`` with a frozen ``W``/``b`` and a (possibly shared) Theta.

    A drop-in for ``nn.Linear``: same ``weight``/``bias`` attributes and state_dict keys
    (plus ``theta.phi`` / ``theta.psi``). Build one from an existing layer with
    :meth:`from_linear`; several layers may hold the same :class:`GiftTheta`.

    :meth:`merge` folds GIFT into the weight for inference (the forward is then a plain
    ``F.linear``); :meth:`unmerge` restores the original weight bit for bit.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        theta: GiftTheta,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_theta(theta, in_features, "GiftLinear")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        # initialise like nn.Linear so a GiftLinear built from scratch is a usable layer
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.theta = theta
        # the pre-merge weight; a non-persistent buffer so .to() moves it and state_dict ignores it
        self.register_buffer("_original_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, theta: GiftTheta, *, freeze: bool = True) -> "GiftLinear":
        """Wrap ``linear``'s own weight/bias tensors (no copy) with ``theta``.

        ``freeze`` sets ``requires_grad=False`` on the wrapped weight and bias, as GIFT trains
        only Theta.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GiftLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_theta(theta, linear.in_features, f"GiftLinear.from_linear({linear})")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.theta = theta
        layer.register_buffer("_original_weight", None, persistent=False)
        if freeze:
            layer.weight.requires_grad_(False)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
        return layer

    @property
    def phi(self) -> Tensor:
        return self.theta.phi

    @property
    def psi(self) -> Tensor:
        return self.theta.psi

    @property
    def merged(self) -> bool:
        return self._original_weight is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return gift_linear(x, self.weight, self.bias, self.theta.phi, self.theta.psi)

    def merged_weight(self) -> Tensor:
        """``W + (W phi) psi``, computed in float32 (float64 for float64 weights), in W's dtype."""
        w = self._original_weight if self.merged else self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            w_acc = w.to(acc)
            merged = torch.addmm(w_acc, w_acc @ self.theta.phi.to(acc), self.theta.psi.to(acc))
        return merged.to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Theta into the weight (in place) for inference. Keeps a copy of the original."""
        if self.merged:
            raise RuntimeError("GiftLinear.merge: this layer is already merged; call unmerge() first")
        merged = self.merged_weight()
        self._original_weight = self.weight.detach().clone()
        self.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight exactly as it was before :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("GiftLinear.unmerge: this layer is not merged")
        self.weight.copy_(self._original_weight)
        self._original_weight = None

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (a new tensor) and this layer's bias."""
        w = self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.theta.rank}, merged={self.merged}"
        )


def _check_theta(theta: GiftTheta, in_features: int, where: str, *, allow_bias: bool = False) -> None:
    if not isinstance(theta, GiftTheta):
        raise TypeError(f"{where}: theta must be a GiftTheta, got {type(theta).__name__}")
    if isinstance(theta, GiftThetaWithBias) and not allow_bias:
        raise TypeError(f"{where}: a GiftThetaWithBias needs GiftFusedLinear, which applies its projection biases")
    if theta.in_features != in_features:
        raise ValueError(
            f"{where}: theta has in_features={theta.in_features} (phi {tuple(theta.phi.shape)}) but the layer "
            f"has in_features={in_features}; a shared Theta needs one d_in"
        )


class GiftThetaWithBias(GiftTheta):
    """Theta plus the optional biases of GIFT's two projections (the authors'
    ``in_projection_bias`` / ``out_projection_bias``).

    GIFT maps every row ``w_i`` of ``W`` through two linear maps; with biases the row becomes

        w_i + ((w_i phi + b1) psi + b2)        b1: (rank,)  b2: (in_features,)

    so ``y = x W^T + b + t (W phi)^T + (t . b1 + x . b2)``: a per-token scalar
    ``x . (psi^T b1 + b2)`` added to every output. Only :class:`GiftFusedLinear` applies the
    biases; :class:`GiftLinear` refuses this Theta rather than silently drop them.

    Initialised as the authors do: ``b1`` like ``nn.Linear(in_features, rank).bias``, ``b2``
    zeros (their out projection is zero-initialised), so training starts at the pretrained layer.
    """

    def __init__(
        self, in_features: int, rank: int, *, in_bias: bool = True, out_bias: bool = True, device=None, dtype=None
    ) -> None:
        if not (in_bias or out_bias):
            raise ValueError("GiftThetaWithBias: in_bias and out_bias are both False; use GiftTheta")
        super().__init__(in_features, rank, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_bias = nn.Parameter(torch.empty(rank, **factory)) if in_bias else None
        self.out_bias = nn.Parameter(torch.empty(in_features, **factory)) if out_bias else None
        self._reset_biases()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "in_bias" in self._parameters:  # not yet created while GiftTheta.__init__ runs
            self._reset_biases()

    def _reset_biases(self) -> None:
        with torch.no_grad():
            if self.in_bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.in_bias.uniform_(-bound, bound)
            if self.out_bias is not None:
                self.out_bias.zero_()

    def token_direction(self) -> Tensor:
        """``v = psi^T b1 + b2`` (``in_features``,): the bias terms add ``x . v`` to every output."""
        v = self.out_bias if self.in_bias is None else self.in_bias @ self.psi
        if self.in_bias is not None and self.out_bias is not None:
            v = v + self.out_bias
        return v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_bias={self.in_bias is not None}, out_bias={self.out_bias is not None}"


def _concat_thetas(thetas: Sequence[GiftTheta]) -> Tuple[Tensor, Tensor]:
    """(phi, psi) of several Thetas acting on one weight: ``W (I + sum_a phi_a psi_a)`` is
    ``W (I + [phi_1 .. phi_n] [psi_1; ..; psi_n])``, one GIFT call of rank ``sum r_a``."""
    if len(thetas) == 1:
        return thetas[0].phi, thetas[0].psi
    dt = thetas[0].phi.dtype
    phi = torch.cat([t.phi.to(dt) for t in thetas], dim=1)
    psi = torch.cat([t.psi.to(dt) for t in thetas], dim=0)
    return phi, psi


def _token_direction(thetas: Sequence[GiftTheta]) -> Optional[Tensor]:
    dirs = [t.token_direction() for t in thetas if isinstance(t, GiftThetaWithBias)]
    if not dirs:
        return None
    v = dirs[0]
    for d in dirs[1:]:
        v = v + d.to(v.dtype)
    return v


def _chunk_bounds(splits: Sequence[int]) -> List[Tuple[int, int]]:
    bounds, start = [], 0
    for size in splits:
        bounds.append((start, start + size))
        start += size
    return bounds


def gift_linear_stacked(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    chunk_thetas: Sequence[Sequence[GiftTheta]],
    splits: Sequence[int],
) -> Tensor:
    """GIFT on a weight whose rows stack several projections (a fused qkv), each row chunk
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
    for (start, stop), thetas in zip(_chunk_bounds(splits), chunk_thetas):
        w = weight[start:stop]
        b = None if bias is None else bias[start:stop]
        if not thetas:
            outs.append(F.linear(x, w, b))
            continue
        phi, psi = _concat_thetas(thetas)
        y = gift_linear(x, w, b, phi, psi)
        v = _token_direction(thetas)
        if v is not None:
            y = y + (x @ v.to(x.dtype)).to(y.dtype).unsqueeze(-1)
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@torch.no_grad()
def gift_stacked_merged_weight(
    weight: Tensor, chunk_thetas: Sequence[Sequence[GiftTheta]], splits: Sequence[int]
) -> Tensor:
    """``W_hat`` of :func:`gift_linear_stacked` as a ``(d_out, d_in)`` float32 (float64 for
    float64 weights) tensor: per chunk ``W_c + (W_c phi + b1) psi + b2``."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(acc)
    out = w.clone()
    for (start, stop), thetas in zip(_chunk_bounds(splits), chunk_thetas):
        for theta in thetas:
            wc = w[start:stop]
            gen = wc @ theta.phi.to(acc)
            if isinstance(theta, GiftThetaWithBias) and theta.in_bias is not None:
                gen = gen + theta.in_bias.to(acc)
            out[start:stop] += gen @ theta.psi.to(acc)
            if isinstance(theta, GiftThetaWithBias) and theta.out_bias is not None:
                out[start:stop] += theta.out_bias.to(acc)
    return out


class GiftFusedLinear(nn.Module):
    """A frozen linear layer adapted with one Theta per row chunk of its weight.

    Covers what :class:`GiftLinear` does not: a weight stacking several projections (a fused
    qkv ``nn.Linear`` given split sizes, GPT-2's ``Conv1D`` ``c_attn``), Thetas with projection
    biases (:class:`GiftThetaWithBias`), and weights stored transposed as ``(d_in, d_out)``
    (``Conv1D``; ``transposed=True``). One chunk is the plain case.

    Holds the original ``weight``/``bias`` Parameters (no copy, same state_dict keys as the
    original layer) and registers its Thetas in ``thetas`` (a ModuleList that may alias Thetas
    shared with other layers). The Conv1D weight is read through ``weight.t()``, a view:
    nothing is copied per step on the torch backend.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: Optional[nn.Parameter],
        thetas: Sequence[GiftTheta],
        splits: Sequence[int],
        *,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"GiftFusedLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        splits = tuple(int(s) for s in splits)
        if len(splits) != len(thetas) or sum(splits) != d_out or min(splits) < 1:
            raise ValueError(
                f"GiftFusedLinear: splits {list(splits)} must be positive, sum to d_out={d_out} and match the "
                f"{len(thetas)} Theta(s) given (weight {tuple(weight.shape)}, transposed={transposed})"
            )
        for i, theta in enumerate(thetas):
            _check_theta(theta, d_in, f"GiftFusedLinear chunk {i}", allow_bias=True)
        self.in_features, self.out_features = d_in, d_out
        self.transposed = transposed
        self.splits = splits
        self.weight = weight
        self.bias = bias
        self.thetas = nn.ModuleList(thetas)

    @classmethod
    def from_module(
        cls, module: nn.Module, thetas: Sequence[GiftTheta], splits: Optional[Sequence[int]] = None, *, freeze=True
    ) -> "GiftFusedLinear":
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D`` (its own Parameters, no copy)."""
        if isinstance(module, nn.Linear):
            transposed = False
        elif is_conv1d(module):
            transposed = True
        else:
            raise TypeError(f"GiftFusedLinear.from_module expects an nn.Linear or Conv1D, got {type(module).__name__}")
        d_out = module.weight.shape[1] if transposed else module.weight.shape[0]
        layer = cls(module.weight, module.bias, thetas, splits or [d_out], transposed=transposed)
        if freeze:
            layer.weight.requires_grad_(False)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
        return layer

    def weight_rows(self) -> Tensor:
        """The weight as ``(d_out, d_in)`` (a view for Conv1D)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: Tensor) -> Tensor:
        return gift_linear_stacked(x, self.weight_rows(), self.bias, [[t] for t in self.thetas], self.splits)

    def merged_weight(self) -> Tensor:
        """``W_hat`` in the layout and dtype of ``self.weight`` (a new tensor)."""
        merged = gift_stacked_merged_weight(self.weight_rows(), [[t] for t in self.thetas], self.splits)
        merged = merged.to(self.weight.dtype)
        return merged.t().contiguous() if self.transposed else merged

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"splits={list(self.splits)}, transposed={self.transposed}"
        )


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2): a linear map whose weight is stored ``(d_in, d_out)``.

    Recognised by name and shape so transformers need not be imported."""
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )
