"""3D propagation from one key-slice box, with a thresholding stand-in as the slice predictor."""

import numpy as np
import pytest

from fmadapt.evaluate.propagation import choose_key_slice, enlarge_box, propagate

FIRST, LAST = 4, 16  # slices that contain the tube
RADII = {index: 3 + min(index - FIRST, 4) - max(index - 12, 0) for index in range(FIRST, LAST + 1)}


def tube_volume():
    """48×48×20 volume (rows, columns, slices): a tube drifting one column per slice, and a distractor.

    The tube's disk radius grows from 3 (slice 4) to 7 (slices 8..12) and shrinks to 3
    (slice 16). A bright 4×4 distractor in the top-left corner is present on every slice,
    so a predictor that looked outside the box would never stop.
    """
    rows, columns = np.mgrid[0:48, 0:48]
    image = np.full((48, 48, 20), 20.0)
    reference = np.zeros((48, 48, 20), dtype=bool)
    for index, radius in RADII.items():
        centre_column = 18 + (index - FIRST)
        reference[..., index] = (rows - 24) ** 2 + (columns - centre_column) ** 2 <= radius**2
    image[reference] = 200.0
    image[1:5, 1:5, :] = 200.0
    return image, reference


def threshold_in_box(image):
    """Stand-in slice predictor: pixels brighter than 100 inside the XYXY box."""

    def predict_slice(index, box):
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[y0 : y1 + 1, x0 : x1 + 1] = image[y0 : y1 + 1, x0 : x1 + 1, index] > 100
        return mask

    return predict_slice


def key_box(reference, index):
    rows, columns = np.nonzero(reference[..., index])
    return np.array([columns.min(), rows.min(), columns.max(), rows.max()], dtype=np.float32)


def test_tube_recovered_from_key_slice():
    image, reference = tube_volume()
    key = choose_key_slice(reference, axis=2)
    result = propagate(
        threshold_in_box(image), key_index=key, key_box=key_box(reference, key),
        slice_range=(0, 20), image_size=(48, 48), margin=2,
    )
    assert result.first_index == FIRST
    assert result.last_index == LAST
    assert result.prompts_used == 1
    assert np.array_equal(result.to_volume(reference.shape, axis=2), reference)


def test_propagation_stops_at_tube_end():
    image, reference = tube_volume()
    result = propagate(
        threshold_in_box(image), key_index=8, key_box=key_box(reference, 8),
        slice_range=(0, 20), image_size=(48, 48), margin=2,
    )
    # The empty predictions on slices 3 and 17 end propagation; 2 and 18 are never visited.
    assert sorted(result.boxes) == list(range(FIRST - 1, LAST + 2))
    assert sorted(result.masks) == list(range(FIRST, LAST + 1))


def test_propagated_box_follows_previous_prediction():
    image, reference = tube_volume()
    result = propagate(
        threshold_in_box(image), key_index=8, key_box=key_box(reference, 8),
        slice_range=(0, 20), image_size=(48, 48), margin=2,
    )
    # Slice 9's box is slice 8's predicted disk (centre column 22, radius 7) grown by 2.
    assert result.boxes[9].tolist() == [13, 15, 31, 33]


def test_box_without_margin_cuts_drifting_tube():
    image, reference = tube_volume()
    result = propagate(
        threshold_in_box(image), key_index=8, key_box=key_box(reference, 8),
        slice_range=(0, 20), image_size=(48, 48), margin=0,
    )
    recovered = result.to_volume(reference.shape, axis=2)
    assert not np.array_equal(recovered, reference)
    assert not (recovered & ~reference).any()


def test_slice_range_limits_propagation():
    image, reference = tube_volume()
    result = propagate(
        threshold_in_box(image), key_index=10, key_box=key_box(reference, 10),
        slice_range=(7, 14), image_size=(48, 48), margin=2,
    )
    assert (result.first_index, result.last_index) == (7, 13)
    assert min(result.boxes) == 7
    assert max(result.boxes) == 13


def test_empty_key_prediction_propagates_nothing():
    image, reference = tube_volume()
    empty_box = np.array([40, 40, 46, 46], dtype=np.float32)
    result = propagate(
        threshold_in_box(image), key_index=8, key_box=empty_box, slice_range=(0, 20), image_size=(48, 48)
    )
    assert result.first_index is None
    assert result.last_index is None
    assert result.masks == {}
    assert list(result.boxes) == [8]


def test_key_slice_rules():
    _, reference = tube_volume()
    assert choose_key_slice(reference, 2, "largest") == 8  # first of the radius-7 slices
    assert choose_key_slice(reference, 2, "middle") == 10  # (4 + 16) // 2
    assert choose_key_slice(reference, 2, "largest", slice_range=(13, 20)) == 13


def test_middle_key_slice_skips_gap():
    reference = np.zeros((4, 4, 9), dtype=bool)
    reference[1, 1, [0, 1, 7, 8]] = True  # middle slice 4 is empty; 1 and 7 are 3 away
    assert choose_key_slice(reference, 2, "middle") == 1


def test_key_slice_rejects_empty_range():
    _, reference = tube_volume()
    with pytest.raises(ValueError, match="no object pixel"):
        choose_key_slice(reference, 2, slice_range=(17, 20))


def test_enlarge_box_clips_to_image():
    grown = enlarge_box(np.array([1, 2, 40, 30]), 3, (32, 42))
    assert grown.tolist() == [0, 0, 41, 31]


def test_propagate_rejects_key_outside_range():
    image, reference = tube_volume()
    with pytest.raises(ValueError, match="outside slice_range"):
        propagate(threshold_in_box(image), key_index=15, key_box=key_box(reference, 15),
                  slice_range=(0, 10), image_size=(48, 48))
