"""Prompt protocols on a trained run's split: clicks, iterative correction, 3D propagation.

``clicks``
    Every slice where a class is present gets ``num_positive`` clicks inside the class and
    ``num_negative`` clicks outside it (the first positive click at the farthest-from-border
    pixel with ``click_mode="center"``), and one prediction.
``iterative``
    Every slice where a class is present runs :func:`fmadapt.evaluate.interactive.run_interactive`
    with a budget of ``num_interactions``. The volume after interaction k contains each slice's
    prediction after its k-th interaction, and its 3D Dice per case and class is written to
    ``dice_per_interaction.csv`` (columns ``dice_1..dice_N`` and ``auc``, the mean of the curve)
    and drawn in ``dice_per_interaction.png``. ``per_case.csv`` scores the final volume.
``propagate3d``
    Every class present in a volume gets one box on its key slice and is propagated through
    the split's slices (:mod:`fmadapt.evaluate.propagation`). ``propagation.csv`` lists the
    key, first and last predicted slice and the prompts used per case and class.

Box prompts (``iterative`` with ``start="box"`` and ``propagate3d``) are evaluated once per
box noise level in ``box_jitter``. Each box coordinate moves by a uniform random shift of up
to the level, in pixels (``jitter_unit="pixels"``) or as a fraction of the box's width for x
and height for y (``jitter_unit="fraction"``). Each level restarts the random generator from
the seed, so levels differ only in their noise.

Each evaluation writes ``RUN_DIR/eval_<split>_<mode>[_jitter<J>[frac]]`` with ``per_case.csv``,
``summary.json``, ``predictions/CASE.nii.gz``, ``protocol.json`` (mode, split, seed, noise
level and every setting), ``overlays.png`` (worst, median and best case by Dice) and
``report.md``, built under a temporary name and renamed when complete. Where the
masks of two classes overlap, the written label map keeps the class listed first in the recipe.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fmadapt.config import Recipe, resolve_data_root
from fmadapt.data.datasets import read_dataset
from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.io import write_segmentation
from fmadapt.data.prompts import box_from_mask, jitter_box
from fmadapt.errors import RecipeError
from fmadapt.evaluate.clicks import CLICK_MODES, clicks_to_arrays, initial_clicks
from fmadapt.evaluate.figures import plot_dice_curves
from fmadapt.evaluate.interactive import (
    START_PROMPTS,
    InteractiveSettings,
    predictor_prompt_function,
    run_interactive,
)
from fmadapt.evaluate.metrics import compute_case_metrics, dice
from fmadapt.evaluate.propagation import KEY_SLICE_RULES, choose_key_slice, propagate
from fmadapt.evaluate.report import cut_overlay_case, write_case_overlays, write_report
from fmadapt.evaluate.results import MetricTable
from fmadapt.evaluate.runner import EvaluationResult
from fmadapt.inference.predictor import Predictor
from fmadapt.runs import SPLIT_FILE, load_run
from fmadapt.train.samples import class_ids, load_normalised_case, split_slices_for_evaluation
from fmadapt.train.splits import SPLIT_NAMES, SplitPlan

__all__ = ["JITTER_UNITS", "PROTOCOL_MODES", "ProtocolSettings", "noisy_box", "run_protocol"]

logger = logging.getLogger(__name__)

PROTOCOL_MODES = ("clicks", "iterative", "propagate3d")
JITTER_UNITS = ("pixels", "fraction")
PROTOCOL_FILE = "protocol.json"
CURVE_FILE = "dice_per_interaction.csv"
FIGURE_FILE = "dice_per_interaction.png"
PROPAGATION_FILE = "propagation.csv"


@dataclass(frozen=True)
class ProtocolSettings:
    """Every setting of the prompt protocols; all of them are saved in ``protocol.json``.

    Attributes:
        seed: seed of click and box noise draws; None takes the recipe seed.
        box_jitter: box noise levels (>= 0), one evaluation each.
        jitter_unit: "pixels" or "fraction" (of the box side).
        num_positive: positive clicks per object in ``clicks`` mode (>= 0).
        num_negative: negative clicks per object in ``clicks`` mode (>= 0).
        click_mode: "center" (farthest-from-border pixel) or "random" first positive click.
        num_interactions: budget N of the iterative protocol, first prompt included.
        start: first prompt of the iterative protocol, "box" or "click".
        feed_logits: pass the previous low-res logits as mask input in iterative mode.
        key_slice: "largest" or "middle" object slice for the 3D propagation box.
        margin: pixels added to every side of each propagated box.
        min_area: predictions with fewer pixels end propagation.
    """

    seed: int | None = None
    box_jitter: tuple[float, ...] = (0.0,)
    jitter_unit: str = "pixels"
    num_positive: int = 1
    num_negative: int = 0
    click_mode: str = "center"
    num_interactions: int = 5
    start: str = "box"
    feed_logits: bool = True
    key_slice: str = "largest"
    margin: float = 0.0
    min_area: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "box_jitter", tuple(float(level) for level in self.box_jitter))
        if not self.box_jitter or any(not math.isfinite(level) or level < 0 for level in self.box_jitter):
            raise ValueError(f"box_jitter must list finite noise levels >= 0, got {self.box_jitter}")
        for name, value, choices in (
            ("jitter_unit", self.jitter_unit, JITTER_UNITS),
            ("click_mode", self.click_mode, CLICK_MODES),
            ("start", self.start, START_PROMPTS),
            ("key_slice", self.key_slice, KEY_SLICE_RULES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.num_positive < 0 or self.num_negative < 0 or self.num_positive + self.num_negative == 0:
            raise ValueError(
                f"num_positive ({self.num_positive}) and num_negative ({self.num_negative}) must be >= 0 "
                "with at least one click"
            )
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number of pixels >= 0, got {self.margin}")
        self.interactive()  # validates num_interactions

    def interactive(self) -> InteractiveSettings:
        """Return the settings of :func:`fmadapt.evaluate.interactive.run_interactive`."""
        return InteractiveSettings(self.num_interactions, self.start, self.click_mode, self.feed_logits)


def noisy_box(
    box: np.ndarray, image_size: tuple[int, int], level: float, unit: str, rng: np.random.Generator
) -> np.ndarray:
    """Add box noise: each XYXY coordinate moves by a uniform shift in [-s, s].

    ``s`` is ``level`` pixels for ``unit="pixels"``, and ``level`` times the box width
    (x coordinates) or height (y coordinates) in pixels, ``x1 - x0 + 1``, for
    ``unit="fraction"``. The result is sorted so x0 <= x1 and y0 <= y1 and clipped to the
    H×W image. Level 0 returns the box unchanged without drawing from ``rng``.
    """
    if unit not in JITTER_UNITS:
        raise ValueError(f"unit must be one of {JITTER_UNITS}, got {unit!r}")
    box = np.asarray(box, dtype=np.float32)
    if level == 0:
        return box
    if unit == "pixels":
        return jitter_box(box, image_size, max_shift=level, rng=rng)
    height, width = image_size
    sides = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, dtype=np.float64)
    shifted = box + rng.uniform(-1.0, 1.0, size=4) * level * sides
    x0, x1 = np.clip(sorted((shifted[0], shifted[2])), 0, width - 1)
    y0, y1 = np.clip(sorted((shifted[1], shifted[3])), 0, height - 1)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def run_protocol(
    run_dir: str | Path,
    mode: str,
    split: str | None = None,
    overrides: list[str] | None = None,
    settings: ProtocolSettings | None = None,
) -> list[EvaluationResult]:
    """Evaluate the run in ``run_dir`` with a prompt protocol; one result per box noise level.

    ``overrides`` are ``evaluate.*`` recipe keys as ``key=value``; ``evaluate.max_cases``,
    ``evaluate.nsd_tolerance_mm`` and ``evaluate.write_predictions`` apply here.
    """
    if mode not in PROTOCOL_MODES:
        raise ValueError(f"mode {mode!r} is invalid; choose one of {', '.join(PROTOCOL_MODES)}")
    settings = settings or ProtocolSettings()
    if not isinstance(settings, ProtocolSettings):
        raise TypeError(f"settings must be a ProtocolSettings, got {type(settings).__name__}")
    run_dir = Path(run_dir)
    recipe, model = load_run(run_dir, overrides)
    split = split or recipe.evaluate.split
    if split not in SPLIT_NAMES:
        raise ValueError(f"split {split!r} is invalid; choose one of {', '.join(SPLIT_NAMES)}")
    if mode == "propagate3d" and recipe.data.axis is None:
        raise RecipeError(f"mode 'propagate3d' needs volumes, but the run in {run_dir} has 2D images (data.axis is null)")
    if settings.seed is None:
        settings = dataclasses.replace(settings, seed=recipe.seed)

    plan = SplitPlan.load(run_dir / SPLIT_FILE)
    info = read_dataset(resolve_data_root(recipe))
    dataset_ids = class_ids(info, recipe)
    case_ids = plan.cases[split][: recipe.evaluate.max_cases]
    cases = [load_normalised_case(info, case_id, recipe, list(dataset_ids.values())) for case_id in case_ids]
    context = _Context(recipe, plan, split, mode, settings, Predictor(model, intensity=IntensitySpec(mode="none")))

    uses_box = mode == "propagate3d" or (mode == "iterative" and settings.start == "box")
    results = []
    for level in settings.box_jitter if uses_box else (None,):
        folder = run_dir / _folder_name(split, mode, level, settings.jitter_unit)
        summary = _write_evaluation(context, cases, dataset_ids, level, folder)
        results.append(EvaluationResult(folder, mode, level, summary))
        logger.info("%s: mean Dice %s over %d cases", folder.name, summary["overall"]["dice"]["mean"], len(cases))
    return results


@dataclass
class _Context:
    recipe: Recipe
    plan: SplitPlan
    split: str
    mode: str
    settings: ProtocolSettings
    predictor: Predictor


def _folder_name(split: str, mode: str, level: float | None, unit: str) -> str:
    if level is None:
        return f"eval_{split}_{mode}"
    return f"eval_{split}_{mode}_jitter{level:g}" + ("frac" if unit == "fraction" else "")


def _write_evaluation(context: _Context, cases: list, dataset_ids: dict[str, int], level, folder: Path) -> dict:
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "predictions").mkdir(parents=True)
    rng = np.random.default_rng(context.settings.seed)
    names = list(dataset_ids)
    table, curves, propagation_rows = MetricTable(), [], []
    views = {}
    try:
        for case in tqdm(cases, desc=f"{context.mode} {context.split}", leave=False):
            region, masks, extra = _run_case(context, case, names, level, rng, curves, propagation_rows)
            rows = _class_rows(masks, case.label, region, case.label_source.spacing, names, context.recipe)
            noise = {} if level is None else {"jitter": level, "jitter_unit": context.settings.jitter_unit}
            table.add_case(case.case_id, rows, mode=context.mode, **noise, **extra)
            region_labels = _merged_dataset_labels(masks[(slice(None), *region)], list(range(1, len(names) + 1)))
            views[case.case_id] = cut_overlay_case(
                case.case_id, case.image[region], case.label[region], region_labels, context.recipe.data.axis
            )
            if context.recipe.evaluate.write_predictions:
                labels = _merged_dataset_labels(masks, list(dataset_ids.values()))
                write_segmentation(partial / "predictions" / f"{case.case_id}.nii.gz", labels, case.label_source)
        summary = table.summary()
        table.to_csv(partial / "per_case.csv")
        if context.mode == "iterative":
            summary["dice_per_interaction"] = _write_curves(partial, curves, names, context.settings.num_interactions)
        if context.mode == "propagate3d":
            _write_csv(partial / PROPAGATION_FILE, propagation_rows)
        _write_json(partial / "summary.json", summary)
        record = {"mode": context.mode, "split": context.split, "jitter": level, "cases": [c.case_id for c in cases]}
        _write_json(partial / PROTOCOL_FILE, {**record, **dataclasses.asdict(context.settings)})
        write_case_overlays(partial, table.rows, views)
        listed = {key: value for key, value in record.items() if key != "cases"}
        write_report(partial, {**listed, **dataclasses.asdict(context.settings)})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return summary


def _run_case(context: _Context, case, names, level, rng, curves: list, propagation_rows: list):
    """Predict one case; returns the scored region, C×(volume) bool masks and extra CSV columns."""
    axis = context.recipe.data.axis
    slices, block = split_slices_for_evaluation(case, context.plan, context.split, axis)
    region = [slice(None)] * case.label.ndim
    if block is not None:
        region[axis] = slice(*block)
    region = tuple(region)
    if context.mode == "propagate3d":
        masks, rows = _propagate_case(context, case, block, slices, names, level, rng)
        propagation_rows.extend(rows)
        return region, masks, {"prompts": sum(row["prompts_used"] for row in rows)}
    if context.mode == "clicks":
        masks = _clicks_case(context, case, slices, len(names), rng)
        return region, masks, {"clicks": context.settings.num_positive + context.settings.num_negative}
    history, auc_inputs = _iterative_case(context, case, slices, len(names), level, rng)
    for c, name in enumerate(names):
        reference = case.label[region] == c + 1
        curve = [dice(volume[c][region], reference) for volume in history]
        curves.append({"case": case.case_id, "class_name": name, "class_id": c + 1, "dice": curve, **auc_inputs[c]})
    return region, history[-1], {"interactions": context.settings.num_interactions}


def _slice_index(axis: int | None, index: int | None, ndim: int) -> tuple:
    region = [slice(None)] * ndim
    if axis is not None:
        region[axis] = index
    return tuple(region)


def _clicks_case(context: _Context, case, slices, num_classes: int, rng) -> np.ndarray:
    settings, axis = context.settings, context.recipe.data.axis
    masks = np.zeros((num_classes, *case.label.shape), dtype=bool)
    predict = predictor_prompt_function(context.predictor)
    for sample in slices:
        present = [c for c in range(1, num_classes + 1) if (sample.label == c).any()]
        if not present:
            continue
        context.predictor.set_image(sample.image)
        for c in present:
            clicks = initial_clicks(
                sample.label == c,
                num_positive=settings.num_positive,
                num_negative=settings.num_negative,
                mode=settings.click_mode,
                rng=rng,
            )
            mask, _ = predict(None, *clicks_to_arrays(clicks), None)
            masks[(c - 1, *_slice_index(axis, sample.index, case.label.ndim))] = mask
    return masks


def _iterative_case(context: _Context, case, slices, num_classes: int, level, rng):
    """Run the iterative protocol on every present object; returns N volumes and per-class counts."""
    settings, axis = context.settings, context.recipe.data.axis
    count = settings.num_interactions
    history = np.zeros((count, num_classes, *case.label.shape), dtype=bool)
    counts = [{"objects": 0, "stopped_early": 0} for _ in range(num_classes)]
    predict = predictor_prompt_function(context.predictor)
    for sample in slices:
        present = [c for c in range(1, num_classes + 1) if (sample.label == c).any()]
        if not present:
            continue
        context.predictor.set_image(sample.image)
        for c in present:
            reference = sample.label == c
            box = None
            if settings.start == "box":
                box = noisy_box(box_from_mask(reference), reference.shape, level, settings.jitter_unit, rng)
            result = run_interactive(predict, reference, settings.interactive(), box=box, rng=rng)
            counts[c - 1]["objects"] += 1
            counts[c - 1]["stopped_early"] += int(result.stopped_early)
            place = _slice_index(axis, sample.index, case.label.ndim)
            for k in range(count):
                history[(k, c - 1, *place)] = result.mask_after(k + 1)
    return history, counts


def _propagate_case(context: _Context, case, block, slices, names, level, rng):
    settings, axis = context.settings, context.recipe.data.axis
    by_index = {sample.index: sample for sample in slices}
    block = block or (0, case.label.shape[axis])
    image_size = slices[0].label.shape
    masks = np.zeros((len(names), *case.label.shape), dtype=bool)
    rows = []

    # NOTE: every class encodes the slices it visits again. Keeping all embeddings of a case
    # would avoid that, but a SAM ViT-B embedding is 4 MiB (256×64×64 float32) per slice.
    def predict_slice(index: int, box: np.ndarray) -> np.ndarray:
        context.predictor.set_image(by_index[index].image)
        masks_k, scores, _ = context.predictor.predict(box=box, multimask_output=False)
        return masks_k[int(np.argmax(scores))]

    for c, name in enumerate(names, start=1):
        reference = case.label == c
        if not reference[_block_region(axis, block, case.label.ndim)].any():
            continue
        key = choose_key_slice(reference, axis, settings.key_slice, slice_range=block)
        key_box = noisy_box(box_from_mask(by_index[key].label == c), image_size, level, settings.jitter_unit, rng)
        result = propagate(
            predict_slice,
            key_index=key,
            key_box=key_box,
            slice_range=block,
            image_size=image_size,
            margin=settings.margin,
            min_area=settings.min_area,
        )
        masks[c - 1] = result.to_volume(case.label.shape, axis)
        present = np.flatnonzero(np.count_nonzero(reference, axis=tuple(a for a in range(3) if a != axis)))
        rows.append(
            {
                "case": case.case_id,
                "class_name": name,
                "class_id": c,
                "key_slice": key,
                "first_slice": result.first_index,
                "last_slice": result.last_index,
                "reference_first_slice": int(present[0]),
                "reference_last_slice": int(present[-1]),
                "slices_predicted": len(result.masks),
                "prompts_used": result.prompts_used,
            }
        )
    return masks, rows


def _block_region(axis: int, block: tuple[int, int], ndim: int) -> tuple:
    region = [slice(None)] * ndim
    region[axis] = slice(*block)
    return tuple(region)


def _class_rows(masks, reference, region, spacing, names, recipe) -> list[dict]:
    rows = []
    for c, name in enumerate(names, start=1):
        predicted = masks[c - 1][region].astype(np.uint8)
        expected = (reference[region] == c).astype(np.uint8)
        (row,) = compute_case_metrics(predicted, expected, spacing, {name: 1}, recipe.evaluate.nsd_tolerance_mm)
        row["class_id"] = c
        rows.append(row)
    return rows


def _merged_dataset_labels(masks: np.ndarray, dataset_label_ids: list[int]) -> np.ndarray:
    """Merge C class masks into dataset label ids; the class listed first wins overlaps."""
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for c in reversed(range(masks.shape[0])):
        labels[masks[c]] = dataset_label_ids[c]
    return labels


def _write_curves(folder: Path, curves: list[dict], names: list[str], count: int) -> dict:
    """Write the Dice curves as CSV and PNG; returns their means for summary.json."""
    header = [f"dice_{k}" for k in range(1, count + 1)]
    rows = []
    for curve in curves:
        values = dict(zip(header, curve["dice"]))
        auc = float(np.mean(curve["dice"]))
        counts = {"auc": auc, "objects": curve["objects"], "stopped_early": curve["stopped_early"]}
        rows.append({key: curve[key] for key in ("case", "class_name", "class_id")} | values | counts)
    _write_csv(folder / CURVE_FILE, rows)

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


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    columns = list(rows[0]) if rows else ["case"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    _write_text(path, buffer.getvalue())


def _write_json(path: Path, data: dict) -> None:
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
