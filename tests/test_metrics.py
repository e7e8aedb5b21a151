"""Tests for fmadapt.evaluate.metrics and fmadapt.evaluate.surface: hand-computed values,
empty-mask rules, input checks and agreement with MONAI."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from fmadapt.evaluate import (
    compute_case_metrics,
    confusion_counts,
    dice,
    hausdorff_distance_95,
    iou,
    normalized_surface_dice,
)
from fmadapt.evaluate.surface import mask_surface, surface_distances
from tests.conftest import require_dataset


def square(shape, rows, cols):
    """Boolean mask with ones on rows[0]..rows[1] and cols[0]..cols[1], both inclusive."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


REFERENCE_SQUARE = square((8, 8), (2, 5), (2, 5))
SQUARE_ONE_COLUMN_RIGHT = square((8, 8), (2, 5), (3, 6))
SQUARE_ONE_ROW_DOWN = square((8, 8), (3, 6), (2, 5))
ANISOTROPIC_SPACING = (2.0, 0.5)  # mm per row, mm per column


# --- overlap metrics ---------------------------------------------------------------------


def test_dice_iou_shifted_square():
    # Both squares have 16 pixels and overlap on columns 3-5 of rows 2-5: 12 pixels.
    # Dice = 2 * 12 / (16 + 16) = 0.75 and IoU = 12 / (16 + 16 - 12) = 0.6.
    assert dice(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE) == pytest.approx(0.75)
    assert iou(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE) == pytest.approx(0.6)


def test_confusion_counts_shifted_square():
    counts = confusion_counts(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE)
    # 12 shared pixels, 4 only predicted (column 6), 4 only in the reference (column 2),
    # and 64 - 12 - 4 - 4 = 44 background pixels.
    assert counts == {"tp": 12, "fp": 4, "fn": 4, "tn": 44, "n_pred": 16, "n_ref": 16}
    assert all(type(value) is int for value in counts.values())


def test_dice_accepts_integer_zero_one_masks():
    assert dice(SQUARE_ONE_COLUMN_RIGHT.astype(np.uint8), REFERENCE_SQUARE.astype(np.float32)) == pytest.approx(0.75)


# --- surfaces ----------------------------------------------------------------------------


def test_mask_surface_counts_array_border():
    # A full 3x3 mask: all eight pixels on the array border are surface, only the centre is not.
    surface = mask_surface(np.ones((3, 3), dtype=bool))
    expected = np.ones((3, 3), dtype=bool)
    expected[1, 1] = False
    np.testing.assert_array_equal(surface, expected)


def test_mask_surface_uses_face_connectivity():
    # A 4x4 square loses its 2x2 interior. With face connectivity the corners of the interior
    # keep all four face neighbours, so all 12 ring pixels and no others are surface.
    surface = mask_surface(REFERENCE_SQUARE)
    assert surface.sum() == 12
    assert not surface[3:5, 3:5].any()
    for row, col in [(2, 2), (5, 5), (2, 4), (4, 2), (3, 2), (3, 5)]:
        assert surface[row, col], (row, col)


