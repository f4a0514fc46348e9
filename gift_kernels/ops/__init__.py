"""GIFT's ops, laid out by op. Each op folder reads top to bottom: its contract
(``__init__``: schema and fakes), ``reference.py`` (the float64 spec), the launchers of each
backend (``torch.py``, ``triton.py``, ``cuda.py``), ``op.py`` (the registered ``torch.library``
op with its fake and autograd, and the eager autograd Function):

    linear/   the epilogue form  y = x W^T + b + (x psi^T)(W phi)^T
    input/    the input-side form  u = x + (x psi^T) phi^T  (any base layer runs on u)
    mixed/    mixed-adapter batches: one adapter of a bank per row (input-side form)

Shared beside them: ``checks`` (validation at the public boundary), ``dtypes`` (the rank-path
dtype rule), ``tiles`` (Triton tile tables, pruning, and ``tiles.runtime``: availability, device
facts, tuning, launching), ``cuda`` (building and loading the C++ extension), ``plan`` (the one
chooser: backend, form, fallback, cached per kind of call), ``registry`` (what every op's
registration shares) and ``functional`` (``gift_linear``, ``gift_input`` and the mixed forms:
the public boundary, validated once).

Importing this package registers ``torch.ops.gift_kernels.*``; no optional backend is imported
until it is first used.
"""

from .functional import gift_input, gift_input_mixed, gift_linear, gift_linear_mixed
from .input.op import GiftInputFunction, GiftInputLinearFunction
from .input.reference import gift_input_ref
from .linear.op import GiftLinearFunction
from .linear.reference import gift_linear_authors, gift_linear_ref, gift_weight_ref
from .mixed.op import GiftMixedFunction
from .mixed.reference import gift_input_mixed_ref, gift_linear_mixed_ref
from .plan import backend, explain, last_backend

__all__ = [
    "GiftInputFunction",
    "GiftInputLinearFunction",
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
