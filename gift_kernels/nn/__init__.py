"""Modules: ``GiftTheta`` / ``GiftThetaWithBias`` (theta.py), ``GiftLinear`` (linear.py: one
class for a plain, transposed, stacked or quantized base), ``bases`` (which layers can be adapted and how), and the one merge formula and record
of merged weights (merge.py)."""

from .bases import BaseKind, is_conv1d, register_base_kind
from .linear import GiftFusedLinear, GiftLinear, gift_linear_stacked
from .merge import merged_weight
from .theta import GiftTheta, GiftThetaWithBias, make_theta

__all__ = [
    "BaseKind",
    "GiftFusedLinear",
    "GiftLinear",
    "GiftTheta",
    "GiftThetaWithBias",
    "gift_linear_stacked",
    "is_conv1d",
    "make_theta",
    "merged_weight",
    "register_base_kind",
]
