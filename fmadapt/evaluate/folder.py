"""Evaluate a folder of NIfTI predictions against a folder of reference label maps.

Any tool's predictions can be scored this way (nnU-Net's, fmadapt's own), so their rows sit
in one table. Cases are matched by file name: ``PRED_DIR/CASE.nii.gz`` is compared with
``GT_DIR/CASE.nii.gz`` (``.nii`` also works). A reference case without a prediction raises
:class:`~fmadapt.errors.DataError` naming the cases, unless ``allow_missing=True``, which
scores it as an empty prediction and sets ``"missing_prediction": true`` in its entry.
Prediction files without a reference are logged and skipped. With ``splits_file`` (nnU-Net's
``splits_final.json``, a list of ``{"train": [...], "val": [...]}`` per fold) and ``fold``,
only that fold's validation cases are evaluated.

Labels are label ids or names. Names, and the default labels, come from a ``dataset.json`` in
GT_DIR or its parent folder (nnU-Net's labelsTr sits beside it). Without a dataset.json the
default is every non-zero value found in the reference and prediction files.

Output (default ``PRED_DIR/fmadapt_evaluation``)
    ``summary.json`` in nnU-Net's format: ``metric_per_case`` (``prediction_file``,
    ``reference_file``, ``metrics`` per label id with ``Dice, IoU, TP, FP, FN, TN, n_pred,
    n_ref`` plus ``NSD`` and ``HD95`` in mm), ``mean`` per label and ``foreground_mean``. As in
    nnU-Net, a label that is empty in both files has Dice and IoU NaN, and the file is written
    with Python's ``json`` and its ``NaN`` and ``Infinity`` tokens, which nnU-Net and Python
    read back. ``mean`` skips NaN values, as nnU-Net's ``np.nanmean`` does, and also infinite
    HD95 values (one mask empty), whose number is in ``fmadapt.n_inf``. ``foreground_mean``
    averages the label means that are not NaN. ``per_case.csv`` has fmadapt's columns (see
    :mod:`fmadapt.evaluate.results`), so ``fmadapt compare`` reads it. ``report.md`` comes last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmadapt.data.io import NIFTI_SUFFIXES, Volume, read_image, read_mask
from fmadapt.errors import DataError, FmadaptWarning
from fmadapt.evaluate.detection import DetectionSettings, compute_froc, detect_lesions, summarize_sweep, sweep_values
from fmadapt.evaluate.metrics import compute_case_metrics
from fmadapt.evaluate.report import OVERLAY_FILENAME, RANKS, OverlayCase, FROC_FILENAME, rank_cases, write_detection_json, write_froc_figure, write_overlay_figure
from fmadapt.evaluate.results import PER_CASE_FILENAME, MetricTable, _write_text_atomically

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_NAME = "fmadapt_evaluation"
SUMMARY_FILENAME = "summary.json"
NNUNET_METRIC_NAMES = {
    "Dice": "dice", "IoU": "iou", "TP": "tp", "FP": "fp", "FN": "fn", "TN": "tn",
    "n_pred": "n_pred", "n_ref": "n_ref", "NSD": "nsd", "HD95": "hd95",
}  # fmt: skip


@dataclass
class FolderCase:
    """One reference case with its prediction file, or None when the prediction is missing."""

    case_id: str
    reference_file: Path
    prediction_file: Path | None


@dataclass
class FolderEvaluation:
    """Result of :func:`evaluate_folder`: the output folder, the nnU-Net-style summary and the rows."""

    output_dir: Path
    summary: dict
    table: MetricTable
    cases: list[FolderCase]
    labels: dict[str, int]
    missing_predictions: list[str] = field(default_factory=list)


def list_nifti_cases(folder: str | Path, name: str) -> dict[str, Path]:
    """Map case ids (file names without .nii.gz or .nii) to the NIfTI files directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} {str(folder)!r} not found; give a folder of .nii.gz files")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file() or path.name.startswith("."):
            continue
        case_id = path.name[: -len(suffix)]
        if case_id in cases:
            raise DataError(f"{name} {str(folder)!r} has both {cases[case_id].name} and {path.name}; keep one")
        cases[case_id] = path
    return cases


