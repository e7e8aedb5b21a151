"""Lesion detection: components, matching, FROC, sweeps, and the protocol on real brain MR lesions."""

import math

import numpy as np
import pytest
from scipy import ndimage

from fmadapt.data.io import read_mask
from fmadapt.evaluate.detection import (
    DetectionCase,
    DetectionSettings,
    compute_froc,
    detect_cases,
    detect_lesions,
    label_components,
    sweep_min_sizes,
    sweep_thresholds,
)
from fmadapt.evaluate.report import format_sweep_table, write_froc_figure

from conftest import require_dataset


def square(mask, row, col, size=3, value=True):
    mask[row : row + size, col : col + size] = value


def froc_volumes():
    # Volume A: lesions L1, L2, L3. L1 is found with score 0.9, L2 with 0.7, L3 is missed;
    # false positives score 0.8 and 0.55. Volume B: lesion L4 found with 0.6, one false
    # positive with 0.95. Each found lesion is covered exactly by one 3×3 component.
    reference_a = np.zeros((40, 40), bool)
    probabilities_a = np.zeros((40, 40))
    for row, col in ((2, 2), (2, 20), (20, 2)):
        square(reference_a, row, col)
    square(probabilities_a, 2, 2, value=0.9)
    square(probabilities_a, 2, 20, value=0.7)
    square(probabilities_a, 30, 30, value=0.8)
    square(probabilities_a, 30, 10, value=0.55)

    reference_b = np.zeros((40, 40), bool)
    probabilities_b = np.zeros((40, 40))
    square(reference_b, 10, 10)
    square(probabilities_b, 10, 10, value=0.6)
    square(probabilities_b, 30, 30, value=0.95)
    return [DetectionCase("a", reference_a, probabilities_a), DetectionCase("b", reference_b, probabilities_b)]


def test_froc_hand_computed_sensitivities():
    froc = compute_froc(detect_cases(froc_volumes()))
    # 4 lesions, 2 volumes. Score thresholds from high to low:
    #   0.95: 0 lesions, 1 FP -> (0.5 FP/vol, 0)     0.9: L1      -> (0.5, 1/4)
    #   0.8:  L1, 2 FP        -> (1.0, 1/4)          0.7: +L2     -> (1.0, 2/4)
    #   0.6:  +L4             -> (1.0, 3/4)          0.55: 3 FP   -> (1.5, 3/4)
    # Best sensitivity with at most r FP/vol: r=1/8 and 1/4 only reach (0, 0) -> 0;
    # r=1/2 -> 1/4; r=1, 2, 4, 8 -> 3/4. Average = (0 + 0 + 1/4 + 4 * 3/4) / 7 = 3.25 / 7.
    assert froc.sensitivity_at_rates == (0.0, 0.0, 0.25, 0.75, 0.75, 0.75, 0.75)
    assert froc.average_sensitivity == pytest.approx(3.25 / 7)
    assert froc.n_lesions == 4
    assert froc.n_detected == 3
    assert froc.n_false_positives == 3
    assert froc.fp_per_volume.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.5]
    assert froc.sensitivity.tolist() == [0.0, 0.0, 0.25, 0.25, 0.5, 0.75, 0.75]
    # Found lesions are covered exactly (Dice 1), the missed one scores 0: mean 3/4.
    assert froc.mean_lesion_dice == pytest.approx(0.75)


def test_label_map_gives_single_operating_point():
    cases = [
        DetectionCase(case.case_id, case.reference, case.prediction > 0)
        for case in froc_volumes()
    ]
    froc = compute_froc(detect_cases(cases))
    # Every component scores 1: 3 of 4 lesions and 3 FP over 2 volumes (1.5 per volume).
    # Sensitivity is 3/4 from 2 FP/vol on and 0 below, so the average is 3 * 0.75 / 7.
    assert froc.sensitivity_at_rates == (0.0, 0.0, 0.0, 0.0, 0.75, 0.75, 0.75)
    assert froc.average_sensitivity == pytest.approx(2.25 / 7)
    assert froc.fp_per_volume.tolist() == [0.0, 1.5]


