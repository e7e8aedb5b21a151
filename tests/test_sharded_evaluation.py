"""`fmadapt evaluate` split over two CPU processes against the same evaluation in one process."""

import shutil

import pytest

from fmadapt.config import load_recipe
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.train.loop import train
from fmadapt.train.splits import SplitPlan

from conftest import REPO_ROOT, require_dataset
from sharded_evaluation_worker import INJECTED_MESSAGE
from sharded_runs import assert_same_rows, launch_worker, read_rows, start_worker_processes

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

RECIPE = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
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


@pytest.fixture
def trained_run(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    return train(load_recipe(RECIPE, TINY), tmp_path / "run").run_dir


def copy_run(run_dir, target):
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("eval_*"))
    return target


def test_two_processes_match_one_process(trained_run, data_root, tmp_path):
    single_run = copy_run(trained_run, tmp_path / "single")
    sharded_run = copy_run(trained_run, tmp_path / "sharded")
    for mode in MODES:
        evaluate_run(single_run, mode, overrides=[MAX_CASES])
    # One launch for both modes, because starting two processes takes most of the test's time.
    launch_worker([sharded_run, ",".join(MODES), MAX_CASES], data_root)

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


def test_failing_main_process_stops_both(trained_run, data_root, tmp_path):
    run = copy_run(trained_run, tmp_path / "failing")
    case = SplitPlan.load(run / "split.json").cases["test"][2]  # rank 0 scores cases 0, 2 and 4
    environment = {"FMADAPT_TEST_FAIL_CASE": case, "FMADAPT_TEST_FAIL_RANK": "0"}
    outcomes = start_worker_processes([run, "automatic", MAX_CASES], data_root, environment, tmp_path)

    for rank, outcome in enumerate(outcomes):
        assert outcome.returncode != 0, f"process {rank} exited with 0"
        assert "ShardedEvaluationError" in outcome.stderr, outcome.stderr[-3000:]
        assert f"process 0 of 2 failed on case {case}: RuntimeError: {INJECTED_MESSAGE}" in outcome.stderr
    assert not list(run.glob("*.partial"))
    assert not list(run.glob("eval_*"))
