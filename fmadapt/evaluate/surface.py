"""Input checks, surface voxels and surface-to-surface distances for the segmentation metrics.

A mask's surface is the set of its border voxels: the mask XOR its binary erosion with the
face-connected structuring element (4-connected in 2D, 6-connected in 3D). Voxels on the
array border count as surface, because the erosion treats everything outside the array as
background. Distances are Euclidean in mm, measured between voxel centres with
``scipy.ndimage.distance_transform_edt(sampling=spacing)``, so anisotropic spacing is honoured.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_NUMERIC_KINDS = "biuf"


def as_binary_mask(mask: object, name: str) -> np.ndarray:
    """Return ``mask`` as a boolean array, accepting bool arrays and numeric arrays of 0 and 1.

    Raises TypeError for a non-numeric input and ValueError for a 0-d array or for values
    other than 0 and 1.
    """
    if isinstance(mask, (str, bytes)) or mask is None:
        raise TypeError(f"{name} must be a boolean array, got {type(mask).__name__} {mask!r}")
    array = np.asarray(mask)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"{name} must be a boolean array, got an array of dtype {array.dtype}; "
            "pass a numpy bool array, e.g. labels == class_id"
        )
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a 0-d array {array!r}")
    if array.dtype == bool:
        return array

    invalid = (array != 0) & (array != 1)
    if invalid.any():
        examples = np.unique(array[invalid])[:5].tolist()
        raise ValueError(
            f"{name} must be a binary mask, but it contains values {examples} besides 0 and 1; "
            "compare a label map with its class id first, e.g. labels == class_id"
        )
    return array.astype(bool)


def check_mask_pair(prediction: object, reference: object) -> tuple[np.ndarray, np.ndarray]:
    """Return prediction and reference as boolean arrays of the same shape.

    Raises TypeError or ValueError (see :func:`as_binary_mask`) and ValueError when the
    shapes differ.
    """
    prediction = as_binary_mask(prediction, "prediction")
    reference = as_binary_mask(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have the same shape, got {prediction.shape} and "
            f"{reference.shape}; resample the prediction onto the reference grid first"
        )
    return prediction, reference


def check_spacing(spacing: object, ndim: int) -> tuple[float, ...]:
    """Return ``spacing`` as a tuple of ``ndim`` finite positive floats (mm, array axis order).

    Raises TypeError when spacing is not a sequence of numbers and ValueError when its length
    differs from ``ndim`` or a value is not finite and positive.
    """
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, (Sequence, np.ndarray)):
        raise TypeError(
            f"spacing must be a sequence of {ndim} numbers in mm, one per array axis, "
            f"got {type(spacing).__name__} {spacing!r}; e.g. spacing={(1.0,) * ndim}"
        )
    values = list(spacing)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"spacing must contain numbers in mm, got {value!r} of type "
                f"{type(value).__name__} in spacing={spacing!r}"
            )
    if len(values) != ndim:
        raise ValueError(
            f"spacing must have one value per mask axis ({ndim}), got {len(values)} values "
            f"in spacing={tuple(values)!r}"
        )
    floats = tuple(float(value) for value in values)
    if not all(np.isfinite(value) and value > 0 for value in floats):
        raise ValueError(f"spacing values must be finite and > 0 mm, got spacing={floats!r}")
    return floats


def mask_surface(mask: np.ndarray) -> np.ndarray:
    """Return the border voxels of a boolean mask: the mask XOR its face-connected erosion.

    The result has the mask's shape. Voxels on the array border are surface voxels.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask ^ eroded


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Return the directed surface distances in mm between two non-empty boolean masks.

    The first array holds, for each prediction surface voxel, the distance to the nearest
    reference surface voxel; the second array holds the reverse. Both are float64 of shape
    (number of surface voxels,). The masks must have the same shape and the spacing one value
    per axis (use :func:`check_mask_pair` and :func:`check_spacing`). Raises ValueError when
    either mask is empty, because no distance exists then.
    """
    if not prediction.any() or not reference.any():
        raise ValueError(
            f"surface distances need two non-empty masks, got {int(prediction.sum())} prediction "
            f"voxels and {int(reference.sum())} reference voxels; handle empty masks before calling"
        )

    # Cropping to the union's bounding box leaves every distance unchanged, because both
    # surfaces lie inside it and the erosion treats voxels outside it as background either way.
    union_box = ndimage.find_objects(np.logical_or(prediction, reference).astype(np.uint8))[0]
    prediction_surface = mask_surface(prediction[union_box])
    reference_surface = mask_surface(reference[union_box])

    prediction_to_reference = _directed_distances(prediction_surface, reference_surface, spacing)
    reference_to_prediction = _directed_distances(reference_surface, prediction_surface, spacing)
    return prediction_to_reference, reference_to_prediction


def _directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    # The transform gives each voxel its distance to the nearest zero, so the target surface
    # must be the zeros of its input.
    distance_to_target = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_to_target[from_surface]
