"""Tests for fmadapt.evaluate.results.MetricTable: rows, summary statistics and atomic writers."""

import csv
import json
import math

import numpy as np
import pytest

import fmadapt.evaluate.results as results
from fmadapt.evaluate import MetricTable, compute_case_metrics
from fmadapt.evaluate.results import CSV_COLUMNS


def metric_row(class_name, class_id, dice, hd95, **overrides):
    row = {
        "class_name": class_name,
        "class_id": class_id,
        "dice": dice,
        "iou": dice,
        "nsd": dice,
        "hd95": hd95,
        "tp": 1,
        "fp": 2,
        "fn": 3,
        "tn": 4,
        "n_pred": 3,
        "n_ref": 4,
    }
    row.update(overrides)
    return row


def three_case_table():
    # liver: Dice 0.8, 0.6 and NaN (both masks empty); HD95 2.0, inf (one mask empty) and NaN.
    # spleen: Dice 1.0, 0.0 and 0.5; HD95 0.0, inf and 4.0.
    table = MetricTable()
    table.add_case("a", [metric_row("liver", 5, 0.8, 2.0), metric_row("spleen", 1, 1.0, 0.0)], mode="box")
    table.add_case("b", [metric_row("liver", 5, 0.6, math.inf), metric_row("spleen", 1, 0.0, math.inf)], mode="box")
    table.add_case("c", [metric_row("liver", 5, math.nan, math.nan), metric_row("spleen", 1, 0.5, 4.0)], mode="point")
    return table


def test_add_case_stores_rows_with_extra_columns():
    table = three_case_table()
    assert len(table) == 6
    assert table.case_ids == ["a", "b", "c"]
    assert table.columns == [*CSV_COLUMNS, "mode"]
    first = table.rows[0]
    assert first["case"] == "a"
    assert first["class_name"] == "liver"
    assert first["mode"] == "box"


