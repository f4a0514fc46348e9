"""GIFT on a dense weight whose rows stack several projections, each row chunk with its own
Theta(s) (several Thetas on one chunk: several adapters at once, concatenated along the rank),
plus the helpers every GIFT layer uses to read its Thetas."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.functional import gift_linear
from .merge import chunk_bounds
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
    for t in thetas[1:]:
        dt = torch.promote_types(dt, t.phi.dtype)  # never narrows a Theta (as a mixed bank)
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
    if len(chunk_thetas) == 1 and chunk_thetas[0]:  # one projection: no row views (each a dispatched op per call)
        phi, psi = concat_thetas(chunk_thetas[0])
        return with_token_direction(gift_linear(x, weight, bias, phi, psi, form=form), x, chunk_thetas[0])
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):  # a slice would cut a longer bias silently
        raise ValueError(f"gift_linear_stacked: bias must have shape ({weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got bias {tuple(bias.shape)}")
    outs = []
    for (start, stop), thetas in zip(chunk_bounds(splits), chunk_thetas):
        w = weight[start:stop]
        b = None if bias is None else bias[start:stop]
        if not thetas:
            outs.append(F.linear(x, w, b))
            continue
        phi, psi = concat_thetas(thetas)
        outs.append(with_token_direction(gift_linear(x, w, b, phi, psi, form=form), x, thetas))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def with_token_direction(y: Tensor, x: Tensor, thetas: Sequence[GiftTheta]) -> Tensor:
    """``y`` plus the per-token scalar ``x . (psi^T b1 + b2)`` of the Thetas with projection biases."""
    v = token_direction(thetas)
    return y if v is None else y + (x @ v.to(x.dtype)).to(y.dtype).unsqueeze(-1)
