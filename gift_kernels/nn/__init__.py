"""Modules: ``GiftTheta`` / ``GiftThetaWithBias`` (theta.py), ``GiftLinear`` (linear.py: one
class for a plain, transposed, stacked or quantized base), the behaviour every GIFT layer
shares (layer.py: forward, mixed batches, merge; also the PEFT layer's), the dense and
module-base computations it runs (stacked.py, module_base.py, mixed.py), ``bases`` (which
layers can be adapted and how), and the one merge formula and record of merged weights
(merge.py)."""

from .bases import BaseKind, is_conv1d, register_base_kind
from .layer import GiftLayer
from .linear import GiftLinear
from .merge import merged_weight
from .stacked import gift_linear_stacked
from .theta import GiftTheta, GiftThetaWithBias, make_theta

__all__ = [
    "BaseKind",
    "GiftLayer",
    "GiftLinear",
    "GiftTheta",
    "GiftThetaWithBias",
    "gift_linear_stacked",
    "is_conv1d",
    "make_theta",
    "merged_weight",
    "register_base_kind",
]
