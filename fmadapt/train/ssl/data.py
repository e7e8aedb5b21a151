"""Unlabelled slices from dataset folders, and the multi-crop views of self-distillation.

Only image files are read: nnU-Net's ``imagesTr`` (and ``imagesTs``) channel files, or a 2D
dataset's ``images/`` folder or the ``image`` entries of its dataset.json. Each file is one
image, so the channels of a multi-channel case become separate images. Volumes are scaled
to 0–255 once per volume and then cut into 2D slices.

Every random choice of a sample (slice, crop boxes, flips, masks) is drawn from a
generator seeded with (seed, sample index). A sample is therefore the same whichever
process, worker or resumed run builds it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fmadapt.data.intensity import normalize_intensity
from fmadapt.data.io import NIFTI_SUFFIXES, PHOTO_SUFFIXES, read_image
from fmadapt.data.layout import to_hwc
from fmadapt.data.slices import extract_slice
from fmadapt.data.transforms import PreprocessSpec
from fmadapt.errors import DataError
from fmadapt.train.samples import intensity_spec
from fmadapt.train.ssl.config import PretrainRecipe, SourceConfig, resolve_source_roots

__all__ = ["MultiCropDataset", "MultiCropSettings", "UnlabelledSlice", "list_image_files", "load_pretrain_slices"]

logger = logging.getLogger(__name__)

# Aspect ratio range (width / height) of random resized crops.
_CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class UnlabelledSlice:
    """One 2D image for self-supervision.

    Attributes:
        file: the image file it comes from.
        index: slice index along the source axis, or None for a 2D image.
        image: H×W×3 float32 on a 0–255 scale.
    """

    file: Path
    index: int | None
    image: np.ndarray


def list_image_files(root: Path, *, include_test_images: bool = True) -> list[Path]:
    """List the image files of an nnU-Net v2 or 2D dataset folder, sorted, without touching labels.

    Raises:
        DataError: no dataset.json, no image folder, or no image file.
    """
    description = _read_description(root)
    if (root / "imagesTr").is_dir():
        ending = description.get("file_ending", ".nii.gz")
        folders = [root / "imagesTr"]
        if include_test_images and (root / "imagesTs").is_dir():
            folders.append(root / "imagesTs")
        files = [path for folder in folders for path in sorted(folder.iterdir()) if _is_image(path, ending)]
    elif isinstance(description.get("cases"), dict):
        entries = [entry for _, entry in sorted(description["cases"].items()) if isinstance(entry, dict)]
        files = [root / str(entry["image"]) for entry in entries if "image" in entry]
    elif (root / "images").is_dir():
        files = [path for path in sorted((root / "images").iterdir()) if path.suffix.lower() in PHOTO_SUFFIXES]
    else:
        raise DataError(
            f"dataset folder {str(root)!r} has neither imagesTr/ (nnU-Net layout) nor images/ or "
            "a 'cases' entry in dataset.json (2d layout)"
        )
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise DataError(f"image files listed in {str(root / 'dataset.json')!r} not found: {missing[:5]}")
    if not files:
        raise DataError(f"dataset folder {str(root)!r} contains no image files")
    return files


def _read_description(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"dataset description {str(path)!r} not found; add a dataset.json")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"failed to read {str(path)!r}: {error}") from error
    if not isinstance(description, dict):
        raise DataError(f"{str(path)!r} must contain a JSON object, got {type(description).__name__}")
    return description


def _is_image(path: Path, file_ending: str) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(file_ending) and name.endswith(NIFTI_SUFFIXES + PHOTO_SUFFIXES)


def load_source_slices(root: Path, source: SourceConfig, min_content_fraction: float) -> list[UnlabelledSlice]:
    """Read every image file of one source, scale each volume to 0–255 and cut it into kept slices."""
    spec = intensity_spec(source.intensity)
    slices = []
    for path in list_image_files(root, include_test_images=source.include_test_images):
        volume = read_image(path)
        volume.array = normalize_intensity(volume.array, spec)
        if volume.spatial_ndim == 2:
            candidates = [(None, extract_slice(volume, None, 0)[0])]
        else:
            count = volume.spatial_shape[source.axis]
            candidates = [(index, extract_slice(volume, source.axis, index)[0]) for index in range(count)]
        kept_slices = [
            UnlabelledSlice(path, index, to_hwc(np.ascontiguousarray(plane, dtype=np.float32)))
            for index, plane in candidates
            if _content_fraction(plane) >= min_content_fraction and np.ptp(plane) > 0
        ]
        logger.info("%s: kept %d of %d slices", path.name, len(kept_slices), len(candidates))
        slices.extend(kept_slices)
    return slices


def _content_fraction(plane: np.ndarray) -> float:
    content = plane > 0 if plane.ndim == 2 else (plane > 0).any(axis=-1)
    return float(content.mean())


def load_pretrain_slices(recipe: PretrainRecipe) -> list[UnlabelledSlice]:
    """Load the kept slices of every source of the recipe, in source order.

    Raises:
        RecipeError: a source folder is missing.
        DataError: a folder has no images, or no slice passes ``data.min_content_fraction``.
    """
    slices: list[UnlabelledSlice] = []
    for root, source in zip(resolve_source_roots(recipe), recipe.data.sources, strict=True):
        slices.extend(load_source_slices(root, source, recipe.data.min_content_fraction))
    if not slices:
        raise DataError(
            f"no slice has at least {recipe.data.min_content_fraction:.0%} of its pixels above 0 after "
            "intensity scaling; lower data.min_content_fraction or check data.sources[*].intensity"
        )
    return slices


@dataclass(frozen=True)
class MultiCropSettings:
    """Crop sizes in pixels, crop area fractions and iBOT masking of the global crops."""

    global_size: int
    local_size: int
    local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    flip: bool
    patch_size: int
    mask_probability: float
    mask_ratio: tuple[float, float]
    global_crops: int = 2

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if size < self.patch_size or size % self.patch_size:
                raise ValueError(
                    f"{name} {size} px is not a positive multiple of the patch size {self.patch_size}; "
                    f"use a multiple such as {max(1, round(size / self.patch_size)) * self.patch_size}"
                )

    @classmethod
    def from_recipe(cls, recipe: PretrainRecipe, patch_size: int) -> MultiCropSettings:
        crops, objective = recipe.crops, recipe.objective
        return cls(
            global_size=crops.global_size,
            local_size=crops.local_size,
            local_crops=crops.local_crops,
            global_scale=tuple(crops.global_scale),
            local_scale=tuple(crops.local_scale),
            flip=crops.flip,
            patch_size=patch_size,
            mask_probability=objective.mask_probability,
            mask_ratio=tuple(objective.mask_ratio),
        )

    @property
    def global_patches(self) -> int:
        """N, the patch count of one global crop."""
        return (self.global_size // self.patch_size) ** 2


class MultiCropDataset(Dataset):
    """Sample ``k`` is a random slice with its global crops, local crops and patch masks.

    Items are dicts of tensors:
    ``global_crops`` G×3×S×S, ``local_crops`` L×3×s×s (S, s = global and local size,
    G = 2 global crops, L = ``local_crops``) and ``masks`` G×N bool (N = (S / patch)²,
    True = patch replaced by the mask token for the student). Pixels are normalised
    with ``preprocess`` (the encoder's value scale, mean and std).

    Args:
        slices: the images to crop from.
        settings: crop and mask settings.
        preprocess: the encoder's input normalisation. Its resize rule is not used,
            because every crop is resized to a square.
        length: number of samples, normally steps × batch size × processes.
        seed: base seed of every sample's generator.
    """

    def __init__(
        self,
        slices: list[UnlabelledSlice],
        settings: MultiCropSettings,
        preprocess: PreprocessSpec,
        *,
        length: int,
        seed: int,
    ) -> None:
        if not slices:
            raise ValueError("slices is empty; load at least one unlabelled slice")
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.slices = slices
        self.settings = settings
        self.preprocess = preprocess
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        image = torch.from_numpy(self.slices[int(rng.integers(len(self.slices)))].image).permute(2, 0, 1)
        settings = self.settings
        global_crops = [
            self._crop(image, settings.global_size, settings.global_scale, rng) for _ in range(settings.global_crops)
        ]
        local_crops = [
            self._crop(image, settings.local_size, settings.local_scale, rng) for _ in range(settings.local_crops)
        ]
        if local_crops:
            local = torch.stack(local_crops)
        else:
            local = torch.empty(0, 3, settings.local_size, settings.local_size)
        masks = torch.stack([self._mask(rng) for _ in range(settings.global_crops)])
        return {"global_crops": torch.stack(global_crops), "local_crops": local, "masks": masks}

    def _crop(
        self, image: torch.Tensor, size: int, scale: tuple[float, float], rng: np.random.Generator
    ) -> torch.Tensor:
        top, left, height, width = random_crop_box(image.shape[1:], scale, rng)
        crop = image[:, top : top + height, left : left + width].unsqueeze(0)
        shrinking = min(height, width) > size
        crop = F.interpolate(crop, (size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        if self.settings.flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return normalise_pixels(crop, self.preprocess)[0]

    def _mask(self, rng: np.random.Generator) -> torch.Tensor:
        patches = self.settings.global_patches
        mask = torch.zeros(patches, dtype=torch.bool)
        if rng.random() < self.settings.mask_probability:
            ratio = rng.uniform(*self.settings.mask_ratio)
            count = min(patches, int(round(ratio * patches)))
            mask[torch.from_numpy(rng.permutation(patches)[:count])] = True
        return mask


def random_crop_box(
    shape: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Draw (top, left, height, width) of a crop covering a ``scale`` fraction of an H×W image.

    The aspect ratio is log-uniform in [3/4, 4/3]. A box that does not fit is clipped to
    the image, so small or elongated images still give a valid crop.
    """
    image_height, image_width = int(shape[0]), int(shape[1])
    area = rng.uniform(*scale) * image_height * image_width
    aspect = math.exp(rng.uniform(math.log(_CROP_ASPECT_RANGE[0]), math.log(_CROP_ASPECT_RANGE[1])))
    width = min(image_width, max(1, int(round(math.sqrt(area * aspect)))))
    height = min(image_height, max(1, int(round(math.sqrt(area / aspect)))))
    top = int(rng.integers(image_height - height + 1))
    left = int(rng.integers(image_width - width + 1))
    return top, left, height, width


def normalise_pixels(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Apply ``spec``'s value scale, min-max scaling and mean/std to B×3×H×W pixels on 0–255."""
    pixels = pixels * spec.value_scale
    if spec.minmax:
        low = pixels.amin(dim=(1, 2, 3), keepdim=True)
        spread = (pixels.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-8)
        pixels = (pixels - low) / spread
    if spec.pixel_mean is not None:
        mean = torch.tensor(spec.pixel_mean, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(spec.pixel_std, dtype=pixels.dtype).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels
