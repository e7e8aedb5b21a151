"""Tests for fmadapt.data.slices: slice extraction, foreground search, remapping, splits."""

import numpy as np
import pytest

from fmadapt.data.io import Volume, read_image, read_mask
from fmadapt.data.slices import (
    SliceRef,
    SliceSplit,
    extract_slice,
    foreground_slices,
    remap_labels,
    split_slices,
)
from tests.conftest import require_dataset


def _volume(shape=(4, 5, 6), spacing=(1.0, 2.0, 3.0)) -> Volume:
    array = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    return Volume(array=array, affine=np.eye(4), spacing=spacing)


@pytest.mark.parametrize(
    ("axis", "index", "expected_shape", "expected_spacing"),
    [(0, 3, (5, 6), (2.0, 3.0)), (1, 0, (4, 6), (1.0, 3.0)), (2, 5, (4, 5), (1.0, 2.0))],
)
def test_extract_slice_shape_and_spacing(axis, index, expected_shape, expected_spacing):
    volume = _volume()

    plane, spacing = extract_slice(volume, axis, index)

    assert plane.shape == expected_shape
    assert spacing == expected_spacing
    assert np.array_equal(plane, np.take(volume.array, index, axis=axis))


def test_extract_slice_returns_copy():
    volume = _volume()

    plane, _ = extract_slice(volume, 2, 1)
    plane[:] = -1

    assert volume.array.min() == 0


def test_extract_slice_keeps_channels_last():
    array = np.zeros((4, 5, 6, 2), dtype=np.float32)
    array[:, :, 3, 1] = 7.0
    volume = Volume(array=array, affine=np.eye(4), spacing=(1.0, 1.0, 2.5))

    plane, spacing = extract_slice(volume, 2, 3)

    assert plane.shape == (4, 5, 2)
    assert spacing == (1.0, 1.0)
    assert np.all(plane[..., 1] == 7.0)
    assert np.all(plane[..., 0] == 0.0)


def test_extract_slice_of_2d_image():
    image = Volume(array=np.ones((7, 8, 3), np.uint8), affine=np.eye(4), spacing=(1.0, 1.0))

    plane, spacing = extract_slice(image, None, 0)

    assert plane.shape == (7, 8, 3)
    assert spacing == (1.0, 1.0)
    with pytest.raises(ValueError, match="axis=None and index=0"):
        extract_slice(image, 0, 0)
    with pytest.raises(ValueError, match="axis=None and index=0"):
        extract_slice(image, None, 1)


def test_extract_slice_rejects_out_of_range():
    volume = _volume()

    with pytest.raises(ValueError, match="outside 0..5"):
        extract_slice(volume, 2, 6)
    with pytest.raises(ValueError, match="outside 0..5"):
        extract_slice(volume, 2, -1)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        extract_slice(volume, 3, 0)
    with pytest.raises(TypeError, match="axis"):
        extract_slice(volume, None, 0)


def test_real_brain_axial_slice(data_root):
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    image = read_image(folder / "imagesTr" / "brain1_0000.nii.gz")

    plane, spacing = extract_slice(image, 2, 12)

    assert plane.shape == (256, 256)
    assert spacing == pytest.approx((0.78125, 0.78125))
    _, through_plane = extract_slice(image, 0, 128)
    assert through_plane == pytest.approx((0.78125, 6.5))


def test_foreground_slices_by_hand():
    label = np.zeros((3, 4, 5), dtype=np.uint8)
    label[0, 0, 1] = 2
    label[1, 1, 3] = 2
    label[1, 2, 3] = 2
    label[2, 3, 4] = 7

    assert foreground_slices(label, 2, [2]) == [1, 3]
    assert foreground_slices(label, 2, [2, 7]) == [1, 3, 4]
    assert foreground_slices(label, 0, [2]) == [0, 1]
    assert foreground_slices(label, 2, [2], min_pixels=2) == [3]
    assert foreground_slices(label, 1, [9]) == []


