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
and height for y (``jitter_unit="fraction"``). Each case draws its clicks and box noise from
its own generator, seeded by the seed and the case id
(:func:`fmadapt.evaluate.protocol_settings.case_generator`). Every level
starts these generators afresh, so levels differ only in their noise.

Each evaluation writes ``RUN_DIR/eval_<split>_<mode>[_jitter<J>[frac]]`` with ``per_case.csv``,
``summary.json``, ``predictions/CASE.nii.gz``, ``protocol.json`` (mode, split, seed, noise
level and every setting), ``overlays.png`` (worst, median and best case by Dice) and
``report.md``, built under a temporary name and renamed when complete. Where the
masks of two classes overlap, the written label map keeps the class listed first in the recipe.

Under several processes (``accelerate launch`` or ``torchrun``), process r of R loads and
evaluates cases r, r + R, ... on its own device and writes their prediction files. The main
process gathers the results in case order and writes every other file
(:mod:`fmadapt.evaluate.sharding`). Since each case has its own generator, the files are those
of one process. When a process fails on a case, every process raises ShardedEvaluationError
and the main process removes the partial folder.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmadapt.config import Recipe, resolve_data_root
from fmadapt.data.datasets import read_dataset
from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.io import write_segmentation
from fmadapt.data.prompts import box_from_mask
from fmadapt.errors import RecipeError
from fmadapt.evaluate.clicks import clicks_to_arrays, initial_clicks
from fmadapt.evaluate.interactive import predictor_prompt_function, run_interactive
from fmadapt.evaluate.metrics import dice
from fmadapt.evaluate.propagation import choose_key_slice, propagate
from fmadapt.evaluate.protocol_files import write_csv, write_curves, write_json
from fmadapt.evaluate.protocol_settings import JITTER_UNITS, ProtocolSettings, case_generator, noisy_box
from fmadapt.evaluate.report import OverlayCase, cut_overlay_case, write_case_overlays, write_report
from fmadapt.evaluate.results import MetricTable
from fmadapt.evaluate.runner import EvaluationResult, class_metric_rows, create_partial_folder
from fmadapt.evaluate.sharding import ProcessGroup, evaluation_device, gather_cases, join_process_group, run_on_main
from fmadapt.inference.cache import open_embedding_cache
from fmadapt.inference.predictor import Predictor
from fmadapt.inference.slice_embeddings import SliceEmbeddings
from fmadapt.runs import SPLIT_FILE, load_run
from fmadapt.train.samples import LoadedCase, class_ids, load_normalised_case, split_slices_for_evaluation
from fmadapt.train.splits import SPLIT_NAMES, SplitPlan

__all__ = ["JITTER_UNITS", "PROTOCOL_MODES", "ProtocolSettings", "noisy_box", "run_protocol"]

logger = logging.getLogger(__name__)

PROTOCOL_MODES = ("clicks", "iterative", "propagate3d")
PROTOCOL_FILE = "protocol.json"
PROPAGATION_FILE = "propagation.csv"


def run_protocol(
    run_dir: str | Path,
    mode: str,
    split: str | None = None,
    overrides: list[str] | None = None,
    settings: ProtocolSettings | None = None,
) -> list[EvaluationResult]:
    """Evaluate the run in ``run_dir`` with a prompt protocol; one result per box noise level.

    ``overrides`` are ``evaluate.*`` recipe keys or ``data.root`` as ``key=value``;
    ``evaluate.max_cases``, ``evaluate.nsd_tolerance_mm`` and ``evaluate.write_predictions``
    apply here.
    """
    if mode not in PROTOCOL_MODES:
        raise ValueError(f"mode {mode!r} is invalid; choose one of {', '.join(PROTOCOL_MODES)}")
    settings = settings or ProtocolSettings()
    if not isinstance(settings, ProtocolSettings):
        raise TypeError(f"settings must be a ProtocolSettings, got {type(settings).__name__}")
    run_dir = Path(run_dir)
    recipe, model = load_run(run_dir, overrides)
    model.to(evaluation_device())
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
    label_ids = list(dataset_ids.values())

    # Each process loads only the cases it evaluates, once for all noise levels.
    @functools.cache
    def load_case(case_id: str) -> LoadedCase:
        return load_normalised_case(info, case_id, recipe, label_ids)

    cache = open_embedding_cache(recipe.evaluate.cache_dir, "evaluate.cache_dir")
    predictor = Predictor(model, intensity=IntensitySpec(mode="none"), cache=cache)
    context = _Context(recipe, plan, split, mode, settings, predictor, load_case)
    group = join_process_group()

    uses_box = mode == "propagate3d" or (mode == "iterative" and settings.start == "box")
    results = []
    for level in settings.box_jitter if uses_box else (None,):
        folder = run_dir / _folder_name(split, mode, level, settings.jitter_unit)
        summary = _write_evaluation(context, case_ids, dataset_ids, level, folder, group)
        results.append(EvaluationResult(folder, mode, level, summary))
        logger.info("%s: mean Dice %s over %d cases", folder.name, summary["overall"]["dice"]["mean"], len(case_ids))
    if cache is not None:
        logger.info("embedding cache %s: %d hits, %d misses", cache.folder, cache.hits, cache.misses)
    return results


