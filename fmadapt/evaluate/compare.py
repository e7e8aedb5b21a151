"""Compare evaluation runs case by case, with a paired Wilcoxon signed-rank test per metric.

A run is a ``per_case.csv`` file, or a folder that contains one (an ``fmadapt evaluate`` or
``evaluate-folder`` output). A folder with only an nnU-Net ``summary.json`` is read from its
``metric_per_case`` entries, with the label key as class name and the prediction file name
(without .nii.gz or .nii) as case. Rows are matched on (case, class name), and two runs without a shared row raise DataError.

The first run is the baseline and every other run is compared with it. Per metric, the
differences are other minus baseline over the matched rows where both values are finite:
NaN (both masks empty) and infinite HD95 (one mask empty) leave a pair out, and the number of
such pairs is reported. The p-value is the two-sided ``scipy.stats.wilcoxon`` of the paired
values with scipy's defaults. With no pair it is NaN, and when every difference is 0 it is 1.0
without calling scipy, whose statistic is undefined then.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from fmadapt.errors import DataError
from fmadapt.evaluate.results import METRIC_NAMES, PER_CASE_FILENAME, SUMMARY_FILENAME

logger = logging.getLogger(__name__)

_NNUNET_KEYS = {"dice": "Dice", "iou": "IoU", "nsd": "NSD", "hd95": "HD95"}


@dataclass(frozen=True)
class RunRows:
    """Metric values of one run keyed by (case, class name), with the file they came from."""

    name: str
    source: Path
    values: dict[tuple[str, str], dict[str, float]]


@dataclass(frozen=True)
class PairedComparison:
    """One metric of one run against the baseline over their matched (case, class) rows.

    ``differences`` maps each (case, class) pair with two finite values to
    (baseline value, other value, other minus baseline).
    """

    metric: str
    baseline: str
    other: str
    differences: dict[tuple[str, str], tuple[float, float, float]]
    n_not_finite: int
    mean_difference: float
    median_difference: float
    p_value: float


@dataclass(frozen=True)
class Comparison:
    """Means of every run and the paired comparisons of each run with the first."""

    runs: list[RunRows]
    metrics: tuple[str, ...]
    means: dict[str, dict[str, float]]
    pairs: list[PairedComparison]
    only_in_baseline: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    only_in_other: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def read_run_rows(path: str | os.PathLike, name: str | None = None) -> RunRows:
    """Read a run's per-case metrics from per_case.csv or an nnU-Net summary.json."""
    path = Path(path)
    if path.is_dir():
        csv_path, summary_path = path / PER_CASE_FILENAME, path / SUMMARY_FILENAME
        if csv_path.is_file():
            path = csv_path
        elif summary_path.is_file():
            path = summary_path
        else:
            raise FileNotFoundError(f"run folder {str(path)!r} has neither {PER_CASE_FILENAME} nor {SUMMARY_FILENAME}")
    elif not path.is_file():
        raise FileNotFoundError(f"run {str(path)!r} not found; give a per_case.csv file or an evaluation folder")
    name = name or (path.parent.name if path.name in (PER_CASE_FILENAME, SUMMARY_FILENAME) else path.stem)
    values = _read_nnunet_summary(path) if path.suffix == ".json" else _read_per_case_csv(path)
    return RunRows(name, path, values)


def compare_runs(
    runs: Sequence[str | os.PathLike], metrics: Sequence[str] = ("dice",), names: Sequence[str] | None = None
) -> Comparison:
    """Read two or more runs and compare each later run with the first on ``metrics``."""
    if isinstance(runs, (str, bytes, os.PathLike)) or len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {runs!r}")
    metrics = tuple(metrics)
    unknown = [metric for metric in metrics if metric not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"metrics must be chosen from {list(METRIC_NAMES)}, got {list(metrics)}")
    if names is not None and len(names) != len(runs):
        raise ValueError(f"names must give one name per run ({len(runs)}), got {list(names)}")
    loaded = [read_run_rows(run, None if names is None else names[index]) for index, run in enumerate(runs)]
    if len({run.name for run in loaded}) != len(loaded):
        loaded = [RunRows(f"{index + 1}:{run.name}", run.source, run.values) for index, run in enumerate(loaded)]

    means = {run.name: {metric: _run_mean(run, metric) for metric in metrics} for run in loaded}
    baseline = loaded[0]
    pairs, only_in_baseline, only_in_other = [], {}, {}
    for index, other in enumerate(loaded[1:], start=1):
        if not set(baseline.values) & set(other.values):
            raise DataError(
                f"runs {str(runs[0])!r} and {str(runs[index])!r} share no case/class rows, so there is nothing "
                f"to compare: the first has {_describe_rows(baseline)}, the second {_describe_rows(other)}. "
                "Compare evaluations of the same cases and class names"
            )
        only_in_baseline[other.name] = sorted(set(baseline.values) - set(other.values))
        only_in_other[other.name] = sorted(set(other.values) - set(baseline.values))
        if only_in_baseline[other.name] or only_in_other[other.name]:
            logger.warning(
                "%s and %s do not share %d (case, class) rows; they are left out of the paired test",
                baseline.name, other.name, len(only_in_baseline[other.name]) + len(only_in_other[other.name]),
            )  # fmt: skip
        pairs += [paired_comparison(baseline, other, metric) for metric in metrics]
    return Comparison(loaded, metrics, means, pairs, only_in_baseline, only_in_other)


