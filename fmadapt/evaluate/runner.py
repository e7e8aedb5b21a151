"""Evaluate a trained run on its held-out split, prompted or automatic.

Prompted mode gives the model the ground-truth box of every class on every slice where the
class is present, once per jitter level of the recipe (``evaluate.box_jitter``, pixels).
Automatic mode gives no prompt: the model predicts all recipe classes from the image alone.
Slice predictions are put back into volumes, and metrics are computed per case and class
in 3D with the voxel spacing (2D images: per image, spacing 1 pixel). Each class is judged
on its own mask (logit > 0), so overlapping masks of two classes are not cut against each
other; the written label map gives overlaps to the class with the larger logit.

Each evaluation writes ``per_case.csv``, ``summary.json`` and ``predictions/CASE.nii.gz``
into ``RUN_DIR/eval_<split>_<mode>[_jitter<J>]``. The tables number classes in recipe order
(``class_id``) and also give the dataset label value (``label_id``) that the NIfTI files use.
Then ``overlays.png`` shows image, reference and prediction of the worst, median and best
case by Dice (a volume at its slice with the most reference foreground), and ``report.md``
lists the settings and links the figures.
Automatic mode also keeps each case's class probabilities (float16, evaluated region only)
and writes the sweeps of :mod:`fmadapt.evaluate.sweeps`: ``threshold_sweep.csv``, and with
``evaluate.detection: true`` also ``detection.json`` and ``froc.png``. The folder is built
under a temporary name and renamed when complete, so a failed evaluation leaves no partial
report.

Under several processes (``accelerate launch`` or ``torchrun``), process r of R predicts and
scores cases r, r + R, r + 2R, ... on its own device (:func:`fmadapt.evaluate.sharding.evaluation_device`)
and writes their prediction files. The main process gathers the results in case order, one
round of R cases at a time (:mod:`fmadapt.evaluate.sharding`), and writes every other file. It
also runs the sweeps of automatic mode on the gathered probabilities, so that work is not split.
With box jitter, each process draws the random shifts of the other processes' cases too, so
every case gets the same boxes, and the output the same rows, as in one process. When a process
fails on a case, every process raises ShardedEvaluationError at the end of that round, and the
main process removes the partial folder.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmadapt.config import Recipe, resolve_data_root
from fmadapt.data.datasets import read_dataset
from fmadapt.data.io import write_segmentation
from fmadapt.data.prompts import box_from_mask, jitter_box
from fmadapt.errors import RecipeError
from fmadapt.evaluate.metrics import compute_case_metrics
from fmadapt.evaluate.report import OverlayCase, cut_overlay_case, write_case_overlays, write_report
from fmadapt.evaluate.results import MetricTable
from fmadapt.evaluate.sharding import ProcessGroup, evaluation_device, gather_cases, join_process_group, run_on_main
from fmadapt.evaluate.sweeps import CHOSEN_THRESHOLD, ProbabilitySweeps, probabilities_from_logits
from fmadapt.inference.cache import EmbeddingCache, open_embedding_cache
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


@dataclass
class _CasePrediction:
    """Predictions of one case: C×(label shape) bool class masks, the merged uint8 label map
    with classes 1..C, and in automatic mode the C×(region shape) float16 probabilities."""

    masks: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray | None


@dataclass
class _CaseResult:
    """Results of one scored case that the main process collects: metric rows with extra
    columns, the overlay view and, in automatic mode, the C×(region shape) float16
    probabilities with the region's reference label map and spacing (mm) for the sweeps."""

    case_id: str
    rows: list[dict]
    extra: dict
    view: OverlayCase
    probabilities: np.ndarray | None
    reference: np.ndarray | None
    spacing: tuple[float, ...]


