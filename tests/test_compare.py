"""compare: run means, paired differences and the Wilcoxon test on per-case files made here."""

import json
import math

import pytest
from scipy import stats

from fmadapt import cli
from fmadapt.errors import DataError
from fmadapt.evaluate.compare import compare_runs, format_comparison, read_run_rows
from fmadapt.evaluate.results import MetricTable

BASELINE_DICE = {"c1": 0.8, "c2": 0.7, "c3": 0.9, "c4": 0.6, "c5": 0.75, "c6": 0.85, "c8": 0.5}
OTHER_DICE = {"c1": 0.85, "c2": 0.72, "c3": 0.88, "c4": 0.7, "c5": 0.8, "c6": 0.9, "c7": 0.4}


def row(dice, hd95=1.0):
    return {
        "class_name": "liver", "class_id": 1, "dice": dice, "iou": dice, "nsd": dice, "hd95": hd95,
        "tp": 1, "fp": 0, "fn": 0, "tn": 1, "n_pred": 1, "n_ref": 1,
    }  # fmt: skip


def write_run(folder, dice_by_case, hd95_by_case=None):
    table = MetricTable()
    for case, dice in dice_by_case.items():
        hd95 = (hd95_by_case or {}).get(case, 1.0)
        table.add_case(case, [row(dice, hd95)])
    table.write(folder)
    return folder


def test_mean_difference_and_wilcoxon_match_scipy(tmp_path):
    baseline = write_run(tmp_path / "eval_a", BASELINE_DICE)
    other = write_run(tmp_path / "eval_b", OTHER_DICE)
    comparison = compare_runs([baseline, other], ["dice"])
    (pair,) = comparison.pairs

    # Shared cases c1-c6: differences 0.05, 0.02, -0.02, 0.1, 0.05, 0.05, mean 0.25 / 6.
    assert len(pair.differences) == 6
    assert pair.mean_difference == pytest.approx(0.25 / 6)
    shared = ["c1", "c2", "c3", "c4", "c5", "c6"]
    expected = stats.wilcoxon([OTHER_DICE[c] for c in shared], [BASELINE_DICE[c] for c in shared]).pvalue
    assert pair.p_value == pytest.approx(expected)
    # Run means use every finite row of each run, shared or not.
    assert comparison.means["eval_a"]["dice"] == pytest.approx(sum(BASELINE_DICE.values()) / 7)
    assert comparison.means["eval_b"]["dice"] == pytest.approx(sum(OTHER_DICE.values()) / 7)


def test_mismatched_cases_reported(tmp_path):
    baseline = write_run(tmp_path / "eval_a", BASELINE_DICE)
    other = write_run(tmp_path / "eval_b", OTHER_DICE)
    comparison = compare_runs([baseline, other])
    assert comparison.only_in_baseline["eval_b"] == [("c8", "liver")]
    assert comparison.only_in_other["eval_b"] == [("c7", "liver")]
    text = format_comparison(comparison)
    assert "1 rows only in baseline: c8/liver" in text
    assert "1 rows only in eval_b: c7/liver" in text


def test_infinite_values_left_out_of_pairs(tmp_path):
    baseline = write_run(tmp_path / "a", {"c1": 0.5, "c2": 0.6, "c3": 0.7}, {"c2": math.inf})
    other = write_run(tmp_path / "b", {"c1": 0.6, "c2": 0.6, "c3": 0.9})
    (pair,) = compare_runs([baseline / "per_case.csv", other / "per_case.csv"], ["hd95"]).pairs
    assert pair.n_not_finite == 1
    assert sorted(pair.differences) == [("c1", "liver"), ("c3", "liver")]
    # Every HD95 difference is 0, so the p-value is 1.
    assert pair.p_value == 1.0


def test_reads_nnunet_summary(tmp_path):
    folder = tmp_path / "nnunet"
    folder.mkdir()
    entries = [
        {"prediction_file": f"/x/{case}.nii.gz", "reference_file": f"/y/{case}.nii.gz", "metrics": {"1": {"Dice": dice, "IoU": dice}}}
        for case, dice in (("c1", 0.5), ("c2", 0.25))
    ]
    (folder / "summary.json").write_text(json.dumps({"metric_per_case": entries}))
    run = read_run_rows(folder)
    assert run.values[("c2", "1")]["dice"] == 0.25
    assert math.isnan(run.values[("c1", "1")]["hd95"])


def test_compare_command_prints_table(tmp_path, capsys):
    baseline = write_run(tmp_path / "eval_a", BASELINE_DICE)
    other = write_run(tmp_path / "eval_b", OTHER_DICE)
    assert cli.main(["compare", str(baseline), str(other), "--metric", "dice", "iou"]) == 0
    output = capsys.readouterr().out
    assert "Paired differences" in output
    assert "Per case: iou, eval_b - eval_a" in output
    assert "c4                       liver                0.6000     0.7000     0.1000" in output


def test_compare_rejects_bad_input(tmp_path):
    baseline = write_run(tmp_path / "eval_a", BASELINE_DICE)
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs([baseline])
    with pytest.raises(ValueError, match="metrics must be chosen"):
        compare_runs([baseline, baseline], ["accuracy"])
    with pytest.raises(FileNotFoundError, match="not found"):
        compare_runs([baseline, tmp_path / "missing"])


def test_runs_without_shared_rows_rejected(tmp_path):
    baseline = write_run(tmp_path / "eval_a", {"c1": 0.8, "c2": 0.7})
    other = write_run(tmp_path / "eval_b", {"d1": 0.6, "d2": 0.5})
    with pytest.raises(DataError) as caught:
        compare_runs([baseline, other])
    message = str(caught.value)
    assert str(baseline) in message
    assert str(other) in message
    assert "share no case/class rows" in message
    assert "2 cases (c1, c2) with classes liver" in message
    assert "2 cases (d1, d2) with classes liver" in message


def test_compare_command_fails_without_shared_rows(tmp_path, capsys, caplog):
    baseline = write_run(tmp_path / "eval_a", BASELINE_DICE)
    other = write_run(tmp_path / "eval_b", {"d1": 0.6})
    code = cli.main(["compare", str(baseline), str(other)])
    assert code != 0
    assert capsys.readouterr().out == ""
    assert "share no case/class rows" in caplog.text
    assert str(baseline) in caplog.text
    assert str(other) in caplog.text
