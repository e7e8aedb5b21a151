"""Bring 2D images of the common array layouts to H×W×3."""

from __future__ import annotations

import numpy as np

__all__ = ["ACCEPTED_LAYOUTS", "to_hwc"]

ACCEPTED_LAYOUTS = "H×W, H×W×1, 1×H×W, H×W×3 or H×W×4 (RGBA, alpha dropped)"
_CHANNELS_LAST = (1, 3, 4)


def to_hwc(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an H×W×3 array with its dtype unchanged.

    Accepted layouts are H×W, H×W×1 and 1×H×W (the single channel is repeated three
    times), H×W×3, and H×W×4 (the fourth channel is alpha and is dropped).

    A 3-D array is read as channels-last whenever its last axis has length 1, 3 or 4,
    and as 1×H×W only otherwise. So a 1×5×3 array is a 1-pixel-high RGB image and a
    1×64×48 array is a single-channel 64×48 image.

    Any other layout raises ValueError, for example 3×H×W, 2×H×W, H×W×2, 1-D or 4-D
    arrays. Move the channel axis last (``np.moveaxis(image, 0, -1)``) or select one
    slice before calling.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape}); pass an image with H, W >= 1")

    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[-1] in _CHANNELS_LAST:
        return _channels_last_to_rgb(image)
    if image.ndim == 3 and image.shape[0] == 1:
        return np.repeat(image[0][:, :, None], 3, axis=2)

    raise ValueError(
        f"image has shape {image.shape}, which is not a supported layout; accepted layouts are "
        f"{ACCEPTED_LAYOUTS}. Move the channel axis last or select one 2D slice first."
    )


def _channels_last_to_rgb(image: np.ndarray) -> np.ndarray:
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return image