def evaluate_run(
    run_dir: str | Path,
    mode: str,
    split: str | None = None,
    overrides: list[str] | None = None,
    protocol=None,
) -> list[EvaluationResult]:
    """Evaluate the run in ``run_dir``; prompted mode returns one result per jitter level.

    ``overrides`` are ``evaluate.*`` recipe keys or ``data.root`` as ``key=value``, e.g.
    ``evaluate.max_cases=5``.
    The modes ``clicks``, ``iterative`` and ``propagate3d`` run
    :func:`fmadapt.evaluate.protocols.run_protocol` with ``protocol`` (a ProtocolSettings,
    None for its defaults).

    Under several processes every mode splits the cases over them, evaluates on each process's
    device and returns the same results on every rank.
    With ``evaluate.cache_dir`` set, every mode reads image embeddings from that
    :class:`fmadapt.inference.cache.EmbeddingCache` folder and stores the ones it computes.
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
    model.to(evaluation_device())
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
    group = join_process_group()
    cache = open_embedding_cache(recipe.evaluate.cache_dir, "evaluate.cache_dir")
    results = []
    for jitter in jitters:
        name = f"eval_{split}_{mode}" + ("" if jitter is None else f"_jitter{jitter:g}")
        folder = run_dir / name
        summary = _evaluate_cases(model, recipe, plan, cases, split, mode, jitter, dataset_ids, folder, group, cache)
        results.append(EvaluationResult(folder, mode, jitter, summary))
        logger.info("%s: mean Dice %s over %d cases", name, _mean_dice(summary), summary["n_cases"])
    if cache is not None:
        logger.info("embedding cache %s: %d hits, %d misses", cache.folder, cache.hits, cache.misses)
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
    group: ProcessGroup,
    cache: EmbeddingCache | None = None,
) -> dict:
    """Score this process's share of ``cases``. The main process writes ``folder``, and every
    process returns the summary.

    Under several processes, a failure on any of them makes every process raise
    ShardedEvaluationError, and the main process removes the partial folder.
    """
    partial = folder.with_name(folder.name + ".partial")
    table = MetricTable()
    recipe_ids = {name: index + 1 for index, name in enumerate(dataset_ids)}
    rng = np.random.default_rng(recipe.seed)
    sweeps = _automatic_sweeps(recipe, list(recipe_ids)) if mode == "automatic" else None
    views = {}

    def score(index: int) -> _CaseResult:
        return _score_case(model, recipe, plan, cases[index], split, mode, jitter, dataset_ids, rng, partial, cache)

    def draw_jitter(index: int) -> None:
        _draw_case_jitter(cases[index], plan, split, recipe.data.axis, jitter, len(recipe_ids), rng)

    def collect(result: _CaseResult) -> None:
        table.add_case(result.case_id, result.rows, **result.extra)
        if sweeps is not None:
            sweeps.add_case(result.case_id, result.probabilities, result.reference, result.spacing)
        views[result.case_id] = result.view

    def write_folder() -> dict:
        table.write(partial)
        if sweeps is not None:
            sweeps.write(partial)
        write_case_overlays(partial, table.rows, views)
        write_report(partial, _report_settings(recipe, split, mode, jitter))
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        return table.summary()

    case_ids = [case.case_id for case in cases]
    skip = draw_jitter if mode == "prompted" and jitter else None
    try:
        run_on_main(group, f"creating {partial}", lambda: create_partial_folder(partial))
        gather_cases(case_ids, group, score, collect, skip, description=f"{mode} {split}")
        # Every process waits for this broadcast, so none returns before the folder is in place.
        return run_on_main(group, f"writing {folder}", write_folder)
    except BaseException:
        if group.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def create_partial_folder(partial: Path) -> None:
    """Create ``partial/predictions``, removing what an earlier failed evaluation left there."""
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "predictions").mkdir(parents=True)


def _score_case(
    model,
    recipe: Recipe,
    plan: SplitPlan,
    case: LoadedCase,
    split: str,
    mode: str,
    jitter: float | None,
    dataset_ids: dict[str, int],
    rng: np.random.Generator,
    partial: Path,
    cache: EmbeddingCache | None = None,
) -> _CaseResult:
    """Predict and score one case, and write its prediction file into ``partial/predictions``."""
    recipe_ids = {name: index + 1 for index, name in enumerate(dataset_ids)}
    axis = recipe.data.axis
    slices, block = split_slices_for_evaluation(case, plan, split, axis)
    region = _evaluated_region(case.label.ndim, axis, block)
    prediction = _predict_case(model, case, slices, axis, block, mode, jitter, len(recipe_ids), rng, cache)

    spacing = case.label_source.spacing
    rows = class_metric_rows(prediction.masks, case.label, region, spacing, dataset_ids, recipe)
    extra = {"mode": mode, "jitter": jitter if jitter is not None else ""}
    if block is not None:
        extra["slices"] = f"{block[0]}-{block[1] - 1}"
    view = cut_overlay_case(case.case_id, case.image[region], case.label[region], prediction.labels[region], axis)
    if recipe.evaluate.write_predictions:
        labels = _to_dataset_ids(prediction.labels, list(dataset_ids.values()))
        write_segmentation(partial / "predictions" / f"{case.case_id}.nii.gz", labels, case.label_source)

    reference = case.label[region] if prediction.probabilities is not None else None
    return _CaseResult(case.case_id, rows, extra, view, prediction.probabilities, reference, spacing)


def _draw_case_jitter(
    case: LoadedCase,
    plan: SplitPlan,
    split: str,
    axis: int | None,
    jitter: float,
    num_classes: int,
    rng: np.random.Generator,
) -> None:
    """Draw, and drop, the box shifts that predicting ``case`` takes from ``rng``."""
    slices, _ = split_slices_for_evaluation(case, plan, split, axis)
    for sample in slices:
        _prompt_boxes(sample.label, num_classes, jitter, rng)


def _automatic_sweeps(recipe: Recipe, class_names: list[str]) -> ProbabilitySweeps:
    settings = recipe.evaluate
    return ProbabilitySweeps(class_names, settings.threshold_sweep, settings.min_size_sweep_mm3, settings.detection)


def _evaluated_region(ndim: int, axis: int | None, block: tuple[int, int] | None) -> tuple:
    """Index of the evaluated part of a case: the split's slice block, or everything."""
    region = [slice(None)] * ndim
    if block is not None:
        region[axis] = slice(*block)
    return tuple(region)


