"""`fmadapt evaluate` split over two CPU processes against the same evaluation in one process."""

import csv
import math
import os
import shutil
import subprocess
import sys

import pytest

from fmadapt.config import load_recipe
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.train.loop import train

from conftest import REPO_ROOT, require_dataset

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

RECIPE = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
WORKER = REPO_ROOT / "tests" / "sharded_evaluation_worker.py"
TINY = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=1",
]
# Five cases over two processes: the last round has a case for rank 0 only.
MAX_CASES = "evaluate.max_cases=5"
MODES = ("automatic", "prompted")
# The recipe's box jitter [0, 10] gives two prompted folders. Jitter 10 checks that every
# process draws the same random box shifts for a case as one process does.
FOLDERS = ("eval_test_automatic", "eval_test_prompted_jitter0", "eval_test_prompted_jitter10")
METRIC_COLUMNS = ("dice", "iou", "nsd", "hd95", "tp", "fp", "fn", "tn", "n_pred", "n_ref")


@pytest.fixture
def trained_run(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    return train(load_recipe(RECIPE, TINY), tmp_path / "run").run_dir


def copy_run(run_dir, target):
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("eval_*"))
    return target


def evaluate_in_two_processes(run_dir, data_root):
    # One launch for both modes, because starting two processes takes most of the test's time.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(WORKER), str(run_dir), ",".join(MODES), MAX_CASES,
    ]
    environment = dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def assert_same_rows(sharded_rows, single_rows):
    assert [row["case"] for row in sharded_rows] == [row["case"] for row in single_rows]
    for sharded, single in zip(sharded_rows, single_rows):
        for column in single:
            if column in METRIC_COLUMNS:
                expected, actual = float(single[column]), float(sharded[column])
                if math.isnan(expected):
                    assert math.isnan(actual), (sharded["case"], column)
                else:
                    assert actual == pytest.approx(expected, abs=1e-6, rel=0), (sharded["case"], column)
            else:
                assert sharded[column] == single[column], (sharded["case"], column)


def test_two_processes_match_one_process(trained_run, data_root, tmp_path):
    single_run = copy_run(trained_run, tmp_path / "single")
    sharded_run = copy_run(trained_run, tmp_path / "sharded")
    for mode in MODES:
        evaluate_run(single_run, mode, overrides=[MAX_CASES])
    evaluate_in_two_processes(sharded_run, data_root)

    for name in FOLDERS:
        single_rows = read_rows(single_run / name / "per_case.csv")
        sharded_rows = read_rows(sharded_run / name / "per_case.csv")
        cases = [row["case"] for row in sharded_rows]
        assert len(cases) == 5, name
        assert len(set(cases)) == 5, name
        assert_same_rows(sharded_rows, single_rows)

        predictions = sorted(path.name for path in (sharded_run / name / "predictions").iterdir())
        assert predictions == sorted(f"{case}.nii.gz" for case in cases)
        assert (sharded_run / name / "overlays.png").is_file()
        assert (sharded_run / name / "report.md").is_file()

    sharded_sweep = (sharded_run / "eval_test_automatic" / "threshold_sweep.csv").read_text()
    single_sweep = (single_run / "eval_test_automatic" / "threshold_sweep.csv").read_text()
    assert sharded_sweep == single_sweep
    assert not list(sharded_run.glob("*.partial"))
