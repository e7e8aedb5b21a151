"""Cut 2-D slices out of volumes, find slices with foreground, and split a case's slices.

Slices are taken along one spatial axis of a Volume, with indices along that axis. 2-D images
(H×W or H×W×C) are their own single slice, addressed as axis None and index 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmadapt.data.io import Volume

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class SliceRef:
    """One slice of one case: the slice at `index` along spatial `axis`.

    Attributes:
        case_id: the case the slice belongs to.
        axis: spatial axis of the volume, or None for a 2-D image.
        index: position along `axis`, 0 for a 2-D image.
    """

    case_id: str
    axis: int | None
    index: int


@dataclass(frozen=True)
class SliceSplit:
    """Slice indices of one case split into contiguous train, validation and test blocks."""

    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


def extract_slice(
    volume: Volume, axis: int | None, index: int
) -> tuple[np.ndarray, tuple[float, float]]:
    """Return a copy of one 2-D slice of a volume and the slice's in-plane spacing.

    Args:
        volume: a 3-D volume (X×Y×Z, or X×Y×Z×C with channels last) or a 2-D image
            (H×W or H×W×C).
        axis: spatial axis to cut across, 0..2 for 3-D volumes. For 2-D images the only
            valid call is axis=None and index=0, which returns the whole image.
        index: position along `axis`, 0 <= index < size of that axis.

    Returns:
        (slice, spacing): the slice has the two remaining spatial axes in their volume order,
        plus the channel axis last when the volume has one. spacing gives those two axes'
        spacing in the same order (mm for NIfTI, pixel units for photo formats).

    Raises:
        TypeError: `volume` is not a Volume or `axis`/`index` are not integers.
        ValueError: `axis` or `index` out of range, or axis given for a 2-D image.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    _check_integer("index", index)
    if volume.spatial_ndim == 2:
        if axis is not None or index != 0:
            raise ValueError(
                f"volume is a 2-D image of shape {volume.shape}, so it has one slice: call "
                f"with axis=None and index=0, not axis={axis!r} and index={index}"
            )
        return volume.array.copy(), (volume.spacing[0], volume.spacing[1])
    if volume.spatial_ndim != 3:
        raise ValueError(f"volume must have 2 or 3 spatial axes, got spacing {volume.spacing}")
    axis = _checked_axis(axis, volume.spatial_shape)
    _check_index(index, axis, volume.spatial_shape)
    plane = np.take(volume.array, index, axis=axis)
    in_plane = tuple(volume.spacing[other] for other in range(3) if other != axis)
    return plane, (in_plane[0], in_plane[1])


def foreground_slices(
    label: np.ndarray, axis: int, label_ids: Sequence[int], min_pixels: int = 1
) -> list[int]:
    """Return the sorted indices along `axis` of slices with foreground.

    Args:
        label: 3-D integer label map.
        axis: spatial axis 0..2 along which slices are counted.
        label_ids: label ids that count as foreground; their pixels are counted together.
        min_pixels: a slice counts when it has at least this many foreground pixels.

    Raises:
        TypeError: `label` is not an integer array.
        ValueError: `label` not 3-D, `axis` out of range, empty or non-positive ids, or
            min_pixels < 1.
    """
    _check_label_map(label, ndim=3)
    axis = _checked_axis(axis, label.shape)
    ids = _checked_label_ids(label_ids)
    _check_integer("min_pixels", min_pixels)
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    foreground = np.isin(label, ids)
    other_axes = tuple(other for other in range(3) if other != axis)
    counts = foreground.sum(axis=other_axes)
    return [int(index) for index in np.flatnonzero(counts >= min_pixels)]


