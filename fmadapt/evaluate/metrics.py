"""Segmentation metrics on boolean masks of any dimension (2D images, 3D volumes).

Every function takes a prediction and a reference mask of the same shape. Masks are boolean
arrays, or numeric arrays that contain only 0 and 1. Spacing is a sequence of voxel sizes in
mm, one per array axis in the array's axis order, and every surface metric is in mm.

Definitions
    Dice = 2 |P ∩ R| / (|P| + |R|) and IoU = |P ∩ R| / |P ∪ R|, over voxels.
    Surfaces are the border voxels of each mask (see :mod:`fmadapt.evaluate.surface`).
    HD95 is the larger of the two directed 95th percentiles of the surface-to-surface
    distances (linear interpolation between order statistics, as ``numpy.percentile``).
    NSD (normalized surface Dice) is the fraction of both surfaces that lies within the
    tolerance of the other surface, (|S_P within τ of S_R| + |S_R within τ of S_P|) /
    (|S_P| + |S_R|), where "within" includes distances equal to τ.
    These match MONAI 1.6's ``compute_dice``, ``compute_iou``,
    ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice`` with
    ``use_subvoxels=False`` when both masks are non-empty.

Empty masks
    Both masks empty: Dice, IoU, NSD and HD95 are NaN, because there is nothing to score.
    :class:`fmadapt.evaluate.results.MetricTable` counts these cases per class and metric and
    leaves them out of means.
    Only one mask empty: Dice 0, IoU 0, NSD 0 and HD95 ``inf``. The ``inf`` is kept in
    per-case rows. Summaries average HD95 over finite values only and report the number of
    ``inf`` cases beside the mean as ``n_inf``, so a missed structure is never hidden as 0.
    MONAI 1.6 also returns Dice 0, IoU 0 and NSD 0 here, but its HD95 is NaN, because
    ``compute_hausdorff_distance(percentile=95)`` interpolates between infinite distances.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from fmadapt.evaluate.surface import check_mask_pair, check_spacing, surface_distances

HD_PERCENTILE = 95.0


def confusion_counts(prediction: object, reference: object) -> dict[str, int]:
    """Count voxels of the confusion matrix of two masks of the same shape.

    Returns a dict with ``tp``, ``fp``, ``fn``, ``tn`` (voxel counts) and ``n_pred``,
    ``n_ref`` (foreground voxels of the prediction and the reference), all Python ints.
    """
    prediction, reference = check_mask_pair(prediction, reference)
    return _count_voxels(prediction, reference)


def dice(prediction: object, reference: object) -> float:
    """Compute the Dice coefficient of two masks: 0 to 1, NaN when both are empty."""
    counts = confusion_counts(prediction, reference)
    return _dice_from_counts(counts)


def iou(prediction: object, reference: object) -> float:
    """Compute the intersection over union (Jaccard index): 0 to 1, NaN when both masks are empty."""
    counts = confusion_counts(prediction, reference)
    return _iou_from_counts(counts)


def hausdorff_distance_95(prediction: object, reference: object, spacing: object) -> float:
    """Compute the 95th-percentile Hausdorff distance in mm between the mask surfaces.

    Returns NaN when both masks are empty and ``inf`` when only one of them is.
    """
    prediction, reference = check_mask_pair(prediction, reference)
    spacing = check_spacing(spacing, prediction.ndim)
    return _hd95_of_masks(prediction, reference, spacing)


def normalized_surface_dice(
    prediction: object, reference: object, spacing: object, tolerance_mm: float
) -> float:
    """Compute the normalized surface Dice: the fraction of both surfaces within ``tolerance_mm``.

    Returns a value from 0 to 1, NaN when both masks are empty and 0 when only one of them is.
    """
    prediction, reference = check_mask_pair(prediction, reference)
    spacing = check_spacing(spacing, prediction.ndim)
    tolerance_mm = _check_tolerance(tolerance_mm, "tolerance_mm")
    return _nsd_of_masks(prediction, reference, spacing, tolerance_mm)


def compute_case_metrics(
    prediction_labels: object,
    reference_labels: object,
    spacing: object,
    class_ids: Mapping[str, int],
    tolerance_mm: float | Mapping[str, float],
) -> list[dict]:
    """Compute Dice, IoU, NSD, HD95 and voxel counts for each class of two label maps.

    ``prediction_labels`` and ``reference_labels`` are integer arrays of the same shape
    (H, W) or (H, W, D). ``class_ids`` maps class names to label values, and
    ``tolerance_mm`` is one NSD tolerance for all classes or a mapping from every class name
    to its own tolerance. Returns one dict per class in ``class_ids`` order with keys
    ``class_name``, ``class_id``, ``dice``, ``iou``, ``nsd``, ``hd95`` and the counts of
    :func:`confusion_counts`. The empty-mask rules of this module apply to each class.
    """
    prediction_labels = _check_label_map(prediction_labels, "prediction_labels")
    reference_labels = _check_label_map(reference_labels, "reference_labels")
    if prediction_labels.shape != reference_labels.shape:
        raise ValueError(
            f"prediction_labels and reference_labels must have the same shape, got "
            f"{prediction_labels.shape} and {reference_labels.shape}"
        )
    spacing = check_spacing(spacing, reference_labels.ndim)
    class_ids = _check_class_ids(class_ids)
    tolerances = _tolerances_per_class(tolerance_mm, class_ids)

    rows = []
    for class_name, class_id in class_ids.items():
        prediction = prediction_labels == class_id
        reference = reference_labels == class_id
        row = {"class_name": class_name, "class_id": class_id}
        row.update(_class_metrics(prediction, reference, spacing, tolerances[class_name]))
        rows.append(row)
    return rows


def _class_metrics(
    prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> dict:
    counts = _count_voxels(prediction, reference)
    metrics = {"dice": _dice_from_counts(counts), "iou": _iou_from_counts(counts)}
    if counts["n_pred"] == 0 or counts["n_ref"] == 0:
        metrics["nsd"] = _nsd_with_empty_mask(counts)
        metrics["hd95"] = _hd95_with_empty_mask(counts)
    else:
        # One pair of distance arrays serves both surface metrics.
        distances = surface_distances(prediction, reference, spacing)
        metrics["nsd"] = _nsd_from_distances(*distances, tolerance_mm)
        metrics["hd95"] = _hd95_from_distances(*distances)
    metrics.update(counts)
    return metrics


def _count_voxels(prediction: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    true_positive = int(np.count_nonzero(prediction & reference))
    n_pred = int(np.count_nonzero(prediction))
    n_ref = int(np.count_nonzero(reference))
    false_positive = n_pred - true_positive
    false_negative = n_ref - true_positive
    true_negative = int(prediction.size) - true_positive - false_positive - false_negative
    return {
        "tp": true_positive,
        "fp": false_positive,
        "fn": false_negative,
        "tn": true_negative,
        "n_pred": n_pred,
        "n_ref": n_ref,
    }


def _dice_from_counts(counts: Mapping[str, int]) -> float:
    denominator = counts["n_pred"] + counts["n_ref"]
    if denominator == 0:
        return math.nan
    return 2.0 * counts["tp"] / denominator


def _iou_from_counts(counts: Mapping[str, int]) -> float:
    union = counts["tp"] + counts["fp"] + counts["fn"]
    if union == 0:
        return math.nan
    return counts["tp"] / union


def _hd95_of_masks(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...]) -> float:
    counts = _count_voxels(prediction, reference)
    if counts["n_pred"] == 0 or counts["n_ref"] == 0:
        return _hd95_with_empty_mask(counts)
    return _hd95_from_distances(*surface_distances(prediction, reference, spacing))


def _nsd_of_masks(
    prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> float:
    counts = _count_voxels(prediction, reference)
    if counts["n_pred"] == 0 or counts["n_ref"] == 0:
        return _nsd_with_empty_mask(counts)
    return _nsd_from_distances(*surface_distances(prediction, reference, spacing), tolerance_mm)


def _hd95_with_empty_mask(counts: Mapping[str, int]) -> float:
    both_empty = counts["n_pred"] == 0 and counts["n_ref"] == 0
    return math.nan if both_empty else math.inf


def _nsd_with_empty_mask(counts: Mapping[str, int]) -> float:
    both_empty = counts["n_pred"] == 0 and counts["n_ref"] == 0
    return math.nan if both_empty else 0.0


def _hd95_from_distances(prediction_to_reference: np.ndarray, reference_to_prediction: np.ndarray) -> float:
    forward = np.percentile(prediction_to_reference, HD_PERCENTILE)
    backward = np.percentile(reference_to_prediction, HD_PERCENTILE)
    return float(max(forward, backward))


def _nsd_from_distances(
    prediction_to_reference: np.ndarray, reference_to_prediction: np.ndarray, tolerance_mm: float
) -> float:
    within = np.count_nonzero(prediction_to_reference <= tolerance_mm)
    within += np.count_nonzero(reference_to_prediction <= tolerance_mm)
    total = prediction_to_reference.size + reference_to_prediction.size
    return float(within / total)


def _check_tolerance(tolerance_mm: object, name: str) -> float:
    if isinstance(tolerance_mm, bool) or not isinstance(tolerance_mm, numbers.Real):
        raise TypeError(f"{name} must be a number in mm, got {type(tolerance_mm).__name__} {tolerance_mm!r}")
    value = float(tolerance_mm)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 mm, got {value!r}")
    return value


def _check_label_map(labels: object, name: str) -> np.ndarray:
    if isinstance(labels, (str, bytes)) or labels is None:
        raise TypeError(f"{name} must be an integer array, got {type(labels).__name__} {labels!r}")
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be an integer label map, got dtype {array.dtype}; convert it with "
            "np.rint(labels).astype(np.int32) or read NIfTI labels with np.asarray(image.dataobj)"
        )
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a 0-d array {array!r}")
    return array


def _check_class_ids(class_ids: object) -> dict[str, int]:
    if not isinstance(class_ids, Mapping):
        raise TypeError(
            f"class_ids must be a mapping from class name to label value, got "
            f"{type(class_ids).__name__} {class_ids!r}; e.g. {{'liver': 1, 'spleen': 2}}"
        )
    if not class_ids:
        raise ValueError("class_ids is empty; give at least one class, e.g. {'liver': 1}")
    checked: dict[str, int] = {}
    seen_ids: dict[int, str] = {}
    for class_name, class_id in class_ids.items():
        if not isinstance(class_name, str):
            raise TypeError(f"class_ids keys must be class names (str), got {class_name!r}")
        if not class_name:
            raise ValueError("class_ids contains an empty class name; give every class a name")
        if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral):
            raise TypeError(f"class_ids[{class_name!r}] must be an integer label value, got {class_id!r}")
        if int(class_id) in seen_ids:
            raise ValueError(
                f"class_ids gives label value {int(class_id)} to both {seen_ids[int(class_id)]!r} "
                f"and {class_name!r}; each class needs its own label value"
            )
        seen_ids[int(class_id)] = class_name
        checked[class_name] = int(class_id)
    return checked


def _tolerances_per_class(tolerance_mm: object, class_ids: Mapping[str, int]) -> dict[str, float]:
    if not isinstance(tolerance_mm, Mapping):
        value = _check_tolerance(tolerance_mm, "tolerance_mm")
        return {class_name: value for class_name in class_ids}

    missing = [class_name for class_name in class_ids if class_name not in tolerance_mm]
    unknown = [class_name for class_name in tolerance_mm if class_name not in class_ids]
    if missing or unknown:
        raise ValueError(
            f"tolerance_mm must give a tolerance for exactly the classes in class_ids; "
            f"missing {missing}, unknown {unknown}; known classes: {list(class_ids)}"
        )
    return {
        class_name: _check_tolerance(tolerance_mm[class_name], f"tolerance_mm[{class_name!r}]")
        for class_name in class_ids
    }
