"""GIFT's ops, bottom to top: checks and the float64 reference; backends' launchers
(``torch_backend``, ``triton/``, ``cuda/``); ``backends`` (the one place that picks and falls
back); ``library`` (the registered ``torch.library`` ops and the eager autograd Functions);
``functional`` (``gift_linear``, ``gift_input``: the public boundary, validated once).

Importing this package registers ``torch.ops.gift_kernels.*``; no backend is imported until
it is first used.
"""

from .backends import backend, explain, last_backend
from .functional import gift_input, gift_input_mixed, gift_linear, gift_linear_mixed
from .library import GiftInputFunction, GiftLinearFunction, GiftMixedFunction
from .reference import (gift_input_mixed_ref, gift_input_ref, gift_linear_authors, gift_linear_mixed_ref, gift_linear_ref,
                        gift_weight_ref)

__all__ = [
    "GiftInputFunction",
    "GiftLinearFunction",
    "GiftMixedFunction",
    "backend",
    "explain",
    "gift_input",
    "gift_input_mixed",
    "gift_input_mixed_ref",
    "gift_input_ref",
    "gift_linear",
    "gift_linear_authors",
    "gift_linear_mixed",
    "gift_linear_mixed_ref",
    "gift_linear_ref",
    "gift_weight_ref",
    "last_backend",
]
