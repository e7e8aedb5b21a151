"""Evaluation: segmentation metrics on masks and label maps, and per-case result tables."""

from fmadapt.evaluate.metrics import (
    compute_case_metrics,
    confusion_counts,
    dice,
    hausdorff_distance_95,
    iou,
    normalized_surface_dice,
)
from fmadapt.evaluate.results import MetricTable

__all__ = [
    "MetricTable",
    "compute_case_metrics",
    "confusion_counts",
    "dice",
    "hausdorff_distance_95",
    "iou",
    "normalized_surface_dice",
]
