"""Click simulation and the iterative correction protocol on synthetic masks."""

import numpy as np
import pytest

from fmadapt.evaluate.clicks import Click, correction_click, error_regions, initial_clicks
from fmadapt.evaluate.interactive import InteractiveSettings, run_interactive


def square_reference():
    """40×40 image with the object at rows 5..19 and columns 5..19 (15×15 pixels)."""
    reference = np.zeros((40, 40), dtype=bool)
    reference[5:20, 5:20] = True
    return reference


def test_missed_region_gets_positive_click():
    reference = square_reference()
    prediction = reference.copy()
    # Missed block rows 10..14, columns 6..12: the pixels farthest from its border are
    # (12, 8), (12, 9) and (12, 10) at distance 3, and the one nearest their mean is (12, 9).
    prediction[10:15, 6:13] = False
    click = correction_click(prediction, reference)
    assert click == Click(x=9, y=12, label=1, region_size=35)


def test_false_positive_region_gets_negative_click():
    reference = square_reference()
    prediction = reference.copy()
    prediction[30:37, 28:35] = True  # 7×7 false positive centred at row 33, column 31
    click = correction_click(prediction, reference)
    assert click == Click(x=31, y=33, label=0, region_size=49)


def test_larger_error_region_wins():
    reference = square_reference()
    prediction = reference.copy()
    prediction[10:15, 6:13] = False  # 35 missed pixels
    prediction[30:33, 30:33] = True  # 9 false-positive pixels
    assert correction_click(prediction, reference).label == 1

    prediction[30:37, 28:35] = True  # now 49 false-positive pixels
    click = correction_click(prediction, reference)
    assert click.label == 0
    assert (click.x, click.y) == (31, 33)


def test_equal_error_regions_prefer_positive_click():
    reference = square_reference()
    prediction = reference.copy()
    prediction[5:8, 5:8] = False  # 9 missed pixels
    prediction[30:33, 30:33] = True  # 9 false-positive pixels
    click = correction_click(prediction, reference)
    assert click == Click(x=6, y=6, label=1, region_size=9)


def test_largest_of_several_missed_regions():
    reference = square_reference()
    prediction = reference.copy()
    prediction[5:7, 5:7] = False  # 4 pixels
    prediction[15:20, 15:20] = False  # 25 pixels, centre (17, 17)
    click = correction_click(prediction, reference)
    assert (click.x, click.y, click.region_size) == (17, 17, 25)


def test_perfect_prediction_has_no_click():
    reference = square_reference()
    assert correction_click(reference.copy(), reference) is None


def test_error_regions_split_misses_and_extras():
    reference = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    prediction = np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)
    missed, extra = error_regions(prediction, reference)
    assert missed.tolist() == [[False, True, False], [False, False, False]]
    assert extra.tolist() == [[False, False, True], [False, False, False]]


def test_error_regions_reject_shape_mismatch():
    with pytest.raises(ValueError, match="same H×W shape"):
        error_regions(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_initial_center_click():
    reference = square_reference()
    (click,) = initial_clicks(reference)
    assert (click.x, click.y, click.label) == (12, 12, 1)


def test_initial_positive_and_negative_clicks():
    reference = square_reference()
    clicks = initial_clicks(reference, num_positive=3, num_negative=2, mode="random", rng=np.random.default_rng(1))
    assert [click.label for click in clicks] == [1, 1, 1, 0, 0]
    for click in clicks:
        assert reference[click.y, click.x] == bool(click.label)


def test_initial_clicks_reject_empty_mask():
    with pytest.raises(ValueError, match="empty"):
        initial_clicks(np.zeros((8, 8), dtype=bool))


class ScriptedPredictor:
    """Return fixed masks in order and record every prompt it receives."""

    def __init__(self, masks):
        self.masks = list(masks)
        self.calls = []

    def __call__(self, box, points, labels, mask_input):
        self.calls.append({"box": box, "points": points, "labels": labels, "mask_input": mask_input})
        mask = self.masks[min(len(self.calls), len(self.masks)) - 1]
        logits = np.full((8, 8), float(len(self.calls)))
        return mask, logits


def test_perfect_prediction_stops_early():
    reference = square_reference()
    half = reference.copy()
    half[5:20, 12:20] = False  # keeps 15×7 = 105 of 225 pixels: Dice = 210 / 330
    predict = ScriptedPredictor([half, reference])
    result = run_interactive(predict, reference, InteractiveSettings(num_interactions=4))

    assert result.interactions_used == 2
    assert result.stopped_early
    assert len(predict.calls) == 2
    assert result.dice == pytest.approx([210 / 330, 1.0, 1.0, 1.0])
    assert result.auc == pytest.approx((210 / 330 + 3.0) / 4)
    assert np.array_equal(result.mask_after(4), reference)


def test_budget_is_respected():
    reference = square_reference()
    predict = ScriptedPredictor([np.zeros_like(reference)])
    result = run_interactive(predict, reference, InteractiveSettings(num_interactions=5))
    assert result.interactions_used == 5
    assert not result.stopped_early
    assert len(predict.calls) == 5
    assert len(result.clicks) == 4
    assert result.dice == [0.0] * 5


def test_box_start_feeds_logits_and_accumulates_clicks():
    reference = square_reference()
    predict = ScriptedPredictor([np.zeros_like(reference)])
    run_interactive(predict, reference, InteractiveSettings(num_interactions=3))
    first, second, third = predict.calls
    assert first["box"].tolist() == [5, 5, 19, 19]
    assert first["points"] is None
    assert first["mask_input"] is None
    assert second["points"].tolist() == [[12, 12]]
    assert second["labels"].tolist() == [1]
    assert np.all(second["mask_input"] == 1.0)
    assert np.all(third["mask_input"] == 2.0)
    assert len(third["points"]) == 2
    assert third["box"].tolist() == [5, 5, 19, 19]


def test_click_start_without_feedback():
    reference = square_reference()
    predict = ScriptedPredictor([np.zeros_like(reference)])
    settings = InteractiveSettings(num_interactions=2, start="click", feed_logits=False)
    result = run_interactive(predict, reference, settings)
    first, second = predict.calls
    assert first["box"] is None
    assert first["points"].tolist() == [[12, 12]]
    assert second["mask_input"] is None
    assert len(result.clicks) == 2


def test_settings_reject_zero_budget():
    with pytest.raises(ValueError, match="num_interactions"):
        InteractiveSettings(num_interactions=0)
