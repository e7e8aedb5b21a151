"""Evaluating a trained run: dataset label ids in the tables, a moved data folder, a wrong RUN_DIR."""

import csv
import json
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest

from fmadapt import cli
from fmadapt.config import load_recipe
from fmadapt.evaluate.protocols import run_protocol
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.train.loop import train

from conftest import REPO_ROOT, require_dataset

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

DATASET = "Dataset001_TotalSegCT"
# Recipe order differs from the dataset's label order (spleen is label 1, liver label 5),
# so the recipe's class ids and the dataset's label ids disagree.
LABELS = ["liver", "spleen"]
REDUCED = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=2",
    f"data.labels=[{','.join(LABELS)}]",
]


@pytest.fixture(scope="module")
def ct_run(data_root, tmp_path_factory):
    require_dataset(data_root, DATASET)
    folder = tmp_path_factory.mktemp("ct_ids")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        recipe = load_recipe(REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml", REDUCED)
        yield train(recipe, folder / "run").run_dir


@pytest.fixture(scope="module")
def dataset_label_ids(data_root):
    labels = json.loads((data_root / DATASET / "dataset.json").read_text())["labels"]
    return {name: labels[name] for name in LABELS}


def read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_label_ids(folder, dataset_label_ids):
    rows = read_rows(folder / "per_case.csv")
    assert rows
    for row in rows:
        assert int(row["class_id"]) == LABELS.index(row["class_name"]) + 1
        assert int(row["label_id"]) == dataset_label_ids[row["class_name"]]

    per_class = json.loads((folder / "summary.json").read_text())["per_class"]
    for position, name in enumerate(LABELS, start=1):
        assert per_class[name]["class_id"] == position
        assert per_class[name]["label_id"] == dataset_label_ids[name]

    # The prediction files use the label_id values, never the recipe's class ids.
    for prediction_file in (folder / "predictions").glob("*.nii.gz"):
        values = set(np.unique(np.asarray(nib.load(prediction_file).dataobj)).tolist())
        assert values <= {0, *dataset_label_ids.values()}


def test_automatic_tables_give_label_ids(ct_run, data_root, dataset_label_ids, monkeypatch):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    (result,) = evaluate_run(ct_run, "automatic", overrides=["evaluate.max_cases=1"])
    check_label_ids(result.folder, dataset_label_ids)
    assert any((result.folder / "predictions").glob("*.nii.gz"))


def test_clicks_tables_give_label_ids(ct_run, data_root, dataset_label_ids, monkeypatch):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    (result,) = run_protocol(ct_run, "clicks", overrides=["evaluate.max_cases=1"])
    check_label_ids(result.folder, dataset_label_ids)


def test_evaluate_moved_data_with_data_root(ct_run, data_root, tmp_path, monkeypatch, caplog):
    moved = tmp_path / "moved" / DATASET
    shutil.copytree(data_root / DATASET, moved)
    for path in [moved, *moved.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    monkeypatch.delenv("FMADAPT_DATA", raising=False)
    output = ct_run / "eval_test_automatic"
    shutil.rmtree(output, ignore_errors=True)

    # Without the variable, the error names the override that the next call uses.
    code = cli.main(["evaluate", str(ct_run), "--mode", "automatic", "evaluate.max_cases=1"])
    assert code == 2
    assert "data.root=" in caplog.text
    assert not output.exists()

    caplog.clear()
    code = cli.main(["evaluate", str(ct_run), "--mode", "automatic", f"data.root={moved}", "evaluate.max_cases=1"])
    assert code == 0
    assert "only evaluate.* keys" not in caplog.text
    rows = read_rows(output / "per_case.csv")
    assert sorted(row["class_name"] for row in rows) == sorted(LABELS)


def test_evaluate_rejects_other_data_keys(ct_run, caplog):
    code = cli.main(["evaluate", str(ct_run), "--mode", "automatic", "data.labels=[liver]"])
    assert code == 2
    assert "only evaluate.* keys and data.root" in caplog.text


def test_evaluate_parent_folder_names_run(ct_run, caplog):
    parent = ct_run.parent
    code = cli.main(["evaluate", str(parent), "--mode", "automatic"])
    assert code == 2
    assert f"{parent / 'recipe.yaml'} not found" in caplog.text
    assert f"did you mean {ct_run}?" in caplog.text


def test_evaluate_empty_folder_has_no_suggestion(tmp_path, caplog):
    code = cli.main(["evaluate", str(tmp_path), "--mode", "automatic"])
    assert code == 2
    assert "RUN_DIR must be a folder written by `fmadapt train`" in caplog.text
    assert "did you mean" not in caplog.text
