"""Splits, augmentation, losses and label maps used by the training loop."""

import numpy as np
import pytest
import torch

from fmadapt.config import SplitConfig
from fmadapt.errors import DataError, RecipeError
from fmadapt.inference.label_maps import logits_to_label_map
from fmadapt.train.augment import AugmentSettings, augment_sample
from fmadapt.train.losses import dice_bce_loss, mask_iou, soft_dice_loss
from fmadapt.train.splits import SplitPlan, draw_training_slices, split_cases, split_slices


def test_split_cases_seeded_and_disjoint():
    ids = [f"case{i:02d}" for i in range(12)]
    first = split_cases(ids, SplitConfig(train=5, validation=2), seed=3)
    second = split_cases(ids, SplitConfig(train=5, validation=2), seed=3)
    other = split_cases(ids, SplitConfig(train=5, validation=2), seed=4)
    assert first.cases == second.cases
    assert first.cases != other.cases
    assert len(first.cases["train"]) == 5
    assert len(first.cases["validation"]) == 2
    assert len(first.cases["test"]) == 5
    union = set(first.cases["train"]) | set(first.cases["validation"]) | set(first.cases["test"])
    assert union == set(ids)


def test_split_cases_too_few_raises():
    with pytest.raises(RecipeError, match="3 cases"):
        split_cases(["a", "b", "c"], SplitConfig(train=2, validation=1), seed=0)


def test_split_slices_contiguous_blocks():
    plan = split_slices("ct", (60, 100), SplitConfig(mode="slices", slice_fractions=(0.5, 0.25, 0.25)), seed=0)
    assert plan.slice_ranges == {"train": (60, 80), "validation": (80, 90), "test": (90, 100)}
    assert plan.cases["test"] == ["ct"]


def test_split_plan_round_trip(tmp_path):
    plan = split_slices("ct", (0, 10), SplitConfig(mode="slices"), seed=1)
    plan.save(tmp_path / "split.json")
    loaded = SplitPlan.load(tmp_path / "split.json")
    assert loaded.slice_range("test") == plan.slice_range("test")
    assert loaded.cases == plan.cases


def test_draw_training_slices_seeded():
    candidates = list(range(10, 40))
    first = draw_training_slices(candidates, 5, seed=0, case_id="ct")
    assert first == draw_training_slices(candidates, 5, seed=0, case_id="ct")
    assert len(set(first)) == 5
    assert set(first) <= set(candidates)
    with pytest.raises(DataError, match="fewer than"):
        draw_training_slices(candidates[:3], 5, seed=0, case_id="ct")


def test_augment_applies_same_transform():
    rng = np.random.default_rng(0)
    label = np.zeros((40, 60), dtype=np.uint8)
    label[5:15, 10:30] = 1
    label[20:35, 40:55] = 2
    image = np.stack([label * 100, label * 50, np.arange(40 * 60).reshape(40, 60) % 7], axis=-1).astype(np.float32)
    for _ in range(50):
        augmented_image, augmented_label = augment_sample(image, label, AugmentSettings(), rng)
        assert augmented_image.shape[:2] == augmented_label.shape
        assert np.array_equal(augmented_image[..., 0], augmented_label.astype(np.float32) * 100)


def test_augment_without_crop_keeps_pixels():
    rng = np.random.default_rng(1)
    label = (np.arange(12).reshape(3, 4) % 3).astype(np.uint8)
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    settings = AugmentSettings(crop_scale=(1.0, 1.0))
    for _ in range(20):
        _, augmented_label = augment_sample(image, label, settings, rng)
        assert np.bincount(augmented_label.ravel(), minlength=3).tolist() == [4, 4, 4]


def test_soft_dice_hand_values():
    # sigmoid(+inf-like) = 1, sigmoid(-inf-like) = 0: prediction covers 2 of 4 pixels,
    # target covers 1 of them and 1 other: intersection 1, sizes 2 + 2.
    logits = torch.tensor([[[40.0, 40.0], [-40.0, -40.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    expected = 1.0 - (2.0 * 1 + 1.0) / (4 + 1.0)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert mask_iou(logits, target).item() == pytest.approx(1 / 3)
    assert dice_bce_loss(logits, target).item() > soft_dice_loss(logits, target).item()


def test_empty_target_empty_prediction_costs_nothing():
    logits = torch.full((1, 4, 4), -40.0)
    target = torch.zeros(1, 4, 4)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_iou(logits, target).item() == 1.0


def test_logits_to_label_map_picks_highest_positive():
    logits = torch.tensor(
        [
            [[1.0, -1.0], [2.0, -3.0]],
            [[0.5, 3.0], [-1.0, -2.0]],
        ]
    )
    labels = logits_to_label_map(logits)
    assert labels.tolist() == [[1, 2], [1, 0]]
    assert labels.dtype == np.uint8