def read_nnunet_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """Read nnU-Net's ``splits_final.json``: one ``{"train": [...], "val": [...]}`` dict per fold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file {str(path)!r} not found")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"splits file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(splits, list) or not splits:
        raise DataError(f"splits file {str(path)!r} must contain a non-empty list of folds, got {type(splits).__name__}")
    for fold, entry in enumerate(splits):
        if not isinstance(entry, dict) or set(entry) != {"train", "val"}:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"fold {fold} of {str(path)!r} must have exactly the keys 'train' and 'val', got {keys}")
        for key in ("train", "val"):
            if not isinstance(entry[key], list) or not all(isinstance(case, str) for case in entry[key]):
                raise DataError(f"fold {fold} of {str(path)!r}: {key!r} must be a list of case ids")
    return splits


def fold_validation_cases(splits: Sequence[dict], fold: int) -> list[str]:
    """Return the validation case ids of ``fold`` (0-based, as nnU-Net numbers them)."""
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral):
        raise TypeError(f"fold must be an integer, got {type(fold).__name__} {fold!r}")
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist; the splits file has folds 0 to {len(splits) - 1}")
    return list(splits[fold]["val"])


def evaluate_folder(
    prediction_dir: str | Path,
    reference_dir: str | Path,
    *,
    labels: Sequence[str | int] | None = None,
    tolerance_mm: float = 2.0,
    output_dir: str | Path | None = None,
    splits_file: str | Path | None = None,
    fold: int | None = None,
    allow_missing: bool = False,
) -> FolderEvaluation:
    """Score every reference case, write summary.json and per_case.csv, and return the result.

    ``tolerance_mm`` is the NSD tolerance. ``report.md`` and figures are written by the
    caller (see :func:`fmadapt.evaluate.report.write_report`).
    """
    predictions = list_nifti_cases(prediction_dir, "prediction_dir")
    references = list_nifti_cases(reference_dir, "reference_dir")
    if not references:
        raise DataError(f"reference_dir {str(reference_dir)!r} contains no .nii.gz or .nii files")
    case_ids = _selected_case_ids(references, splits_file, fold)
    cases = [FolderCase(case_id, references[case_id], predictions.get(case_id)) for case_id in case_ids]
    missing = [case.case_id for case in cases if case.prediction_file is None]
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} reference cases have no prediction in {str(prediction_dir)!r}: {', '.join(missing)}; "
            "add the files or pass allow_missing=True (--allow-missing) to score them as empty predictions"
        )
    ignored = sorted(set(predictions) - set(case_ids))
    if ignored:
        logger.info("skipping %d prediction files without a selected reference case: %s", len(ignored), ", ".join(ignored))

    label_ids = _resolve_labels(labels, Path(reference_dir), cases)
    table = MetricTable()
    per_case = []
    for case in cases:
        prediction, reference = load_case_pair(case)
        rows = compute_case_metrics(prediction.array, reference.array, reference.spacing, label_ids, tolerance_mm)
        table.add_case(case.case_id, rows, missing_prediction=case.prediction_file is None)
        per_case.append(_nnunet_case_entry(case, rows))

    output_dir = Path(output_dir) if output_dir is not None else Path(prediction_dir) / DEFAULT_OUTPUT_NAME
    settings = {
        "prediction_dir": str(Path(prediction_dir).resolve()),
        "reference_dir": str(Path(reference_dir).resolve()),
        "labels": label_ids,
        "tolerance_mm": float(tolerance_mm),
        "splits_file": None if splits_file is None else str(Path(splits_file).resolve()),
        "fold": fold,
        "allow_missing": allow_missing,
    }
    summary = build_nnunet_summary(per_case, label_ids, settings, missing)
    write_nnunet_summary(output_dir / SUMMARY_FILENAME, summary)
    table.to_csv(output_dir / PER_CASE_FILENAME)
    logger.info("evaluated %d cases of %s; results in %s", len(cases), prediction_dir, output_dir)
    return FolderEvaluation(output_dir, summary, table, cases, label_ids, missing)


def write_folder_overlays(evaluation: FolderEvaluation, images_dir: str | Path) -> Path:
    """Draw the worst, median and best case by Dice into ``overlays.png`` of the output folder.

    Images are ``images_dir/CASE_0000.nii.gz`` (nnU-Net's first channel) or ``images_dir/CASE.nii.gz``.
    """
    images = list_nifti_cases(images_dir, "images_dir")
    ranked = rank_cases(evaluation.table.rows)
    if not ranked:
        raise DataError("no case has a finite Dice, so no worst, median or best case can be drawn")
    cases = {case.case_id: case for case in evaluation.cases}
    overlays = []
    for rank in RANKS:
        case = cases[ranked[rank]]
        image_file = images.get(f"{case.case_id}_0000") or images.get(case.case_id)
        if image_file is None:
            raise DataError(f"no image for case {case.case_id!r} in {str(images_dir)!r}; expected {case.case_id}_0000.nii.gz")
        prediction, reference = load_case_pair(case)
        image = read_image(image_file).array
        overlays.append(OverlayCase(f"{rank} {case.case_id}", image, reference.array, prediction.array))
    return write_overlay_figure(evaluation.output_dir / OVERLAY_FILENAME, overlays)


def write_folder_detection(
    evaluation: FolderEvaluation, settings: DetectionSettings, min_size_sweep: Sequence[float] = ()
) -> dict:
    """Detect lesions of every label in every case, write detection.json and froc.png, and return the FROC dicts.

    Label maps give one operating point per label. ``min_size_sweep`` values (in
    ``settings.size_unit``) add a sweep of the minimum component size beside ``settings.min_size``.
    """
    sizes = sweep_values(min_size_sweep, settings.min_size, "min_size_sweep") if min_size_sweep else [settings.min_size]
    detections = {name: {size: [] for size in sizes} for name in evaluation.labels}
    for case in evaluation.cases:
        prediction, reference = load_case_pair(case)
        for name, label_id in evaluation.labels.items():
            for size in sizes:
                case_settings = dataclasses.replace(settings, min_size=size)
                detections[name][size].append(
                    detect_lesions(prediction.array == label_id, reference.array == label_id, reference.spacing, case_settings, case.case_id)
                )
    frocs = {name: compute_froc(by_size[settings.min_size]) for name, by_size in detections.items()}
    sweeps = {}
    if min_size_sweep:
        sweeps = {f"{name} min_size ({settings.size_unit})": summarize_sweep("min_size", by_size, settings.min_size) for name, by_size in detections.items()}
    write_detection_json(evaluation.output_dir, frocs, dataclasses.asdict(settings), sweeps)
    write_froc_figure(evaluation.output_dir / FROC_FILENAME, frocs)
    return {name: froc.to_dict() for name, froc in frocs.items()}


def load_case_pair(case: FolderCase) -> tuple[Volume, Volume]:
    """Read a case's prediction and reference label maps; a missing prediction reads as all zeros."""
    reference = read_mask(case.reference_file)
    if case.prediction_file is None:
        empty = np.zeros(reference.array.shape, dtype=np.uint8)
        return Volume(empty, reference.affine, reference.spacing), reference
    prediction = read_mask(case.prediction_file)
    if prediction.array.shape != reference.array.shape:
        raise DataError(
            f"prediction {str(case.prediction_file)!r} has shape {prediction.array.shape} but reference "
            f"{str(case.reference_file)!r} has {reference.array.shape}; resample the prediction onto the reference grid"
        )
    if not np.allclose(prediction.affine, reference.affine, atol=1e-3):
        warnings.warn(
            f"case {case.case_id!r}: the prediction's affine differs from the reference's; the arrays are "
            "compared voxel by voxel, so check that the prediction was written on the reference grid",
            FmadaptWarning,
            stacklevel=2,
        )
    return prediction, reference


def build_nnunet_summary(
    per_case: list[dict], label_ids: dict[str, int], settings: dict, missing: list[str]
) -> dict:
    """Build the summary dict: ``metric_per_case``, ``mean``, ``foreground_mean`` and an ``fmadapt`` section."""
    means: dict[str, dict[str, float]] = {}
    n_nan: dict[str, dict[str, int]] = {}
    n_inf: dict[str, int] = {}
    for label_id in label_ids.values():
        key = str(label_id)
        values = {name: np.array([entry["metrics"][key][name] for entry in per_case], dtype=float) for name in NNUNET_METRIC_NAMES}
        means[key] = {name: _finite_mean(array) for name, array in values.items()}
        n_nan[key] = {name: int(np.isnan(array).sum()) for name, array in values.items() if np.isnan(array).any()}
        n_inf[key] = int(np.isinf(values["HD95"]).sum())

    foreground_mean = {}
    for name in NNUNET_METRIC_NAMES:
        label_means = np.array([means[key][name] for key in means], dtype=float)
        foreground_mean[name] = _finite_mean(label_means)
    return {
        "metric_per_case": per_case,
        "mean": means,
        "foreground_mean": foreground_mean,
        "fmadapt": {"settings": settings, "missing_predictions": missing, "n_nan": n_nan, "n_inf": {"HD95": n_inf}},
    }


def write_nnunet_summary(path: str | Path, summary: dict) -> Path:
    """Write the summary as JSON with NaN and Infinity tokens, as nnU-Net writes its summary.json, atomically."""
    text = json.dumps(summary, indent=2, sort_keys=False) + "\n"
    return _write_text_atomically(path, text, "path")


def _nnunet_case_entry(case: FolderCase, rows: list[dict]) -> dict:
    metrics = {str(row["class_id"]): {name: row[key] for name, key in NNUNET_METRIC_NAMES.items()} for row in rows}
    return {
        "prediction_file": None if case.prediction_file is None else str(case.prediction_file.resolve()),
        "reference_file": str(case.reference_file.resolve()),
        "missing_prediction": case.prediction_file is None,
        "metrics": metrics,
    }


def _selected_case_ids(references: dict[str, Path], splits_file: str | Path | None, fold: int | None) -> list[str]:
    if (splits_file is None) != (fold is None):
        raise ValueError(f"splits_file and fold go together, got splits_file={splits_file!r} and fold={fold!r}")
    if splits_file is None:
        return sorted(references)
    case_ids = fold_validation_cases(read_nnunet_splits(splits_file), fold)
    absent = [case_id for case_id in case_ids if case_id not in references]
    if absent:
        raise DataError(
            f"fold {fold} of {str(splits_file)!r} lists validation cases without a reference file: {', '.join(absent)}; "
            "check that the reference folder belongs to the same dataset"
        )
    return case_ids


def _resolve_labels(requested: Sequence[str | int] | None, reference_dir: Path, cases: list[FolderCase]) -> dict[str, int]:
    dataset_labels = _dataset_json_labels(reference_dir)
    if requested is None:
        if dataset_labels is not None:
            return {name: label_id for name, label_id in dataset_labels.items() if label_id != 0}
        found = _label_values_in_files(cases)
        if not found:
            raise DataError(f"no foreground label in the files of {str(reference_dir)!r}; pass labels explicitly")
        return {str(value): value for value in found}
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence) or not requested:
        raise TypeError(f"labels must be a non-empty list of label ids or names, got {requested!r}")

    names_by_id = {label_id: name for name, label_id in (dataset_labels or {}).items()}
    resolved: dict[str, int] = {}
    for item in requested:
        label_id = _label_id(item, dataset_labels)
        name = names_by_id.get(label_id, str(label_id))
        if name in resolved:
            raise ValueError(f"label {item!r} appears twice in labels={list(requested)}")
        resolved[name] = label_id
    return resolved


