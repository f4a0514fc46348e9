"""gift_kernels: fused kernels and a PyTorch frontend for GIFT (Generative Interpretable Fine-Tuning).

    W_hat = W (I + phi psi),   y = x W^T + (x psi^T)(W phi)^T + b

Layers, each importing only downward:
kernels/ (launchers per backend) -> backends (choice) -> ops (torch.library op + autograd)
-> functional (gift_linear) -> modules (GiftTheta, GiftLinear).
"""

from .backends import backend, explain, last_backend
from .functional import gift_linear
from .modules import GiftLinear, GiftTheta
from .reference import gift_linear_authors, gift_linear_ref

__version__ = "0.1.0"

__all__ = [
    "GiftLinear",
    "GiftTheta",
    "backend",
    "explain",
    "gift_linear",
    "gift_linear_authors",
    "gift_linear_ref",
    "last_backend",
]
