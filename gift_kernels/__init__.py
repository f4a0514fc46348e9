"""gift_kernels: fused kernels and a PyTorch frontend for GIFT (Generative Interpretable
Fine-Tuning), published at ICML 2025 as WeGeFT (Weight-Generative Fine-Tuning; Savadikar, Song
and Wu, arXiv 2312.00700 v5).

    W_hat = W (I + phi psi),   y = x W^T + (x psi^T)(W phi)^T + b  =  base(x + (x psi^T) phi^T)

Layers, each importing only downward (docs/design.md):
ops/ (checks, reference, backends' launchers, backend choice, registered ops + autograd,
functional) -> nn/ (GiftTheta, the GIFT layer, GiftLinear, merge) -> adapters/ (planning,
apply_gift and the adapter store, checkpoint files, load_gift, named adapters, training, PEFT)
-> interpret/ (clustering scores, plots) -> bench/ (benchmarks).

The top level holds what users call. ``gift_kernels.adapters.peft`` (GIFT as a PEFT method) and
``gift_kernels.interpret.plotting`` (matplotlib) are imported explicitly: importing this
package needs neither peft nor matplotlib. The authors' formulation (a reference for the
benchmarks) is ``gift_kernels.ops.linear.reference.gift_linear_authors``.
"""

from .adapters import (
    GiftConfig,
    apply_gift,
    delete_gift_adapter,
    enable_input_require_grads,
    export_lora,
    fully_shard_gift,
    gift_adapter_names,
    gift_report,
    is_adapted,
    load_gift,
    merge_gift,
    mixed_adapters,
    print_trainable_parameters,
    save_gift,
    unmerge_gift,
)
from .interpret import assign_clusters, cluster_scores, normalize_maps, record_cluster_scores, scores_to_grid
from .nn import GiftLinear, GiftTheta, GiftThetaWithBias, gift_linear_stacked
from .ops import (backend, explain, gift_input, gift_input_mixed, gift_linear, gift_linear_mixed,
                  gift_linear_ref, last_backend)

__version__ = "0.1.0"

__all__ = [
    "GiftConfig",
    "GiftLinear",
    "GiftTheta",
    "GiftThetaWithBias",
    "apply_gift",
    "assign_clusters",
    "backend",
    "cluster_scores",
    "delete_gift_adapter",
    "enable_input_require_grads",
    "explain",
    "export_lora",
    "fully_shard_gift",
    "gift_adapter_names",
    "gift_input",
    "gift_input_mixed",
    "gift_linear",
    "gift_linear_mixed",
    "gift_linear_ref",
    "gift_linear_stacked",
    "gift_report",
    "is_adapted",
    "last_backend",
    "load_gift",
    "merge_gift",
    "mixed_adapters",
    "normalize_maps",
    "print_trainable_parameters",
    "record_cluster_scores",
    "save_gift",
    "scores_to_grid",
    "unmerge_gift",
]
