"""Map raw image values (CT in HU, MR in arbitrary units, photos) to a 0–255 scale."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass

import numpy as np

from fmadapt.errors import FmadaptWarning

__all__ = [
    "CT_WINDOWS",
    "INTENSITY_MODES",
    "IntensitySpec",
    "apply_window",
    "normalize_intensity",
    "scale_minmax",
    "scale_percentiles",
]

# Common CT display presets as (width, level) in Hounsfield units. Sites and textbooks
# differ by a few tens of HU; pass width and level to IntensitySpec for other values.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
}

INTENSITY_MODES = ("auto", "ct_window", "percentile", "minmax", "none")


def apply_window(image: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map values inside the window ``level ± width / 2`` linearly onto 0–255.

    Values below the window become 0 and values above it 255. ``width`` and ``level``
    are in the image's units (HU for CT). Returns float32 with the input's shape.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}; a CT window has a positive width in HU")
    lower = level - width / 2.0
    scaled = (np.asarray(image, dtype=np.float64) - lower) / width * 255.0
    return np.clip(scaled, 0.0, 255.0).astype(np.float32)


def scale_percentiles(
    image: np.ndarray, lower: float = 0.5, upper: float = 99.5
) -> np.ndarray:
    """Map the ``lower``–``upper`` percentile range of ``image`` linearly onto 0–255.

    Values outside the range are clipped. A constant image (or one whose two
    percentiles are equal) returns zeros. Returns float32 with the input's shape.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )
    values = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(values, [lower, upper])
    return _scale_between(values, low, high)


def scale_minmax(image: np.ndarray) -> np.ndarray:
    """Map the minimum of ``image`` to 0 and its maximum to 255 (float32, same shape)."""
    values = np.asarray(image, dtype=np.float64)
    return _scale_between(values, values.min(), values.max())


def _scale_between(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(scaled, 0.0, 255.0).astype(np.float32)


@dataclass(frozen=True)
class IntensitySpec:
    """Rule that maps raw image values onto the 0–255 scale that model transforms expect.

    Modes:
        ``"ct_window"``: a named window from ``CT_WINDOWS`` or explicit ``width`` and
        ``level`` in HU. ``"percentile"``: the ``percentiles`` range maps to 0–255 (MR).
        ``"minmax"``: the image's minimum and maximum map to 0 and 255. ``"none"``: values
        are already on a 0–255 scale (uint8 photos, PNG slices). ``"auto"``: ``"none"``
        for uint8 images and ``"percentile"`` for every other dtype.
    """

    mode: str = "auto"
    window: str | None = None
    width: float | None = None
    level: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise ValueError(
                f"IntensitySpec mode {self.mode!r} is invalid; choose one of {list(INTENSITY_MODES)}"
            )
        if self.mode == "ct_window":
            self._check_window()
        elif self.window is not None or self.width is not None or self.level is not None:
            raise ValueError(
                f"IntensitySpec window, width and level apply only to mode 'ct_window', "
                f"got mode {self.mode!r} with window={self.window!r}, width={self.width}, "
                f"level={self.level}; set mode='ct_window' or drop them"
            )
        self._check_percentiles()

    def _check_window(self) -> None:
        if self.window is not None:
            if self.width is not None or self.level is not None:
                raise ValueError(
                    f"IntensitySpec takes either window={self.window!r} or width and level, "
                    f"not both (got width={self.width}, level={self.level})"
                )
            if self.window not in CT_WINDOWS:
                closest = difflib.get_close_matches(self.window, CT_WINDOWS, n=1)
                hint = f" Did you mean {closest[0]!r}?" if closest else ""
                raise ValueError(
                    f"unknown CT window {self.window!r}; known windows are "
                    f"{sorted(CT_WINDOWS)}.{hint}"
                )
            return
        if self.width is None or self.level is None:
            raise ValueError(
                "IntensitySpec mode 'ct_window' needs a window name or both width and level "
                f"in HU, got window=None, width={self.width}, level={self.level}"
            )
        if not self.width > 0:
            raise ValueError(f"IntensitySpec width must be > 0 HU, got {self.width}")

    def _check_percentiles(self) -> None:
        if len(self.percentiles) != 2:
            raise ValueError(
                f"IntensitySpec percentiles must be (lower, upper), got {self.percentiles!r}"
            )
        lower, upper = self.percentiles
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(
                "IntensitySpec percentiles must satisfy 0 <= lower < upper <= 100, "
                f"got {self.percentiles!r}"
            )

    def window_values(self) -> tuple[float, float]:
        """(width, level) in HU for mode ``"ct_window"``."""
        if self.mode != "ct_window":
            raise ValueError(f"window_values() needs mode 'ct_window', this spec has {self.mode!r}")
        if self.window is not None:
            return CT_WINDOWS[self.window]
        return float(self.width), float(self.level)


def normalize_intensity(image: np.ndarray, spec: IntensitySpec) -> np.ndarray:
    """Map ``image`` onto a 0–255 scale by the rule in ``spec``. Returns float32, same shape."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if not isinstance(spec, IntensitySpec):
        raise TypeError(f"spec must be an IntensitySpec, got {type(spec).__name__}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if not np.issubdtype(image.dtype, np.number) and image.dtype != np.bool_:
        raise TypeError(f"image must have a numeric dtype, got {image.dtype}")

    mode = spec.mode
    if mode == "auto":
        mode = "none" if image.dtype == np.uint8 else "percentile"

    if mode == "ct_window":
        width, level = spec.window_values()
        return apply_window(image, width, level)
    if mode == "percentile":
        return scale_percentiles(image, *spec.percentiles)
    if mode == "minmax":
        return scale_minmax(image)
    return _check_byte_range(image.astype(np.float32))


def _check_byte_range(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 255.0:
        warnings.warn(
            f"intensity mode 'none' expects values in 0–255 but the image spans "
            f"[{low:g}, {high:g}]; use mode 'ct_window', 'percentile' or 'minmax' for raw scans",
            FmadaptWarning,
            stacklevel=3,
        )
    return values
