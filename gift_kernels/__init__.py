"""gift_kernels: fused kernels and a PyTorch frontend for GIFT (Generative Interpretable Fine-Tuning).

    W_hat = W (I + phi psi),   y = x W^T + (x psi^T)(W phi)^T + b

Layers, each importing only downward:
kernels/ (launchers per backend) -> backends (choice) -> ops (torch.library op + autograd)
-> functional (gift_linear) -> modules (GiftTheta, GiftLinear, GiftFusedLinear)
-> adapter / checkpoint / training / interpret (whole models).

``gift_kernels.peft_integration`` (GIFT as a PEFT method) and ``gift_kernels.plotting``
(matplotlib) are imported explicitly: importing this package needs neither peft nor matplotlib.
"""

from .adapter import GiftConfig, apply_gift, gift_report, is_adapted, merge_gift, print_trainable_parameters, unmerge_gift
from .backends import backend, explain, last_backend
from .checkpoint import load_gift, save_gift
from .functional import gift_linear
from .interpret import assign_clusters, cluster_scores, normalize_maps, record_cluster_scores, scores_to_grid
from .modules import GiftFusedLinear, GiftLinear, GiftTheta, GiftThetaWithBias
from .reference import gift_linear_authors, gift_linear_ref
from .training import enable_input_require_grads, fully_shard_gift

__version__ = "0.1.0"

__all__ = [
    "GiftConfig",
    "GiftFusedLinear",
    "GiftLinear",
    "GiftTheta",
    "GiftThetaWithBias",
    "apply_gift",
    "assign_clusters",
    "backend",
    "cluster_scores",
    "enable_input_require_grads",
    "explain",
    "fully_shard_gift",
    "gift_linear",
    "gift_linear_authors",
    "gift_linear_ref",
    "gift_report",
    "is_adapted",
    "last_backend",
    "load_gift",
    "merge_gift",
    "normalize_maps",
    "print_trainable_parameters",
    "record_cluster_scores",
    "save_gift",
    "scores_to_grid",
    "unmerge_gift",
]
