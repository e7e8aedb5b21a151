"""3D segmentation from one box: prompt a key slice, then propagate slice by slice.

The only prompt is a box on a key slice of the volume. The key slice's prediction gives the
box of the next slice (``box_from_mask`` of the prediction, enlarged by a margin), and so on
in both directions. Propagation in a direction stops at the first empty prediction, taken as
the end of the object, or at the end of the slice range. No ground truth is read after the key slice's box, so the whole volume
costs one prompt.

Propagation takes any per-slice predict function: the real path segments each slice with a
:class:`fmadapt.inference.Predictor` (see :mod:`fmadapt.evaluate.protocols`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmadapt.data.prompts import box_from_mask

__all__ = [
    "KEY_SLICE_RULES",
    "PropagationResult",
    "SlicePredictFunction",
    "choose_key_slice",
    "enlarge_box",
    "propagate",
]

logger = logging.getLogger(__name__)

KEY_SLICE_RULES = ("largest", "middle")

# predict_slice(index, box) -> H×W bool mask of slice ``index`` segmented inside the XYXY box.
SlicePredictFunction = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class PropagationResult:
    """Predictions of one object through a volume.

    Attributes:
        key_index: the prompted slice.
        key_box: the XYXY box given on the key slice, in pixels.
        masks: slice index to its H×W bool prediction, for every non-empty prediction.
        boxes: slice index to the box that slice was segmented with (key slice included).
        first_index: first slice with a non-empty prediction, or None when the key slice's
            prediction is empty.
        last_index: last slice with a non-empty prediction, or None as above.
        prompts_used: prompts taken from the ground truth; always 1, the key box.
    """

    key_index: int
    key_box: np.ndarray
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    first_index: int | None = None
    last_index: int | None = None
    prompts_used: int = 1

    def to_volume(self, shape: tuple[int, ...], axis: int) -> np.ndarray:
        """Place the slice predictions into a bool volume of ``shape``, slices along ``axis``."""
        volume = np.zeros(shape, dtype=bool)
        for index, mask in self.masks.items():
            region = [slice(None)] * len(shape)
            region[axis] = index
            volume[tuple(region)] = mask
        return volume


def choose_key_slice(
    reference: np.ndarray,
    axis: int,
    rule: str = "largest",
    *,
    slice_range: tuple[int, int] | None = None,
) -> int:
    """Pick the slice to prompt from the reference object.

    Args:
        reference: bool (or integer, nonzero is the object) 3D mask.
        axis: slice axis, 0..2.
        rule: "largest" takes the slice with the most object pixels (the first on ties).
            "middle" takes the slice halfway between the first and last object slices,
            rounded down, or the nearest object slice when that one is empty (the lower
            one on ties).
        slice_range: [start, stop) of slices to choose from; default all.

    Returns:
        The index of the key slice along ``axis``.

    Raises:
        ValueError: invalid rule or axis, or no object pixel inside the slice range.
    """
    if rule not in KEY_SLICE_RULES:
        raise ValueError(f"rule must be one of {KEY_SLICE_RULES}, got {rule!r}")
    reference = np.asarray(reference)
    if reference.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"reference must be a 3D mask and axis 0, 1 or 2, got shape {reference.shape}, axis {axis!r}")
    other_axes = tuple(a for a in range(3) if a != axis)
    areas = np.count_nonzero(reference, axis=other_axes)
    start, stop = _checked_range(slice_range, areas.size)
    present = np.flatnonzero(areas[start:stop]) + start
    if present.size == 0:
        raise ValueError(f"reference has no object pixel in slices {start}..{stop - 1} along axis {axis}")
    if rule == "largest":
        return int(present[np.argmax(areas[present])])
    middle = (int(present[0]) + int(present[-1])) // 2
    return int(present[np.argmin(np.abs(present - middle))])


def enlarge_box(box: np.ndarray, margin: float, image_size: tuple[int, int]) -> np.ndarray:
    """Grow an XYXY box by ``margin`` pixels on every side, clipped to the H×W image."""
    height, width = image_size
    grown = np.asarray(box, dtype=np.float64) + np.array([-margin, -margin, margin, margin])
    grown[[0, 2]] = np.clip(grown[[0, 2]], 0, width - 1)
    grown[[1, 3]] = np.clip(grown[[1, 3]], 0, height - 1)
    return grown.astype(np.float32)


def propagate(
    predict_slice: SlicePredictFunction,
    *,
    key_index: int,
    key_box: np.ndarray,
    slice_range: tuple[int, int],
    image_size: tuple[int, int],
    margin: float = 0.0,
    min_area: int = 1,
) -> PropagationResult:
    """Segment an object through a volume from one box on its key slice.

    Args:
        predict_slice: segments slice ``index`` inside a box (see ``SlicePredictFunction``).
        key_index: the prompted slice, inside ``slice_range``.
        key_box: XYXY box on the key slice, in pixels; the only ground-truth prompt.
        slice_range: [start, stop) of slices that propagation may visit.
        image_size: (H, W) of a slice, to clip enlarged boxes.
        margin: pixels added to every side of each propagated box (>= 0), so an object
            that grows from one slice to the next is not cut by the previous slice's box.
        min_area: a prediction with fewer pixels counts as empty and ends propagation in
            that direction (>= 1).

    Returns:
        The non-empty predictions and the first and last predicted slices. Slices past an
        empty prediction are never visited.
    """
    start, stop = _checked_range(slice_range, None)
    if not start <= key_index < stop:
        raise ValueError(f"key_index {key_index} is outside slice_range [{start}, {stop})")
    if not (np.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number of pixels >= 0, got {margin!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"min_area must be an int >= 1 (pixels), got {min_area!r}")

    key_box = np.asarray(key_box, dtype=np.float32)
    result = PropagationResult(key_index=key_index, key_box=key_box)
    key_mask = _predict_and_keep(predict_slice, key_index, key_box, min_area, result)
    if key_mask is None:
        logger.info("the key slice %d gives an empty prediction, so nothing is propagated", key_index)
        return result

    for step, limit in ((-1, start - 1), (1, stop)):
        previous = key_mask
        for index in range(key_index + step, limit, step):
            box = enlarge_box(box_from_mask(previous), margin, image_size)
            previous = _predict_and_keep(predict_slice, index, box, min_area, result)
            if previous is None:
                break
    predicted = sorted(result.masks)
    result.first_index, result.last_index = predicted[0], predicted[-1]
    return result


def _predict_and_keep(
    predict_slice: SlicePredictFunction, index: int, box: np.ndarray, min_area: int, result: PropagationResult
) -> np.ndarray | None:
    mask = np.asarray(predict_slice(index, box)).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"predict_slice must return an H×W mask, got shape {mask.shape} for slice {index}")
    result.boxes[index] = box
    if np.count_nonzero(mask) < min_area:
        return None
    result.masks[index] = mask
    return mask


def _checked_range(slice_range: tuple[int, int] | None, size: int | None) -> tuple[int, int]:
    if slice_range is None:
        if size is None:
            raise TypeError("slice_range must be a (start, stop) pair of slice indices, got None")
        return 0, size
    start, stop = (int(value) for value in slice_range)
    if start < 0 or stop <= start or (size is not None and stop > size):
        limit = "" if size is None else f" within 0..{size}"
        raise ValueError(f"slice_range must be [start, stop) with start < stop{limit}, got {tuple(slice_range)}")
    return start, stop