# --- surface metrics, hand-computed with spacing (2.0, 0.5) ------------------------------
#
# Surfaces of the reference square (rows 2-5, cols 2-5): the 12-pixel ring
#   rows 2 and 5 at cols 2..5, and cols 2 and 5 at rows 3 and 4.
#
# Shift by one column (prediction cols 3-6). Offset = 1 column = 0.5 mm.
#   Prediction -> reference: rows 2/5 at cols 3,4,5 lie on the reference ring (6 x 0 mm);
#   rows 2/5 at col 6 reach col 5 (2 x 0.5 mm); col 3 rows 3/4 reach col 2 (2 x 0.5 mm);
#   col 6 rows 3/4 reach col 5 (2 x 0.5 mm). So 6 x 0 and 6 x 0.5 mm.
#   Reference -> prediction is the mirror image: 6 x 0 and 6 x 0.5 mm.
#   95th percentile of 12 sorted values: position 0.95 * 11 = 10.45, between two 0.5 values,
#   so HD95 = 0.5 mm. NSD(0.4 mm) = (6 + 6) / 24 = 0.5; NSD(0.5 mm) = 24 / 24 = 1.
#
# Shift by one row (prediction rows 3-6). Offset = 1 row = 2.0 mm.
#   Prediction -> reference: (3,2), (3,5), (4,2), (4,5), (5,2), (5,5) lie on the ring (6 x 0);
#   (3,3) and (3,4) are 1 column from (3,2) and (3,5) (2 x 0.5 mm, nearer than 2 mm up);
#   row 6 at cols 2..5 is 1 row below row 5 (4 x 2.0 mm).
#   Reference -> prediction: row 2 is 1 row above row 3 (4 x 2.0 mm); (5,3) and (5,4) are
#   1 column from (5,2) and (5,5) (2 x 0.5 mm); the other 6 ring pixels are shared (6 x 0).
#   Each direction: 6 x 0, 2 x 0.5, 4 x 2.0 mm, so HD95 (position 10.45) = 2.0 mm.
#   NSD(0.4 mm) = (6 + 6) / 24 = 0.5; NSD(1.9 mm) = (8 + 8) / 24 = 2/3; NSD(2.0 mm) = 1.


def test_surface_distances_shift_along_columns():
    forward, backward = surface_distances(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE, ANISOTROPIC_SPACING)
    np.testing.assert_allclose(np.sort(forward), [0.0] * 6 + [0.5] * 6)
    np.testing.assert_allclose(np.sort(backward), [0.0] * 6 + [0.5] * 6)


def test_surface_distances_shift_along_rows():
    forward, backward = surface_distances(SQUARE_ONE_ROW_DOWN, REFERENCE_SQUARE, ANISOTROPIC_SPACING)
    np.testing.assert_allclose(np.sort(forward), [0.0] * 6 + [0.5] * 2 + [2.0] * 4)
    np.testing.assert_allclose(np.sort(backward), [0.0] * 6 + [0.5] * 2 + [2.0] * 4)


def test_hd95_anisotropic_column_shift():
    value = hausdorff_distance_95(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE, ANISOTROPIC_SPACING)
    assert value == pytest.approx(0.5)


def test_hd95_anisotropic_row_shift():
    value = hausdorff_distance_95(SQUARE_ONE_ROW_DOWN, REFERENCE_SQUARE, ANISOTROPIC_SPACING)
    assert value == pytest.approx(2.0)


@pytest.mark.parametrize(("tolerance_mm", "expected"), [(0.4, 0.5), (0.5, 1.0), (0.6, 1.0)])
def test_nsd_anisotropic_column_shift(tolerance_mm, expected):
    value = normalized_surface_dice(SQUARE_ONE_COLUMN_RIGHT, REFERENCE_SQUARE, ANISOTROPIC_SPACING, tolerance_mm)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(("tolerance_mm", "expected"), [(0.4, 0.5), (1.9, 2 / 3), (2.0, 1.0), (2.1, 1.0)])
def test_nsd_anisotropic_row_shift(tolerance_mm, expected):
    value = normalized_surface_dice(SQUARE_ONE_ROW_DOWN, REFERENCE_SQUARE, ANISOTROPIC_SPACING, tolerance_mm)
    assert value == pytest.approx(expected)


