"""Model-input transforms: resize and normalise images, map prompts and masks between frames.

Two frames appear throughout fmadapt. The *original* frame is the image as the user
gives it (H×W pixels). The *model frame* is the S×S square the encoder takes as input
(S = image_size). ``ImageTransform`` is the only place that converts between them.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fmadapt.errors import FmadaptWarning

__all__ = [
    "MEDSAM_PREPROCESS",
    "SAM_PREPROCESS",
    "ImageTransform",
    "PreprocessSpec",
    "resolve_preprocess",
]

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

_RESIZE_MODES = ("longest_side", "square")


@dataclass(frozen=True)
class PreprocessSpec:
    """Input preparation a model expects, as data.

    Attributes:
        resize: ``"longest_side"`` scales the longer side to S keeping the aspect ratio
            and pads the bottom and right with zeros after normalisation (SAM).
            ``"square"`` resizes to S×S without keeping the aspect ratio (MedSAM).
        value_scale: factor applied to the 0–255 input values first.
        pixel_mean, pixel_std: per-channel (R, G, B) statistics subtracted and divided
            after scaling, on the scaled value range; ``None`` skips this step.
        minmax: when true, the resized image is min-max scaled to [0, 1] after
            ``value_scale``, as ``(x - min) / max(max - min, 1e-8)``.
    """

    resize: Literal["longest_side", "square"]
    value_scale: float
    pixel_mean: tuple[float, float, float] | None
    pixel_std: tuple[float, float, float] | None
    minmax: bool = False

    def __post_init__(self) -> None:
        if self.resize not in _RESIZE_MODES:
            raise ValueError(
                f"PreprocessSpec resize {self.resize!r} is invalid; choose one of {list(_RESIZE_MODES)}"
            )
        if not self.value_scale > 0:
            raise ValueError(f"PreprocessSpec value_scale must be > 0, got {self.value_scale}")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError(
                "PreprocessSpec pixel_mean and pixel_std must both be set or both be None, "
                f"got pixel_mean={self.pixel_mean}, pixel_std={self.pixel_std}"
            )
        if self.pixel_mean is not None:
            _check_channel_triple("pixel_mean", self.pixel_mean)
            _check_channel_triple("pixel_std", self.pixel_std)
            if min(self.pixel_std) <= 0:
                raise ValueError(f"PreprocessSpec pixel_std values must be > 0, got {self.pixel_std}")


def _check_channel_triple(name: str, values: tuple[float, ...] | None) -> None:
    if values is None or len(values) != 3:
        raise ValueError(f"PreprocessSpec {name} must have 3 values (R, G, B), got {values!r}")


# segment-anything 1.0 (ResizeLongestSide, Sam.preprocess): ImageNet mean and std on 0–255.
SAM_PREPROCESS = PreprocessSpec(
    resize="longest_side",
    value_scale=1.0,
    pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375),
)

# MedSAM's released inference script: resize to 1024×1024 and min-max scale to [0, 1].
# That script truncates the resized image to uint8 before scaling. This transform keeps
# float values, which differ from it by less than one grey level before scaling.
MEDSAM_PREPROCESS = PreprocessSpec(
    resize="square",
    value_scale=1.0,
    pixel_mean=None,
    pixel_std=None,
    minmax=True,
)


def resolve_preprocess(
    model_preprocess: PreprocessSpec,
    requested: PreprocessSpec | None,
    *,
    allow_preprocess_mismatch: bool = False,
    model_name: str = "the model",
) -> PreprocessSpec:
    """Return the preprocessing to use, rejecting one that differs from the model's.

    ``requested=None`` means the model's own spec. A different spec raises ValueError,
    because a model fed differently prepared images gives wrong masks without any error.
    With ``allow_preprocess_mismatch=True`` the requested spec is used and a
    FmadaptWarning is issued instead.
    """
    if requested is None or requested == model_preprocess:
        return model_preprocess
    if not isinstance(requested, PreprocessSpec):
        raise TypeError(f"preprocess must be a PreprocessSpec or None, got {type(requested).__name__}")
    message = (
        f"preprocess {requested} differs from the preprocessing {model_name} was trained with "
        f"({model_preprocess})"
    )
    if not allow_preprocess_mismatch:
        raise ValueError(
            f"{message}; drop the preprocess argument to use the model's own, or pass "
            "allow_preprocess_mismatch=True if the change is intended"
        )
    warnings.warn(message + "; using it because allow_preprocess_mismatch=True", FmadaptWarning, stacklevel=3)
    return requested


class ImageTransform:
    """Resize, normalise and pad images, and map boxes, points and masks between frames.

    Args:
        spec: the model's preprocessing.
        image_size: S, the side of the square model input in pixels.
    """

    def __init__(self, spec: PreprocessSpec, image_size: int) -> None:
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.spec = spec
        self.image_size = image_size

    def __repr__(self) -> str:
        return f"ImageTransform(spec={self.spec!r}, image_size={self.image_size})"

    def model_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the resized image inside the S×S input, before padding.

        For ``"longest_side"`` the longer side becomes S and the other side is
        ``side * S / max(H, W)`` rounded half up, as segment-anything's ResizeLongestSide.
        """
        height, width = _check_original_size(original_size)
        if self.spec.resize == "square":
            return self.image_size, self.image_size
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def image_to_tensor(self, image_hwc: np.ndarray) -> torch.Tensor:
        """Turn an H×W×3 image on a 0–255 scale into the 3×S×S float32 model input.

        Resizes with bilinear interpolation (antialiased when shrinking), then applies
        ``value_scale``, min-max scaling and mean/std as set in the spec, then pads the
        bottom and right with zeros up to S×S.
        """
        if not isinstance(image_hwc, np.ndarray):
            raise TypeError(f"image_hwc must be a numpy.ndarray, got {type(image_hwc).__name__}")
        if image_hwc.ndim != 3 or image_hwc.shape[2] != 3 or min(image_hwc.shape[:2]) < 1:
            raise ValueError(
                f"image_hwc must have shape H×W×3, got {image_hwc.shape}; "
                "convert it with fmadapt.data.layout.to_hwc first"
            )
        height, width = image_hwc.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(image_hwc, dtype=np.float32))
        pixels = pixels.permute(2, 0, 1).unsqueeze(0)

        new_size = self.model_size((height, width))
        if new_size != (height, width):
            pixels = F.interpolate(pixels, new_size, mode="bilinear", align_corners=False, antialias=True)

        pixels = self._normalise(pixels)

        pad_bottom = self.image_size - new_size[0]
        pad_right = self.image_size - new_size[1]
        pixels = F.pad(pixels, (0, pad_right, 0, pad_bottom))
        return pixels[0]

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        pixels = pixels * spec.value_scale
        if spec.minmax:
            low = pixels.min()
            spread = torch.clamp(pixels.max() - low, min=1e-8)
            pixels = (pixels - low) / spread
        if spec.pixel_mean is not None:
            mean = torch.tensor(spec.pixel_mean, dtype=pixels.dtype).view(1, 3, 1, 1)
            std = torch.tensor(spec.pixel_std, dtype=pixels.dtype).view(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def _xy_scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        height, width = _check_original_size(original_size)
        new_height, new_width = self.model_size((height, width))
        return new_width / width, new_height / height

    def points_to_model(self, points: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
        """Map (..., 2) XY points from original pixels to the model frame (float32)."""
        return _scale_xy(points, self._xy_scale(original_size), "points", 2, inverse=False)

    def points_from_model(self, points: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
        """Map (..., 2) XY points from the model frame back to original pixels (float32)."""
        return _scale_xy(points, self._xy_scale(original_size), "points", 2, inverse=True)

    def boxes_to_model(self, boxes: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
        """Map (..., 4) XYXY boxes from original pixels to the model frame (float32)."""
        return _scale_xy(boxes, self._xy_scale(original_size), "boxes", 4, inverse=False)

    def boxes_from_model(self, boxes: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
        """Map (..., 4) XYXY boxes from the model frame back to original pixels (float32)."""
        return _scale_xy(boxes, self._xy_scale(original_size), "boxes", 4, inverse=True)

    def masks_to_original(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Resize decoder logits (..., h, w) to the original image, (..., H, W), in one pass.

        ``"longest_side"``: the result equals segment-anything's ``Sam.postprocess_masks``
        (bilinear upsampling to S×S, cropping the padding away, bilinear resizing to H×W)
        up to float rounding, but no S×S mask is formed. Each of those steps is a linear map
        along each axis, so their product is one H×h matrix for the rows and one W×w matrix
        for the columns, and the logits are resized by two matrix products. ``"square"``:
        one bilinear resize straight to H×W, as MedSAM's inference script does.
        """
        height, width = _check_original_size(original_size)
        logits, leading = _as_image_batch(low_res_logits, "low_res_logits")
        if self.spec.resize == "square":
            logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
            return logits.reshape(*leading, height, width)

        low_height, low_width = logits.shape[-2:]
        new_height, new_width = self.model_size((height, width))
        rows = _sam_resize_matrix(low_height, self.image_size, new_height, height).to(logits.device)
        columns = _sam_resize_matrix(low_width, self.image_size, new_width, width).to(logits.device)
        # (H×h) @ (N×h×w) @ (w×W) gives N×H×W.
        resized = rows @ logits[0] @ columns.T
        return resized.reshape(*leading, height, width)

    def masks_to_low_res(self, mask: torch.Tensor, low_res_size: int | tuple[int, int]) -> torch.Tensor:
        """Resize masks (..., H, W) in the original frame to the decoder's output size.

        The result is float32 (..., h, w) with h, w = ``low_res_size`` (S/4 for SAM's
        decoder). Shrinking averages over areas, so boolean or 0/1 masks become coverage
        fractions in [0, 1]; threshold at 0.5 for a binary target.
        """
        low_height, low_width = _pair(low_res_size, "low_res_size")
        values, leading = _as_image_batch(mask, "mask")
        height, width = values.shape[-2:]
        if self.spec.resize == "square":
            values = _resize(values, (low_height, low_width))
            return values.reshape(*leading, low_height, low_width)

        new_height, new_width = self.model_size((height, width))
        values = _resize(values, (new_height, new_width))
        values = F.pad(values, (0, self.image_size - new_width, 0, self.image_size - new_height))
        values = _resize(values, (low_height, low_width))
        return values.reshape(*leading, low_height, low_width)


def _check_original_size(original_size: tuple[int, int]) -> tuple[int, int]:
    return _pair(original_size, "original_size")


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = (int(value) for value in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W) in pixels, got {size!r}") from None
    if height < 1 or width < 1 or (height, width) != tuple(size):
        raise ValueError(f"{name} must be two positive integers (H, W), got {size!r}")
    return height, width


def _resize(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize 1×N×H×W masks: area averaging when shrinking both axes, else bilinear."""
    height, width = values.shape[-2:]
    if (height, width) == size:
        return values
    if size[0] <= height and size[1] <= width:
        return F.interpolate(values, size, mode="area")
    return F.interpolate(values, size, mode="bilinear", align_corners=False, antialias=True)


def _linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """Return the size_out×size_in matrix of torch's 1-D linear resize (align_corners=False).

    The matrix is the resized identity, so its weights are torch's own, border clamping
    included. Bilinear resizing of an image applies the same matrix to rows and columns.
    """
    identity = torch.eye(size_in, dtype=torch.float64).unsqueeze(0)
    return F.interpolate(identity, size_out, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=32)
def _sam_resize_matrix(low_res: int, model_size: int, resized: int, original: int) -> torch.Tensor:
    """Return the original×low_res float32 matrix of SAM's three steps along one axis.

    The steps: linear upsampling from ``low_res`` to ``model_size`` (the S×S frame),
    keeping the first ``resized`` entries (the image without its padding), and linear
    resizing to ``original``. The last step is the identity when ``resized == original``.
    """
    to_model = _linear_resize_matrix(low_res, model_size)[:resized]
    if resized != original:
        to_model = _linear_resize_matrix(resized, original) @ to_model
    return to_model.float()


def _as_image_batch(values: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Reshape (..., h, w) to 1×N×h×w float32 for F.interpolate; return the leading shape."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.ndim < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {tuple(values.shape)}")
    leading = tuple(values.shape[:-2])
    height, width = values.shape[-2:]
    return values.float().reshape(1, -1, height, width), leading


def _scale_xy(
    coords: ArrayOrTensor,
    xy_scale: tuple[float, float],
    name: str,
    last_dim: int,
    *,
    inverse: bool,
) -> ArrayOrTensor:
    """Multiply (or divide) the x and y entries of (..., last_dim) coordinates."""
    if isinstance(coords, np.ndarray):
        scaled = coords.astype(np.float32, copy=True)
    elif isinstance(coords, torch.Tensor):
        scaled = coords.to(torch.float32).clone()
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(coords).__name__}")
    if scaled.ndim < 1 or scaled.shape[-1] != last_dim:
        layout = "XYXY boxes (..., 4)" if last_dim == 4 else "XY points (..., 2)"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(scaled.shape)}")

    scale_x, scale_y = xy_scale
    if inverse:
        scale_x, scale_y = 1.0 / scale_x, 1.0 / scale_y
    scaled[..., 0::2] *= scale_x
    scaled[..., 1::2] *= scale_y
    return scaled