def test_to_csv_columns_and_rows(tmp_path):
    table = three_case_table()
    path = table.to_csv(tmp_path / "per_case.csv")

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(path, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [
        "case", "class_name", "class_id", "label_id", "dice", "iou", "nsd", "hd95",
        "tp", "fp", "fn", "tn", "n_pred", "n_ref", "mode",
    ]  # fmt: skip
    assert len(rows) == 6
    assert [(row["case"], row["class_name"]) for row in rows] == [
        ("a", "liver"), ("a", "spleen"), ("b", "liver"), ("b", "spleen"), ("c", "liver"), ("c", "spleen"),
    ]  # fmt: skip
    assert rows[0]["dice"] == "0.8"
    assert rows[2]["hd95"] == "inf"
    assert rows[4]["dice"] == "nan"
    assert rows[5]["mode"] == "point"
    assert float(rows[4]["hd95"]) != float(rows[4]["hd95"])  # reads back as NaN


def test_to_csv_leaves_missing_extra_column_empty(tmp_path):
    table = MetricTable()
    table.add_case("a", [metric_row("liver", 5, 0.5, 1.0)])
    table.add_case("b", [metric_row("liver", 5, 0.5, 1.0)], jitter=0.1)
    with open(table.to_csv(tmp_path / "per_case.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["jitter"] == ""
    assert rows[1]["jitter"] == "0.1"


def test_summary_counts_nan_and_inf():
    summary = three_case_table().summary()
    assert summary["n_cases"] == 3
    assert summary["n_rows"] == 6

    liver = summary["per_class"]["liver"]
    assert liver["class_id"] == 5
    assert liver["n_cases"] == 3
    # Dice 0.8 and 0.6 are finite, one NaN: mean 0.7, sample std sqrt(0.02) = 0.1414...
    assert liver["dice"]["mean"] == pytest.approx(0.7)
    assert liver["dice"]["std"] == pytest.approx(math.sqrt(0.02))
    assert liver["dice"]["n"] == 2
    assert liver["dice"]["n_nan"] == 1
    assert liver["dice"]["n_inf"] == 0
    # HD95 2.0, inf, NaN: only 2.0 is averaged, std needs two finite values.
    assert liver["hd95"]["mean"] == pytest.approx(2.0)
    assert math.isnan(liver["hd95"]["std"])
    assert (liver["hd95"]["n"], liver["hd95"]["n_nan"], liver["hd95"]["n_inf"]) == (1, 1, 1)

    spleen = summary["per_class"]["spleen"]
    assert spleen["dice"]["mean"] == pytest.approx(0.5)
    assert spleen["dice"]["n_nan"] == 0
    assert spleen["hd95"]["mean"] == pytest.approx(2.0)  # (0 + 4) / 2, inf left out
    assert spleen["hd95"]["n_inf"] == 1


def test_summary_overall_pools_rows():
    overall = three_case_table().summary()["overall"]
    # Finite Dice values: 0.8, 1.0, 0.6, 0.0, 0.5 -> mean 2.9 / 5 = 0.58, median 0.6.
    assert overall["dice"]["mean"] == pytest.approx(0.58)
    assert overall["dice"]["median"] == pytest.approx(0.6)
    assert overall["dice"]["n"] == 5
    assert overall["dice"]["n_nan"] == 1
    # Finite HD95 values: 2.0, 0.0, 4.0 -> mean 2.0; two inf and one NaN counted beside it.
    assert overall["hd95"]["mean"] == pytest.approx(2.0)
    assert overall["hd95"]["n_inf"] == 2
    assert overall["hd95"]["n_nan"] == 1


def test_summary_lists_extra_column_values():
    summary = three_case_table().summary()
    assert summary["extra_columns"] == {"mode": ["box", "point"]}


def test_summary_of_empty_table():
    summary = MetricTable().summary()
    assert summary["n_cases"] == 0
    assert math.isnan(summary["overall"]["dice"]["mean"])
    assert summary["per_class"] == {}


def test_write_summary_is_strict_json(tmp_path):
    path = three_case_table().write_summary(tmp_path / "summary.json")
    text = path.read_text()

    def reject_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    loaded = json.loads(text, parse_constant=reject_constant)
    assert "NaN" not in text
    assert "Infinity" not in text
    assert loaded["per_class"]["liver"]["hd95"]["std"] is None
    assert loaded["per_class"]["liver"]["hd95"]["n_inf"] == 1
    assert loaded["overall"]["dice"]["mean"] == pytest.approx(0.58)


def test_write_puts_both_files_in_folder(tmp_path):
    csv_path, json_path = three_case_table().write(tmp_path / "run" / "eval")
    assert csv_path == tmp_path / "run" / "eval" / "per_case.csv"
    assert json_path == tmp_path / "run" / "eval" / "summary.json"
    assert csv_path.is_file()
    assert json_path.is_file()


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    table = three_case_table()
    with pytest.raises(OSError, match="disk full"):
        table.to_csv(tmp_path / "per_case.csv")
    with pytest.raises(OSError, match="disk full"):
        table.write_summary(tmp_path / "summary.json")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("previous")

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError):
        three_case_table().write_summary(path)
    assert path.read_text() == "previous"
    assert [entry.name for entry in tmp_path.iterdir()] == ["summary.json"]


def test_write_to_folder_path_fails_cleanly(tmp_path):
    target = tmp_path / "per_case.csv"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        three_case_table().to_csv(target)
    assert [entry.name for entry in tmp_path.iterdir()] == ["per_case.csv"]
    assert list(target.iterdir()) == []


def test_accepts_compute_case_metrics_rows(tmp_path):
    reference = np.zeros((8, 8), dtype=np.uint8)
    reference[2:6, 2:6] = 1
    prediction = np.zeros((8, 8), dtype=np.uint8)
    prediction[2:6, 3:7] = 1
    rows = compute_case_metrics(prediction, reference, (1.0, 1.0), {"organ": 1, "absent": 2}, 1.0)

    table = MetricTable()
    table.add_case("case_001", rows, mode="box", jitter=0.0)
    summary = table.summary()
    assert summary["per_class"]["organ"]["dice"]["mean"] == pytest.approx(0.75)
    assert summary["per_class"]["absent"]["dice"]["n_nan"] == 1
    with open(table.to_csv(tmp_path / "per_case.csv"), newline="") as handle:
        written = list(csv.DictReader(handle))
    assert written[0]["tp"] == "12"
    assert written[1]["hd95"] == "nan"


# --- input checks ------------------------------------------------------------------------


def test_rejects_duplicate_case():
    table = three_case_table()
    with pytest.raises(ValueError, match="'a' was already added"):
        table.add_case("a", [metric_row("liver", 5, 0.5, 1.0)])


def test_rejects_missing_and_unknown_row_keys():
    table = MetricTable()
    row = metric_row("liver", 5, 0.5, 1.0, mode="box")
    del row["tn"]
    with pytest.raises(ValueError, match=r"missing keys \['tn'\] and unknown keys \['mode'\]"):
        table.add_case("a", [row])
    assert len(table) == 0


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dice": 1.5}, ValueError, "dice must be between 0 and 1"),
        ({"hd95": -1.0}, ValueError, "hd95 must be >= 0"),
        ({"nsd": "0.5"}, TypeError, "nsd must be a number"),
        ({"tp": -1}, ValueError, "tp must be >= 0"),
        ({"fp": 2.0}, TypeError, "fp must be an integer"),
        ({"class_id": True}, TypeError, "class_id must be an integer"),
        ({"class_name": ""}, ValueError, "class_name is empty"),
        ({"class_name": 3}, TypeError, "class_name must be a string"),
    ],
)
def test_rejects_invalid_row_values(overrides, error, message):
    row = metric_row("liver", 5, 0.5, 1.0)
    row.update(overrides)
    table = MetricTable()
    with pytest.raises(error, match=message):
        table.add_case("a", [row])


