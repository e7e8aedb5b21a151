"""Reports of an evaluation folder: ``report.md``, case overlays and FROC curves as PNG.

:func:`write_report` reads what a folder contains (``summary.json`` of ``fmadapt evaluate``
or the nnU-Net-style one of ``fmadapt evaluate-folder``, ``per_case.csv``, ``detection.json``)
and links every PNG figure in it. Figures are drawn with Pillow: :func:`write_overlay_figure`
shows image, reference and prediction side by side, and :func:`write_froc_figure` draws FROC
curves on a log2 axis of false positives per volume. Every file is written to a temporary
name in the target folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fmadapt.evaluate.detection import FrocResult, SweepRow
from fmadapt.evaluate.results import METRIC_NAMES, PER_CASE_FILENAME, SUMMARY_FILENAME, _write_text_atomically

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.md"
DETECTION_FILENAME = "detection.json"
OVERLAY_FILENAME = "overlays.png"
FROC_FILENAME = "froc.png"
RANKS = ("worst", "median", "best")
SWEEP_FILENAME = "threshold_sweep.csv"

_PANEL_SIZE = 256
_REFERENCE_COLOUR = (0, 200, 0)
_PREDICTION_COLOUR = (230, 40, 40)
_CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))


@dataclass(frozen=True)
class OverlayCase:
    """One row of an overlay figure: a title and an image with its two label maps.

    ``image`` is H×W, H×W×3 or X×Y×Z, and the label maps have its spatial shape. A volume is
    shown at the slice of its last axis with the most reference voxels.
    """

    title: str
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray


def case_means(rows: Sequence[Mapping], metric: str = "dice") -> dict[str, float]:
    """Average ``metric`` over each case's classes in per-case rows (per_case.csv).

    NaN values are skipped, and a case without a finite value is left out. Infinite HD95
    values (one mask empty) are kept, so such a case averages to infinity.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        value = float(row[metric])
        if math.isfinite(value) or (metric == "hd95" and value == math.inf):
            values.setdefault(str(row["case"]), []).append(value)
    return {case: float(np.mean(case_values)) for case, case_values in values.items()}