def remap_labels(label: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """Map label_ids[i] to class i + 1 and every other value to 0.

    Args:
        label: integer label map of any shape.
        label_ids: C distinct positive label ids, in the requested class order.

    Returns:
        Array of label's shape with values 0..C: uint8 when C <= 255, else int16.
    """
    _check_label_map(label, ndim=None)
    ids = _checked_label_ids(label_ids)
    dtype = np.uint8 if len(ids) <= np.iinfo(np.uint8).max else np.int16
    remapped = np.zeros(label.shape, dtype=dtype)
    for class_index, label_id in enumerate(ids, start=1):
        remapped[label == label_id] = class_index
    return remapped


def split_slices(
    indices: Sequence[int],
    *,
    fractions: Sequence[float] | None = None,
    counts: Sequence[int] | None = None,
    gap: int = 0,
    seed: int | None = None,
) -> SliceSplit:
    """Split one case's slice indices into contiguous train, validation and test blocks.

    Neighbouring slices look almost alike, so random per-slice splits leak information
    between training and testing. This function sorts `indices` and cuts the sorted list
    into three contiguous blocks, optionally leaving `gap` unused slices between
    neighbouring blocks.

    Args:
        indices: distinct slice indices (for example from `foreground_slices`). Blocks are
            contiguous in this sorted list, which may skip indices of the volume.
        fractions: (train, validation, test) shares, each >= 0, summing to 1. The slices
            left after gaps are shared by largest remainder, and every block with a positive
            share gets at least one slice.
        counts: (train, validation, test) numbers of slices. Slices beyond their sum plus the
            gaps are left unused at the end. Give exactly one of fractions and counts.
        gap: number of slices left out between two neighbouring non-empty blocks.
        seed: None keeps the block order train, validation, test by increasing index. An
            integer shuffles the order of the three blocks with numpy.random.default_rng(seed),
            so repeated experiments can test on different parts of the volume.

    Returns:
        SliceSplit with sorted index tuples.

    Raises:
        ValueError: duplicate indices, both or neither of fractions and counts, shares or
            counts of the wrong length or sign, or too few slices for the blocks and gaps.
    """
    ordered = sorted(int(index) for index in indices)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"indices must be distinct, got duplicates in {ordered}")
    _check_integer("gap", gap)
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    sizes = _block_sizes(len(ordered), fractions, counts, gap)
    order = list(range(3))
    if seed is not None:
        order = [int(position) for position in np.random.default_rng(seed).permutation(3)]
    logger.debug(
        "split %d slices into blocks of %s (train, validation, test) in order %s with gap %d",
        len(ordered),
        sizes,
        [SPLIT_NAMES[block] for block in order],
        gap,
    )
    blocks: dict[int, tuple[int, ...]] = {}
    start = 0
    for block in order:
        size = sizes[block]
        blocks[block] = tuple(ordered[start : start + size])
        if size > 0:
            start += size + gap
    return SliceSplit(train=blocks[0], validation=blocks[1], test=blocks[2])


def _block_sizes(
    total: int, fractions: Sequence[float] | None, counts: Sequence[int] | None, gap: int
) -> list[int]:
    if (fractions is None) == (counts is None):
        raise ValueError(
            "give exactly one of fractions and counts, for example fractions=(0.6, 0.2, 0.2)"
        )
    if counts is not None:
        sizes = [int(count) for count in counts]
        if len(sizes) != 3 or any(size < 0 for size in sizes):
            raise ValueError(
                f"counts must be three integers >= 0 (train, validation, test), got {counts}"
            )
        needed = sum(sizes) + gap * (sum(size > 0 for size in sizes) - 1)
        if needed > total:
            raise ValueError(
                f"counts {sizes} with gap={gap} need {needed} slices, but only {total} are given"
            )
        return sizes
    shares = [float(share) for share in fractions]
    if len(shares) != 3 or any(not share >= 0 for share in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(
            "fractions must be three shares >= 0 summing to 1 (train, validation, test), "
            f"got {fractions}"
        )
    positive = [block for block in range(3) if shares[block] > 0]
    available = total - gap * (len(positive) - 1)
    if available < len(positive):
        raise ValueError(
            f"{total} slices cannot fill {len(positive)} blocks with gap={gap}; lower the gap "
            "or give more slices"
        )
    return _largest_remainder(shares, available, positive)


def _largest_remainder(shares: list[float], available: int, positive: list[int]) -> list[int]:
    exact = [share * available for share in shares]
    sizes = [int(np.floor(value)) for value in exact]
    by_remainder = sorted(range(3), key=lambda block: exact[block] - sizes[block], reverse=True)
    for block in by_remainder[: available - sum(sizes)]:
        sizes[block] += 1
    # A positive share that rounded to zero takes one slice from the largest block.
    for block in positive:
        if sizes[block] == 0:
            largest = max(range(3), key=lambda other: sizes[other])
            sizes[largest] -= 1
            sizes[block] = 1
    return sizes


def _check_integer(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")


def _checked_axis(axis: object, shape: tuple[int, ...]) -> int:
    _check_integer("axis", axis)
    if not 0 <= axis < 3:
        raise ValueError(
            f"axis must be 0, 1 or 2 for a volume of spatial shape {shape}, got {axis}"
        )
    return int(axis)


def _check_index(index: int, axis: int, shape: tuple[int, ...]) -> None:
    if not 0 <= index < shape[axis]:
        raise ValueError(
            f"index {index} is outside 0..{shape[axis] - 1} along axis {axis} of spatial "
            f"shape {shape}"
        )


def _check_label_map(label: object, ndim: int | None) -> None:
    if not isinstance(label, np.ndarray) or not (
        np.issubdtype(label.dtype, np.integer) or label.dtype == bool
    ):
        kind = label.dtype if isinstance(label, np.ndarray) else type(label).__name__
        raise TypeError(f"label must be an integer numpy array, got {kind}")
    if ndim is not None and label.ndim != ndim:
        raise ValueError(f"label must be {ndim}-D, got shape {label.shape}")


def _checked_label_ids(label_ids: Sequence[int]) -> list[int]:
    ids = list(label_ids)
    if not ids:
        raise ValueError("label_ids is empty; give at least one foreground label id")
    for label_id in ids:
        _check_integer("each label id", label_id)
    if any(label_id <= 0 for label_id in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"label_ids must be distinct positive ids (0 is background), got {ids}")
    return [int(label_id) for label_id in ids]
