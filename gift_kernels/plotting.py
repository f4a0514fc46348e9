"""Former location of :mod:`gift_kernels.interpret.plotting` (kept so old imports work)."""

from .interpret.plotting import *  # noqa: F401,F403
from .interpret.plotting import __all__  # noqa: F401
