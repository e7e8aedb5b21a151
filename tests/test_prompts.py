"""Tests for fmadapt.data.prompts: boxes and points derived from masks."""

import numpy as np
import pytest

from fmadapt.data.io import read_mask
from fmadapt.data.prompts import (
    box_from_mask,
    boxes_from_label_map,
    center_pixel,
    jitter_box,
    points_from_mask,
)
from tests.conftest import require_dataset


def test_empty_mask_gives_no_prompt():
    empty = np.zeros((8, 9), dtype=bool)

    assert box_from_mask(empty) is None
    assert points_from_mask(empty, rng=np.random.default_rng(0)) is None
    assert points_from_mask(empty, mode="center") is None


def test_single_pixel_mask_gives_valid_box():
    mask = np.zeros((8, 9), dtype=bool)
    mask[3, 6] = True

    box = box_from_mask(mask)

    assert box.dtype == np.float32
    assert box.tolist() == [6.0, 3.0, 6.0, 3.0]
    assert box[0] <= box[2]
    assert box[1] <= box[3]


def test_box_uses_extreme_pixel_centres():
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:5, 1:4] = 1
    mask[7, 9] = 1

    assert box_from_mask(mask).tolist() == [1.0, 2.0, 9.0, 7.0]


def test_jitter_near_corners_stays_valid():
    height, width = 50, 70
    rng = np.random.default_rng(123)
    corner_boxes = [
        np.array([0, 0, 2, 3], dtype=np.float32),
        np.array([66, 0, 69, 1], dtype=np.float32),
        np.array([0, 47, 1, 49], dtype=np.float32),
        np.array([68, 48, 69, 49], dtype=np.float32),
    ]

    for box in corner_boxes:
        for _ in range(250):
            jittered = jitter_box(box, (height, width), max_shift=20, rng=rng)
            assert jittered[0] >= 0
            assert jittered[1] >= 0
            assert jittered[2] <= width - 1
            assert jittered[3] <= height - 1
            assert jittered[0] <= jittered[2]
            assert jittered[1] <= jittered[3]


def test_jitter_outward_only_grows_box():
    box = np.array([20, 30, 40, 45], dtype=np.float32)
    rng = np.random.default_rng(5)

    for _ in range(200):
        grown = jitter_box(box, (100, 100), max_shift=20, rng=rng, direction="outward")
        assert grown[0] <= 20
        assert grown[0] >= 0
        assert grown[1] <= 30
        assert grown[1] >= 10
        assert grown[2] >= 40
        assert grown[2] <= 60
        assert grown[3] >= 45
        assert grown[3] <= 65


def test_jitter_zero_shift_keeps_box():
    box = np.array([3, 4, 10, 12], dtype=np.float32)

    jittered = jitter_box(box, (20, 20), max_shift=0, rng=np.random.default_rng(0))

    assert jittered.tolist() == box.tolist()


def test_jitter_rejects_bad_arguments():
    box = np.array([3, 4, 10, 12], dtype=np.float32)
    rng = np.random.default_rng(0)

    with pytest.raises(ValueError, match="x0 <= x1"):
        jitter_box(np.array([10, 4, 3, 12]), (20, 20), rng=rng)
    with pytest.raises(ValueError, match="max_shift"):
        jitter_box(box, (20, 20), max_shift=-1, rng=rng)
    with pytest.raises(TypeError, match="default_rng"):
        jitter_box(box, (20, 20), rng=None)
    with pytest.raises(ValueError, match="direction"):
        jitter_box(box, (20, 20), rng=rng, direction="inward")


def test_centre_point_of_5_by_9_rectangle():
    mask = np.zeros((11, 15), dtype=bool)
    mask[3:8, 2:11] = True  # 5 rows by 9 columns, centre pixel at row 5, column 6

    points, labels = points_from_mask(mask, mode="center")

    assert points.tolist() == [[6.0, 5.0]]
    assert labels.tolist() == [1]
    assert center_pixel(mask) == (5, 6)


def test_centre_point_of_mask_filling_image():
    mask = np.ones((5, 9), dtype=bool)

    assert center_pixel(mask) == (2, 4)


def test_random_points_inside_and_outside_mask():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 8:20] = True

    points, labels = points_from_mask(
        mask, num_positive=4, num_negative=3, rng=np.random.default_rng(1)
    )

    assert points.shape == (7, 2)
    assert points.dtype == np.float32
    assert labels.tolist() == [1, 1, 1, 1, 0, 0, 0]
    for (x, y), label in zip(points.astype(int), labels, strict=True):
        assert mask[y, x] == bool(label)
    assert len({tuple(point) for point in points[:4].tolist()}) == 4


def test_seeded_rng_repeats_exactly():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 8:20] = True
    box = np.array([8, 5, 19, 9], dtype=np.float32)

    first = points_from_mask(mask, num_positive=3, num_negative=2, rng=np.random.default_rng(7))
    second = points_from_mask(mask, num_positive=3, num_negative=2, rng=np.random.default_rng(7))
    box_a = jitter_box(box, (20, 30), rng=np.random.default_rng(7))
    box_b = jitter_box(box, (20, 30), rng=np.random.default_rng(7))

    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert np.array_equal(box_a, box_b)


def test_points_need_rng_for_random_picks():
    mask = np.ones((4, 4), dtype=bool)

    with pytest.raises(TypeError, match="rng"):
        points_from_mask(mask)
    with pytest.raises(ValueError, match="num_negative"):
        points_from_mask(mask, num_negative=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mode"):
        points_from_mask(mask, mode="middle", rng=np.random.default_rng(0))


def test_points_reject_probability_masks():
    with pytest.raises(TypeError, match="mask > 0.5"):
        box_from_mask(np.full((4, 4), 0.7))


def test_boxes_from_label_map_per_class():
    label = np.zeros((10, 10), dtype=np.uint8)
    label[1:3, 2:5] = 1
    label[6, 7] = 4

    boxes = boxes_from_label_map(label, [1, 4, 9])

    assert boxes[1].tolist() == [2.0, 1.0, 4.0, 2.0]
    assert boxes[4].tolist() == [7.0, 6.0, 7.0, 6.0]
    assert boxes[9] is None


def test_box_of_real_polyp_mask_bounds_foreground(data_root):
    folder = require_dataset(data_root, "2D_KvasirSEG_polyp")
    mask = read_mask(folder / "masks" / "cju0qoxqj9q6s0835b43399p4.jpg", threshold=127).array

    box = box_from_mask(mask.astype(bool))
    rows, columns = np.nonzero(mask)

    assert box.tolist() == [columns.min(), rows.min(), columns.max(), rows.max()]
