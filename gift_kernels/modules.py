"""Modules: ``GiftTheta`` (one shared Theta = (phi, psi)) and ``GiftLinear`` (a drop-in for
``nn.Linear`` that applies a frozen weight through GIFT)."""

from __future__ import annotations

import math
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


def _check_theta(theta: GiftTheta, in_features: int, where: str) -> None:
    if not isinstance(theta, GiftTheta):
        raise TypeError(f"{where}: theta must be a GiftTheta, got {type(theta).__name__}")
    if theta.in_features != in_features:
        raise ValueError(
            f"{where}: theta has in_features={theta.in_features} (phi {tuple(theta.phi.shape)}) but the layer "
            f"has in_features={in_features}; a shared Theta needs one d_in"
        )
