"""Geometric augmentation of 2D training samples: flips, quarter turns and random crops.

Few-shot training on a handful of images lets the decoder memorise where objects are.
Moving the objects around with these label-preserving transforms makes the box prompt the
only reliable cue to an object's position, so prompted training learns to follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities of each flip and of a quarter turn, and the crop side range.

    ``crop_scale`` = (low, high) draws each crop side as a fraction of the image side;
    (1.0, 1.0) turns cropping off.
    """

    flip_probability: float = 0.5
    rotate_probability: float = 0.5
    crop_scale: tuple[float, float] = (0.6, 1.0)


def augment_sample(
    image: np.ndarray, label: np.ndarray, settings: AugmentSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same random flips, quarter turn and crop to an image and its label map.

    Args:
        image: H×W or H×W×C array.
        label: H×W label map.

    Returns:
        The transformed image and label, with matching H′×W′ (which may differ from H×W).
    """
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} must have the same H×W")
    if rng.random() < settings.flip_probability:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < settings.flip_probability:
        image, label = image[::-1], label[::-1]
    if rng.random() < settings.rotate_probability:
        turns = int(rng.integers(1, 4))
        image, label = np.rot90(image, turns, axes=(0, 1)), np.rot90(label, turns, axes=(0, 1))
    low, high = settings.crop_scale
    if low < 1.0:
        height, width = label.shape
        crop_height = max(1, int(round(height * rng.uniform(low, high))))
        crop_width = max(1, int(round(width * rng.uniform(low, high))))
        top = int(rng.integers(0, height - crop_height + 1))
        left = int(rng.integers(0, width - crop_width + 1))
        image = image[top : top + crop_height, left : left + crop_width]
        label = label[top : top + crop_height, left : left + crop_width]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