def test_hd95_interpolates_outlier_in_1d():
    # Reference: voxels 0..9, surface {0, 9} (voxel 0 lies on the array border).
    # Prediction: the same plus an isolated voxel 29, surface {0, 9, 29}.
    # Prediction -> reference: [0, 0, 20] voxels; position 0.95 * 2 = 1.9 gives 0 + 0.9 * 20 = 18.
    # Reference -> prediction: [0, 0]. With 0.5 mm voxels HD95 = 9.0 mm.
    # NSD(5 mm): 2 of 3 prediction and 2 of 2 reference surface voxels are within, so 4 / 5.
    reference = np.zeros(30, dtype=bool)
    reference[:10] = True
    prediction = reference.copy()
    prediction[29] = True
    assert hausdorff_distance_95(prediction, reference, (1.0,)) == pytest.approx(18.0)
    assert hausdorff_distance_95(prediction, reference, (0.5,)) == pytest.approx(9.0)
    assert normalized_surface_dice(prediction, reference, (0.5,), 5.0) == pytest.approx(0.8)


def test_identical_masks_score_perfectly():
    assert hausdorff_distance_95(REFERENCE_SQUARE, REFERENCE_SQUARE, ANISOTROPIC_SPACING) == 0.0
    assert normalized_surface_dice(REFERENCE_SQUARE, REFERENCE_SQUARE, ANISOTROPIC_SPACING, 0.0) == 1.0
    assert dice(REFERENCE_SQUARE, REFERENCE_SQUARE) == 1.0
    assert iou(REFERENCE_SQUARE, REFERENCE_SQUARE) == 1.0


# --- empty masks -------------------------------------------------------------------------


def test_both_empty_gives_nan_everywhere():
    empty = np.zeros((6, 5, 4), dtype=bool)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(iou(empty, empty))
    assert math.isnan(normalized_surface_dice(empty, empty, (1.0, 1.0, 2.0), 1.0))
    assert math.isnan(hausdorff_distance_95(empty, empty, (1.0, 1.0, 2.0)))
    assert confusion_counts(empty, empty) == {"tp": 0, "fp": 0, "fn": 0, "tn": 120, "n_pred": 0, "n_ref": 0}


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_one_empty_gives_zero_and_inf(empty_side):
    empty = np.zeros((8, 8), dtype=bool)
    prediction, reference = (empty, REFERENCE_SQUARE) if empty_side == "prediction" else (REFERENCE_SQUARE, empty)
    assert dice(prediction, reference) == 0.0
    assert iou(prediction, reference) == 0.0
    assert normalized_surface_dice(prediction, reference, ANISOTROPIC_SPACING, 100.0) == 0.0
    assert hausdorff_distance_95(prediction, reference, ANISOTROPIC_SPACING) == math.inf


def test_surface_distances_rejects_empty_mask():
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(np.zeros((8, 8), dtype=bool), REFERENCE_SQUARE, (1.0, 1.0))


# --- label maps --------------------------------------------------------------------------


def label_map_pair():
    reference = np.zeros((8, 8), dtype=np.int16)
    reference[REFERENCE_SQUARE] = 1
    reference[7, 0] = 3  # class 3 only in the reference
    prediction = np.zeros((8, 8), dtype=np.int16)
    prediction[SQUARE_ONE_COLUMN_RIGHT] = 1
    return prediction, reference


def test_case_metrics_rows_per_class():
    prediction, reference = label_map_pair()
    class_ids = {"organ": 1, "absent": 2, "missed": 3}
    rows = compute_case_metrics(prediction, reference, ANISOTROPIC_SPACING, class_ids, tolerance_mm=0.4)

    assert [row["class_name"] for row in rows] == ["organ", "absent", "missed"]
    assert [row["class_id"] for row in rows] == [1, 2, 3]
    organ, absent, missed = rows
    assert organ["dice"] == pytest.approx(0.75)
    assert organ["iou"] == pytest.approx(0.6)
    assert organ["nsd"] == pytest.approx(0.5)
    assert organ["hd95"] == pytest.approx(0.5)
    assert (organ["tp"], organ["fp"], organ["fn"], organ["tn"]) == (12, 4, 4, 44)
    assert all(math.isnan(absent[name]) for name in ("dice", "iou", "nsd", "hd95"))
    assert (absent["n_pred"], absent["n_ref"], absent["tn"]) == (0, 0, 64)
    assert (missed["dice"], missed["iou"], missed["nsd"], missed["hd95"]) == (0.0, 0.0, 0.0, math.inf)
    assert (missed["fn"], missed["n_ref"]) == (1, 1)


