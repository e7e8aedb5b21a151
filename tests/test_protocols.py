"""Prompt protocols on trained runs of real data: 3D propagation, iterative correction, clicks."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fmadapt.cli import main
from fmadapt.config import load_recipe
from fmadapt.evaluate.figures import plot_dice_curves
from fmadapt.evaluate.protocols import ProtocolSettings, noisy_box, run_protocol
from fmadapt.evaluate.runner import evaluate_run
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
name: brain_lesion
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
  nsd_tolerance_mm: 2.0
"""


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


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


@pytest.fixture(scope="module")
def ct_run(data_root, tmp_path_factory):
    require_dataset(data_root, "Dataset001_TotalSegCT")
    folder = tmp_path_factory.mktemp("ct")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        overrides = REDUCED + ["data.labels=[kidney_right,kidney_left]", "data.split.train=4"]
        recipe = load_recipe(REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml", overrides)
        yield train(recipe, folder / "run").run_dir


def test_noisy_box_levels():
    rng = np.random.default_rng(0)
    box = np.array([10, 10, 29, 19], dtype=np.float32)  # 20 pixels wide, 10 high
    assert noisy_box(box, (64, 64), 0.0, "fraction", rng).tolist() == box.tolist()
    for _ in range(50):
        shifted = noisy_box(box, (64, 64), 0.1, "fraction", rng)
        assert np.all(np.abs(shifted[[0, 2]] - box[[0, 2]]) <= 2.0)
        assert np.all(np.abs(shifted[[1, 3]] - box[[1, 3]]) <= 1.0)
        shifted = noisy_box(box, (64, 64), 3.0, "pixels", rng)
        assert np.all(np.abs(shifted - box) <= 3.0)
    first = noisy_box(box, (64, 64), 0.2, "fraction", np.random.default_rng(5))
    second = noisy_box(box, (64, 64), 0.2, "fraction", np.random.default_rng(5))
    assert first.tolist() == second.tolist()


def test_noisy_box_clips_to_image():
    box = np.array([0, 0, 9, 9], dtype=np.float32)
    for seed in range(20):
        shifted = noisy_box(box, (10, 10), 0.5, "fraction", np.random.default_rng(seed))
        assert shifted.min() >= 0
        assert shifted.max() <= 9
        assert shifted[0] <= shifted[2]
        assert shifted[1] <= shifted[3]


def test_settings_reject_invalid_values():
    with pytest.raises(ValueError, match="jitter_unit"):
        ProtocolSettings(jitter_unit="mm")
    with pytest.raises(ValueError, match="box_jitter"):
        ProtocolSettings(box_jitter=(-1.0,))
    with pytest.raises(ValueError, match="num_interactions"):
        ProtocolSettings(num_interactions=0)
    with pytest.raises(ValueError, match="at least one click"):
        ProtocolSettings(num_positive=0, num_negative=0)


def test_figure_draws_each_series(tmp_path):
    path = plot_dice_curves({"liver": [0.2, 0.5, 0.9], "spleen": [0.1, float("nan"), 0.4]}, tmp_path / "curve.png")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=100000)}
    assert (0x1F, 0x77, 0xB4) in colours  # first series
    assert (0xFF, 0x7F, 0x0E) in colours  # second series
    with pytest.raises(ValueError, match="same number"):
        plot_dice_curves({"a": [0.1], "b": [0.1, 0.2]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_propagation_on_brain_lesion(brain_run, data_root):
    settings = ProtocolSettings(box_jitter=(0.1,), jitter_unit="fraction", margin=2.0)
    results = evaluate_run(brain_run, "propagate3d", protocol=settings)
    assert [r.folder.name for r in results] == ["eval_test_propagate3d_jitter0.1frac"]

    for result in results:
        (row,) = read_rows(result.folder / "per_case.csv")
        assert row["class_name"] == "lesion"
        assert 0.0 <= float(row["dice"]) <= 1.0
        assert 0.0 <= float(row["nsd"]) <= 1.0
        assert float(row["hd95"]) >= 0.0
        assert row["prompts"] == "1"

        (propagated,) = read_rows(result.folder / "propagation.csv")
        assert propagated["prompts_used"] == "1"
        assert propagated["label_id"] == row["label_id"] == "1"
        case_id = propagated["case"]
        label = np.asarray(nib.load(data_root / "Dataset003_PyRadiomicsBrainMR" / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        areas = np.count_nonzero(label == 1, axis=(0, 1))
        assert int(propagated["key_slice"]) == int(np.argmax(areas))
        assert int(propagated["reference_first_slice"]) == int(np.flatnonzero(areas)[0])
        if propagated["first_slice"]:
            assert int(propagated["first_slice"]) <= int(propagated["key_slice"]) <= int(propagated["last_slice"])

        written = nib.load(result.folder / "predictions" / f"{case_id}.nii.gz")
        assert written.shape == label.shape
        protocol = json.loads((result.folder / "protocol.json").read_text())
        assert protocol["seed"] == 0
        assert protocol["margin"] == 2.0
        assert protocol["jitter_unit"] == "fraction"
        assert protocol["jitter"] == result.jitter
        assert protocol["key_slice"] == "largest"


def test_iterative_on_ct_organs(ct_run, data_root):
    settings = ProtocolSettings(num_interactions=3)
    (result,) = run_protocol(ct_run, "iterative", settings=settings, overrides=["evaluate.write_predictions=false"])
    assert result.folder.name == "eval_test_iterative_jitter0"

    curves = read_rows(result.folder / "dice_per_interaction.csv")
    assert [row["class_name"] for row in curves] == ["kidney_right", "kidney_left"]
    dataset_labels = json.loads((data_root / "Dataset001_TotalSegCT" / "dataset.json").read_text())["labels"]
    per_case = {row["class_name"]: row for row in read_rows(result.folder / "per_case.csv")}
    for row in curves:
        values = [float(row[f"dice_{k}"]) for k in (1, 2, 3)]
        assert all(0.0 <= value <= 1.0 for value in values)
        assert float(row["auc"]) == pytest.approx(sum(values) / 3)
        assert int(row["objects"]) > 0
        assert float(per_case[row["class_name"]]["dice"]) == pytest.approx(values[-1])
        assert row["label_id"] == per_case[row["class_name"]]["label_id"]
        assert row["label_id"] == str(dataset_labels[row["class_name"]])

    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["dice_per_interaction"]["interactions"] == [1, 2, 3]
    assert len(summary["dice_per_interaction"]["mean"]) == 3
    figure = result.folder / "dice_per_interaction.png"
    assert figure.stat().st_size > 0
    with Image.open(figure) as image:
        image.verify()
        assert image.format == "PNG"
        assert image.size[0] > 0
    protocol = json.loads((result.folder / "protocol.json").read_text())
    assert protocol["num_interactions"] == 3
    assert protocol["start"] == "box"
    assert protocol["feed_logits"] is True


def test_clicks_from_cli_repeat_exactly(ct_run):
    code = main([
        "evaluate", str(ct_run), "--mode", "clicks", "--click-mode", "random", "--negative-clicks", "1",
        "--seed", "7", "evaluate.write_predictions=false",
    ])
    assert code == 0
    folder = ct_run / "eval_test_clicks"
    protocol = json.loads((folder / "protocol.json").read_text())
    assert protocol["seed"] == 7
    assert protocol["click_mode"] == "random"
    assert protocol["num_positive"] == 1
    assert protocol["num_negative"] == 1
    rows = read_rows(folder / "per_case.csv")
    assert [row["clicks"] for row in rows] == ["2", "2"]
    assert all(math.isfinite(float(row["dice"])) for row in rows)
    first_metrics = (folder / "per_case.csv").read_text()

    overrides = ["evaluate.write_predictions=false"]
    settings = ProtocolSettings(num_negative=1, click_mode="random", seed=7)
    (again,) = run_protocol(ct_run, "clicks", settings=settings, overrides=overrides)
    assert (again.folder / "per_case.csv").read_text() == first_metrics
    (other,) = run_protocol(ct_run, "clicks", settings=ProtocolSettings(num_negative=1, click_mode="random", seed=8), overrides=overrides)
    assert (other.folder / "per_case.csv").read_text() != first_metrics
    assert not list(ct_run.glob("*.partial"))