def paired_comparison(baseline: RunRows, other: RunRows, metric: str) -> PairedComparison:
    """Compare ``other`` with ``baseline`` on the (case, class) rows they share."""
    differences = {}
    n_not_finite = 0
    for key in sorted(set(baseline.values) & set(other.values)):
        first, second = baseline.values[key][metric], other.values[key][metric]
        if not (math.isfinite(first) and math.isfinite(second)):
            n_not_finite += 1
            continue
        differences[key] = (first, second, second - first)
    first_values = np.array([item[0] for item in differences.values()])
    second_values = np.array([item[1] for item in differences.values()])
    deltas = second_values - first_values
    if deltas.size == 0:
        p_value = math.nan
    elif not deltas.any():
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(second_values, first_values).pvalue)
    return PairedComparison(
        metric=metric,
        baseline=baseline.name,
        other=other.name,
        differences=differences,
        n_not_finite=n_not_finite,
        mean_difference=float(deltas.mean()) if deltas.size else math.nan,
        median_difference=float(np.median(deltas)) if deltas.size else math.nan,
        p_value=p_value,
    )


def format_comparison(comparison: Comparison, per_case: bool = True) -> str:
    """Format the means, the paired tests, the unmatched rows and (optionally) per-case differences as text."""
    lines = ["Means over finite values", ""]
    lines.append("run".ljust(28) + "".join(metric.rjust(12) for metric in comparison.metrics))
    for run in comparison.runs:
        cells = "".join(_cell(comparison.means[run.name][metric]).rjust(12) for metric in comparison.metrics)
        lines.append(run.name[:27].ljust(28) + cells)
    lines += ["", "Paired differences (other - baseline), Wilcoxon signed-rank test", ""]
    lines.append(f"{'metric':8s} {'baseline':20s} {'other':20s} {'pairs':>6s} {'mean diff':>10s} {'median diff':>12s} {'p-value':>9s}")
    for pair in comparison.pairs:
        lines.append(
            f"{pair.metric:8s} {pair.baseline[:20]:20s} {pair.other[:20]:20s} {len(pair.differences):6d} "
            f"{_cell(pair.mean_difference):>10s} {_cell(pair.median_difference):>12s} {_cell(pair.p_value, 4):>9s}"
        )
        if pair.n_not_finite:
            lines.append(f"  {pair.n_not_finite} pairs left out because a value is NaN or infinite")
    for name in comparison.only_in_baseline:
        for label, keys in (("only in baseline", comparison.only_in_baseline[name]), (f"only in {name}", comparison.only_in_other[name])):
            if keys:
                lines.append(f"{len(keys)} rows {label}: " + ", ".join(f"{case}/{class_name}" for case, class_name in keys))
    if per_case:
        for pair in comparison.pairs:
            lines += ["", f"Per case: {pair.metric}, {pair.other} - {pair.baseline}", ""]
            lines.append(f"{'case':24s} {'class':16s} {'baseline':>10s} {'other':>10s} {'diff':>10s}")
            for (case, class_name), (first, second, delta) in pair.differences.items():
                lines.append(f"{case[:24]:24s} {class_name[:16]:16s} {_cell(first):>10s} {_cell(second):>10s} {_cell(delta):>10s}")
    return "\n".join(lines) + "\n"


def _read_per_case_csv(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in ("case", "class_name", *METRIC_NAMES) if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{str(path)!r} lacks the columns {missing}; it must be a per_case.csv written by fmadapt")
        values = {}
        for line, row in enumerate(reader, start=2):
            key = (row["case"], row["class_name"])
            if key in values:
                raise DataError(f"{str(path)!r} line {line} repeats case {key[0]!r} class {key[1]!r}")
            try:
                values[key] = {metric: float(row[metric]) for metric in METRIC_NAMES}
            except ValueError as error:
                raise DataError(f"{str(path)!r} line {line} has a value that is not a number: {error}") from error
    return values


def _read_nnunet_summary(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["metric_per_case"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{str(path)!r} is not an nnU-Net summary.json with 'metric_per_case': {error!r}") from error
    values = {}
    for entry in entries:
        file_name = Path(entry.get("prediction_file") or entry["reference_file"]).name
        case = file_name.removesuffix(".gz").removesuffix(".nii")
        for label, metrics in entry["metrics"].items():
            values[(case, str(label))] = {metric: _json_number(metrics.get(key)) for metric, key in _NNUNET_KEYS.items()}
    return values


def _describe_rows(run: RunRows) -> str:
    """Name a few of the run's cases and classes for an error message."""
    cases = sorted({case for case, _ in run.values})
    classes = sorted({class_name for _, class_name in run.values})
    listed = ", ".join(cases[:3]) + (", ..." if len(cases) > 3 else "")
    return f"{len(cases)} cases ({listed}) with classes {', '.join(classes)}"


def _json_number(value: object) -> float:
    return math.nan if value is None else float(value)


def _run_mean(run: RunRows, metric: str) -> float:
    finite = [row[metric] for row in run.values.values() if math.isfinite(row[metric])]
    return float(np.mean(finite)) if finite else math.nan


def _cell(value: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
