"""Simulated clicks: first clicks inside an object, and correction clicks on prediction errors.

Clicks are XY pixel centres of the original image (pixel at row r, column c is x = c,
y = r), with label 1 for a positive (foreground) click and 0 for a negative one, the
convention of :meth:`fmadapt.inference.Predictor.predict`.

A correction click goes to the largest error region of a prediction. The error regions
are the 8-connected components of the false-negative pixels (the object was missed there,
so the click is positive) and of the false-positive pixels (so the click is negative).
The click sits on the region's pixel farthest from the region's border
(:func:`fmadapt.data.prompts.center_pixel`), which is the point a user would most likely
pick and the one least sensitive to the exact error outline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from fmadapt.data.prompts import center_pixel, points_from_mask

__all__ = ["CLICK_MODES", "Click", "clicks_to_arrays", "correction_click", "error_regions", "initial_clicks"]

CLICK_MODES = ("center", "random")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Click:
    """One simulated click.

    Attributes:
        x: column of the clicked pixel.
        y: row of the clicked pixel.
        label: 1 for a positive (foreground) click, 0 for a negative one.
        region_size: pixels in the error region the click corrects; 0 for a first click.
    """

    x: int
    y: int
    label: int
    region_size: int = 0


def initial_clicks(
    reference: np.ndarray,
    *,
    num_positive: int = 1,
    num_negative: int = 0,
    mode: Literal["center", "random"] = "center",
    rng: np.random.Generator | None = None,
) -> list[Click]:
    """Simulate the first clicks on an object: positives inside it, negatives outside it.

    Args:
        reference: H×W bool (or integer, nonzero is foreground) object mask.
        num_positive: positive clicks (>= 0). With ``mode="center"`` the first one is the
            object pixel farthest from its border and the others are random object pixels.
        num_negative: negative clicks (>= 0), random background pixels.
        mode: "center" or "random" (every positive click a random object pixel).
        rng: random source; required whenever a click is drawn at random.

    Returns:
        Positive clicks first, then negative ones.

    Raises:
        ValueError: the reference mask is empty, or an invalid count or mode.
    """
    if mode not in CLICK_MODES:
        raise ValueError(f"mode must be one of {CLICK_MODES}, got {mode!r}")
    drawn = points_from_mask(reference, num_positive=num_positive, num_negative=num_negative, rng=rng, mode=mode)
    if drawn is None:
        raise ValueError("reference mask is empty, so there is no object to click on; skip empty slices")
    points, labels = drawn
    return [Click(int(x), int(y), int(label)) for (x, y), label in zip(points, labels)]


def error_regions(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a prediction's errors into false-negative and false-positive pixels.

    Both inputs are H×W bool masks. Returns (missed, extra): H×W bool masks of reference
    pixels the prediction lacks and predicted pixels outside the reference.
    """
    prediction, reference = _checked_pair(prediction, reference)
    return reference & ~prediction, prediction & ~reference


def correction_click(prediction: np.ndarray, reference: np.ndarray) -> Click | None:
    """Place one correction click at the centre of the largest error region.

    Args:
        prediction: H×W bool predicted mask.
        reference: H×W bool ground-truth mask.

    Returns:
        A positive click when the largest region is missed object, a negative click when it
        is false foreground. When a missed region and a false-positive region have the same
        size, the positive click wins, because recovering missed object is what a user does
        first. None when the prediction equals the reference.
    """
    missed, extra = error_regions(prediction, reference)
    best_missed = _largest_component(missed)
    best_extra = _largest_component(extra)
    if best_missed is None and best_extra is None:
        return None
    missed_size = 0 if best_missed is None else int(best_missed.sum())
    extra_size = 0 if best_extra is None else int(best_extra.sum())
    if missed_size >= extra_size:
        region, label, size = best_missed, 1, missed_size
    else:
        region, label, size = best_extra, 0, extra_size
    row, column = center_pixel(region)
    return Click(column, row, label, size)


def clicks_to_arrays(clicks: list[Click]) -> tuple[np.ndarray, np.ndarray]:
    """Convert clicks to the Predictor's arrays: float32 N×2 XY points and int64 (N,) labels."""
    points = np.array([[click.x, click.y] for click in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([click.label for click in clicks], dtype=np.int64)
    return points, labels


def _largest_component(region: np.ndarray) -> np.ndarray | None:
    """Return the largest 8-connected component of ``region``; ties go to the first labelled one."""
    components, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def _checked_pair(prediction: object, reference: object) -> tuple[np.ndarray, np.ndarray]:
    masks = []
    for name, mask in (("prediction", prediction), ("reference", reference)):
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(mask).__name__}")
        if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(f"{name} must be a bool or integer mask, got dtype {mask.dtype}; threshold it first")
        if mask.ndim != 2:
            raise ValueError(f"{name} must be an H×W mask, got shape {mask.shape}")
        masks.append(mask.astype(bool, copy=False))
    if masks[0].shape != masks[1].shape:
        raise ValueError(
            f"prediction and reference must have the same H×W shape, got {masks[0].shape} and {masks[1].shape}"
        )
    return masks[0], masks[1]
