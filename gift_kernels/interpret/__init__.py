"""GIFT's token-clustering head: ``scores`` (the numbers: ``W phi`` scoring every token) and
``plotting`` (the pictures; matplotlib is imported only when a picture is drawn)."""

from .scores import (
    AUTHORS_THRESHOLD,
    ClusterRecorder,
    assign_clusters,
    cluster_head,
    cluster_scores,
    normalize_maps,
    record_cluster_scores,
    scores_to_grid,
)

__all__ = [
    "AUTHORS_THRESHOLD",
    "ClusterRecorder",
    "assign_clusters",
    "cluster_head",
    "cluster_scores",
    "normalize_maps",
    "record_cluster_scores",
    "scores_to_grid",
]
