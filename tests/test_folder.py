"""evaluate-folder: nnU-Net-style summary.json, case matching, splits and labels, on files made here."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from fmadapt import cli
from fmadapt.errors import DataError
from fmadapt.evaluate.folder import evaluate_folder, fold_validation_cases, read_nnunet_splits

SHAPE = (6, 4, 2)
SPACING = (1.0, 1.0, 2.0)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))


def make_dataset(root, with_dataset_json=True):
    """Two cases in nnU-Net layout, labels liver=1 and tumor=2.

    caseA: liver is x 0-3 in the reference and x 2-5 in the prediction (a line at y=0, z=0);
    tumor is 2 reference voxels that the prediction misses.
    caseB: liver is the same 3 voxels in both files; tumor is absent from both.
    """
    reference_a = np.zeros(SHAPE)
    reference_a[0:4, 0, 0] = 1
    reference_a[0:2, 3, 1] = 2
    prediction_a = np.zeros(SHAPE)
    prediction_a[2:6, 0, 0] = 1
    reference_b = np.zeros(SHAPE)
    reference_b[0:3, 2, 0] = 1

    save(root / "labelsTr" / "caseA.nii.gz", reference_a)
    save(root / "labelsTr" / "caseB.nii.gz", reference_b)
    save(root / "predictions" / "caseA.nii.gz", prediction_a)
    save(root / "predictions" / "caseB.nii.gz", reference_b)
    for case_id, reference in (("caseA", reference_a), ("caseB", reference_b)):
        save(root / "imagesTr" / f"{case_id}_0000.nii.gz", reference * 50 + 10)
    if with_dataset_json:
        labels = {"background": 0, "liver": 1, "tumor": 2}
        (root / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    return root / "predictions", root / "labelsTr"


def test_summary_matches_hand_computed_values(tmp_path):
    predictions, references = make_dataset(tmp_path)
    output = tmp_path / "evaluation"
    code = cli.main(["evaluate-folder", str(predictions), str(references), "--tolerance-mm", "1", "--output", str(output)])
    assert code == 0
    text = (output / "summary.json").read_text()
    # NaN and infinity are written as nnU-Net writes them.
    assert "NaN" in text
    assert "Infinity" in text
    summary = json.loads(text)

    case_a, case_b = summary["metric_per_case"]
    assert case_a["prediction_file"] == str((predictions / "caseA.nii.gz").resolve())
    assert case_a["reference_file"] == str((references / "caseA.nii.gz").resolve())
    # caseA liver: TP x=2,3; FP x=4,5; FN x=0,1; TN 48 - 6 = 42. Dice 4/8, IoU 2/6.
    # Every voxel of a line is surface. Prediction-to-reference distances 0, 0, 1, 2 mm and
    # the reverse 2, 1, 0, 0: 95th percentile 1 + 0.85 * (2 - 1) = 1.85 mm. NSD at 1 mm: 6/8.
    liver_a = case_a["metrics"]["1"]
    assert liver_a == pytest.approx(
        {"Dice": 0.5, "IoU": 1 / 3, "TP": 2, "FP": 2, "FN": 2, "TN": 42, "n_pred": 4, "n_ref": 4, "NSD": 0.75, "HD95": 1.85}
    )
    # caseA tumor: missed, so Dice, IoU and NSD are 0 and HD95 infinite; TN 48 - 2 = 46.
    tumor_a = case_a["metrics"]["2"]
    assert tumor_a["Dice"] == 0.0
    assert tumor_a["TN"] == 46
    assert tumor_a["FN"] == 2
    assert tumor_a["HD95"] == math.inf
    # caseB: liver is exact; tumor is empty in both files, so Dice and IoU are NaN (nnU-Net's rule).
    assert case_b["metrics"]["1"]["Dice"] == 1.0
    assert case_b["metrics"]["1"]["HD95"] == 0.0
    assert math.isnan(case_b["metrics"]["2"]["Dice"])
    assert math.isnan(case_b["metrics"]["2"]["IoU"])
    assert case_b["metrics"]["2"]["TN"] == 48

    # Means skip NaN (and infinite HD95): liver Dice (0.5 + 1) / 2, tumor Dice 0 from caseA alone.
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.75)
    assert summary["mean"]["1"]["IoU"] == pytest.approx(2 / 3)
    assert summary["mean"]["1"]["HD95"] == pytest.approx(0.925)
    assert summary["mean"]["1"]["TP"] == pytest.approx(2.5)
    assert summary["mean"]["2"]["Dice"] == 0.0
    assert math.isnan(summary["mean"]["2"]["HD95"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.375)
    assert summary["foreground_mean"]["HD95"] == pytest.approx(0.925)
    assert summary["fmadapt"]["n_nan"]["2"]["Dice"] == 1
    assert summary["fmadapt"]["n_inf"]["HD95"] == {"1": 0, "2": 1}

    with open(output / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["case"], row["class_name"], row["dice"]) for row in rows] == [
        ("caseA", "liver", "0.5"), ("caseA", "tumor", "0.0"), ("caseB", "liver", "1.0"), ("caseB", "tumor", "nan"),
    ]  # fmt: skip
    assert (output / "report.md").is_file()


def test_missing_prediction_is_an_error_naming_case(tmp_path):
    predictions, references = make_dataset(tmp_path)
    (predictions / "caseB.nii.gz").unlink()
    with pytest.raises(DataError, match="caseB"):
        evaluate_folder(predictions, references, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_allow_missing_scores_empty_prediction(tmp_path):
    predictions, references = make_dataset(tmp_path)
    (predictions / "caseB.nii.gz").unlink()
    result = evaluate_folder(predictions, references, output_dir=tmp_path / "out", allow_missing=True)
    case_b = result.summary["metric_per_case"][1]
    assert case_b["missing_prediction"] is True
    assert case_b["prediction_file"] is None
    # An empty prediction misses the 3 liver voxels.
    assert case_b["metrics"]["1"]["Dice"] == 0.0
    assert case_b["metrics"]["1"]["FN"] == 3
    assert result.summary["fmadapt"]["missing_predictions"] == ["caseB"]


def test_default_output_is_inside_prediction_folder(tmp_path):
    predictions, references = make_dataset(tmp_path)
    result = evaluate_folder(predictions, references)
    assert result.output_dir == predictions / "fmadapt_evaluation"
    assert (predictions / "fmadapt_evaluation" / "summary.json").is_file()


def test_splits_restrict_to_fold_validation_cases(tmp_path):
    predictions, references = make_dataset(tmp_path)
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["caseA"], "val": ["caseB"]}, {"train": ["caseB"], "val": ["caseA"]}]))
    assert fold_validation_cases(read_nnunet_splits(splits), 1) == ["caseA"]

    result = evaluate_folder(predictions, references, output_dir=tmp_path / "out", splits_file=splits, fold=0)
    assert [case.case_id for case in result.cases] == ["caseB"]
    assert len(result.summary["metric_per_case"]) == 1
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        evaluate_folder(predictions, references, output_dir=tmp_path / "out", splits_file=splits, fold=2)


def test_splits_with_unknown_case_raise(tmp_path):
    predictions, references = make_dataset(tmp_path)
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": [], "val": ["caseZ"]}]))
    with pytest.raises(DataError, match="caseZ"):
        evaluate_folder(predictions, references, splits_file=splits, fold=0)
    splits.write_text(json.dumps([{"training": [], "val": []}]))
    with pytest.raises(DataError, match="'train' and 'val'"):
        read_nnunet_splits(splits)


def test_labels_by_name_id_and_from_files(tmp_path):
    predictions, references = make_dataset(tmp_path)
    by_name = evaluate_folder(predictions, references, labels=["tumor"], output_dir=tmp_path / "a")
    assert by_name.labels == {"tumor": 2}
    by_id = evaluate_folder(predictions, references, labels=["1"], output_dir=tmp_path / "b")
    assert by_id.labels == {"liver": 1}
    with pytest.raises(ValueError, match="known labels"):
        evaluate_folder(predictions, references, labels=["spleen"], output_dir=tmp_path / "c")

    bare = tmp_path / "bare"
    bare_predictions, bare_references = make_dataset(bare, with_dataset_json=False)
    found = evaluate_folder(bare_predictions, bare_references, output_dir=tmp_path / "d")
    assert found.labels == {"1": 1, "2": 2}


def test_shape_mismatch_raises(tmp_path):
    predictions, references = make_dataset(tmp_path)
    save(predictions / "caseA.nii.gz", np.zeros((5, 4, 2)))
    with pytest.raises(DataError, match="resample"):
        evaluate_folder(predictions, references, output_dir=tmp_path / "out")


def test_detection_and_overlays_linked_in_report(tmp_path):
    predictions, references = make_dataset(tmp_path)
    output = tmp_path / "evaluation"
    code = cli.main([
        "evaluate-folder", str(predictions), str(references), "--output", str(output),
        "--images", str(tmp_path / "imagesTr"), "--detection", "--min-size-sweep", "4",
    ])  # fmt: skip
    assert code == 0
    detection = json.loads((output / "detection.json").read_text())
    # Liver: caseA's 4-voxel prediction covers half of the 4-voxel lesion (a hit), caseB is exact.
    assert detection["labels"]["liver"]["n_detected"] == 2
    assert detection["labels"]["liver"]["n_false_positives"] == 0
    # Tumor: the one lesion (caseA) is missed.
    assert detection["labels"]["tumor"]["n_lesions"] == 1
    assert detection["labels"]["tumor"]["n_detected"] == 0
    # Minimum size 4 voxels removes caseB's 3-voxel liver prediction.
    liver_sweep = detection["sweeps"]["liver min_size (voxels)"]
    assert [row["sensitivity"] for row in liver_sweep] == [1.0, 0.5]

    report = (output / "report.md").read_text()
    for name in ("froc.png", "overlays.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"
        assert f"![{name}]({name})" in report
    assert "min_size = 0 (chosen)" in report
