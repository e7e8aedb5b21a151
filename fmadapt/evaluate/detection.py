"""Lesion-level detection from segmentations: connected components, matching, FROC and sweeps.

Components
    Lesions and predicted components are the connected components of the reference mask and
    of the predicted mask (``scipy.ndimage.label``). ``connectivity="face"`` joins voxels that
    share a face (4-connected in 2D, 6-connected in 3D), and ``"full"`` also joins voxels that
    share an edge or a corner (8- and 26-connected). A prediction is either a mask (bool, or
    integers 0 and 1) or a float probability map in [0, 1]. A probability map is cut at
    ``threshold`` (voxels with p >= threshold are foreground), and each component is scored
    with the max or mean probability inside it. Every component of a mask scores 1, which
    gives a single operating point. Predicted components smaller than ``min_size`` (voxels,
    or mm³ with the spacing) are removed before matching. Reference lesions are never removed.

Matching
    A predicted component hits a lesion when their overlap is at least ``hit_threshold`` of
    the lesion's voxels (``criterion="overlap"``, default 0.1) or when their IoU is at least
    ``hit_threshold`` (``criterion="iou"``). Each component is matched to at most one lesion:
    the one it hits with the largest overlap fraction (IoU for ``"iou"``), the lower lesion
    index on ties. A lesion may be matched by several components, and its score is the highest
    score among them. A component that hits no lesion is a false positive, even when it
    touches a lesion below the hit threshold. A component hitting two lesions counts for one
    of them only. Per-lesion Dice compares a lesion with the union of its matched components,
    and is 0 for a missed lesion.

FROC
    For each score threshold t, sensitivity is the fraction of all lesions whose score is at
    least t, and the false-positive rate is the number of false positives with score at least
    t divided by the number of volumes. The sensitivity at a rate r is the highest sensitivity
    among the curve points with at most r false positives per volume, or 0 when there is none.
    The average sensitivity is the mean over the rates 1/8, 1/4, 1/2, 1, 2, 4 and 8.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fmadapt.evaluate.surface import as_binary_mask, check_spacing

logger = logging.getLogger(__name__)

CONNECTIVITIES = ("face", "full")
HIT_CRITERIA = ("overlap", "iou")
SCORE_REDUCTIONS = ("max", "mean")
SIZE_UNITS = ("voxels", "mm3")
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class DetectionSettings:
    """Settings of lesion detection, with the rules of the module docstring.

    Attributes:
        threshold: probability cut-off in (0, 1]. Voxels with p >= threshold are foreground,
            and masks ignore it.
        min_size: predicted components smaller than this are removed (0 keeps all).
        size_unit: "voxels" or "mm3" (voxel volume from the spacing) for ``min_size``.
        connectivity: "face" or "full".
        criterion: "overlap" (fraction of the lesion covered) or "iou".
        hit_threshold: in (0, 1]; the overlap fraction or IoU a hit needs.
        score: "max" or "mean" probability inside a component.
    """

    threshold: float = 0.5
    min_size: float = 0.0
    size_unit: str = "voxels"
    connectivity: str = "face"
    criterion: str = "overlap"
    hit_threshold: float = 0.1
    score: str = "max"

    def __post_init__(self) -> None:
        _check_fraction(self.threshold, "threshold")
        _check_fraction(self.hit_threshold, "hit_threshold")
        _check_number(self.min_size, "min_size")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size!r}")
        for name, allowed in (
            ("size_unit", SIZE_UNITS),
            ("connectivity", CONNECTIVITIES),
            ("criterion", HIT_CRITERIA),
            ("score", SCORE_REDUCTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class DetectionCase:
    """One volume for detection: a reference mask and a mask or probability map of its shape.

    ``spacing`` is in mm per array axis. None means 1.0 per axis.
    """

    case_id: str
    reference: np.ndarray
    prediction: np.ndarray
    spacing: tuple[float, ...] | None = None


@dataclass(frozen=True)
class VolumeDetection:
    """Lesions and predicted components of one volume after matching.

    Attributes:
        case_id: the volume's id.
        lesion_sizes: (L,) voxels of each reference lesion.
        lesion_scores: (L,) highest score of a matched component, ``-inf`` for a missed lesion.
        lesion_dice: (L,) Dice of each lesion with its matched components.
        component_sizes: (M,) voxels of each kept predicted component.
        component_scores: (M,) score of each kept component.
        component_lesion: (M,) index of the matched lesion, -1 for a false positive.
        removed_components: components removed as smaller than ``min_size``.
        voxel_dice: Dice of the kept prediction with the reference over all voxels, NaN when
            both are empty.
    """

    case_id: str
    lesion_sizes: np.ndarray
    lesion_scores: np.ndarray
    lesion_dice: np.ndarray
    component_sizes: np.ndarray
    component_scores: np.ndarray
    component_lesion: np.ndarray
    removed_components: int
    voxel_dice: float

    @property
    def n_lesions(self) -> int:
        """Number of reference lesions."""
        return int(self.lesion_sizes.size)

    @property
    def n_detected(self) -> int:
        """Lesions matched by at least one kept component."""
        return int(np.count_nonzero(np.isfinite(self.lesion_scores)))

    @property
    def n_false_positives(self) -> int:
        """Kept components that match no lesion."""
        return int(np.count_nonzero(self.component_lesion < 0))


@dataclass(frozen=True)
class FrocResult:
    """A FROC curve with its sensitivities at fixed false-positive rates.

    Attributes:
        fp_per_volume: (T+1,) false positives per volume of each curve point, starting at 0.
        sensitivity: (T+1,) sensitivity of each curve point, starting at 0.
        score_thresholds: (T+1,) score threshold of each point, ``inf`` for the first.
        fp_rates: false positives per volume at which sensitivity is read.
        sensitivity_at_rates: sensitivity at each of ``fp_rates``.
        average_sensitivity: mean of ``sensitivity_at_rates``.
        n_lesions, n_volumes, n_detected, n_false_positives: totals at the lowest threshold.
        mean_lesion_dice: mean per-lesion Dice over all lesions, missed ones as 0.
    """

    fp_per_volume: np.ndarray
    sensitivity: np.ndarray
    score_thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivity_at_rates: tuple[float, ...]
    average_sensitivity: float
    n_lesions: int
    n_volumes: int
    n_detected: int
    n_false_positives: int
    mean_lesion_dice: float

    def to_dict(self) -> dict:
        """Return the result as plain Python values, for JSON."""
        return {
            "n_volumes": self.n_volumes,
            "n_lesions": self.n_lesions,
            "n_detected": self.n_detected,
            "n_false_positives": self.n_false_positives,
            "mean_lesion_dice": self.mean_lesion_dice,
            "average_sensitivity": self.average_sensitivity,
            "sensitivity_at_fp_per_volume": {f"{rate:g}": value for rate, value in zip(self.fp_rates, self.sensitivity_at_rates)},
            "curve": {
                "score_threshold": self.score_thresholds.tolist(),
                "fp_per_volume": self.fp_per_volume.tolist(),
                "sensitivity": self.sensitivity.tolist(),
            },
        }


@dataclass(frozen=True)
class SweepRow:
    """Detection results of one setting in a sweep; ``chosen`` marks the setting in use."""

    parameter: str
    value: float
    chosen: bool
    sensitivity: float
    fp_per_volume: float
    average_sensitivity: float
    mean_lesion_dice: float
    mean_voxel_dice: float


def label_components(mask: object, connectivity: str = "face") -> tuple[np.ndarray, int]:
    """Label the connected components of a mask.

    Returns an int32 array of the mask's shape (0 background, components 1..n) and n.
    """
    mask = as_binary_mask(mask, "mask")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {list(CONNECTIVITIES)}, got {connectivity!r}")
    rank = 1 if connectivity == "face" else mask.ndim
    structure = ndimage.generate_binary_structure(mask.ndim, rank)
    labels, count = ndimage.label(mask, structure=structure, output=np.int32)
    return labels, int(count)


def detect_lesions(
    prediction: object,
    reference: object,
    spacing: object = None,
    settings: DetectionSettings | None = None,
    case_id: str = "",
) -> VolumeDetection:
    """Find the lesions and predicted components of one volume and match them.

    ``prediction`` is a mask or a probability map with the shape of the ``reference`` mask,
    both H×W or H×W×D. ``spacing`` is in mm per array axis (default 1.0 each).
    """
    settings = settings or DetectionSettings()
    reference = as_binary_mask(reference, "reference")
    spacing = (1.0,) * reference.ndim if spacing is None else check_spacing(spacing, reference.ndim)
    foreground, probabilities = _prediction_foreground(prediction, reference.shape, settings.threshold)

    lesion_labels, n_lesions = label_components(reference, settings.connectivity)
    component_labels, n_components = label_components(foreground, settings.connectivity)
    component_labels, n_kept = _remove_small(component_labels, n_components, settings, spacing)

    index = np.arange(1, n_kept + 1)
    if probabilities is None or n_kept == 0:
        component_scores = np.ones(n_kept)
    elif settings.score == "max":
        component_scores = np.asarray(ndimage.maximum(probabilities, component_labels, index), dtype=float)
    else:
        component_scores = np.asarray(ndimage.mean(probabilities, component_labels, index), dtype=float)

    overlap = _overlap_matrix(component_labels, n_kept, lesion_labels, n_lesions)
    lesion_sizes = overlap.sum(axis=0)[1:]
    component_sizes = overlap.sum(axis=1)[1:]
    overlap = overlap[1:, 1:]
    component_lesion = _match(overlap, component_sizes, lesion_sizes, settings)
    return VolumeDetection(
        case_id=case_id,
        lesion_sizes=lesion_sizes,
        lesion_scores=_lesion_scores(component_lesion, component_scores, n_lesions),
        lesion_dice=_lesion_dice(overlap, component_lesion, component_sizes, lesion_sizes),
        component_sizes=component_sizes,
        component_scores=component_scores,
        component_lesion=component_lesion,
        removed_components=n_components - n_kept,
        voxel_dice=_voxel_dice(overlap, component_sizes, lesion_sizes),
    )


def detect_cases(cases: Sequence[DetectionCase], settings: DetectionSettings | None = None) -> list[VolumeDetection]:
    """Run :func:`detect_lesions` on each case."""
    detections = []
    for case in _check_cases(cases):
        detections.append(detect_lesions(case.prediction, case.reference, case.spacing, settings, case.case_id))
    return detections


def compute_froc(detections: Sequence[VolumeDetection], fp_rates: Sequence[float] = FROC_FP_RATES) -> FrocResult:
    """Compute the FROC curve of several volumes; sensitivities are NaN when there is no lesion."""
    if not detections:
        raise ValueError("detections is empty; give the VolumeDetection of at least one volume")
    fp_rates = tuple(_check_number(rate, "fp_rates") for rate in fp_rates)
    lesion_scores = np.concatenate([item.lesion_scores for item in detections])
    fp_scores = np.concatenate([item.component_scores[item.component_lesion < 0] for item in detections])
    n_volumes = len(detections)
    n_lesions = int(lesion_scores.size)

    thresholds = np.unique(np.concatenate([lesion_scores[np.isfinite(lesion_scores)], fp_scores]))[::-1]
    thresholds = np.concatenate([[math.inf], thresholds])
    detected = np.array([np.count_nonzero(lesion_scores >= t) for t in thresholds], dtype=float)
    false_positives = np.array([np.count_nonzero(fp_scores >= t) for t in thresholds], dtype=float)
    sensitivity = detected / n_lesions if n_lesions else np.full(thresholds.size, math.nan)
    fp_per_volume = false_positives / n_volumes

    at_rates = tuple(_sensitivity_at(rate, fp_per_volume, sensitivity) for rate in fp_rates)
    if n_lesions == 0:
        logger.warning("FROC of %d volumes without any reference lesion: sensitivity is undefined (NaN)", n_volumes)
    all_dice = np.concatenate([item.lesion_dice for item in detections])
    return FrocResult(
        fp_per_volume=fp_per_volume,
        sensitivity=sensitivity,
        score_thresholds=thresholds,
        fp_rates=fp_rates,
        sensitivity_at_rates=at_rates,
        average_sensitivity=float(np.mean(at_rates)) if at_rates else math.nan,
        n_lesions=n_lesions,
        n_volumes=n_volumes,
        n_detected=int(np.count_nonzero(np.isfinite(lesion_scores))),
        n_false_positives=int(fp_scores.size),
        mean_lesion_dice=float(all_dice.mean()) if all_dice.size else math.nan,
    )


def sweep_thresholds(
    cases: Sequence[DetectionCase], thresholds: Sequence[float], settings: DetectionSettings | None = None
) -> list[SweepRow]:
    """Detect lesions at each probability cut-off, adding the settings' own cut-off as the chosen row.

    Every case prediction must be a probability map (float), because a mask has no cut-off.
    """
    for case in _check_cases(cases):
        if np.asarray(case.prediction).dtype.kind != "f":
            raise ValueError(
                f"case {case.case_id!r} has a mask prediction (dtype {np.asarray(case.prediction).dtype}); "
                "a threshold sweep needs float probability maps"
            )
    return _sweep(cases, "threshold", thresholds, settings or DetectionSettings())


def sweep_min_sizes(
    cases: Sequence[DetectionCase], min_sizes: Sequence[float], settings: DetectionSettings | None = None
) -> list[SweepRow]:
    """Detect lesions with each minimum component size in ``settings.size_unit``, adding the settings' own as the chosen row."""
    return _sweep(cases, "min_size", min_sizes, settings or DetectionSettings())