def test_rejects_inconsistent_class_ids():
    table = MetricTable()
    table.add_case("a", [metric_row("liver", 5, 0.5, 1.0)])
    with pytest.raises(ValueError, match="gives class 'liver' the id 6, but earlier cases gave it 5"):
        table.add_case("b", [metric_row("liver", 6, 0.5, 1.0)])
    with pytest.raises(ValueError, match="two rows for class 'liver'"):
        table.add_case("c", [metric_row("liver", 5, 0.5, 1.0), metric_row("liver", 5, 0.5, 1.0)])
    assert table.case_ids == ["a"]


def test_rejects_invalid_case_and_extra_columns():
    table = MetricTable()
    with pytest.raises(TypeError, match="case_id"):
        table.add_case(7, [metric_row("liver", 5, 0.5, 1.0)])
    with pytest.raises(ValueError, match="clashes with a standard column"):
        table.add_case("a", [metric_row("liver", 5, 0.5, 1.0)], dice=0.3)
    with pytest.raises(TypeError, match="extra column 'mode'"):
        table.add_case("a", [metric_row("liver", 5, 0.5, 1.0)], mode=["box"])
    with pytest.raises(ValueError, match="empty"):
        table.add_case("a", [])
    with pytest.raises(TypeError, match="list of dicts"):
        table.add_case("a", metric_row("liver", 5, 0.5, 1.0))
    with pytest.raises(TypeError, match="str or os.PathLike"):
        table.to_csv(3)


def test_label_id_defaults_to_class_id(tmp_path):
    table = three_case_table()
    with open(table.to_csv(tmp_path / "per_case.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label_id"] for row in rows] == [row["class_id"] for row in rows]
    assert table.summary()["per_class"]["liver"]["label_id"] == 5


def test_label_id_written_beside_class_id(tmp_path):
    # Recipe order [liver, spleen] gives class ids 1 and 2; the dataset labels are 5 and 1.
    table = MetricTable()
    for case in ("a", "b"):
        table.add_case(
            case,
            [metric_row("liver", 1, 0.8, 2.0, label_id=5), metric_row("spleen", 2, 0.5, 1.0, label_id=1)],
        )
    csv_path, summary_path = table.write(tmp_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["class_name"], row["class_id"], row["label_id"]) for row in rows] == [
        ("liver", "1", "5"), ("spleen", "2", "1"), ("liver", "1", "5"), ("spleen", "2", "1"),
    ]  # fmt: skip
    per_class = json.loads(summary_path.read_text())["per_class"]
    assert per_class["liver"]["class_id"] == 1
    assert per_class["liver"]["label_id"] == 5
    assert per_class["spleen"]["class_id"] == 2
    assert per_class["spleen"]["label_id"] == 1


def test_rejects_inconsistent_label_ids():
    table = MetricTable()
    table.add_case("a", [metric_row("liver", 1, 0.5, 1.0, label_id=5)])
    with pytest.raises(ValueError, match="gives class 'liver' the label_id 6, but earlier cases gave it 5"):
        table.add_case("b", [metric_row("liver", 1, 0.5, 1.0, label_id=6)])
    with pytest.raises(TypeError, match="label_id must be an integer"):
        table.add_case("c", [metric_row("liver", 1, 0.5, 1.0, label_id="5")])
    assert table.case_ids == ["a"]
