"""2D samples for training and evaluation: normalised slices with remapped label maps.

A recipe names its classes; every label map here contains 0 for background and 1..C for those
classes in recipe order. Intensity scaling runs once per volume, before slicing, so a
percentile window is the same on every slice of a scan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fmadapt.config import IntensityConfig, Recipe
from fmadapt.data.datasets import DatasetInfo, load_case, resolve_labels
from fmadapt.data.intensity import IntensitySpec, normalize_intensity
from fmadapt.data.io import Volume
from fmadapt.data.slices import extract_slice, foreground_slices, remap_labels
from fmadapt.errors import DataError
from fmadapt.train.splits import SplitPlan, draw_training_slices

logger = logging.getLogger(__name__)


@dataclass
class SliceSample:
    """One 2D image with its label map.

    Attributes:
        case_id: case the slice comes from.
        index: slice index along the recipe axis, or None for a 2D image.
        image: H×W (grey) or H×W×3 float32 on a 0–255 scale.
        label: H×W uint8 label map with classes 1..C in recipe order.
        spacing: in-plane pixel size (row, column) in mm; 1.0 for 2D photos.
    """

    case_id: str
    index: int | None
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float]


@dataclass
class LoadedCase:
    """A case after intensity scaling: the normalised image and the remapped label volume."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    source: Volume
    label_source: Volume


def intensity_spec(config: IntensityConfig) -> IntensitySpec:
    return IntensitySpec(
        mode=config.mode,
        window=config.window,
        width=config.width,
        level=config.level,
        percentiles=tuple(config.percentiles),
    )


def class_ids(info: DatasetInfo, recipe: Recipe) -> dict[str, int]:
    """Dataset label ids of the recipe's classes, in recipe order."""
    return resolve_labels(info, recipe.data.labels)


def load_normalised_case(info: DatasetInfo, case_id: str, recipe: Recipe, label_ids: list[int]) -> LoadedCase:
    """Load one case, scale its intensities to 0–255 and remap its labels to 1..C."""
    files = {case.case_id: case for case in info.cases}
    if case_id not in files:
        raise DataError(f"case {case_id!r} not found in {info.root}; known cases: {sorted(files)[:10]}")
    image, label = load_case(info, files[case_id])
    if label is None:
        raise DataError(f"case {case_id!r} in {info.root} has no label file; training and evaluation need labels")
    normalised = normalize_intensity(image.array, intensity_spec(recipe.data.intensity))
    remapped = remap_labels(np.asarray(label.array), label_ids)
    return LoadedCase(case_id, normalised, remapped, image, label)


def case_slices(case: LoadedCase, axis: int | None, indices: list[int] | None = None) -> list[SliceSample]:
    """Cut a loaded case into SliceSamples; a 2D case gives one sample with index None."""
    if axis is None:
        spacing = tuple(float(s) for s in case.source.spacing[:2])
        return [SliceSample(case.case_id, None, case.image, case.label, spacing)]
    image_volume = Volume(case.image, case.source.affine, case.source.spacing)
    label_volume = Volume(case.label, case.source.affine, case.source.spacing)
    if indices is None:
        indices = list(range(case.label.shape[axis]))
    samples = []
    for index in indices:
        image, spacing = extract_slice(image_volume, axis, index)
        label, _ = extract_slice(label_volume, axis, index)
        samples.append(SliceSample(case.case_id, index, image, label.astype(np.uint8), spacing))
    return samples


def training_slices(
    info: DatasetInfo, plan: SplitPlan, recipe: Recipe, label_ids: list[int]
) -> list[SliceSample]:
    """Slices that training samples from: foreground slices of the train cases or train block.

    In ``cases`` mode every slice of a training case with at least
    ``data.min_foreground_pixels`` pixels of a requested class is kept. In ``slices`` mode
    ``data.split.train`` such slices are drawn from the train block with the recipe seed.
    """
    axis = recipe.data.axis
    min_pixels = recipe.data.min_foreground_pixels
    num_classes = len(label_ids)
    samples: list[SliceSample] = []
    for case_id in plan.cases["train"]:
        case = load_normalised_case(info, case_id, recipe, label_ids)
        if axis is None:
            samples.extend(case_slices(case, None))
            continue
        candidates = foreground_slices(case.label, axis, list(range(1, num_classes + 1)), min_pixels=min_pixels)
        block = plan.slice_range("train")
        if block is not None:
            candidates = [i for i in candidates if block[0] <= i < block[1]]
            candidates = draw_training_slices(candidates, recipe.data.split.train, plan.seed, case_id)
        samples.extend(case_slices(case, axis, candidates))
    if not samples:
        raise DataError(
            f"no training slice in {info.root} contains any of the classes {recipe.data.labels} with at least "
            f"{min_pixels} pixels; check data.labels and data.axis"
        )
    logger.info("training on %d slices from cases %s", len(samples), plan.cases["train"])
    return samples


def split_slices_for_evaluation(
    case: LoadedCase, plan: SplitPlan, split: str, axis: int | None
) -> tuple[list[SliceSample], tuple[int, int] | None]:
    """Return the slices of ``case`` that belong to ``split`` and the slice range they span."""
    if axis is None:
        return case_slices(case, None), None
    block = plan.slice_range(split)
    if block is None:
        block = (0, case.label.shape[axis])
    return case_slices(case, axis, list(range(*block))), block