def test_case_metrics_tolerance_per_class():
    prediction, reference = label_map_pair()
    class_ids = {"organ": 1, "missed": 3}
    rows = compute_case_metrics(
        prediction, reference, ANISOTROPIC_SPACING, class_ids, tolerance_mm={"organ": 0.5, "missed": 1.0}
    )
    assert rows[0]["nsd"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="missing \\['missed'\\]"):
        compute_case_metrics(prediction, reference, ANISOTROPIC_SPACING, class_ids, tolerance_mm={"organ": 0.5})


# --- input checks ------------------------------------------------------------------------


def test_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(8, 8\) and \(8, 7\)"):
        dice(REFERENCE_SQUARE, REFERENCE_SQUARE[:, :7])


def test_rejects_non_binary_mask():
    labels = REFERENCE_SQUARE.astype(np.int32) * 4
    with pytest.raises(ValueError, match=r"values \[4\]"):
        iou(labels, REFERENCE_SQUARE)


def test_rejects_non_numeric_mask():
    with pytest.raises(TypeError, match="prediction"):
        dice("mask", REFERENCE_SQUARE)
    with pytest.raises(TypeError, match="dtype"):
        dice(np.array([["a", "b"]]), np.array([[True, False]]))


@pytest.mark.parametrize(
    ("spacing", "error", "message"),
    [
        ((1.0,), ValueError, "one value per mask axis \\(2\\)"),
        ((1.0, 1.0, 1.0), ValueError, "got 3 values"),
        ((1.0, 0.0), ValueError, "finite and > 0"),
        ((1.0, -2.0), ValueError, "-2.0"),
        ((1.0, math.inf), ValueError, "inf"),
        (1.0, TypeError, "sequence of 2 numbers"),
        ("1,1", TypeError, "sequence of 2 numbers"),
        ((1.0, "2"), TypeError, "'2'"),
    ],
)
def test_rejects_invalid_spacing(spacing, error, message):
    with pytest.raises(error, match=message):
        hausdorff_distance_95(REFERENCE_SQUARE, REFERENCE_SQUARE, spacing)