def rank_cases(rows: Sequence[Mapping], metric: str = "dice") -> dict[str, str]:
    """Pick the worst, median and best case by ``metric`` averaged over each case's classes.

    ``rows`` are per-case rows with ``case`` and ``metric`` keys (per_case.csv), averaged by
    :func:`case_means`. For HD95 a lower value is better. Returns {"worst": case,
    "median": case, "best": case}, or {} when nothing can be ranked.
    """
    means = case_means(rows, metric)
    if not means:
        return {}
    ordered = sorted(means, key=lambda case: (means[case], case), reverse=metric == "hd95")
    return {"worst": ordered[0], "median": ordered[(len(ordered) - 1) // 2], "best": ordered[-1]}


def write_overlay_figure(path: str | os.PathLike, cases: Sequence[OverlayCase]) -> Path:
    """Draw one row per case (image, image with reference in green, image with prediction in red) as PNG."""
    if not cases:
        raise ValueError("cases is empty; give at least one OverlayCase")
    rows = [_overlay_row(case) for case in cases]
    width = max(row.width for row in rows)
    figure = Image.new("RGB", (width, sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        figure.paste(row, (0, top))
        top += row.height
    return _save_png_atomically(figure, path)


def cut_overlay_case(
    case_id: str, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, axis: int | None
) -> OverlayCase:
    """Cut the view of one evaluated case that an overlay figure shows, titled with its id.

    ``reference`` and ``prediction`` are label maps of the evaluated region, and ``image`` has
    their shape plus an optional trailing channel axis. A 2D case (``axis`` None) is kept
    whole. A volume is cut at the slice along ``axis`` with the most reference foreground.
    When the reference is empty, the slice with the most predicted foreground is taken, or
    else the middle slice. The slice is rotated by 90° as in the usual axial view of NIfTI
    arrays. An image with other than 3 channels shows its first channel.
    """
    if axis is not None:
        other_axes = tuple(a for a in range(reference.ndim) if a != axis)
        counts = np.count_nonzero(reference, axis=other_axes)
        if not counts.any():
            counts = np.count_nonzero(prediction, axis=other_axes)
        index = int(np.argmax(counts)) if counts.any() else reference.shape[axis] // 2
        image, reference, prediction = (np.rot90(np.take(array, index, axis=axis)) for array in (image, reference, prediction))
    if image.ndim == reference.ndim + 1 and image.shape[-1] != 3:
        image = image[..., 0]
    return OverlayCase(case_id, np.asarray(image), np.asarray(reference), np.asarray(prediction))


def write_case_overlays(folder: str | os.PathLike, rows: Sequence[Mapping], views: Mapping[str, OverlayCase]) -> Path | None:
    """Draw the worst, median and best case by Dice into ``overlays.png`` of ``folder``.

    ``rows`` are per-case rows (per_case.csv) and ``views`` maps each case id to the view
    of :func:`cut_overlay_case`. Rows are titled with rank, case id and mean Dice. Returns
    the path, or None (logged) when no case has a finite Dice.
    """
    means = case_means(rows)
    ranked = rank_cases(rows)
    if not ranked:
        logger.warning("no case in %s has a finite Dice, so no overlay figure is drawn", folder)
        return None
    cases = []
    for rank in RANKS:
        case_id = ranked[rank]
        view = views[case_id]
        title = f"{rank}: {case_id} (Dice {means[case_id]:.3f})"
        cases.append(OverlayCase(title, view.image, view.reference, view.prediction))
    return write_overlay_figure(Path(folder) / OVERLAY_FILENAME, cases)


def write_froc_figure(path: str | os.PathLike, curves: Mapping[str, FrocResult]) -> Path:
    """Draw FROC curves (sensitivity against false positives per volume, log2 axis) as PNG.

    Curve points with 0 false positives are drawn at the left edge (1/16), and points above
    16 at the right edge. Dots mark the sensitivity read at each rate of the result.
    """
    if not curves:
        raise ValueError("curves is empty; give at least one named FrocResult")
    width, height, left, right, top, bottom = 640, 440, 70, 20, 20, 70
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)

    def to_pixel(fp: float, sensitivity: float) -> tuple[float, float]:
        log_rate = min(max(math.log2(fp), -4.0), 4.0) if fp > 0 else -4.0
        x = left + (log_rate + 4.0) / 8.0 * (width - left - right)
        y = top + (1.0 - sensitivity) * (height - top - bottom)
        return x, y

    _draw_froc_axes(draw, to_pixel, width, height, left, bottom)
    for index, (name, froc) in enumerate(curves.items()):
        colour = _CURVE_COLOURS[index % len(_CURVE_COLOURS)]
        sensitivity = np.nan_to_num(froc.sensitivity, nan=0.0)
        points = [to_pixel(fp, value) for fp, value in zip(froc.fp_per_volume, sensitivity)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for rate, value in zip(froc.fp_rates, froc.sensitivity_at_rates):
            x, y = to_pixel(rate, 0.0 if math.isnan(value) else value)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        label = f"{name}: average sensitivity {_number(froc.average_sensitivity)}"
        draw.text((left + 10, top + 8 + 14 * index), label, fill=colour)
    return _save_png_atomically(figure, path)


def write_detection_json(
    folder: str | os.PathLike,
    frocs: Mapping[str, FrocResult],
    settings: Mapping,
    sweeps: Mapping[str, Sequence[SweepRow]],
    lesions: Mapping[str, Sequence[Mapping]] | None = None,
) -> Path:
    """Write ``detection.json`` with the settings, each label's FROC results and sweep rows.

    ``lesions`` adds, per label, one entry per reference lesion (for example its case, size,
    score and Dice) under ``"lesions"``.
    """
    data = {
        "settings": dict(settings),
        "labels": {name: froc.to_dict() for name, froc in frocs.items()},
        "sweeps": {name: [vars(row) for row in rows] for name, rows in sweeps.items()},
    }
    if lesions is not None:
        data["lesions"] = {name: [dict(entry) for entry in entries] for name, entries in lesions.items()}
    text = json.dumps(_strict(data), indent=2, allow_nan=False) + "\n"
    return _write_text_atomically(Path(folder) / DETECTION_FILENAME, text, "folder")


def format_sweep_table(rows: Sequence[SweepRow | Mapping]) -> str:
    """Format sweep rows as a Markdown table; the chosen setting is marked "(chosen)"."""
    lines = [
        "| setting | sensitivity | FP per volume | FROC average sensitivity | mean lesion Dice | mean voxel Dice |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        row = row if isinstance(row, Mapping) else vars(row)
        marker = " (chosen)" if row["chosen"] else ""
        cells = [row[key] for key in ("sensitivity", "fp_per_volume", "average_sensitivity", "mean_lesion_dice", "mean_voxel_dice")]
        lines.append(f"| {row['parameter']} = {row['value']:g}{marker} | " + " | ".join(_number(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: str | os.PathLike, settings: Mapping | None = None) -> Path:
    """Write ``report.md`` into an evaluation folder from the files it contains, and return its path.

    ``settings`` (name to JSON-serialisable value) are listed first under "Settings".
    """
    folder = Path(folder)
    # Evaluations write the report into their folder while it is still named NAME.partial.
    name = folder.name.removesuffix(".partial")
    summary_path = folder / SUMMARY_FILENAME
    if not summary_path.is_file():
        raise FileNotFoundError(f"{str(summary_path)!r} not found; write_report needs an evaluation folder")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rows = _read_per_case(folder / PER_CASE_FILENAME)

    lines = [f"# Evaluation report: {name}", ""]
    lines += _settings_section(folder, summary, settings or {})
    lines += _metrics_section(summary, rows)
    lines += _ranked_cases_section(rows)
    sweep_path = folder / SWEEP_FILENAME
    if sweep_path.is_file():
        lines += _sweep_section(_read_per_case(sweep_path))
    detection_path = folder / DETECTION_FILENAME
    if detection_path.is_file():
        lines += _detection_section(json.loads(detection_path.read_text(encoding="utf-8")))
    figures = sorted(path.name for path in folder.glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({name})" for name in figures] + [""]
    path = _write_text_atomically(folder / REPORT_FILENAME, "\n".join(lines), "folder")
    logger.info("wrote %s", path)
    return path


def _settings_section(folder: Path, summary: Mapping, settings: Mapping) -> list[str]:
    lines = ["## Settings", ""]
    lines += [f"- {key}: `{json.dumps(_strict(value))}`" for key, value in settings.items()]
    if "fmadapt" in summary:
        for key, value in summary["fmadapt"]["settings"].items():
            lines.append(f"- {key}: `{json.dumps(value)}`")
        missing = summary["fmadapt"].get("missing_predictions") or []
        lines.append(f"- cases: {len(summary['metric_per_case'])}, missing predictions scored as empty: {len(missing)}")
    else:
        lines.append(f"- cases: {summary.get('n_cases')}")
        for key, values in summary.get("extra_columns", {}).items():
            if key not in settings:
                lines.append(f"- {key}: {', '.join(str(value) for value in values)}")
        if (folder.parent / "recipe.yaml").is_file():
            lines.append("- recipe: [../recipe.yaml](../recipe.yaml)")
    return lines + [""]


def _metrics_section(summary: Mapping, rows: list[dict]) -> list[str]:
    lines = ["## Metrics", "", "Means over cases; NaN (both masks empty) and infinite HD95 (one mask empty) are left out.", ""]
    lines += ["| class | Dice | IoU | NSD | HD95 (mm) | cases |", "|---|---|---|---|---|---|"]
    classes: dict[str, list[dict]] = {}
    for row in rows:
        classes.setdefault(row["class_name"], []).append(row)
    for name, class_rows in classes.items():
        means = [_finite_mean([float(row[metric]) for row in class_rows]) for metric in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(_number(mean) for mean in means) + f" | {len(class_rows)} |")
    if "foreground_mean" in summary:
        foreground = summary["foreground_mean"]
        cells = [foreground.get(key) for key in ("Dice", "IoU", "NSD", "HD95")]
        lines.append("| foreground mean | " + " | ".join(_number(cell) for cell in cells) + " | |")
    return lines + [""]


def _ranked_cases_section(rows: list[dict]) -> list[str]:
    ranked = rank_cases(rows)
    if not ranked:
        return []
    means = case_means(rows)
    lines = ["## Worst, median and best case by Dice", ""]
    lines += [f"- {rank}: {ranked[rank]} (Dice {means[ranked[rank]]:.3f})" for rank in RANKS]
    return lines + [""]


def _sweep_section(rows: list[dict]) -> list[str]:
    lines = ["## Probability cut-off and small-component removal", ""]
    lines += [
        f"Rows of `{SWEEP_FILENAME}`. The chosen setting is the cut-off 0.5 with no component removed; "
        "min_size_mm3 rows remove predicted components smaller than the size (pixels for 2D images).",
        "",
    ]
    classes: dict[str, list[dict]] = {}
    for row in rows:
        parsed = {key: float(row[key]) for key in row if key not in ("class_name", "parameter", "chosen")}
        parsed.update(parameter=row["parameter"], chosen=row["chosen"] == "True")
        classes.setdefault(row["class_name"], []).append(parsed)
    for name, class_rows in classes.items():
        lines += [f"### {name}", "", format_sweep_table(class_rows)]
    return lines


def _detection_section(detection: Mapping) -> list[str]:
    lines = ["## Lesion detection", ""]
    lines += [f"- {key}: `{json.dumps(value)}`" for key, value in detection.get("settings", {}).items()]
    lines += ["", "| label | lesions | detected | false positives | FROC average sensitivity | mean lesion Dice |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, result in detection.get("labels", {}).items():
        lines.append(
            f"| {name} | {result['n_lesions']} | {result['n_detected']} | {result['n_false_positives']} | "
            f"{_number(result['average_sensitivity'])} | {_number(result['mean_lesion_dice'])} |"
        )
    for name, rows in detection.get("sweeps", {}).items():
        lines += ["", f"### Sweep: {name}", "", format_sweep_table(rows)]
    return lines + [""]


def _overlay_row(case: OverlayCase) -> Image.Image:
    image, reference, prediction = _display_slices(case)
    gray = _to_uint8(image)
    base = np.repeat(gray[..., None], 3, axis=-1) if gray.ndim == 2 else gray[..., :3]
    panels = [base, _blend(base, reference > 0, _REFERENCE_COLOUR), _blend(base, prediction > 0, _PREDICTION_COLOUR)]
    scale = _PANEL_SIZE / max(base.shape[:2])
    size = (max(1, round(base.shape[1] * scale)), max(1, round(base.shape[0] * scale)))
    row = Image.new("RGB", (3 * size[0], size[1] + 18), "white")
    draw = ImageDraw.Draw(row)
    for index, panel in enumerate(panels):
        row.paste(Image.fromarray(panel).resize(size, Image.NEAREST), (index * size[0], 18))
    # The title may be wider than one panel, so the two panel captions are right-aligned.
    draw.text((4, 3), case.title, fill="black")
    for index, caption in ((1, "reference"), (2, "prediction")):
        draw.text(((index + 1) * size[0] - 4 - draw.textlength(caption), 3), caption, fill="black")
    return row


def _display_slices(case: OverlayCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    reference = np.asarray(case.reference)
    prediction = np.asarray(case.prediction)
    image = np.asarray(case.image, dtype=float)
    if reference.shape != prediction.shape or image.shape[: reference.ndim] != reference.shape:
        raise ValueError(
            f"overlay case {case.title!r}: image {image.shape}, reference {reference.shape} and prediction "
            f"{prediction.shape} must share their spatial shape"
        )
    if reference.ndim == 2:
        return image, reference, prediction
    counts = (reference > 0).sum(axis=(0, 1)) if (reference > 0).any() else (prediction > 0).sum(axis=(0, 1))
    z = int(np.argmax(counts)) if counts.any() else reference.shape[2] // 2
    # NIfTI arrays are X×Y; rotating shows Y upwards, as in the usual axial view.
    return tuple(np.rot90(array[:, :, z]) for array in (image, reference, prediction))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _blend(base: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    blended = base.astype(float)
    blended[mask] = 0.5 * blended[mask] + 0.5 * np.array(colour, dtype=float)
    return blended.astype(np.uint8)


def _draw_froc_axes(draw: ImageDraw.ImageDraw, to_pixel, width: int, height: int, left: int, bottom: int) -> None:
    x0, y0 = to_pixel(1 / 16, 0.0)
    x1, y1 = to_pixel(16, 1.0)
    draw.rectangle((x0, y1, x1, y0), outline="black")
    for exponent in range(-3, 4):
        x, _ = to_pixel(2.0**exponent, 0.0)
        draw.line((x, y1, x, y0), fill=(220, 220, 220))
        tick = f"1/{2 ** -exponent}" if exponent < 0 else str(2**exponent)
        draw.text((x - 8, y0 + 6), tick, fill="black")
    for step in range(6):
        _, y = to_pixel(1.0, step / 5)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((x0 - 30, y - 6), f"{step / 5:.1f}", fill="black")
    draw.text((width // 2 - 90, height - bottom + 30), "false positives per volume (log2)", fill="black")
    draw.text((8, 4), "sensitivity", fill="black")


def _save_png_atomically(figure: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.save(temp_name, format="PNG")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote figure %s", path)
    return path


def _read_per_case(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _strict(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(key): _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite_mean(values: Sequence[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def _number(value: object) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}"
