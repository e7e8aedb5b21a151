"""Evaluate a trained run on its held-out split, prompted or automatic.

Prompted mode gives the model the ground-truth box of every class on every slice where the
class is present, once per jitter level of the recipe (``evaluate.box_jitter``, pixels).
Automatic mode gives no prompt: the model predicts all recipe classes from the image alone.
Slice predictions are put back into volumes, and metrics are computed per case and class
in 3D with the voxel spacing (2D images: per image, spacing 1 pixel). Each class is judged
on its own mask (logit > 0), so overlapping masks of two classes are not cut against each
other; the written label map gives overlaps to the class with the larger logit.

Each evaluation writes ``per_case.csv``, ``summary.json`` and ``predictions/CASE.nii.gz``
into ``RUN_DIR/eval_<split>_<mode>[_jitter<J>]``. The folder is built under a temporary
name and renamed when complete, so a failed evaluation leaves no partial report.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fmadapt.config import Recipe, resolve_data_root
from fmadapt.data.datasets import read_dataset
from fmadapt.data.io import write_segmentation
from fmadapt.data.prompts import box_from_mask, jitter_box
from fmadapt.errors import RecipeError
from fmadapt.evaluate.metrics import compute_case_metrics
from fmadapt.evaluate.results import MetricTable
from fmadapt.inference.label_maps import (
    class_logits_automatic,
    class_logits_from_boxes,
    embed_image,
    logits_to_label_map,
)
from fmadapt.runs import SPLIT_FILE, load_run
from fmadapt.train.samples import LoadedCase, SliceSample, class_ids, load_normalised_case, split_slices_for_evaluation
from fmadapt.train.splits import SPLIT_NAMES, SplitPlan

logger = logging.getLogger(__name__)

EVALUATION_MODES = ("prompted", "automatic")


@dataclass
class EvaluationResult:
    """One evaluation folder and its summary dict."""

    folder: Path
    mode: str
    jitter: float | None
    summary: dict


def evaluate_run(
    run_dir: str | Path,
    mode: str,
    split: str | None = None,
    overrides: list[str] | None = None,
    protocol=None,
) -> list[EvaluationResult]:
    """Evaluate the run in ``run_dir``; prompted mode returns one result per jitter level.

    ``overrides`` are ``evaluate.*`` recipe keys as ``key=value``, e.g. ``evaluate.max_cases=5``.
    The modes ``clicks``, ``iterative`` and ``propagate3d`` run
    :func:`fmadapt.evaluate.protocols.run_protocol` with ``protocol`` (a ProtocolSettings,
    None for its defaults).
    """
    # Imported here because the protocols module imports EvaluationResult from this one.
    from fmadapt.evaluate.protocols import PROTOCOL_MODES, run_protocol

    if mode in PROTOCOL_MODES:
        return run_protocol(run_dir, mode, split, overrides, protocol)
    if mode not in EVALUATION_MODES:
        choices = ", ".join(EVALUATION_MODES + PROTOCOL_MODES)
        raise ValueError(f"mode {mode!r} is invalid; choose one of {choices}")
    run_dir = Path(run_dir)
    recipe, model = load_run(run_dir, overrides)
    split = split or recipe.evaluate.split
    if split not in SPLIT_NAMES:
        raise ValueError(f"split {split!r} is invalid; choose one of {', '.join(SPLIT_NAMES)}")
    if mode == "automatic" and not getattr(model, "class_names", ()):
        raise RecipeError(f"the model in {run_dir} has no class embeddings, so it cannot segment without prompts")
    plan = SplitPlan.load(run_dir / SPLIT_FILE)
    info = read_dataset(resolve_data_root(recipe))
    dataset_ids = class_ids(info, recipe)
    label_ids = list(dataset_ids.values())

    jitters = [float(j) for j in recipe.evaluate.box_jitter] if mode == "prompted" else [None]
    case_ids = plan.cases[split][: recipe.evaluate.max_cases]
    cases = [load_normalised_case(info, case_id, recipe, label_ids) for case_id in case_ids]
    results = []
    for jitter in jitters:
        name = f"eval_{split}_{mode}" + ("" if jitter is None else f"_jitter{jitter:g}")
        folder = run_dir / name
        summary = _evaluate_cases(model, recipe, plan, cases, split, mode, jitter, dataset_ids, folder)
        results.append(EvaluationResult(folder, mode, jitter, summary))
        logger.info("%s: mean Dice %s over %d cases", name, _mean_dice(summary), summary["n_cases"])
    return results


def _evaluate_cases(
    model,
    recipe: Recipe,
    plan: SplitPlan,
    cases: list[LoadedCase],
    split: str,
    mode: str,
    jitter: float | None,
    dataset_ids: dict[str, int],
    folder: Path,
) -> dict:
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "predictions").mkdir(parents=True)
    table = MetricTable()
    recipe_ids = {name: index + 1 for index, name in enumerate(dataset_ids)}
    rng = np.random.default_rng(recipe.seed)
    axis = recipe.data.axis
    try:
        for case in tqdm(cases, desc=f"{mode} {split}", leave=False):
            slices, block = split_slices_for_evaluation(case, plan, split, axis)
            masks, merged = _predict_case(model, case, slices, axis, mode, jitter, len(recipe_ids), rng)
            region = [slice(None)] * case.label.ndim
            if block is not None:
                region[axis] = slice(*block)
            region = tuple(region)
            rows = _class_metrics(masks, case.label, region, case.label_source.spacing, recipe_ids, recipe)
            extra = {"mode": mode, "jitter": jitter if jitter is not None else ""}
            if block is not None:
                extra["slices"] = f"{block[0]}-{block[1] - 1}"
            table.add_case(case.case_id, rows, **extra)
            if recipe.evaluate.write_predictions:
                labels = _to_dataset_ids(merged, list(dataset_ids.values()))
                write_segmentation(partial / "predictions" / f"{case.case_id}.nii.gz", labels, case.label_source)
        table.write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return table.summary()


def _predict_case(
    model,
    case: LoadedCase,
    slices: list[SliceSample],
    axis: int | None,
    mode: str,
    jitter: float | None,
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict every slice of ``slices`` and place the results into volumes like case.label.

    Returns:
        C×(shape of case.label) bool class masks (logit > 0) and the merged uint8 label
        map with classes 1..C. Slices outside ``slices`` stay empty.
    """
    masks = np.zeros((num_classes, *case.label.shape), dtype=bool)
    merged = np.zeros(case.label.shape, dtype=np.uint8)
    for sample in slices:
        embedding = embed_image(model, sample.image)
        size = sample.label.shape[:2]
        if mode == "automatic":
            logits = class_logits_automatic(model, embedding, size)
        else:
            boxes = {}
            for c in range(1, num_classes + 1):
                box = box_from_mask(sample.label == c)
                if box is None:
                    continue
                if jitter:
                    box = jitter_box(box, size, max_shift=jitter, rng=rng)
                boxes[c] = box
            logits = class_logits_from_boxes(model, embedding, boxes, size, num_classes)
        index = [slice(None)] * case.label.ndim
        if axis is not None:
            index[axis] = sample.index
        masks[(slice(None), *index)] = (logits > 0).numpy()
        merged[tuple(index)] = logits_to_label_map(logits)
    return masks, merged


def _class_metrics(
    masks: np.ndarray,
    reference: np.ndarray,
    region: tuple,
    spacing: tuple[float, ...],
    recipe_ids: dict[str, int],
    recipe: Recipe,
) -> list[dict]:
    """Metrics of each class on its own C×… mask channel inside ``region`` of the volume."""
    rows = []
    for name, class_id in recipe_ids.items():
        predicted = masks[class_id - 1][region].astype(np.uint8)
        expected = (reference[region] == class_id).astype(np.uint8)
        (row,) = compute_case_metrics(predicted, expected, spacing, {name: 1}, recipe.evaluate.nsd_tolerance_mm)
        row["class_id"] = class_id
        rows.append(row)
    return rows


def _to_dataset_ids(labels: np.ndarray, dataset_label_ids: list[int]) -> np.ndarray:
    """Map recipe classes 1..C back to the dataset's own label ids for the written NIfTI."""
    lookup = np.zeros(len(dataset_label_ids) + 1, dtype=np.int32)
    lookup[1:] = dataset_label_ids
    return lookup[labels]


def _mean_dice(summary: dict) -> str:
    mean = summary.get("overall", {}).get("dice", {}).get("mean")
    return "n/a" if mean is None else f"{mean:.4f}"
