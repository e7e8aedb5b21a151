"""A table of per-case metrics with its CSV and summary JSON writers.

:class:`MetricTable` collects the rows of :func:`fmadapt.evaluate.metrics.compute_case_metrics`
for each case, plus extra columns that describe the run (for example ``mode`` or ``jitter``).

Class ids
    ``class_id`` is the class's value in the label maps that were scored. ``label_id`` is the
    class's label value in the dataset, as in its label files and in the prediction NIfTI
    files that fmadapt writes. They differ for ``fmadapt evaluate``, which remaps the recipe's
    ``data.labels`` to 1..C in recipe order: with ``[liver, spleen]`` on TotalSegmentator,
    liver has class_id 1 and label_id 5, spleen class_id 2 and label_id 1. ``evaluate-folder``
    scores the dataset's own label maps, so there both are the label value.

Files
    ``per_case.csv`` has one row per case and class with the columns ``case, class_name,
    class_id, label_id, dice, iou, nsd, hd95, tp, fp, fn, tn, n_pred, n_ref`` and then the
    extra columns in the order they first appeared. Floats are written with Python's ``str``, so
    they read back exactly and NaN and infinity appear as ``nan`` and ``inf``. A case without
    an extra column has an empty cell there.
    ``summary.json`` contains :meth:`MetricTable.summary`. It is strict JSON: every NaN or
    infinite float is written as ``null``.

Summary rules
    Means, medians and standard deviations use finite values only. NaN values (both masks
    empty) are counted as ``n_nan`` and infinite HD95 values (one mask empty) as ``n_inf``,
    so ``n + n_nan + n_inf`` is the number of rows behind each entry. The standard deviation
    is the sample one (ddof=1), so it is null with fewer than two finite values. ``overall``
    pools the rows of every case and class, while ``per_class`` groups them by class.

Both writers are atomic: they write a temporary file in the target folder and move it into
place with ``os.replace``, so a failed write leaves no partial file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METRIC_NAMES = ("dice", "iou", "nsd", "hd95")
COUNT_NAMES = ("tp", "fp", "fn", "tn", "n_pred", "n_ref")
ROW_KEYS = ("class_name", "class_id", *METRIC_NAMES, *COUNT_NAMES)
# Rows may add the dataset label id, which defaults to class_id (see "Class ids" above).
LABEL_ID = "label_id"
CSV_COLUMNS = ("case", "class_name", "class_id", LABEL_ID, *METRIC_NAMES, *COUNT_NAMES)
PER_CASE_FILENAME = "per_case.csv"
SUMMARY_FILENAME = "summary.json"

_BOUNDED_METRICS = ("dice", "iou", "nsd")
_EXTRA_VALUE_TYPES = (str, int, float, bool, type(None))


class MetricTable:
    """Per-case, per-class metric rows with summaries and file writers.

    Rows are added one case at a time with :meth:`add_case`. A class name must keep the same
    class id and label id in every case, and a case id may be added only once.
    """

    def __init__(self) -> None:
        self._rows: list[dict] = []
        self._case_ids: list[str] = []
        self._class_ids: dict[str, int] = {}
        self._label_ids: dict[str, int] = {}
        self._extra_columns: list[str] = []

    @property
    def case_ids(self) -> list[str]:
        """Case ids in the order they were added."""
        return list(self._case_ids)

    @property
    def rows(self) -> list[dict]:
        """Copies of all rows, keyed by the CSV column names."""
        return [dict(row) for row in self._rows]

    @property
    def columns(self) -> list[str]:
        """CSV column names: the standard columns, then the extra columns."""
        return [*CSV_COLUMNS, *self._extra_columns]

    def __len__(self) -> int:
        return len(self._rows)

    def add_case(self, case_id: str, rows: Sequence[Mapping], **extra_columns: object) -> None:
        """Add the metric rows of one case, one row per class.

        ``rows`` is the output of ``compute_case_metrics``: mappings with exactly the keys
        ``class_name, class_id, dice, iou, nsd, hd95, tp, fp, fn, tn, n_pred, n_ref``, and
        optionally ``label_id``, the dataset label value (default: ``class_id``).
        ``extra_columns`` (str, int, float, bool or None values) are added to every row of
        the case. Raises TypeError or ValueError, naming the row and key, for an invalid row,
        and adds nothing then.
        """
        _check_case_id(case_id, self._case_ids)
        _check_extra_columns(extra_columns)
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
            raise TypeError(f"rows for case {case_id!r} must be a list of dicts, got {type(rows).__name__}")
        if not rows:
            raise ValueError(f"rows for case {case_id!r} is empty; compute them with compute_case_metrics")

        checked_rows = []
        class_ids = dict(self._class_ids)
        label_ids = dict(self._label_ids)
        for index, row in enumerate(rows):
            checked = _check_row(row, f"case {case_id!r} row {index}")
            _check_class_consistency(checked, class_ids, label_ids, case_id, checked_rows)
            class_ids[checked["class_name"]] = checked["class_id"]
            label_ids[checked["class_name"]] = checked[LABEL_ID]
            checked_rows.append(checked)

        for checked in checked_rows:
            self._rows.append({"case": case_id, **checked, **extra_columns})
        for name in extra_columns:
            if name not in self._extra_columns:
                self._extra_columns.append(name)
        self._class_ids = class_ids
        self._label_ids = label_ids
        self._case_ids.append(case_id)

    def summary(self) -> dict:
        """Summarise the table: counts, overall and per-class statistics of each metric.

        Returns a dict with ``n_cases``, ``n_rows``, ``overall`` (metric name to statistics),
        ``per_class`` (class name to ``class_id``, ``label_id``, ``n_cases`` and the statistics
        of each metric) and ``extra_columns`` (column name to its distinct values in first-seen
        order). Each statistics entry has ``mean``, ``median``, ``std``, ``n``, ``n_nan`` and
        ``n_inf``. NaN stands for a statistic without finite values.
        """
        per_class = {}
        for class_name, class_id in self._class_ids.items():
            class_rows = [row for row in self._rows if row["class_name"] == class_name]
            label_id = self._label_ids[class_name]
            per_class[class_name] = {"class_id": class_id, "label_id": label_id, "n_cases": len(class_rows)}
            per_class[class_name].update(_describe_metrics(class_rows))

        return {
            "n_cases": len(self._case_ids),
            "n_rows": len(self._rows),
            "overall": _describe_metrics(self._rows),
            "per_class": per_class,
            "extra_columns": {name: self._distinct_values(name) for name in self._extra_columns},
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV to ``path`` (conventionally ``per_case.csv``) atomically.

        Creates missing parent folders and returns the path written.
        """
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in self._rows:
            writer.writerow({key: _format_csv_value(value) for key, value in row.items()})
        written = _write_text_atomically(path, buffer.getvalue(), "path")
        logger.info("wrote %d metric rows of %d cases to %s", len(self._rows), len(self._case_ids), written)
        return written

    def write_summary(self, path: str | os.PathLike) -> Path:
        """Write :meth:`summary` as strict JSON to ``path`` (conventionally ``summary.json``) atomically.

        NaN and infinite floats become ``null``. Creates missing parent folders and returns
        the path written.
        """
        text = json.dumps(_to_strict_json(self.summary()), indent=2, allow_nan=False) + "\n"
        written = _write_text_atomically(path, text, "path")
        logger.info("wrote metric summary of %d cases to %s", len(self._case_ids), written)
        return written

    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``per_case.csv`` and ``summary.json`` into ``folder`` and return their paths."""
        folder = _check_path(folder, "folder")
        return self.to_csv(folder / PER_CASE_FILENAME), self.write_summary(folder / SUMMARY_FILENAME)

    def _distinct_values(self, column: str) -> list:
        values: list = []
        for row in self._rows:
            value = row.get(column)
            if value not in values:
                values.append(value)
        return values


def _describe_metrics(rows: Sequence[Mapping]) -> dict[str, dict]:
    return {name: _describe(np.array([row[name] for row in rows], dtype=float)) for name in METRIC_NAMES}


def _describe(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "median": float(np.median(finite)) if finite.size else math.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
        "n": int(finite.size),
        "n_nan": int(np.count_nonzero(np.isnan(values))),
        "n_inf": int(np.count_nonzero(np.isinf(values))),
    }


def _check_case_id(case_id: object, existing: Sequence[str]) -> None:
    if not isinstance(case_id, str):
        raise TypeError(f"case_id must be a string, got {type(case_id).__name__} {case_id!r}")
    if not case_id:
        raise ValueError("case_id is empty; give each case a unique non-empty id")
    if case_id in existing:
        raise ValueError(f"case {case_id!r} was already added; give each case a unique case_id")


def _check_extra_columns(extra_columns: Mapping[str, object]) -> None:
    for name, value in extra_columns.items():
        if name in CSV_COLUMNS:
            raise ValueError(
                f"extra column {name!r} clashes with a standard column; standard columns: {list(CSV_COLUMNS)}"
            )
        if not isinstance(value, _EXTRA_VALUE_TYPES):
            raise TypeError(
                f"extra column {name!r} must be a str, int, float, bool or None, got "
                f"{type(value).__name__} {value!r}"
            )


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(row).__name__} {row!r}")
    missing = [key for key in ROW_KEYS if key not in row]
    unknown = [key for key in row if key not in ROW_KEYS and key != LABEL_ID]
    if missing or unknown:
        raise ValueError(
            f"{where} has missing keys {missing} and unknown keys {unknown}; rows need exactly "
            f"{list(ROW_KEYS)} and optionally {LABEL_ID!r}, and run settings go in extra columns of add_case"
        )

    class_name = row["class_name"]
    if not isinstance(class_name, str):
        raise TypeError(f"{where}: class_name must be a string, got {type(class_name).__name__} {class_name!r}")
    if not class_name:
        raise ValueError(f"{where}: class_name is empty; give the class a name")
    class_id = _check_integer(row["class_id"], "class_id", where, signed=True)
    label_id = _check_integer(row.get(LABEL_ID, class_id), LABEL_ID, where, signed=True)
    checked = {"class_name": class_name, "class_id": class_id, LABEL_ID: label_id}
    for name in METRIC_NAMES:
        checked[name] = _check_metric(row[name], name, where)
    for name in COUNT_NAMES:
        checked[name] = _check_integer(row[name], name, where, signed=False)
    return checked


def _check_metric(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if name in _BOUNDED_METRICS and not (math.isnan(value) or 0.0 <= value <= 1.0):
        raise ValueError(f"{where}: {name} must be between 0 and 1 or NaN, got {value!r}")
    if name == "hd95" and value < 0:
        raise ValueError(f"{where}: hd95 must be >= 0 mm, inf or NaN, got {value!r}")
    return value


def _check_integer(value: object, name: str, where: str, *, signed: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an integer, got {type(value).__name__} {value!r}")
    if not signed and value < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")
    return int(value)


def _check_class_consistency(
    row: Mapping,
    class_ids: Mapping[str, int],
    label_ids: Mapping[str, int],
    case_id: str,
    rows_of_case: Sequence[Mapping],
) -> None:
    class_name = row["class_name"]
    if any(other["class_name"] == class_name for other in rows_of_case):
        raise ValueError(f"case {case_id!r} has two rows for class {class_name!r}; give one row per class")
    for key, noun, known in (("class_id", "id", class_ids), (LABEL_ID, "label_id", label_ids)):
        known_id = known.get(class_name)
        if known_id is not None and known_id != row[key]:
            raise ValueError(
                f"case {case_id!r} gives class {class_name!r} the {noun} {row[key]}, but earlier "
                f"cases gave it {known_id}; use one class_ids mapping for all cases"
            )


def _format_csv_value(value: object) -> object:
    # str() of a float is its shortest exact repr, and gives "nan" and "inf".
    if value is None:
        return ""
    if isinstance(value, float):
        return str(value)
    return value


def _to_strict_json(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(key): _to_strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_path(path: object, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    return Path(path)


def _write_text_atomically(path: object, text: str, name: str) -> Path:
    path = _check_path(path, name)
    if path.is_dir():
        raise IsADirectoryError(f"{name} {str(path)!r} is a folder; give the path of a file inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", newline="", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
