"""GIFT's trainable parameters: ``GiftTheta`` (phi, psi) and ``GiftThetaWithBias`` (plus the
biases of GIFT's two projections). One Theta is shared by every layer that uses it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_size(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {value}")
    return value


class GiftTheta(nn.Module):
    """GIFT's trainable parameters Theta = (phi, psi), shared by every layer that uses it.

    ``W_hat = W (I + phi psi)`` with ``phi: (in_features, rank)`` and ``psi: (rank,
    in_features)``. Initialised as the authors do: ``phi`` like the weight of
    ``nn.Linear(in_features, rank)`` (transposed), ``psi`` zeros, so an adapted layer
    starts exactly at the pretrained one. ``init_weights=False`` draws psi like phi instead
    (a Theta that changes outputs from the start, as PEFT's tests ask of every method).

    ``dtype`` may be wider than the layers' (float32 Theta with bf16 weights): outputs stay
    in the activation dtype, grads land in Theta's dtype.
    """

    def __init__(self, in_features: int, rank: int, *, init_weights: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        _check_size(type(self).__name__, "in_features", in_features)
        _check_size(type(self).__name__, "rank", rank)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.rank = rank
        self.init_weights = bool(init_weights)
        self.phi = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.psi = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear(in_features, rank).weight is (rank, in_features) with kaiming_uniform(a=sqrt(5)),
        # i.e. U(-1/sqrt(in_features), 1/sqrt(in_features)); phi is that weight transposed.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.phi.uniform_(-bound, bound)
            if self.init_weights:
                self.psi.zero_()
            else:
                self.psi.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


class GiftThetaWithBias(GiftTheta):
    """Theta plus the optional biases of GIFT's two projections (the authors'
    ``in_projection_bias`` / ``out_projection_bias``).

    GIFT maps every row ``w_i`` of ``W`` through two linear maps; with biases the row becomes

        w_i + ((w_i phi + b1) psi + b2)        b1: (rank,)  b2: (in_features,)

    so ``y = x W^T + b + t (W phi)^T + (t . b1 + x . b2)``: a per-token scalar
    ``x . (psi^T b1 + b2)`` added to every output. A layer followed by a softmax or a
    normalisation over its outputs is blind to a per-token constant, so there these biases get
    exactly zero gradient (see docs/adapter.md).

    Initialised as the authors do: ``b1`` like ``nn.Linear(in_features, rank).bias``, ``b2``
    zeros (their out projection is zero-initialised), so training starts at the pretrained layer.
    """

    def __init__(
        self, in_features: int, rank: int, *, in_bias: bool = True, out_bias: bool = True, init_weights: bool = True,
        device=None, dtype=None,
    ) -> None:
        if not (in_bias or out_bias):
            raise ValueError("GiftThetaWithBias: in_bias and out_bias are both False; use GiftTheta")
        super().__init__(in_features, rank, init_weights=init_weights, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_bias = nn.Parameter(torch.empty(rank, **factory)) if in_bias else None
        self.out_bias = nn.Parameter(torch.empty(in_features, **factory)) if out_bias else None
        self._reset_biases()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "in_bias" in self._parameters:  # not yet created while GiftTheta.__init__ runs
            self._reset_biases()

    def _reset_biases(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            if self.in_bias is not None:
                self.in_bias.uniform_(-bound, bound)
            if self.out_bias is not None:
                if self.init_weights:
                    self.out_bias.zero_()
                else:
                    self.out_bias.uniform_(-bound, bound)

    def token_direction(self) -> Tensor:
        """``v = psi^T b1 + b2`` (``in_features``,): the bias terms add ``x . v`` to every output."""
        v = self.out_bias if self.in_bias is None else self.in_bias @ self.psi
        if self.in_bias is not None and self.out_bias is not None:
            v = v + self.out_bias
        return v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_bias={self.in_bias is not None}, out_bias={self.out_bias is not None}"


def make_theta(in_features: int, rank: int, *, in_bias: bool = False, out_bias: bool = False,
               init_weights: bool = True, device=None, dtype=None) -> GiftTheta:
    """The Theta a config asks for: a :class:`GiftThetaWithBias` when either bias is on."""
    factory = {"init_weights": init_weights, "device": device, "dtype": dtype}
    if in_bias or out_bias:
        return GiftThetaWithBias(in_features, rank, in_bias=in_bias, out_bias=out_bias, **factory)
    return GiftTheta(in_features, rank, **factory)
