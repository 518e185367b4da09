"""Evaluation metrics on feature matrices (specs/metrics.md; docs/metrics.md).

Pure statistics live in :mod:`.stats`, :mod:`.modes` and :mod:`.floors`; feature extractors in
``fewstep.metrics.features``.
"""

from fewstep.metrics.floors import floor, mmd_floor
from fewstep.metrics.modes import class_mode_metrics, mode_metrics, nearest_mode
from fewstep.metrics.stats import (
    density_coverage,
    diversity,
    diversity_by_condition,
    fd,
    fd_from_stats,
    feature_stats,
    kid,
    kid_from_subsets,
    kid_subsets,
    knn_radii,
    mmd,
    mmd_gammas,
    precision_recall,
    trace_sqrt_product,
)

__all__ = [
    "class_mode_metrics",
    "density_coverage",
    "diversity",
    "diversity_by_condition",
    "fd",
    "fd_from_stats",
    "feature_stats",
    "floor",
    "kid",
    "kid_from_subsets",
    "kid_subsets",
    "knn_radii",
    "mmd",
    "mmd_floor",
    "mmd_gammas",
    "mode_metrics",
    "nearest_mode",
    "precision_recall",
    "trace_sqrt_product",
]