def test_overlap_of_ten_percent_is_a_hit():
    reference = np.zeros((30, 30), bool)
    reference[0:10, 0:10] = True  # 100 voxels
    nine = np.zeros_like(reference)
    nine[0:3, 0:3] = True  # covers 9% of the lesion
    ten = np.zeros_like(reference)
    ten[0:2, 0:5] = True  # covers 10%

    missed = detect_lesions(nine, reference)
    assert missed.n_detected == 0
    assert missed.n_false_positives == 1
    hit = detect_lesions(ten, reference)
    assert hit.n_detected == 1
    assert hit.n_false_positives == 0
    # Per-lesion Dice = 2 * 10 / (100 + 10).
    assert hit.lesion_dice[0] == pytest.approx(20 / 110)


def test_iou_criterion_needs_iou():
    reference = np.zeros((30, 30), bool)
    reference[0:10, 0:10] = True
    prediction = np.zeros_like(reference)
    prediction[0:2, 0:10] = True  # overlap 20 of 100: IoU 0.2
    assert detect_lesions(prediction, reference, settings=DetectionSettings(criterion="iou", hit_threshold=0.2)).n_detected == 1
    assert detect_lesions(prediction, reference, settings=DetectionSettings(criterion="iou", hit_threshold=0.25)).n_detected == 0


def test_component_spanning_two_lesions_counts_once():
    reference = np.zeros((10, 20), bool)
    reference[0:4, 0:4] = True  # lesion 0: 16 voxels
    reference[0:4, 8:10] = True  # lesion 1: 8 voxels
    prediction = np.zeros_like(reference)
    prediction[0:4, 2:10] = True  # covers half of lesion 0 and all of lesion 1
    detection = detect_lesions(prediction, reference)
    assert detection.component_lesion.tolist() == [1]
    assert detection.n_detected == 1
    assert detection.n_false_positives == 0
    # Lesion 1 Dice = 2 * 8 / (8 + 32); lesion 0 is missed.
    assert detection.lesion_dice.tolist() == pytest.approx([0.0, 16 / 40])


def test_connectivity_face_and_full():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours
    assert label_components(mask, "face")[1] == 2
    assert label_components(mask, "full")[1] == 1
    with pytest.raises(ValueError, match="connectivity"):
        label_components(mask, "corner")


def test_min_size_in_voxels_and_mm3():
    reference = np.zeros((20, 20), bool)
    prediction = np.zeros((20, 20), bool)
    square(prediction, 0, 0, size=2)  # 4 voxels
    square(prediction, 10, 10, size=3)  # 9 voxels
    assert detect_lesions(prediction, reference, settings=DetectionSettings(min_size=5)).removed_components == 1
    # With 2 × 1.5 mm pixels a voxel is 3 mm²: the components are 12 and 27 "mm3".
    large_only = detect_lesions(prediction, reference, (2.0, 1.5), DetectionSettings(min_size=27, size_unit="mm3"))
    assert large_only.component_sizes.tolist() == [9]


def test_threshold_sweep_marks_chosen_setting():
    rows = sweep_thresholds(froc_volumes(), [0.65, 0.85], DetectionSettings(threshold=0.5))
    assert [row.value for row in rows] == [0.5, 0.65, 0.85]
    assert [row.chosen for row in rows] == [True, False, False]
    # Cut at 0.65: components L1 (0.9), L2 (0.7), FP 0.8 in A and FP 0.95 in B remain:
    # 2 of 4 lesions, 2 FP over 2 volumes.
    assert rows[1].sensitivity == 0.5
    assert rows[1].fp_per_volume == 1.0
    # Cut at 0.85: L1 and FP 0.95 remain.
    assert rows[2].sensitivity == 0.25
    assert rows[2].fp_per_volume == 0.5
    table = format_sweep_table(rows)
    assert "| threshold = 0.5 (chosen) | 0.750 | 1.500 |" in table


def test_threshold_sweep_rejects_masks():
    cases = [DetectionCase("a", np.zeros((4, 4), bool), np.zeros((4, 4), bool))]
    with pytest.raises(ValueError, match="probability maps"):
        sweep_thresholds(cases, [0.3])


