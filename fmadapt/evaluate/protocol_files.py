"""Files of the prompt protocols besides the metric table: Dice curves, CSV and strict JSON.

Every file is written to a temporary name in its folder and then renamed, so a reader never
sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from fmadapt.evaluate.figures import plot_dice_curves

__all__ = ["CURVE_FILE", "FIGURE_FILE", "write_csv", "write_curves", "write_json"]

CURVE_FILE = "dice_per_interaction.csv"
FIGURE_FILE = "dice_per_interaction.png"


def write_curves(folder: Path, curves: list[dict], names: list[str], count: int) -> dict:
    """Write the Dice curves as CSV and PNG; returns their means for summary.json."""
    header = [f"dice_{k}" for k in range(1, count + 1)]
    rows = []
    for curve in curves:
        values = dict(zip(header, curve["dice"]))
        auc = float(np.mean(curve["dice"]))
        counts = {"auc": auc, "objects": curve["objects"], "stopped_early": curve["stopped_early"]}
        rows.append({key: curve[key] for key in ("case", "class_name", "class_id", "label_id")} | values | counts)
    write_csv(folder / CURVE_FILE, rows)

    means = {name: _nan_mean([c["dice"] for c in curves if c["class_name"] == name], count) for name in names}
    means["all classes"] = _nan_mean([c["dice"] for c in curves], count)
    plot_dice_curves(means, folder / FIGURE_FILE)
    overall = means["all classes"]
    finite = [value for value in overall if math.isfinite(value)]
    return {
        "interactions": list(range(1, count + 1)),
        "mean": overall,
        "auc_mean": float(np.mean(finite)) if finite else math.nan,
        "per_class": {name: means[name] for name in names},
    }


def _nan_mean(curves: list[list[float]], count: int) -> list[float]:
    """Mean of each interaction over curves, leaving out NaN (class absent in the case)."""
    stacked = np.array(curves, dtype=np.float64).reshape(-1, count)
    finite = np.isfinite(stacked)
    sums = np.where(finite, stacked, 0.0).sum(axis=0)
    counts = finite.sum(axis=0)
    return [float(s / n) if n else math.nan for s, n in zip(sums, counts)]


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    columns = list(rows[0]) if rows else ["case"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    _write_text(path, buffer.getvalue())


def write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(_strict_json(data), indent=2, allow_nan=False) + "\n")


def _strict_json(value):
    if isinstance(value, dict):
        return {str(key): _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_text(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", newline="", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
