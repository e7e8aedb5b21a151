"""Tests for fmadapt.data.io: reading NIfTI and photo files, writing segmentations."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fmadapt.data import io
from fmadapt.data.io import Volume, read_image, read_mask, write_segmentation
from fmadapt.errors import DataError
from tests.conftest import require_dataset

BRAIN_SPACING = (0.78125, 0.78125, 6.5)


def _save_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...]) -> np.ndarray:
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = [-10.0, 20.5, 3.0]
    image = nib.Nifti1Image(array, affine)
    image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return affine


def test_nifti_keeps_dtype_and_spacing_order(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = _save_nifti(tmp_path / "scan.nii.gz", array, (1.0, 2.0, 3.0))

    volume = read_image(tmp_path / "scan.nii.gz")

    assert volume.array.dtype == np.int16
    assert volume.shape == (4, 5, 6)
    assert volume.spacing == (1.0, 2.0, 3.0)
    assert np.allclose(volume.affine, affine)
    assert np.array_equal(volume.array, array)
    assert volume.path == tmp_path / "scan.nii.gz"


def test_real_brain_spacing_follows_array_axes(data_root):
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")

    image = read_image(folder / "imagesTr" / "brain1_0000.nii.gz")
    label = read_mask(folder / "labelsTr" / "brain1.nii.gz")

    assert image.shape == (256, 256, 25)
    assert image.spacing == pytest.approx(BRAIN_SPACING)
    assert image.array.dtype == np.int16
    assert label.shape == (256, 256, 25)
    assert label.spacing == pytest.approx(BRAIN_SPACING)
    assert int(np.count_nonzero(label.array)) == 4137


def test_four_d_nifti_with_single_channel_squeezed(tmp_path):
    array = np.ones((3, 4, 5, 1), dtype=np.float32)
    _save_nifti(tmp_path / "one.nii", array, (1.5, 1.5, 2.0, 1.0))

    volume = read_image(tmp_path / "one.nii")

    assert volume.shape == (3, 4, 5)
    assert volume.spacing == (1.5, 1.5, 2.0)


def test_four_d_nifti_with_channels_rejected(tmp_path):
    _save_nifti(tmp_path / "two.nii.gz", np.ones((3, 4, 5, 2), np.float32), (1, 1, 1, 1))

    with pytest.raises(DataError, match="two.nii.gz"):
        read_image(tmp_path / "two.nii.gz")


@pytest.mark.parametrize(
    ("mode", "expected_shape", "expected_dtype"),
    [("L", (64, 96), np.uint8), ("RGB", (64, 96, 3), np.uint8), ("RGBA", (64, 96, 4), np.uint8)],
)
def test_png_modes_shapes(tmp_path, mode, expected_shape, expected_dtype):
    Image.new(mode, (96, 64)).save(tmp_path / "photo.png")

    volume = read_image(tmp_path / "photo.png")

    assert volume.shape == expected_shape
    assert volume.array.dtype == expected_dtype
    assert volume.spacing == (1.0, 1.0)
    assert np.array_equal(volume.affine, np.eye(4))


def test_sixteen_bit_png_keeps_uint16(tmp_path):
    array = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")

    volume = read_image(tmp_path / "deep.png")

    assert volume.array.dtype == np.uint16
    assert np.array_equal(volume.array, array)


def test_mask_png_reads_back_64_by_96(tmp_path):
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[10:20, 30:50] = 2
    Image.fromarray(mask).save(tmp_path / "mask.png")

    volume = read_mask(tmp_path / "mask.png")

    assert volume.shape == (64, 96)
    assert np.array_equal(volume.array, mask)


def test_jpeg_mask_threshold_binarises(tmp_path):
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:25, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=70)

    raw = read_mask(tmp_path / "mask.jpg").array
    binary = read_mask(tmp_path / "mask.jpg", threshold=127).array

    assert len(np.unique(raw)) > 2
    assert set(np.unique(binary).tolist()) == {0, 1}
    assert np.array_equal(binary[5:25, 10:40], np.ones((20, 30), np.uint8))
    assert int(binary.sum()) == 20 * 30


def test_rgb_mask_reduced_to_one_channel(tmp_path):
    gray = np.zeros((8, 9), dtype=np.uint8)
    gray[2:5, 3:7] = 3
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb_mask.png")

    volume = read_mask(tmp_path / "rgb_mask.png")

    assert volume.shape == (8, 9)
    assert np.array_equal(volume.array, gray)


def test_rgb_mask_with_differing_channels_rejected(tmp_path):
    colours = np.zeros((8, 9, 3), dtype=np.uint8)
    colours[2:4, 2:4, 0] = 200
    Image.fromarray(colours).save(tmp_path / "colour_mask.png")

    with pytest.raises(DataError, match="4 pixels"):
        read_mask(tmp_path / "colour_mask.png")


def test_threshold_on_nifti_mask_rejected(tmp_path):
    _save_nifti(tmp_path / "label.nii.gz", np.zeros((3, 3, 3), np.uint8), (1, 1, 1))

    with pytest.raises(ValueError, match="threshold=127"):
        read_mask(tmp_path / "label.nii.gz", threshold=127)


def test_float_nifti_mask_cast_to_integer(tmp_path):
    labels = np.zeros((3, 3, 3), dtype=np.float32)
    labels[1, 1, 1] = 4.0
    _save_nifti(tmp_path / "label.nii.gz", labels, (1, 1, 1))

    volume = read_mask(tmp_path / "label.nii.gz")

    assert volume.array.dtype == np.uint8
    assert volume.array[1, 1, 1] == 4


def test_unknown_suffix_and_missing_file_name_path(tmp_path):
    (tmp_path / "scan.mha").write_bytes(b"not an image")

    with pytest.raises(DataError, match="scan.mha"):
        read_image(tmp_path / "scan.mha")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_multi_frame_tiff_rejected(tmp_path):
    frames = [Image.new("L", (6, 5), color=value) for value in (0, 100)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])

    with pytest.raises(DataError, match="2 frames"):
        read_image(tmp_path / "stack.tif")


def test_written_prediction_keeps_source_affine(data_root, tmp_path):
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    reference = read_image(folder / "imagesTr" / "brain2_0000.nii.gz")
    prediction = np.zeros(reference.spatial_shape, dtype=np.int64)
    prediction[100:110, 120:130, 10:12] = 1

    path = write_segmentation(tmp_path / "out" / "brain2.nii.gz", prediction, reference)
    written = nib.load(str(path))

    assert path == tmp_path / "out" / "brain2.nii.gz"
    assert np.allclose(written.affine, reference.affine)
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_zooms() == pytest.approx(BRAIN_SPACING)
    assert np.array_equal(np.asanyarray(written.dataobj), prediction)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(0, 255, np.uint8), (0, 256, np.int16), (-1, 3, np.int16), (0, 40000, np.int32)],
)
def test_written_dtype_smallest_that_fits(tmp_path, low, high, expected):
    reference = Volume(array=np.zeros((2, 3)), affine=np.eye(4), spacing=(1.0, 1.0))
    labels = np.array([[low, high, 0], [0, 0, 0]], dtype=np.int64)

    path = write_segmentation(tmp_path / "labels.nii", labels, reference)

    assert nib.load(str(path)).get_data_dtype() == expected


def test_write_rejects_non_integer_floats(tmp_path):
    reference = Volume(array=np.zeros((2, 2, 2)), affine=np.eye(4), spacing=(1, 1, 1))

    with pytest.raises(ValueError, match="non-integer"):
        write_segmentation(tmp_path / "p.nii.gz", np.full((2, 2, 2), 0.5), reference)
    assert not (tmp_path / "p.nii.gz").exists()


def test_write_shape_mismatch_names_both_shapes(tmp_path):
    reference = Volume(array=np.zeros((4, 5, 6)), affine=np.eye(4), spacing=(1, 1, 1))

    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 5, 6\)"):
        write_segmentation(tmp_path / "p.nii.gz", np.zeros((4, 5), np.uint8), reference)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    reference = Volume(array=np.zeros((4, 5, 6)), affine=np.eye(4), spacing=(1, 1, 1))

    def save_then_fail(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.nib, "save", save_then_fail)

    with pytest.raises(OSError, match="disk full"):
        write_segmentation(tmp_path / "p.nii.gz", np.zeros((4, 5, 6), np.uint8), reference)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    reference = Volume(array=np.zeros((2, 2, 2)), affine=np.eye(4), spacing=(1, 1, 1))
    target = write_segmentation(tmp_path / "p.nii.gz", np.ones((2, 2, 2), np.uint8), reference)
    before = target.read_bytes()

    def fail(image, filename):
        raise OSError("disk full")

    monkeypatch.setattr(io.nib, "save", fail)

    with pytest.raises(OSError):
        write_segmentation(target, np.zeros((2, 2, 2), np.uint8), reference)
    assert target.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["p.nii.gz"]


def test_volume_rejects_spacing_of_wrong_length():
    with pytest.raises(ValueError, match="one value per spatial axis"):
        Volume(array=np.zeros((4, 5, 6)), affine=np.eye(4), spacing=(1.0,))


def test_volume_spatial_shape_excludes_channels():
    volume = Volume(array=np.zeros((7, 8, 3)), affine=np.eye(4), spacing=(1.0, 1.0))

    assert volume.ndim == 3
    assert volume.spatial_ndim == 2
    assert volume.spatial_shape == (7, 8)
    assert volume.has_channel_axis