def test_invalid_inputs_raise():
    reference = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detect_lesions(np.full((4, 4), 1.5), reference)
    with pytest.raises(ValueError, match="same shape"):
        detect_lesions(np.zeros((4, 5), bool), reference)
    with pytest.raises(ValueError, match="hit_threshold"):
        DetectionSettings(hit_threshold=0.0)
    with pytest.raises(ValueError, match="size_unit"):
        DetectionSettings(size_unit="ml")
    with pytest.raises(TypeError, match="min_size"):
        DetectionSettings(min_size="5")


def test_no_lesion_gives_nan_sensitivity():
    empty = np.zeros((6, 6), bool)
    prediction = empty.copy()
    prediction[0, 0] = True
    froc = compute_froc([detect_lesions(prediction, empty)])
    assert froc.n_lesions == 0
    assert froc.n_false_positives == 1
    assert math.isnan(froc.average_sensitivity)


def read_brain_lesions(data_root):
    folder = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR") / "labelsTr"
    return {case: read_mask(folder / f"{case}.nii.gz") for case in ("brain1", "brain2")}


def test_brain_lesion_protocol_writes_froc(data_root, tmp_path):
    volumes = read_brain_lesions(data_root)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)

    cases, eroded_sizes = [], {}
    for case_id, volume in volumes.items():
        reference = volume.array > 0
        # Shifting by 100 voxels along x moves every lesion off itself (they span x 162-225).
        shifted = np.roll(reference, -100, axis=0)
        assert not (shifted & reference).any()
        probabilities = 0.6 * shifted
        if case_id == "brain1":
            eroded = ndimage.binary_erosion(reference, in_plane)
            probabilities = np.maximum(probabilities, 0.9 * eroded)
            lesions, _ = ndimage.label(reference)
            eroded_sizes = {index: int((eroded & (lesions == index)).sum()) for index in (1, 2)}
        cases.append(DetectionCase(case_id, reference, probabilities, volume.spacing))

    detections = detect_cases(cases)
    # brain1 has two lesions (3524 and 613 voxels), brain2 one (453 voxels).
    assert [item.n_lesions for item in detections] == [2, 1]
    froc = compute_froc(detections)
    # brain1's eroded lesions (score 0.9) keep 83% and 75% of their voxels, so both are hit.
    # The shifted copies are 3 false positives of score 0.6 over 2 volumes (1.5 per volume),
    # and brain2's lesion is missed: sensitivity 2/3 at 0 FP already, so at every rate.
    assert froc.sensitivity_at_rates == pytest.approx((2 / 3,) * 7)
    assert froc.fp_per_volume.tolist() == [0.0, 0.0, 1.5]
    # Eroded lesion inside its lesion: Dice = 2|E| / (|L| + |E|).
    expected_dice = [2 * eroded_sizes[i] / (size + eroded_sizes[i]) for i, size in ((1, 3524), (2, 613))]
    assert detections[0].lesion_dice.tolist() == pytest.approx(expected_dice)
    assert detections[1].lesion_dice.tolist() == [0.0]

    figure = write_froc_figure(tmp_path / "froc.png", {"lesion": froc})
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_brain_lesion_min_size_sweep(data_root):
    volumes = read_brain_lesions(data_root)
    cases = []
    for case_id, volume in volumes.items():
        reference = volume.array > 0
        prediction = reference | np.roll(reference, -100, axis=0)
        cases.append(DetectionCase(case_id, reference, prediction, volume.spacing))
    rows = sweep_min_sizes(cases, [3000.0], DetectionSettings(size_unit="mm3"))
    assert [row.value for row in rows] == [0.0, 3000.0]
    # No removal: all 3 lesions found, 3 shifted copies are false positives (1.5 per volume).
    assert rows[0].sensitivity == 1.0
    assert rows[0].fp_per_volume == 1.5
    # A voxel is 0.78125² × 6.5 = 3.967 mm³, so 3000 mm³ is 756.2 voxels: only brain1's
    # 3524-voxel lesion and its shifted copy stay. 1 of 3 lesions, 1 FP over 2 volumes.
    assert rows[1].sensitivity == pytest.approx(1 / 3)
    assert rows[1].fp_per_volume == 0.5
