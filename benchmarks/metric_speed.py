"""Time fmadapt's NSD and HD95 against MONAI's on a real CT label volume.

The reference mask is the liver of ``Dataset001_TotalSegCT/labelsTr/ts_ct_full.nii.gz``
(label 5 of the TotalSegmentator ``total`` map). The prediction is the same mask shifted
by a few voxels. Voxels shifted past the array border are dropped, not wrapped around,
because the liver reaches the last axial slice. The spacing comes from the NIfTI header (in mm, array
axis order). Both libraries get the same boolean arrays and spacing.

Compared, each timed as the median of the repetitions after one warm-up call:
- ``fmadapt.evaluate.metrics.hausdorff_distance_95`` against
  ``monai.metrics.compute_hausdorff_distance(percentile=95)``;
- ``fmadapt.evaluate.metrics.normalized_surface_dice`` against
  ``monai.metrics.compute_surface_dice`` with the same tolerance.

Both values are printed so they can be compared directly.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/metric_speed.py --repetitions 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from fmadapt.data.io import read_mask
from fmadapt.evaluate.metrics import hausdorff_distance_95, normalized_surface_dice

logger = logging.getLogger("benchmarks.metric_speed")

DATASET = "Dataset001_TotalSegCT"
LABEL_FILE = "labelsTr/ts_ct_full.nii.gz"
LIVER = 5


def load_liver(data_root: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Return the liver mask (X×Y×Z bool) and its spacing in mm from the TotalSegmentator CT label file."""
    path = data_root / DATASET / LABEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; set FMADAPT_DATA to the folder that contains {DATASET}")
    volume = read_mask(path)
    return volume.array == LIVER, tuple(float(value) for value in volume.spacing)


def shift_mask(mask: np.ndarray, shift: tuple[int, ...]) -> np.ndarray:
    """Return ``mask`` moved by ``shift`` voxels per axis, dropping voxels moved past the border."""
    shifted = np.zeros_like(mask)
    source = []
    target = []
    for offset, size in zip(shift, mask.shape):
        source.append(slice(max(0, -offset), min(size, size - offset)))
        target.append(slice(max(0, offset), min(size, size + offset)))
    shifted[tuple(target)] = mask[tuple(source)]
    return shifted


def median_seconds(function, repetitions: int) -> tuple[float, object]:
    """Run ``function`` once to warm up and then ``repetitions`` times, and return the median wall time and the last value."""
    value = function()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def as_monai_batch(mask: np.ndarray) -> torch.Tensor:
    """Return a boolean X×Y×Z mask as MONAI's one-hot 1×2×X×Y×Z tensor (background, foreground)."""
    foreground = torch.from_numpy(mask)
    return torch.stack([~foreground, foreground]).unsqueeze(0)


def run(data_root: Path, shift: tuple[int, ...], tolerance_mm: float, repetitions: int) -> dict[str, object]:
    reference, spacing = load_liver(data_root)
    prediction = shift_mask(reference, shift)
    reference_batch = as_monai_batch(reference)
    prediction_batch = as_monai_batch(prediction)

    def monai_hd95() -> float:
        distance = compute_hausdorff_distance(
            prediction_batch, reference_batch, include_background=False, percentile=95, spacing=list(spacing)
        )
        return float(distance[0, 0])

    def monai_nsd() -> float:
        dice = compute_surface_dice(
            prediction_batch,
            reference_batch,
            class_thresholds=[tolerance_mm],
            include_background=False,
            spacing=list(spacing),
        )
        return float(dice[0, 0])

    timings = {
        "hd95": {
            "fmadapt": median_seconds(lambda: hausdorff_distance_95(prediction, reference, spacing), repetitions),
            "monai": median_seconds(monai_hd95, repetitions),
        },
        "nsd": {
            "fmadapt": median_seconds(
                lambda: normalized_surface_dice(prediction, reference, spacing, tolerance_mm), repetitions
            ),
            "monai": median_seconds(monai_nsd, repetitions),
        },
    }
    metrics = {}
    for metric, sides in timings.items():
        fmadapt_seconds, fmadapt_value = sides["fmadapt"]
        monai_seconds, monai_value = sides["monai"]
        metrics[metric] = {
            "fmadapt_value": fmadapt_value,
            "monai_value": monai_value,
            "absolute_difference": abs(fmadapt_value - monai_value),
            "fmadapt_seconds": fmadapt_seconds,
            "monai_seconds": monai_seconds,
            "speedup_of_fmadapt": monai_seconds / fmadapt_seconds,
        }
    return {
        "volume_shape": list(reference.shape),
        "spacing_mm": list(spacing),
        "reference_voxels": int(reference.sum()),
        "prediction_voxels": int(prediction.sum()),
        "shift_voxels": list(shift),
        "tolerance_mm": tolerance_mm,
        "repetitions": repetitions,
        "metrics": metrics,
    }


def machine_description() -> dict[str, object]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5, help="timed calls per metric and library after one warm-up call")
    parser.add_argument(
        "--shift", type=int, nargs=3, default=(2, -1, 1), help="voxels the prediction is shifted along each array axis"
    )
    parser.add_argument("--tolerance-mm", type=float, default=3.0, help="NSD tolerance in mm")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_root = Path(os.environ.get("FMADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    results = run(data_root, tuple(arguments.shift), arguments.tolerance_mm, arguments.repetitions)
    results["command"] = " ".join(sys.argv)
    results["machine"] = machine_description()
    text = json.dumps(results, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
