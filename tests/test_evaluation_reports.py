"""Reports, overlays, threshold sweeps and lesion detection written by evaluations of real runs."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fmadapt.config import EvaluateConfig, load_recipe
from fmadapt.errors import RecipeError
from fmadapt.evaluate.protocols import ProtocolSettings, run_protocol
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.evaluate.sweeps import ProbabilitySweeps, probabilities_from_logits
from fmadapt.train.loop import train

from conftest import REPO_ROOT, require_dataset

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

REDUCED = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=2",
]

BRAIN_RECIPE = """\
name: brain_lesion_detection
seed: 0
data:
  root: $FMADAPT_DATA/Dataset003_PyRadiomicsBrainMR
  labels: [lesion]
  axis: 2
  min_foreground_pixels: 5
  intensity:
    mode: percentile
  split:
    mode: cases
    train: 1
    validation: 0
adaptation:
  method: lora
  preset: adapters_decoder
evaluate:
  detection: true
  min_size_sweep_mm3: [20.0, 200.0]
"""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPTION_HEIGHT = 18
PANEL_SIZE = 256


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def finite_mean(values):
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite))


def ranked_cases(folder):
    dice = {row["case"]: float(row["dice"]) for row in read_rows(folder / "per_case.csv")}
    ordered = sorted(dice, key=lambda case: (dice[case], case))
    ranked = {"worst": ordered[0], "median": ordered[(len(ordered) - 1) // 2], "best": ordered[-1]}
    return ranked, dice


def check_overlays(folder, panel_heights):
    """Check overlays.png and the report; ``panel_heights`` maps a case id to its panel height in px."""
    path = folder / "overlays.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    figure = Image.open(path)
    ranked, dice = ranked_cases(folder)
    # One row each for the worst, median and best case: a caption above three panels.
    assert figure.height == sum(CAPTION_HEIGHT + panel_heights[case] for case in ranked.values())
    assert figure.width <= 3 * PANEL_SIZE
    report = (folder / "report.md").read_text()
    assert "![overlays.png](overlays.png)" in report
    for rank, case in ranked.items():
        assert f"- {rank}: {case} (Dice {dice[case]:.3f})" in report
    return report


def kvasir_panel_heights(data_root):
    """Panels scale the longer image side to 256 px, so a H×W photo gives round(H * 256 / max(H, W))."""
    heights = {}
    for path in (data_root / "2D_KvasirSEG_polyp" / "images").iterdir():
        width, height = Image.open(path).size
        heights[path.stem] = round(height * PANEL_SIZE / max(height, width))
    return heights


@pytest.fixture(scope="module")
def kvasir_run(data_root, tmp_path_factory):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    folder = tmp_path_factory.mktemp("kvasir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        recipe = load_recipe(REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml", REDUCED)
        yield train(recipe, folder / "run").run_dir


@pytest.fixture(scope="module")
def brain_run(data_root, tmp_path_factory):
    require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    folder = tmp_path_factory.mktemp("brain")
    recipe_path = folder / "brain.yaml"
    recipe_path.write_text(BRAIN_RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        recipe = load_recipe(recipe_path, REDUCED)
        yield train(recipe, folder / "run").run_dir


def test_kvasir_automatic_report_and_sweep(kvasir_run, data_root):
    (result,) = evaluate_run(kvasir_run, "automatic", overrides=["evaluate.max_cases=4"])
    folder = result.folder
    report = check_overlays(folder, kvasir_panel_heights(data_root))
    assert "- probability_threshold: `0.5`" in report
    assert "## Probability cut-off and small-component removal" in report
    assert "| threshold = 0.5 (chosen) |" in report
    assert not (folder / "detection.json").exists()
    assert not (folder / "froc.png").exists()

    per_case_dice = [float(row["dice"]) for row in read_rows(folder / "per_case.csv")]
    sweep = read_rows(folder / "threshold_sweep.csv")
    thresholds = [float(row["value"]) for row in sweep if row["parameter"] == "threshold"]
    assert thresholds == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sizes = [float(row["value"]) for row in sweep if row["parameter"] == "min_size_mm3"]
    assert sizes == [0.0, 10.0, 50.0, 100.0, 500.0]
    chosen = [row for row in sweep if row["chosen"] == "True"]
    assert [(row["parameter"], float(row["value"])) for row in chosen] == [("threshold", 0.5), ("min_size_mm3", 0.0)]
    for row in chosen:
        assert float(row["mean_voxel_dice"]) == pytest.approx(finite_mean(per_case_dice), abs=1e-12)
        assert row["n_cases"] == "4"


def test_kvasir_prompted_and_clicks_reports(kvasir_run, data_root):
    heights = kvasir_panel_heights(data_root)
    (prompted,) = evaluate_run(kvasir_run, "prompted", overrides=["evaluate.max_cases=3", "evaluate.box_jitter=[0]"])
    report = check_overlays(prompted.folder, heights)
    assert "- mode: `\"prompted\"`" in report
    assert not (prompted.folder / "threshold_sweep.csv").exists()

    settings = ProtocolSettings(num_positive=2)
    (clicks,) = run_protocol(kvasir_run, "clicks", overrides=["evaluate.max_cases=3"], settings=settings)
    report = check_overlays(clicks.folder, heights)
    assert "- num_positive: `2`" in report
    assert not list(kvasir_run.glob("*.partial"))


def test_brain_automatic_detection(brain_run, data_root):
    (result,) = evaluate_run(brain_run, "automatic")
    folder = result.folder
    # Axial slices of the 256×256×Z volumes fill a 256 px panel.
    report = check_overlays(folder, {"brain1": PANEL_SIZE, "brain2": PANEL_SIZE})
    assert "## Lesion detection" in report
    assert "![froc.png](froc.png)" in report
    assert (folder / "froc.png").read_bytes()[:8] == PNG_SIGNATURE

    (case_id,) = {row["case"] for row in read_rows(folder / "per_case.csv")}
    label = np.asarray(nib.load(data_root / "Dataset003_PyRadiomicsBrainMR" / "labelsTr" / f"{case_id}.nii.gz").dataobj)
    _, n_lesions = ndimage.label(label == 1)

    detection = json.loads((folder / "detection.json").read_text())
    lesion = detection["labels"]["lesion"]
    assert list(lesion["sensitivity_at_fp_per_volume"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    for value in lesion["sensitivity_at_fp_per_volume"].values():
        assert 0.0 <= value <= 1.0
    assert lesion["n_volumes"] == 1
    assert lesion["n_lesions"] == n_lesions
    entries = detection["lesions"]["lesion"]
    assert sorted(entry["voxels"] for entry in entries) == sorted(np.bincount(ndimage.label(label == 1)[0].ravel())[1:])
    assert lesion["mean_lesion_dice"] == pytest.approx(np.mean([entry["dice"] for entry in entries]))
    n_detected = sum(entry["detected"] for entry in entries)
    assert lesion["n_detected"] == n_detected
    # At the chosen cut every kept component is on the curve, so no rate exceeds the final sensitivity.
    assert lesion["sensitivity_at_fp_per_volume"]["8"] <= n_detected / n_lesions
    assert detection["settings"]["threshold"] == 0.5
    assert detection["settings"]["size_unit"] == "mm3"

    sweep = read_rows(folder / "threshold_sweep.csv")
    sizes = [float(row["value"]) for row in sweep if row["parameter"] == "min_size_mm3"]
    assert sizes == [0.0, 20.0, 200.0]
    (per_case,) = read_rows(folder / "per_case.csv")
    chosen = [row for row in sweep if row["chosen"] == "True"]
    for row in chosen:
        assert float(row["mean_voxel_dice"]) == pytest.approx(float(per_case["dice"]), abs=1e-12)


def test_float16_probabilities_cut_like_logits():
    logits = torch.tensor([[[-1e-4, 0.0, 1e-9, 2.0, -2.0, -3e-4]]])
    probabilities = probabilities_from_logits(logits)
    assert probabilities.dtype == np.float16
    assert (probabilities >= 0.5).tolist() == (logits > 0).numpy().tolist()
    # sigmoid(2) = 0.8808 and sigmoid(-2) = 0.1192, to float16 precision (2^-11 near 0.5..1).
    assert float(probabilities[0, 0, 3]) == pytest.approx(0.8808, abs=5e-4)
    assert float(probabilities[0, 0, 4]) == pytest.approx(0.1192, abs=5e-4)


def test_sweep_rows_of_hand_made_case(tmp_path):
    reference = np.zeros((10, 10), np.uint8)
    reference[0:4, 0:4] = 1
    probabilities = np.zeros((1, 10, 10), np.float16)
    probabilities[0, 0:4, 0:2] = 0.9  # 8 pixels inside the lesion
    probabilities[0, 0:4, 2:4] = 0.4  # the other 8 lesion pixels
    probabilities[0, 8, 8:10] = 0.7  # a 2-pixel false positive
    sweeps = ProbabilitySweeps(["lesion"], [0.3, 0.8], [5.0], detection=True)
    sweeps.add_case("a", probabilities, reference, (2.0, 1.0))
    rows = {(row.parameter, row.value): row for row in sweeps.sweep_rows()["lesion"]}

    # Cut 0.3: 16 lesion pixels + 2 false-positive pixels, Dice 2*16/(18+16).
    assert rows[("threshold", 0.3)].mean_voxel_dice == pytest.approx(32 / 34)
    # Cut 0.5 (chosen): 8 lesion pixels + 2, Dice 2*8/(10+16).
    assert rows[("threshold", 0.5)].chosen
    assert rows[("threshold", 0.5)].mean_voxel_dice == pytest.approx(16 / 26)
    assert rows[("threshold", 0.5)].fp_per_volume == 1.0
    # Cut 0.8: only the 8 pixels at 0.9, Dice 2*8/(8+16).
    assert rows[("threshold", 0.8)].mean_voxel_dice == pytest.approx(16 / 24)
    assert rows[("threshold", 0.8)].fp_per_volume == 0.0
    # With spacing 2 × 1 the false positive measures 2 * 2 = 4 < 5 and is removed, while the
    # lesion's 8-pixel component (16) stays: Dice 2*8/(8+16).
    assert rows[("min_size_mm3", 5.0)].mean_voxel_dice == pytest.approx(16 / 24)
    assert rows[("min_size_mm3", 5.0)].fp_per_volume == 0.0
    assert rows[("min_size_mm3", 0.0)].chosen

    paths = sweeps.write(tmp_path)
    assert [path.name for path in paths] == ["threshold_sweep.csv", "detection.json", "froc.png"]
    detection = json.loads((tmp_path / "detection.json").read_text())
    (lesion,) = detection["lesions"]["lesion"]
    assert lesion == {"case": "a", "lesion": 1, "voxels": 16, "detected": True, "score": pytest.approx(0.9, abs=1e-3), "dice": pytest.approx(16 / 24)}


def test_sweep_settings_in_recipe(tmp_path):
    assert EvaluateConfig().detection is False
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text("data:\n  labels: [a]\n")
    with pytest.raises(RecipeError, match="evaluate.threshold_sweep"):
        load_recipe(recipe_path, ["evaluate.threshold_sweep=[0.0, 0.5]"])
    with pytest.raises(RecipeError, match="evaluate.min_size_sweep_mm3"):
        load_recipe(recipe_path, ["evaluate.min_size_sweep_mm3=[-1]"])
    recipe = load_recipe(recipe_path, ["evaluate.detection=true", "evaluate.min_size_sweep_mm3=[5]"])
    assert recipe.evaluate.detection is True
    assert recipe.evaluate.min_size_sweep_mm3 == [5.0]