@pytest.mark.parametrize(
    ("tolerance", "error"), [(-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1", TypeError)]
)
def test_rejects_invalid_tolerance(tolerance, error):
    with pytest.raises(error, match="tolerance_mm"):
        normalized_surface_dice(REFERENCE_SQUARE, REFERENCE_SQUARE, (1.0, 1.0), tolerance)


def test_case_metrics_rejects_bad_labels_and_classes():
    prediction, reference = label_map_pair()
    with pytest.raises(TypeError, match="integer label map"):
        compute_case_metrics(prediction.astype(float), reference, (1.0, 1.0), {"organ": 1}, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        compute_case_metrics(prediction[:4], reference, (1.0, 1.0), {"organ": 1}, 1.0)
    with pytest.raises(ValueError, match="label value 1 to both 'organ' and 'copy'"):
        compute_case_metrics(prediction, reference, (1.0, 1.0), {"organ": 1, "copy": 1}, 1.0)
    with pytest.raises(ValueError, match="empty"):
        compute_case_metrics(prediction, reference, (1.0, 1.0), {}, 1.0)
    with pytest.raises(TypeError, match="class_ids\\['organ'\\]"):
        compute_case_metrics(prediction, reference, (1.0, 1.0), {"organ": 1.5}, 1.0)
    with pytest.raises(TypeError, match="mapping"):
        compute_case_metrics(prediction, reference, (1.0, 1.0), [("organ", 1)], 1.0)


# --- agreement with MONAI ----------------------------------------------------------------


def random_blob(rng, shape, sigma, threshold):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return field > threshold * field.std()


def monai_scores(prediction, reference, spacing, tolerance_mm):
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

    y_pred = torch.from_numpy(prediction[None, None].astype(np.float32))
    y = torch.from_numpy(reference[None, None].astype(np.float32))
    return {
        "dice": compute_dice(y_pred, y, include_background=True).item(),
        "iou": compute_iou(y_pred, y, include_background=True).item(),
        "hd95": compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing).item(),
        "nsd": compute_surface_dice(
            y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing
        ).item(),
    }


def fmadapt_scores(prediction, reference, spacing, tolerance_mm):
    return {
        "dice": dice(prediction, reference),
        "iou": iou(prediction, reference),
        "hd95": hausdorff_distance_95(prediction, reference, spacing),
        "nsd": normalized_surface_dice(prediction, reference, spacing, tolerance_mm),
    }


def test_agrees_with_monai_on_random_3d_blobs():
    rng = np.random.default_rng(20240611)
    spacing = (0.8, 1.3, 2.5)
    tolerance_mm = 2.0
    compared = 0
    for _ in range(12):
        reference = random_blob(rng, (24, 20, 16), sigma=2.5, threshold=0.5)
        prediction = random_blob(rng, (24, 20, 16), sigma=2.0, threshold=0.3) | ndimage.binary_erosion(reference)
        assert reference.any(), "reference blob came out empty; change the seed"
        assert prediction.any(), "prediction blob came out empty; change the seed"

        expected = monai_scores(prediction, reference, spacing, tolerance_mm)
        actual = fmadapt_scores(prediction, reference, spacing, tolerance_mm)
        for name in ("dice", "iou", "hd95", "nsd"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-5), name
        compared += 1
    assert compared == 12


def test_agrees_with_monai_on_real_anisotropic_lesion(data_root):
    # Brain MR lesion label with 0.781 x 0.781 x 6.5 mm voxels against the same label moved
    # one voxel along each in-plane axis and with one slice removed.
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    image = nib.load(folder / "labelsTr" / "brain1.nii.gz")
    reference = np.asarray(image.dataobj) == 1
    spacing = tuple(float(size) for size in image.header.get_zooms()[:3])
    prediction = np.roll(reference, shift=(1, -1), axis=(0, 1))
    prediction[:, :, np.flatnonzero(reference.any(axis=(0, 1)))[0]] = False

    expected = monai_scores(prediction, reference, spacing, tolerance_mm=1.0)
    actual = fmadapt_scores(prediction, reference, spacing, tolerance_mm=1.0)
    for name in ("dice", "iou", "hd95", "nsd"):
        assert actual[name] == pytest.approx(expected[name], rel=1e-5), name


def test_case_metrics_on_real_ct_label_maps(data_root):
    # The fast TotalSegmentator model's labels of slices 82-111 against the full-resolution
    # model's labels of the same slices (3 mm voxels). Both models segment the same organs,
    # so each Dice is high but below 1, and every value agrees with MONAI.
    folder = require_dataset(data_root, "Dataset001_TotalSegCT")
    prediction = np.asarray(nib.load(folder / "labelsTr" / "ts_ct_full.nii.gz").dataobj)[:, :, 82:112]
    reference = np.asarray(nib.load(folder / "labelsTr" / "ts_ct_sm.nii.gz").dataobj)
    spacing = (3.0, 3.0, 3.0)
    class_ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}

    rows = compute_case_metrics(prediction, reference, spacing, class_ids, tolerance_mm=3.0)

    for row in rows:
        class_id = row["class_id"]
        expected = monai_scores(prediction == class_id, reference == class_id, spacing, tolerance_mm=3.0)
        assert 0.9 < row["dice"] < 1.0, row["class_name"]
        for name in ("dice", "iou", "hd95", "nsd"):
            assert row[name] == pytest.approx(expected[name], rel=1e-5), (row["class_name"], name)
        assert row["tp"] + row["fn"] == np.count_nonzero(reference == class_id)