def _predict_case(
    model,
    case: LoadedCase,
    slices: list[SliceSample],
    axis: int | None,
    block: tuple[int, int] | None,
    mode: str,
    jitter: float | None,
    num_classes: int,
    rng: np.random.Generator,
    cache: EmbeddingCache | None = None,
) -> _CasePrediction:
    """Predict every slice of ``slices`` and place the results into volumes like case.label.

    Masks are logit > 0. Slices outside ``slices`` stay empty (probability 0). Probabilities
    cover only the slice block ``block`` of a volume, so a slice's place in them is its index
    minus ``block[0]``.
    """
    masks = np.zeros((num_classes, *case.label.shape), dtype=bool)
    merged = np.zeros(case.label.shape, dtype=np.uint8)
    probabilities = None
    if mode == "automatic":
        region_shape = case.label[_evaluated_region(case.label.ndim, axis, block)].shape
        probabilities = np.zeros((num_classes, *region_shape), dtype=np.float16)
    for sample in slices:
        embedding = embed_image(model, sample.image, cache)
        size = sample.label.shape[:2]
        if mode == "automatic":
            logits = class_logits_automatic(model, embedding, size)
        else:
            boxes = _prompt_boxes(sample.label, num_classes, jitter, rng)
            logits = class_logits_from_boxes(model, embedding, boxes, size, num_classes)
        index = [slice(None)] * case.label.ndim
        if axis is not None:
            index[axis] = sample.index
        masks[(slice(None), *index)] = (logits > 0).numpy()
        merged[tuple(index)] = logits_to_label_map(logits)
        if probabilities is not None:
            if block is not None:
                index[axis] = sample.index - block[0]
            probabilities[(slice(None), *index)] = probabilities_from_logits(logits)
    return _CasePrediction(masks, merged, probabilities)


def _prompt_boxes(
    label: np.ndarray, num_classes: int, jitter: float | None, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Return the XYXY box of each class 1..C present in the H×W ``label``, jittered by up to ``jitter`` pixels."""
    size = label.shape[:2]
    boxes = {}
    for c in range(1, num_classes + 1):
        box = box_from_mask(label == c)
        if box is None:
            continue
        if jitter:
            box = jitter_box(box, size, max_shift=jitter, rng=rng)
        boxes[c] = box
    return boxes


def _report_settings(recipe: Recipe, split: str, mode: str, jitter: float | None) -> dict:
    """Settings listed at the top of report.md."""
    settings = {"mode": mode, "split": split, "max_cases": recipe.evaluate.max_cases}
    settings["nsd_tolerance_mm"] = recipe.evaluate.nsd_tolerance_mm
    if jitter is not None:
        settings["box_jitter_pixels"] = jitter
    if mode == "automatic":
        settings["probability_threshold"] = CHOSEN_THRESHOLD
        settings["min_component_size_mm3"] = 0.0
        settings["threshold_sweep"] = list(recipe.evaluate.threshold_sweep)
        settings["min_size_sweep_mm3"] = list(recipe.evaluate.min_size_sweep_mm3)
        settings["detection"] = recipe.evaluate.detection
        settings["probability_storage"] = "float16, evaluated region only"
    return settings


def class_metric_rows(
    masks: np.ndarray,
    reference: np.ndarray,
    region: tuple,
    spacing: tuple[float, ...],
    dataset_ids: dict[str, int],
    recipe: Recipe,
) -> list[dict]:
    """Metrics of each class on its own C×… mask channel inside ``region`` of the volume.

    ``reference`` has the recipe classes 1..C, and each row gets that ``class_id`` and the
    class's ``label_id`` in ``dataset_ids`` (dataset label values in recipe order).
    """
    rows = []
    for class_id, (name, label_id) in enumerate(dataset_ids.items(), start=1):
        predicted = masks[class_id - 1][region].astype(np.uint8)
        expected = (reference[region] == class_id).astype(np.uint8)
        (row,) = compute_case_metrics(predicted, expected, spacing, {name: 1}, recipe.evaluate.nsd_tolerance_mm)
        row["class_id"] = class_id
        row["label_id"] = label_id
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
