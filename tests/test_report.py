"""report.md, overlay and FROC figures written from evaluation folders made here."""

import math

import numpy as np
import pytest
from PIL import Image

from fmadapt.evaluate.detection import DetectionCase, compute_froc, detect_cases
from fmadapt.evaluate.report import OverlayCase, rank_cases, write_froc_figure, write_overlay_figure, write_report
from fmadapt.evaluate.results import MetricTable


def metric_row(dice):
    return {
        "class_name": "lesion", "class_id": 1, "dice": dice, "iou": dice, "nsd": dice, "hd95": 2.0,
        "tp": 1, "fp": 0, "fn": 0, "tn": 1, "n_pred": 1, "n_ref": 1,
    }  # fmt: skip


def test_rank_cases_worst_median_best():
    rows = [
        {"case": "a", "dice": "0.9"}, {"case": "b", "dice": "0.1"}, {"case": "c", "dice": "0.5"},
        {"case": "d", "dice": "nan"},
    ]  # fmt: skip
    assert rank_cases(rows) == {"worst": "b", "median": "c", "best": "a"}
    hd95_rows = [{"case": "a", "hd95": "inf"}, {"case": "b", "hd95": "1.0"}, {"case": "c", "hd95": "3.0"}]
    assert rank_cases(hd95_rows, "hd95") == {"worst": "a", "median": "c", "best": "b"}


def test_report_lists_settings_metrics_and_figures(tmp_path):
    folder = tmp_path / "run" / "eval_test_automatic"
    table = MetricTable()
    table.add_case("a", [metric_row(0.5)], mode="automatic")
    table.add_case("b", [metric_row(1.0)], mode="automatic")
    table.write(folder)
    (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
    Image.new("RGB", (4, 4)).save(folder / "froc.png")

    text = write_report(folder).read_text()
    assert "- mode: automatic" in text
    assert "[../recipe.yaml](../recipe.yaml)" in text
    # Mean Dice (0.5 + 1.0) / 2.
    assert "| lesion | 0.750 | 0.750 | 0.750 | 2.000 | 2 |" in text
    assert "- worst: a" in text
    assert "![froc.png](froc.png)" in text
    assert "overlays.png" not in text


def test_report_needs_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(tmp_path)


def test_overlay_figure_colours_reference_and_prediction(tmp_path):
    image = np.zeros((8, 8, 3))
    reference = np.zeros((8, 8, 3), np.uint8)
    reference[2:4, 2:4, 1] = 1
    prediction = np.zeros_like(reference)
    prediction[5:7, 5:7, 1] = 1
    path = write_overlay_figure(tmp_path / "overlays.png", [OverlayCase("a", image, reference, prediction)] * 2)
    figure = np.asarray(Image.open(path))
    # Each row is 18 px of caption and a 256 px panel; three panels of 256 px side by side.
    assert figure.shape == (2 * (256 + 18), 3 * 256, 3)
    # A volume is shown at its slice with most reference voxels (z=1), rotated so y points up:
    # reference voxel (x=2, y=2) lands at row 8-1-2=5, column 2 of the 8×8 slice (32 px per voxel).
    reference_pixel = figure[18 + 5 * 32 + 16, 256 + 2 * 32 + 16]
    assert tuple(reference_pixel) == (0, 100, 0)
    prediction_pixel = figure[18 + 1 * 32 + 16, 512 + 5 * 32 + 16]
    assert tuple(prediction_pixel) == (115, 20, 20)


def test_froc_figure_is_png(tmp_path):
    reference = np.zeros((10, 10), bool)
    reference[0:3, 0:3] = True
    probabilities = np.zeros((10, 10))
    probabilities[0:3, 0:3] = 0.8
    probabilities[6:8, 6:8] = 0.7
    froc = compute_froc(detect_cases([DetectionCase("a", reference, probabilities)]))
    path = write_froc_figure(tmp_path / "sub" / "froc.png", {"lesion": froc})
    figure = Image.open(path)
    assert figure.size == (640, 440)
    assert not math.isnan(froc.average_sensitivity)
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary file left