def summarize_sweep(
    parameter: str, detections_by_value: Mapping[float, Sequence[VolumeDetection]], chosen: float
) -> list[SweepRow]:
    """Build one sweep row per setting value from the detections made with it, in ascending value order."""
    rows = []
    for value in sorted(detections_by_value):
        detections = detections_by_value[value]
        froc = compute_froc(detections)
        voxel_dice = np.array([item.voxel_dice for item in detections])
        rows.append(
            SweepRow(
                parameter=parameter,
                value=float(value),
                chosen=float(value) == float(chosen),
                sensitivity=float(froc.sensitivity[-1]),
                fp_per_volume=float(froc.fp_per_volume[-1]),
                average_sensitivity=froc.average_sensitivity,
                mean_lesion_dice=froc.mean_lesion_dice,
                mean_voxel_dice=_finite_mean(voxel_dice),
            )
        )
    return rows


def sweep_values(values: Sequence[float], chosen: float, name: str) -> list[float]:
    """Return the distinct sweep values with the chosen one added, in ascending order."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of numbers, got {type(values).__name__} {values!r}")
    return sorted({_check_number(value, name) for value in values} | {float(chosen)})


def _sweep(
    cases: Sequence[DetectionCase], parameter: str, values: Sequence[float], settings: DetectionSettings
) -> list[SweepRow]:
    chosen = float(getattr(settings, parameter))
    detections_by_value = {}
    for value in sweep_values(values, chosen, f"{parameter} values"):
        detections_by_value[value] = detect_cases(cases, dataclasses.replace(settings, **{parameter: value}))
    return summarize_sweep(parameter, detections_by_value, chosen)


def _prediction_foreground(
    prediction: object, shape: tuple[int, ...], threshold: float
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(prediction, (str, bytes)) or prediction is None:
        raise TypeError(f"prediction must be a mask or a float probability array, got {type(prediction).__name__}")
    array = np.asarray(prediction)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"prediction must be a mask or a float probability array, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"prediction and reference must have the same shape, got {array.shape} and {shape}")
    if array.dtype.kind != "f":
        return as_binary_mask(array, "prediction"), None
    if not np.all(np.isfinite(array)) or array.min(initial=0.0) < 0 or array.max(initial=0.0) > 1:
        raise ValueError(
            "prediction is a float array, so it must contain probabilities in [0, 1]; apply a sigmoid to "
            "logits first, or pass a bool mask"
        )
    return array >= threshold, array


def _remove_small(
    labels: np.ndarray, count: int, settings: DetectionSettings, spacing: tuple[float, ...]
) -> tuple[np.ndarray, int]:
    if settings.min_size == 0 or count == 0:
        return labels, count
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(float)
    if settings.size_unit == "mm3":
        sizes = sizes * float(np.prod(spacing))
    keep = sizes >= settings.min_size
    new_ids = np.zeros(count + 1, dtype=np.int32)
    new_ids[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels], int(keep.sum())


def _overlap_matrix(components: np.ndarray, n_components: int, lesions: np.ndarray, n_lesions: int) -> np.ndarray:
    # Entry (j, i) counts the voxels in component j and lesion i, with row and column 0 for
    # background, so row and column sums give the component and lesion sizes.
    pair_index = components.astype(np.int64).ravel() * (n_lesions + 1) + lesions.ravel()
    counts = np.bincount(pair_index, minlength=(n_components + 1) * (n_lesions + 1))
    return counts.reshape(n_components + 1, n_lesions + 1)


def _match(
    overlap: np.ndarray, component_sizes: np.ndarray, lesion_sizes: np.ndarray, settings: DetectionSettings
) -> np.ndarray:
    if overlap.size == 0:
        return np.full(overlap.shape[0], -1, dtype=np.int64)
    if settings.criterion == "overlap":
        fraction = overlap / lesion_sizes[None, :]
    else:
        fraction = overlap / (component_sizes[:, None] + lesion_sizes[None, :] - overlap)
    hits = (overlap > 0) & (fraction >= settings.hit_threshold)
    best = np.argmax(np.where(hits, fraction, -1.0), axis=1)
    return np.where(hits.any(axis=1), best, -1)


def _lesion_scores(component_lesion: np.ndarray, component_scores: np.ndarray, n_lesions: int) -> np.ndarray:
    scores = np.full(n_lesions, -math.inf)
    matched = component_lesion >= 0
    np.maximum.at(scores, component_lesion[matched], component_scores[matched])
    return scores


def _lesion_dice(
    overlap: np.ndarray, component_lesion: np.ndarray, component_sizes: np.ndarray, lesion_sizes: np.ndarray
) -> np.ndarray:
    dice = np.zeros(lesion_sizes.size)
    for lesion in range(lesion_sizes.size):
        matched = component_lesion == lesion
        intersection = overlap[matched, lesion].sum()
        dice[lesion] = 2.0 * intersection / (lesion_sizes[lesion] + component_sizes[matched].sum())
    return dice


def _voxel_dice(overlap: np.ndarray, component_sizes: np.ndarray, lesion_sizes: np.ndarray) -> float:
    denominator = component_sizes.sum() + lesion_sizes.sum()
    return math.nan if denominator == 0 else float(2.0 * overlap.sum() / denominator)


def _sensitivity_at(rate: float, fp_per_volume: np.ndarray, sensitivity: np.ndarray) -> float:
    reachable = sensitivity[fp_per_volume <= rate]
    return float(reachable.max()) if reachable.size else 0.0


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_cases(cases: object) -> Sequence[DetectionCase]:
    if isinstance(cases, DetectionCase) or not isinstance(cases, Sequence):
        raise TypeError(f"cases must be a list of DetectionCase, got {type(cases).__name__}")
    for case in cases:
        if not isinstance(case, DetectionCase):
            raise TypeError(f"cases must contain DetectionCase items, got {type(case).__name__}")
    return cases


def _check_fraction(value: object, name: str) -> None:
    value = _check_number(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