def _label_id(item: str | int, dataset_labels: dict[str, int] | None) -> int:
    if isinstance(item, str) and item.lstrip("-").isdigit():
        item = int(item)
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        if int(item) <= 0:
            raise ValueError(f"label ids must be > 0 (0 is background), got {item}")
        return int(item)
    if not isinstance(item, str):
        raise TypeError(f"labels must contain label ids or names, got {type(item).__name__} {item!r}")
    if dataset_labels is None:
        raise ValueError(f"label name {item!r} needs a dataset.json beside the reference files; pass label ids instead")
    if item not in dataset_labels or dataset_labels[item] == 0:
        known = [name for name, value in dataset_labels.items() if value != 0]
        raise ValueError(f"label {item!r} is not a foreground label of dataset.json; known labels: {known}")
    return dataset_labels[item]


def _dataset_json_labels(reference_dir: Path) -> dict[str, int] | None:
    for folder in (reference_dir, reference_dir.parent):
        path = folder / "dataset.json"
        if path.is_file():
            try:
                labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
                return {str(name): int(value) for name, value in labels.items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
                raise DataError(f"{str(path)!r} has no valid 'labels' mapping of names to ids: {error!r}") from error
    return None


def _label_values_in_files(cases: list[FolderCase]) -> list[int]:
    found: set[int] = set()
    for case in cases:
        for path in (case.reference_file, case.prediction_file):
            if path is not None:
                found.update(int(value) for value in np.unique(read_mask(path).array) if value != 0)
    return sorted(found)


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