@dataclass
class _Context:
    recipe: Recipe
    plan: SplitPlan
    split: str
    mode: str
    settings: ProtocolSettings
    predictor: Predictor
    load_case: Callable[[str], LoadedCase]


@dataclass
class _CaseResult:
    """Results of one evaluated case that the main process collects: metric rows with their
    extra columns, the overlay view, and the rows of ``dice_per_interaction.csv`` (iterative)
    and ``propagation.csv`` (propagate3d)."""

    case_id: str
    rows: list[dict]
    columns: dict
    view: OverlayCase
    curves: list[dict]
    propagation_rows: list[dict]


def _folder_name(split: str, mode: str, level: float | None, unit: str) -> str:
    if level is None:
        return f"eval_{split}_{mode}"
    return f"eval_{split}_{mode}_jitter{level:g}" + ("frac" if unit == "fraction" else "")


def _write_evaluation(
    context: _Context, case_ids: list[str], dataset_ids: dict[str, int], level, folder: Path, group: ProcessGroup
) -> dict:
    """Evaluate this process's share of the cases. The main process writes ``folder``, and every
    process returns the summary."""
    partial = folder.with_name(folder.name + ".partial")
    names = list(dataset_ids)
    table, curves, propagation_rows = MetricTable(), [], []
    views = {}

    def evaluate(index: int) -> _CaseResult:
        return _evaluate_case(context, case_ids[index], dataset_ids, level, partial)

    def collect(result: _CaseResult) -> None:
        table.add_case(result.case_id, result.rows, **result.columns)
        curves.extend(result.curves)
        propagation_rows.extend(result.propagation_rows)
        views[result.case_id] = result.view

    def write_folder() -> dict:
        summary = table.summary()
        table.to_csv(partial / "per_case.csv")
        if context.mode == "iterative":
            summary["dice_per_interaction"] = write_curves(partial, curves, names, context.settings.num_interactions)
        if context.mode == "propagate3d":
            write_csv(partial / PROPAGATION_FILE, propagation_rows)
        write_json(partial / "summary.json", summary)
        record = {"mode": context.mode, "split": context.split, "jitter": level, "cases": case_ids}
        write_json(partial / PROTOCOL_FILE, {**record, **dataclasses.asdict(context.settings)})
        write_case_overlays(partial, table.rows, views)
        listed = {key: value for key, value in record.items() if key != "cases"}
        write_report(partial, {**listed, **dataclasses.asdict(context.settings)})
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        return summary

    try:
        run_on_main(group, f"creating {partial}", lambda: create_partial_folder(partial))
        gather_cases(case_ids, group, evaluate, collect, description=f"{context.mode} {context.split}")
        # Every process waits for this broadcast, so none returns before the folder is in place.
        return run_on_main(group, f"writing {folder}", write_folder)
    except BaseException:
        if group.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _evaluate_case(context: _Context, case_id: str, dataset_ids: dict[str, int], level, partial: Path) -> _CaseResult:
    """Load, predict and score one case, and write its prediction file into ``partial/predictions``."""
    case = context.load_case(case_id)
    names = list(dataset_ids)
    rng = case_generator(context.settings.seed, case_id)
    curves, propagation_rows = [], []
    region, masks, extra = _run_case(context, case, names, level, rng, curves, propagation_rows)
    # class_id is the recipe order; label_id is the dataset's id, as in the prediction files.
    for row in (*curves, *propagation_rows):
        row["label_id"] = dataset_ids[row["class_name"]]
    rows = class_metric_rows(masks, case.label, region, case.label_source.spacing, dataset_ids, context.recipe)
    noise = {} if level is None else {"jitter": level, "jitter_unit": context.settings.jitter_unit}
    region_labels = _merged_dataset_labels(masks[(slice(None), *region)], list(range(1, len(names) + 1)))
    view = cut_overlay_case(case_id, case.image[region], case.label[region], region_labels, context.recipe.data.axis)
    if context.recipe.evaluate.write_predictions:
        labels = _merged_dataset_labels(masks, list(dataset_ids.values()))
        write_segmentation(partial / "predictions" / f"{case_id}.nii.gz", labels, case.label_source)
    columns = {"mode": context.mode, **noise, **extra}
    return _CaseResult(case_id, rows, columns, view, curves, propagation_rows)


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

    # Classes visit overlapping slices, so each slice is encoded once per case while the
    # memory budget of SliceEmbeddings lasts.
    embeddings = SliceEmbeddings(context.predictor)

    def predict_slice(index: int, box: np.ndarray) -> np.ndarray:
        embeddings.set_image(index, by_index[index].image)
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


def _merged_dataset_labels(masks: np.ndarray, dataset_label_ids: list[int]) -> np.ndarray:
    """Merge C class masks into dataset label ids; the class listed first wins overlaps."""
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for c in reversed(range(masks.shape[0])):
        labels[masks[c]] = dataset_label_ids[c]
    return labels
