"""Derive box and point prompts from binary masks.

Coordinates are pixel centres in the original image: pixel (row r, column c) is the point
x = c, y = r. Boxes are XYXY through the centres of the extreme foreground pixels, so a
one-pixel mask gives the box [c, r, c, r]. MedSAM's training script (train_one_gpu.py in
bowang-lab/MedSAM) derives boxes the same way, from the min and max foreground column and
row indices.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

POINT_MODES = ("random", "center")
JITTER_DIRECTIONS = ("both", "outward")


def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
    """Return the XYXY box around a mask's foreground, or None for an empty mask.

    Args:
        mask: H×W bool (or integer, nonzero is foreground) mask.

    Returns:
        float32 array [x0, y0, x1, y1] of pixel-centre coordinates, x0 <= x1 and y0 <= y1.
    """
    foreground = _binary_mask(mask)
    rows = np.flatnonzero(foreground.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(foreground.any(axis=0))
    return np.array([columns[0], rows[0], columns[-1], rows[-1]], dtype=np.float32)


def jitter_box(
    box: np.ndarray,
    image_size: tuple[int, int],
    *,
    max_shift: float = 20.0,
    rng: np.random.Generator,
    direction: Literal["both", "outward"] = "both",
) -> np.ndarray:
    """Move each box coordinate by a random shift, keeping the box valid and in the image.

    Each of x0, y0, x1, y1 moves by its own shift of up to max_shift pixels, drawn uniformly.
    The x pair and the y pair are then sorted, so x0 <= x1 and y0 <= y1, and clipped to
    [0, W-1] and [0, H-1].

    Args:
        box: (4,) XYXY box in pixels of the original image.
        image_size: (H, W) of the image.
        max_shift: largest shift per coordinate, in pixels (>= 0).
        rng: source of the shifts; a seeded generator repeats the same boxes.
        direction: "both" shifts each coordinate by a value in [-max_shift, max_shift], so
            boxes may shrink or grow. "outward" only grows the box, each side by a value in
            [0, max_shift], like MedSAM's training script (bbox_shift=20, integer shifts).

    Returns:
        float32 (4,) XYXY box.
    """
    coords = _checked_box(box)
    height, width = _checked_size(image_size)
    if isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Real):
        raise TypeError(f"max_shift must be a number of pixels, got {max_shift!r}")
    if not (np.isfinite(max_shift) and max_shift >= 0):
        raise ValueError(f"max_shift must be a finite number of pixels >= 0, got {max_shift}")
    if direction not in JITTER_DIRECTIONS:
        raise ValueError(f"direction must be one of {JITTER_DIRECTIONS}, got {direction!r}")
    _check_rng(rng)
    if direction == "both":
        shifts = rng.uniform(-max_shift, max_shift, size=4)
    else:
        shifts = rng.uniform(0, max_shift, size=4) * np.array([-1.0, -1.0, 1.0, 1.0])
    shifted = coords + shifts
    x0, x1 = sorted((shifted[0], shifted[2]))
    y0, y1 = sorted((shifted[1], shifted[3]))
    jittered = np.array([x0, y0, x1, y1], dtype=np.float64)
    jittered[[0, 2]] = np.clip(jittered[[0, 2]], 0, width - 1)
    jittered[[1, 3]] = np.clip(jittered[[1, 3]], 0, height - 1)
    return jittered.astype(np.float32)


def points_from_mask(
    mask: np.ndarray,
    *,
    num_positive: int = 1,
    num_negative: int = 0,
    rng: np.random.Generator | None = None,
    mode: Literal["random", "center"] = "random",
) -> tuple[np.ndarray, np.ndarray] | None:
    """Pick positive points inside a mask and negative points outside it.

    Args:
        mask: H×W bool (or integer, nonzero is foreground) mask.
        num_positive: number of foreground points (>= 0).
        num_negative: number of background points (>= 0), drawn from the whole image
            outside the mask.
        rng: source of random picks. Required unless mode="center", num_positive <= 1
            and num_negative == 0.
        mode: "random" draws positive points uniformly from the foreground. "center" makes
            the first positive point the foreground pixel farthest from the mask border
            (Euclidean distance transform, the image edge counting as border), breaking ties
            by closeness to the mean of the tied pixels, and draws any further ones randomly.

    Points are drawn without replacement, and with replacement only when the region has
    fewer pixels than requested.

    Returns:
        (points, labels): float32 P×2 XY pixel centres, positives first, and int64 (P,)
        labels, 1 for positive and 0 for negative. None when the mask is empty.

    Raises:
        ValueError: invalid counts or mode, or negatives requested while the mask covers
            the whole image.
    """
    foreground = _binary_mask(mask)
    _check_count("num_positive", num_positive)
    _check_count("num_negative", num_negative)
    if mode not in POINT_MODES:
        raise ValueError(f"mode must be one of {POINT_MODES}, got {mode!r}")
    if num_positive + num_negative == 0:
        raise ValueError("num_positive and num_negative are both 0; request at least one point")
    needs_rng = num_negative > 0 or num_positive > (1 if mode == "center" else 0)
    if needs_rng:
        _check_rng(rng)
    if not foreground.any():
        return None
    positives = _positive_pixels(foreground, num_positive, rng, mode)
    negatives = _sample_pixels(~foreground, num_negative, rng, "num_negative")
    rows_cols = np.concatenate([positives, negatives], axis=0)
    points = rows_cols[:, ::-1].astype(np.float32)
    labels = np.concatenate(
        [np.ones(len(positives), dtype=np.int64), np.zeros(len(negatives), dtype=np.int64)]
    )
    return points, labels


def boxes_from_label_map(
    label: np.ndarray, class_ids: Sequence[int]
) -> dict[int, np.ndarray | None]:
    """Return the XYXY box of each requested class in an H×W label map (None when absent)."""
    if not isinstance(label, np.ndarray) or not np.issubdtype(label.dtype, np.integer):
        kind = label.dtype if isinstance(label, np.ndarray) else type(label).__name__
        raise TypeError(f"label must be an integer numpy array, got {kind}")
    if label.ndim != 2:
        raise ValueError(f"label must be an H×W label map, got shape {label.shape}")
    boxes: dict[int, np.ndarray | None] = {}
    for class_id in class_ids:
        if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)):
            raise TypeError(f"class ids must be integers, got {class_id!r}")
        boxes[int(class_id)] = box_from_mask(label == class_id)
    return boxes


def center_pixel(foreground: np.ndarray) -> tuple[int, int]:
    """Return (row, column) of the foreground pixel farthest from the mask border.

    The mask is padded with background, so the image edge counts as border. Among pixels
    at the largest distance, the one closest to their mean position wins, then the first
    in row-major order.
    """
    padded = np.pad(foreground, 1, constant_values=False)
    distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    tied = np.argwhere(distance == distance.max())
    offsets = ((tied - tied.mean(axis=0)) ** 2).sum(axis=1)
    row, column = tied[int(np.argmin(offsets))]
    return int(row), int(column)


def _positive_pixels(
    foreground: np.ndarray, count: int, rng: np.random.Generator | None, mode: str
) -> np.ndarray:
    if mode == "center" and count > 0:
        first = np.array([center_pixel(foreground)], dtype=np.int64)
        rest = _sample_pixels(foreground, count - 1, rng, "num_positive")
        return np.concatenate([first, rest], axis=0)
    return _sample_pixels(foreground, count, rng, "num_positive")


def _sample_pixels(
    region: np.ndarray, count: int, rng: np.random.Generator | None, name: str
) -> np.ndarray:
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64)
    candidates = np.argwhere(region)
    if len(candidates) == 0:
        raise ValueError(
            f"{name}={count} points requested, but the mask leaves no pixels to pick from; "
            f"set {name}=0 for masks that cover the whole image"
        )
    chosen = rng.choice(len(candidates), size=count, replace=len(candidates) < count)
    return candidates[chosen].astype(np.int64)


def _binary_mask(mask: object) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(
            f"mask must be bool or integer, got dtype {mask.dtype}; threshold probabilities "
            "first (for example mask > 0.5)"
        )
    if mask.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _checked_box(box: object) -> np.ndarray:
    coords = np.asarray(box, dtype=np.float64)
    if coords.shape != (4,) or not np.all(np.isfinite(coords)):
        raise ValueError(f"box must be 4 finite XYXY values, got {box!r}")
    if coords[0] > coords[2] or coords[1] > coords[3]:
        raise ValueError(f"box {coords.tolist()} must have x0 <= x1 and y0 <= y1 (XYXY order)")
    return coords


def _checked_size(image_size: object) -> tuple[int, int]:
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise TypeError(f"image_size must be an (H, W) pair, got {image_size!r}")
    height, width = (int(value) for value in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    return height, width


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, got {rng!r}; "
            "pass numpy.random.default_rng(seed)"
        )