def test_foreground_slices_real_brain_lesion(data_root):
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    label = read_mask(folder / "labelsTr" / "brain1.nii.gz").array

    indices = foreground_slices(label, 2, [1])
    expected = [index for index in range(label.shape[2]) if np.any(label[:, :, index] == 1)]

    assert indices == expected
    assert len(indices) > 0


def test_foreground_slices_rejects_bad_input():
    label = np.zeros((3, 4, 5), dtype=np.uint8)

    with pytest.raises(ValueError, match="3-D"):
        foreground_slices(label[0], 0, [1])
    with pytest.raises(ValueError, match="0 is background"):
        foreground_slices(label, 0, [0])
    with pytest.raises(TypeError, match="integer"):
        foreground_slices(label.astype(np.float32), 0, [1])
    with pytest.raises(ValueError, match="min_pixels"):
        foreground_slices(label, 0, [1], min_pixels=0)


def test_remap_labels_to_consecutive_classes():
    label = np.array([[0, 5, 3], [9, 5, 1]], dtype=np.int32)

    remapped = remap_labels(label, [5, 9])

    assert remapped.dtype == np.uint8
    assert np.array_equal(remapped, np.array([[0, 1, 0], [2, 1, 0]]))


def test_remap_labels_many_classes_use_int16():
    label = np.arange(300, dtype=np.int32).reshape(15, 20)

    remapped = remap_labels(label, list(range(1, 300)))

    assert remapped.dtype == np.int16
    assert remapped[14, 19] == 299
    assert remapped[0, 0] == 0


def test_split_slices_fractions_contiguous():
    split = split_slices(range(10, 20), fractions=(0.6, 0.2, 0.2))

    assert split == SliceSplit(train=(10, 11, 12, 13, 14, 15), validation=(16, 17), test=(18, 19))


def test_split_slices_gap_between_blocks():
    # 10 slices, two gaps of 1 leave 8: shares 4.8, 1.6, 1.6 round to 5, 2, 1.
    split = split_slices(range(10), fractions=(0.6, 0.2, 0.2), gap=1)

    assert split.train == (0, 1, 2, 3, 4)
    assert split.validation == (6, 7)
    assert split.test == (9,)


def test_split_slices_counts_leave_rest_unused():
    split = split_slices([7, 3, 5, 9, 11, 13], counts=(2, 1, 2))

    assert split == SliceSplit(train=(3, 5), validation=(7,), test=(9, 11))


def test_split_slices_seed_repeats_and_permutes_blocks():
    first = split_slices(range(12), counts=(6, 3, 3), seed=4)
    again = split_slices(range(12), counts=(6, 3, 3), seed=4)

    assert first == again
    assert sorted(first.train + first.validation + first.test) == list(range(12))
    for block in (first.train, first.validation, first.test):
        assert list(block) == list(range(block[0], block[0] + len(block)))
    orders = set()
    for seed in range(20):
        split = split_slices(range(12), counts=(6, 3, 3), seed=seed)
        orders.add((split.train[0], split.validation[0], split.test[0]))
    assert len(orders) > 1


def test_split_slices_small_positive_share_gets_one_slice():
    split = split_slices(range(5), fractions=(0.9, 0.05, 0.05))

    assert len(split.validation) == 1
    assert len(split.test) == 1
    assert len(split.train) == 3


def test_split_slices_rejects_bad_requests():
    with pytest.raises(ValueError, match="exactly one"):
        split_slices(range(5))
    with pytest.raises(ValueError, match="exactly one"):
        split_slices(range(5), fractions=(1, 0, 0), counts=(5, 0, 0))
    with pytest.raises(ValueError, match="summing to 1"):
        split_slices(range(5), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="need 7 slices"):
        split_slices(range(5), counts=(3, 1, 1), gap=1)
    with pytest.raises(ValueError, match="distinct"):
        split_slices([1, 1, 2], counts=(1, 1, 0))


def test_slice_ref_is_hashable():
    refs = {SliceRef("case", 2, 4), SliceRef("case", 2, 4), SliceRef("photo", None, 0)}

    assert len(refs) == 2
