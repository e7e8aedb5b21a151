"""Read images and label maps from NIfTI and photo formats, and write segmentations as NIfTI.

Every reader returns a `Volume`: the array as stored, a 4×4 voxel-to-world affine and the
spacing of each spatial axis. Spatial axes come first, in the file's own order: nibabel's
voxel order for NIfTI, rows then columns for photo formats. A channel axis, when present,
is last.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from fmadapt.errors import DataError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Pillow modes whose pixels read as one grayscale value per pixel ("I;16*" are 16-bit PNG/TIFF).
_GRAY_MODES = ("L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# Colour modes that read_image converts to RGB before returning H×W×3.
_CONVERT_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


@dataclass
class Volume:
    """An image or label array with its voxel-to-world affine and spacing.

    Attributes:
        array: spatial axes first, then an optional channel axis: X×Y×Z (NIfTI), H×W
            (grayscale photo) or H×W×C (RGB, RGBA, or channels stacked by `load_case`).
        affine: 4×4 float64 voxel-to-world matrix in mm. Photo formats get the identity.
        spacing: one value per spatial axis, in the array's axis order. Millimetres for
            NIfTI; 1.0 "pixel units" for photo formats, which store no physical size.
        path: the file the array was read from, or None for arrays made in memory.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray):
            raise TypeError(
                f"Volume array must be a numpy.ndarray, got {type(self.array).__name__}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4×4, got shape {affine.shape}")
        self.affine = affine
        spacing = tuple(float(value) for value in self.spacing)
        if not all(np.isfinite(value) and value > 0 for value in spacing):
            raise ValueError(f"Volume spacing must be positive and finite, got {spacing}")
        extra_axes = self.array.ndim - len(spacing)
        if extra_axes not in (0, 1) or len(spacing) == 0:
            raise ValueError(
                f"Volume spacing {spacing} has {len(spacing)} values for an array of shape "
                f"{self.array.shape}; give one value per spatial axis (a trailing channel "
                "axis takes none)"
            )
        self.spacing = spacing
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def ndim(self) -> int:
        """Number of array axes, the channel axis included."""
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the array, the channel axis included."""
        return tuple(self.array.shape)

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes (2 or 3 in practice), which is len(spacing)."""
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Sizes of the spatial axes, without the channel axis."""
        return tuple(self.array.shape[: self.spatial_ndim])

    @property
    def has_channel_axis(self) -> bool:
        """True when the array has a trailing channel axis (RGB photos, stacked channels)."""
        return self.array.ndim > self.spatial_ndim


def image_format(path: str | os.PathLike) -> str:
    """Return "nifti" or "photo" for a supported file name, judged by its suffix.

    Raises:
        DataError: the suffix is not one of NIFTI_SUFFIXES or PHOTO_SUFFIXES.
    """
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PHOTO_SUFFIXES):
        return "photo"
    supported = ", ".join(NIFTI_SUFFIXES + PHOTO_SUFFIXES)
    raise DataError(f"unsupported image file {str(path)!r}: the suffix must be one of {supported}")


def read_image(path: str | os.PathLike) -> Volume:
    """Read a NIfTI or photo-format image into a Volume, keeping the stored dtype.

    NIfTI (.nii, .nii.gz): the array is nibabel's data array in voxel order (X×Y×Z), with
    scl_slope/scl_inter applied when the header sets them (which turns the dtype to float).
    A 4-D file whose last axis has size 1 is squeezed to 3-D. Spacing is the header zooms.

    PNG, JPEG, BMP, TIFF: grayscale gives H×W (uint8, or uint16 for 16-bit files), RGB gives
    H×W×3 and RGBA H×W×4. Palette images are expanded to RGB (RGBA if they carry
    transparency). The affine is the identity and the spacing is (1.0, 1.0) in pixel units.

    Raises:
        FileNotFoundError: `path` does not exist.
        DataError: unsupported suffix, unreadable file, or an array layout fmadapt cannot use.
    """
    path = _existing_file(path)
    if image_format(path) == "nifti":
        return _read_nifti(path)
    array = _read_photo_array(path)
    return Volume(array=array, affine=np.eye(4), spacing=(1.0, 1.0), path=path)


def read_mask(path: str | os.PathLike, *, threshold: int | None = None) -> Volume:
    """Read a label file into a Volume with an integer array.

    NIfTI label maps keep their integer dtype; float label maps whose values are all
    whole numbers are cast to the smallest fitting integer dtype. Photo-format masks are
    reduced to one channel: alpha is dropped, and RGB masks must have equal R, G and B.
    Palette PNGs give their palette indices, which are the label ids in such files.

    Args:
        path: label file (.nii, .nii.gz, .png, .jpg, .jpeg, .bmp, .tif, .tiff).
        threshold: for photo formats only. Pixels with value > threshold become 1 and all
            others 0, which removes the artefacts of lossy JPEG masks. With an RGB mask each
            channel is binarised first and the binary channels must agree.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `threshold` is given for a NIfTI file.
        DataError: unreadable file, RGB channels that differ, or float labels that are not
            whole numbers.
    """
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)):
        raise TypeError(f"threshold must be an int or None, got {threshold!r}")
    path = _existing_file(path)
    if image_format(path) == "nifti":
        if threshold is not None:
            raise ValueError(
                f"threshold={threshold} applies to photo-format masks only, but {str(path)!r} "
                "is NIfTI; NIfTI label maps store label ids, so pass threshold=None"
            )
        volume = _read_nifti(path)
        volume.array = _integer_labels(volume.array, path)
        return volume
    array = _single_channel_mask(_read_photo_array(path, as_mask=True), path, threshold)
    if threshold is not None:
        array = (array > threshold).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    return Volume(array=array, affine=np.eye(4), spacing=(1.0, 1.0), path=path)


def write_segmentation(path: str | os.PathLike, labels: np.ndarray, reference: Volume) -> Path:
    """Write a label map as NIfTI with the reference's affine and spacing, atomically.

    Args:
        path: output file ending in .nii.gz (compressed) or .nii. Missing parent folders
            are created.
        labels: integer or bool array (or float array of whole numbers) with the shape of
            `reference.spatial_shape`.
        reference: the image the labels belong to. Its affine is written to both the qform
            and the sform (code 1, scanner) and its spacing to the header zooms.

    Returns:
        The path written. The file gets uint8 when all values fit, else int16, else int32.

    Raises:
        TypeError: `labels` is not an array or `reference` is not a Volume.
        ValueError: wrong suffix, shape mismatch, or labels that are not whole numbers or
            do not fit int32. The data is written to a temporary file in the same folder and
            moved into place with os.replace, so a failure leaves no file behind.
    """
    path = Path(path)
    if image_format(path) != "nifti":
        raise ValueError(
            f"segmentation path {str(path)!r} must end in .nii.gz or .nii; photo formats "
            "cannot store the affine"
        )
    if not isinstance(reference, Volume):
        raise TypeError(f"reference must be a Volume, got {type(reference).__name__}")
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy.ndarray, got {type(labels).__name__}")
    if labels.shape != reference.spatial_shape:
        raise ValueError(
            f"labels shape {labels.shape} does not match the reference spatial shape "
            f"{reference.spatial_shape}; resample the prediction to the reference grid first"
        )
    array = _labels_for_writing(labels)
    image = nib.Nifti1Image(array, reference.affine)
    image.header.set_qform(reference.affine, code=1)
    image.header.set_sform(reference.affine, code=1)
    image.header.set_zooms(reference.spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(image, path)
    logger.debug("wrote %s labels %s to %s", array.dtype, array.shape, path)
    return path


def _existing_file(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} not found")
    return path


def _read_nifti(path: Path) -> Volume:
    # mmap=False reads the data into memory, so no open memory map keeps the file busy
    # while a later write replaces it.
    try:
        image = nib.load(str(path), mmap=False)
        array = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises several unrelated types for corrupt files
        raise DataError(f"failed to read NIfTI file {str(path)!r}: {err}") from err
    zooms = tuple(float(zoom) for zoom in image.header.get_zooms())
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(
            f"NIfTI file {str(path)!r} has shape {array.shape}; fmadapt reads 2-D and 3-D "
            "images (a 4-D file only with a last axis of size 1); split channels into one "
            "file each"
        )
    return Volume(array=array, affine=image.affine, spacing=zooms[: array.ndim], path=path)


def _read_photo_array(path: Path, *, as_mask: bool = False) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise DataError(
                    f"{str(path)!r} has {image.n_frames} frames; fmadapt reads single-frame "
                    "photo files, so convert image stacks to NIfTI"
                )
            image.load()
            return _photo_to_array(image, as_mask=as_mask)
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"failed to read image file {str(path)!r}: {err}") from err


def _photo_to_array(image: Image.Image, *, as_mask: bool) -> np.ndarray:
    mode = image.mode
    # Masks keep palette indices (label ids) and bilevel pixels (bool), images get colours.
    if mode == "P" and not as_mask:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1" and not as_mask:
        image = image.convert("L")
    elif mode == "LA":
        image = image.convert("RGBA")
    elif mode in _CONVERT_TO_RGB:
        image = image.convert("RGB")
    elif mode not in _GRAY_MODES + ("1", "P", "RGB", "RGBA"):
        raise DataError(
            f"unsupported Pillow image mode {mode!r}; save the file as RGB or grayscale"
        )
    array = np.asarray(image)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return np.array(array)


def _single_channel_mask(array: np.ndarray, path: Path, threshold: int | None) -> np.ndarray:
    if array.ndim == 2:
        return array
    colours = array[..., :3]
    if threshold is not None:
        colours = colours > threshold
    differing = int(np.count_nonzero(np.any(colours != colours[..., :1], axis=-1)))
    if differing:
        raise DataError(
            f"RGB mask {str(path)!r} has {differing} pixels whose R, G and B values differ "
            f"(threshold={threshold}); save the mask as grayscale or with equal channels"
        )
    return array[..., 0]


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise DataError(
            f"label file {str(path)!r} has dtype {array.dtype} with non-integer values; "
            "label maps must contain whole-number label ids"
        )
    return array.astype(_smallest_label_dtype(array))


def _labels_for_writing(labels: np.ndarray) -> np.ndarray:
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise ValueError(
                f"labels of dtype {labels.dtype} contain non-integer values; pass label ids "
                "(for example argmax over classes), not probabilities or logits"
            )
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer, bool or float, got dtype {labels.dtype}")
    return labels.astype(_smallest_label_dtype(labels))


def _smallest_label_dtype(array: np.ndarray) -> type:
    if array.size == 0:
        return np.uint8
    low, high = array.min(), array.max()
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(
        f"label values range from {low} to {high}, outside int32; label ids must fit int32"
    )


def _save_atomically(image: nib.Nifti1Image, path: Path) -> None:
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        nib.save(image, temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
