"""Probability cut-off and small-component sweeps of automatic evaluation, and lesion detection.

Automatic evaluation scores each class where its logit is > 0, which is the probability
cut-off 0.5 with no component removed (the chosen setting). :class:`ProbabilitySweeps`
collects, case by case, how the result changes with other settings:

- every probability cut-off of ``evaluate.threshold_sweep`` (no component removed), and
- every minimum component size of ``evaluate.min_size_sweep_mm3`` (cut-off 0.5): predicted
  connected components (face-connected) smaller than the size are removed. Sizes are in mm³
  from the voxel spacing, so for 2D images without physical spacing they are pixels.

Each setting gives, per class, the mean Dice over cases (NaN Dice, both masks empty, left
out as in ``summary.json``) and the lesion-level numbers of :mod:`fmadapt.evaluate.detection`.
The rows go to ``threshold_sweep.csv``. With ``evaluate.detection: true`` the chosen
setting's components also give a FROC curve per class, written with per-lesion Dice to
``detection.json`` and drawn in ``froc.png``. Component scores are the max probability
inside the component, and components exist only where p >= 0.5, so the curve ends at the
chosen operating point.

Memory: the caller keeps the probabilities of one case at a time, only for the evaluated
region, as float16 (2 bytes per class and voxel, half of float32). Only the small detection
records (sizes, scores, Dice per component and lesion) are kept across cases.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fmadapt.evaluate.detection import (
    DetectionSettings,
    FrocResult,
    SweepRow,
    VolumeDetection,
    compute_froc,
    detect_lesions,
    summarize_sweep,
    sweep_values,
)
from fmadapt.evaluate.report import FROC_FILENAME, SWEEP_FILENAME, write_detection_json, write_froc_figure
from fmadapt.evaluate.results import _write_text_atomically

logger = logging.getLogger(__name__)

CHOSEN_THRESHOLD = 0.5
SWEEP_COLUMNS = ("class_name", *(field.name for field in dataclasses.fields(SweepRow)), "n_cases")

# The largest float16 value below 0.5, given to probabilities whose logit is <= 0 but which
# float16 rounding lifted to 0.5.
_BELOW_HALF = np.nextafter(np.float16(CHOSEN_THRESHOLD), np.float16(0.0))


def probabilities_from_logits(logits: torch.Tensor) -> np.ndarray:
    """Convert C×H×W logits to float16 sigmoid probabilities whose 0.5 cut equals logit > 0.

    float16 keeps about three significant digits, so the cut at another threshold t may
    differ from the float32 cut for voxels with |p - t| < 2.5e-4. At t = 0.5 the cut
    matches logit > 0 voxel for voxel.
    """
    logits = logits.detach().float().cpu()
    probabilities = torch.sigmoid(logits).numpy().astype(np.float16)
    lifted = (probabilities >= CHOSEN_THRESHOLD) & ~(logits > 0).numpy()
    probabilities[lifted] = _BELOW_HALF
    return probabilities


class ProbabilitySweeps:
    """Per-class detections of each sweep setting, collected one case at a time.

    Args:
        class_names: the C class names, in the order of the probability channels.
        thresholds: probability cut-offs in (0, 1]; 0.5 is added as the chosen one.
        min_sizes_mm3: minimum component sizes in mm³ (>= 0); 0 is added as the chosen one.
        detection: also compute FROC curves and per-lesion Dice for ``detection.json``.
    """

    def __init__(
        self, class_names: Sequence[str], thresholds: Sequence[float], min_sizes_mm3: Sequence[float], detection: bool
    ) -> None:
        self.class_names = list(class_names)
        self.thresholds = sweep_values(thresholds, CHOSEN_THRESHOLD, "evaluate.threshold_sweep")
        self.min_sizes = sweep_values(min_sizes_mm3, 0.0, "evaluate.min_size_sweep_mm3")
        self.detection = detection
        self.settings = DetectionSettings(threshold=CHOSEN_THRESHOLD, min_size=0.0, size_unit="mm3")
        self._by_threshold = {name: {value: [] for value in self.thresholds} for name in self.class_names}
        self._by_min_size = {name: {value: [] for value in self.min_sizes} for name in self.class_names}
        self.n_cases = 0

    def add_case(self, case_id: str, probabilities: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> None:
        """Detect the components of every class and setting in one case.

        Args:
            probabilities: C×(region) float probabilities in [0, 1] of the evaluated region.
            reference: label map of the region, classes 1..C in the order of ``class_names``.
            spacing: voxel spacing of the region in mm, in the array's axis order.
        """
        if probabilities.shape != (len(self.class_names), *reference.shape):
            raise ValueError(
                f"probabilities of case {case_id!r} have shape {probabilities.shape}; expected "
                f"{(len(self.class_names), *reference.shape)} (classes × reference shape)"
            )
        for c, name in enumerate(self.class_names):
            expected = reference == c + 1
            for value in self.thresholds:
                settings = dataclasses.replace(self.settings, threshold=value)
                self._by_threshold[name][value].append(detect_lesions(probabilities[c], expected, spacing, settings, case_id))
            chosen = self._by_threshold[name][CHOSEN_THRESHOLD][-1]
            for value in self.min_sizes:
                if value == 0.0:
                    detection = chosen
                else:
                    settings = dataclasses.replace(self.settings, min_size=value)
                    detection = detect_lesions(probabilities[c], expected, spacing, settings, case_id)
                self._by_min_size[name][value].append(detection)
        self.n_cases += 1

    def sweep_rows(self) -> dict[str, list[SweepRow]]:
        """Return per class the threshold rows, then the min_size rows (mm³), in ascending order."""
        if self.n_cases == 0:
            raise ValueError("no case was added; call add_case before reading the sweep")
        rows = {}
        for name in self.class_names:
            rows[name] = summarize_sweep("threshold", self._by_threshold[name], CHOSEN_THRESHOLD)
            rows[name] += summarize_sweep("min_size_mm3", self._by_min_size[name], 0.0)
        return rows

    def frocs(self) -> dict[str, FrocResult]:
        """Return the FROC result of each class at the chosen setting."""
        return {name: compute_froc(self._chosen(name)) for name in self.class_names}

    def lesions(self) -> dict[str, list[dict]]:
        """List every reference lesion per class at the chosen setting: size, score and Dice."""
        lesions = {}
        for name in self.class_names:
            lesions[name] = [row for detection in self._chosen(name) for row in _lesion_rows(detection)]
        return lesions

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``threshold_sweep.csv``, and with detection ``detection.json`` and ``froc.png``, into ``folder``."""
        folder = Path(folder)
        paths = [write_sweep_csv(folder / SWEEP_FILENAME, self.sweep_rows(), self.n_cases)]
        if self.detection:
            frocs = self.frocs()
            settings = {**dataclasses.asdict(self.settings), "fp_rates": list(next(iter(frocs.values())).fp_rates)}
            paths.append(write_detection_json(folder, frocs, settings, {}, self.lesions()))
            paths.append(write_froc_figure(folder / FROC_FILENAME, frocs))
        return paths

    def _chosen(self, name: str) -> list[VolumeDetection]:
        return self._by_threshold[name][CHOSEN_THRESHOLD]


def write_sweep_csv(path: str | os.PathLike, rows: dict[str, list[SweepRow]], n_cases: int) -> Path:
    """Write sweep rows of each class as CSV (columns ``SWEEP_COLUMNS``) atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for name, class_rows in rows.items():
        for row in class_rows:
            writer.writerow({"class_name": name, **dataclasses.asdict(row), "n_cases": n_cases})
    path = _write_text_atomically(path, buffer.getvalue(), "path")
    logger.info("wrote %s", path)
    return path


def _lesion_rows(detection: VolumeDetection) -> list[dict]:
    rows = []
    for index in range(detection.n_lesions):
        score = float(detection.lesion_scores[index])
        rows.append(
            {
                "case": detection.case_id,
                "lesion": index + 1,
                "voxels": int(detection.lesion_sizes[index]),
                "detected": bool(np.isfinite(score)),
                "score": score if np.isfinite(score) else None,
                "dice": float(detection.lesion_dice[index]),
            }
        )
    return rows
