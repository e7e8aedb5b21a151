"""Prompt protocols split over two CPU processes against the same evaluation in one process."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fmadapt.config import load_recipe
from fmadapt.evaluate.protocols import ProtocolSettings, run_protocol
from fmadapt.train.loop import train
from fmadapt.train.splits import SplitPlan

from conftest import require_dataset
from sharded_runs import assert_same_rows, launch_worker, read_rows, start_worker_processes

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

SOURCE = "Dataset001_TotalSegCT"
SOURCE_CASE = "ts_ct_full"
DATASET = "CTBlocks"
# Four 12-slice blocks of one CT volume, stored as four cases. They come from one subject,
# which does not matter here: the tests compare one process with two, not model quality.
# iliopsoas_left ends at slice 95, so it covers one slice of block_d and checks a nearly absent class.
BLOCKS = {"block_a": (20, 32), "block_b": (45, 57), "block_c": (70, 82), "block_d": (95, 107)}
RECIPE = """\
name: ct_blocks
seed: 0
data:
  root: $FMADAPT_DATA/CTBlocks
  labels: [colon, iliopsoas_left]
  axis: 2
  min_foreground_pixels: 5
  intensity:
    mode: ct_window
    window: soft_tissue
  split:
    mode: cases
    train: 1
    validation: 0
model:
  name: sam_vit_tiny
  image_size: 128
adaptation:
  method: lora
  preset: adapters_decoder
train:
  epochs: 1
  steps_per_epoch: 2
  batch_size: 1
  max_validation_slices: 1
evaluate:
  nsd_tolerance_mm: 3.0
"""
# Random first clicks and box noise make every mode draw random numbers, so the test checks
# that each case gets the same draws in two processes as in one.
SETTINGS = {
    "seed": 3,
    "box_jitter": [3.0],
    "click_mode": "random",
    "num_negative": 1,
    "num_interactions": 2,
    "margin": 1.0,
}
FOLDERS = {
    "clicks": "eval_test_clicks",
    "iterative": "eval_test_iterative_jitter3",
    "propagate3d": "eval_test_propagate3d_jitter3",
}


@pytest.fixture(scope="module")
def blocks_root(data_root, tmp_path_factory):
    """A data folder whose CTBlocks dataset holds the four blocks as nnU-Net cases."""
    source = require_dataset(data_root, SOURCE)
    root = tmp_path_factory.mktemp("data")
    dataset = root / DATASET
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    image = nib.load(source / "imagesTr" / f"{SOURCE_CASE}_0000.nii.gz")
    label = nib.load(source / "labelsTr" / f"{SOURCE_CASE}.nii.gz")
    for case_id, (start, stop) in BLOCKS.items():
        nib.save(image.slicer[:, :, start:stop], dataset / "imagesTr" / f"{case_id}_0000.nii.gz")
        nib.save(label.slicer[:, :, start:stop], dataset / "labelsTr" / f"{case_id}.nii.gz")
    description = json.loads((source / "dataset.json").read_text())
    description = {key: description[key] for key in ("channel_names", "labels", "file_ending")}
    description |= {"name": DATASET, "numTraining": len(BLOCKS)}
    (dataset / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.fixture(scope="module")
def trained_run(blocks_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocks_run")
    recipe_path = folder / "ct_blocks.yaml"
    recipe_path.write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(blocks_root))
        yield train(load_recipe(recipe_path), folder / "run").run_dir


def copy_run(run_dir, target):
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("eval_*"))
    return target


def test_protocols_two_processes_match_one(trained_run, blocks_root, tmp_path, monkeypatch):
    single_run = copy_run(trained_run, tmp_path / "single")
    sharded_run = copy_run(trained_run, tmp_path / "sharded")
    monkeypatch.setenv("FMADAPT_DATA", str(blocks_root))
    for mode in FOLDERS:
        run_protocol(single_run, mode, settings=ProtocolSettings(**SETTINGS))
    # One launch for every mode, because starting two processes takes most of the test's time.
    launch_worker([sharded_run, ",".join(FOLDERS), "--protocol", json.dumps(SETTINGS)], blocks_root)

    test_cases = SplitPlan.load(trained_run / "split.json").cases["test"]
    assert len(test_cases) == 3  # rank 0 gets cases 0 and 2, rank 1 gets case 1
    for mode, name in FOLDERS.items():
        single, sharded = single_run / name, sharded_run / name
        sharded_rows = read_rows(sharded / "per_case.csv")
        assert [row["case"] for row in sharded_rows] == [case for case in test_cases for _ in range(2)], name
        assert_same_rows(sharded_rows, read_rows(single / "per_case.csv"))

        single_protocol = json.loads((single / "protocol.json").read_text())
        assert json.loads((sharded / "protocol.json").read_text()) == single_protocol
        assert single_protocol["cases"] == test_cases

        predictions = sorted(path.name for path in (sharded / "predictions").iterdir())
        assert predictions == sorted(f"{case}.nii.gz" for case in test_cases), name
        for file_name in predictions:
            sharded_labels = np.asarray(nib.load(sharded / "predictions" / file_name).dataobj)
            single_labels = np.asarray(nib.load(single / "predictions" / file_name).dataobj)
            assert np.array_equal(sharded_labels, single_labels), (name, file_name)
        assert (sharded / "overlays.png").is_file()
        assert (sharded / "report.md").is_file()

    curve_columns = ("dice_1", "dice_2", "auc")
    curves = "eval_test_iterative_jitter3/dice_per_interaction.csv"
    assert_same_rows(read_rows(sharded_run / curves), read_rows(single_run / curves), curve_columns)
    propagation = "eval_test_propagate3d_jitter3/propagation.csv"
    assert read_rows(sharded_run / propagation) == read_rows(single_run / propagation)
    assert len(read_rows(sharded_run / propagation)) > 0
    assert not list(sharded_run.glob("*.partial"))


def test_invalid_case_file_stops_both_processes(trained_run, blocks_root, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    broken_root = tmp_path / "data"
    shutil.copytree(blocks_root, broken_root)
    case = SplitPlan.load(run / "split.json").cases["test"][1]  # scored by rank 1
    label_path = broken_root / DATASET / "labelsTr" / f"{case}.nii.gz"
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 200  # a label value that dataset.json does not list
    nib.save(nib.Nifti1Image(values, label.affine, label.header), label_path)

    arguments = [run, "clicks", "--protocol", json.dumps(SETTINGS)]
    outcomes = start_worker_processes(arguments, broken_root, {}, tmp_path)

    for rank, outcome in enumerate(outcomes):
        assert outcome.returncode != 0, f"process {rank} exited with 0"
        assert "ShardedEvaluationError" in outcome.stderr, outcome.stderr[-3000:]
        assert f"process 1 of 2 failed on case {case}: DataError" in outcome.stderr, outcome.stderr[-3000:]
        assert "200" in outcome.stderr
    assert not list(run.glob("*.partial"))
    assert not list(run.glob("eval_*"))
