import warnings

import numpy as np
import pytest

from fmadapt.data.intensity import (
    CT_WINDOWS,
    IntensitySpec,
    apply_window,
    normalize_intensity,
    scale_percentiles,
)
from fmadapt.errors import FmadaptWarning


def test_window_values_by_hand():
    # W400/L40: lower bound -160 HU, so 0 HU -> 160/400*255 = 102.
    hu = np.array([-1000, 0, 40, 240, 1000], dtype=np.int16)
    out = apply_window(hu, 400, 40)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 102.0, 127.5, 255.0, 255.0], atol=1e-4)


def test_window_table_entries():
    assert CT_WINDOWS["soft_tissue"] == (400.0, 40.0)
    assert CT_WINDOWS["liver"] == (150.0, 30.0)
    assert CT_WINDOWS["lung"] == (1500.0, -600.0)
    assert CT_WINDOWS["bone"] == (1800.0, 400.0)
    assert CT_WINDOWS["brain"] == (80.0, 40.0)
    assert CT_WINDOWS["mediastinum"] == (350.0, 50.0)
    assert "abdomen" in CT_WINDOWS


def test_window_rejects_zero_width():
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros(3), 0, 40)


def test_percentiles_map_range():
    image = np.arange(1001, dtype=np.float64)
    out = scale_percentiles(image, 0.0, 100.0)
    assert out.dtype == np.float32
    assert out[0] == 0.0
    assert out[-1] == 255.0
    assert out[500] == pytest.approx(127.5, abs=1e-3)


def test_percentiles_clip_outliers():
    image = np.concatenate([np.linspace(0, 100, 999), [1e6]])
    out = scale_percentiles(image, 0.5, 99.5)
    assert out.max() == 255.0
    assert out[500] < 255.0


def test_constant_image_gives_zeros():
    out = scale_percentiles(np.full((4, 4), 7.0))
    assert np.array_equal(out, np.zeros((4, 4), dtype=np.float32))
    assert not np.isnan(out).any()


def test_auto_keeps_uint8():
    image = np.array([[0, 17], [200, 255]], dtype=np.uint8)
    out = normalize_intensity(image, IntensitySpec())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image.astype(np.float32))


def test_auto_scales_int16_by_percentiles():
    image = np.arange(-500, 1500, dtype=np.int16).reshape(40, 50)
    out = normalize_intensity(image, IntensitySpec())
    np.testing.assert_allclose(out, scale_percentiles(image))
    assert out.min() == 0.0
    assert out.max() == 255.0


def test_named_window_mode():
    hu = np.array([-160, 40, 240], dtype=np.int16)
    out = normalize_intensity(hu, IntensitySpec(mode="ct_window", window="soft_tissue"))
    np.testing.assert_allclose(out, [0.0, 127.5, 255.0])


def test_explicit_window_mode():
    hu = np.array([-45.0, 30.0, 105.0])
    out = normalize_intensity(hu, IntensitySpec(mode="ct_window", width=150, level=30))
    np.testing.assert_allclose(out, [0.0, 127.5, 255.0])


def test_minmax_mode():
    out = normalize_intensity(np.array([2.0, 4.0, 6.0]), IntensitySpec(mode="minmax"))
    np.testing.assert_allclose(out, [0.0, 127.5, 255.0])


def test_none_mode_warns_outside_byte_range():
    with pytest.warns(FmadaptWarning, match="0–255"):
        normalize_intensity(np.array([-1000.0, 500.0]), IntensitySpec(mode="none"))


def test_none_mode_silent_inside_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalize_intensity(np.array([0.0, 255.0]), IntensitySpec(mode="none"))


def test_unknown_window_lists_known():
    with pytest.raises(ValueError) as caught:
        IntensitySpec(mode="ct_window", window="livr")
    assert "'liver'" in str(caught.value)
    assert "soft_tissue" in str(caught.value)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="percentile"):
        IntensitySpec(mode="zscore")


def test_window_mode_needs_values():
    with pytest.raises(ValueError, match="width and level"):
        IntensitySpec(mode="ct_window", width=400)


def test_window_fields_need_window_mode():
    with pytest.raises(ValueError, match="ct_window"):
        IntensitySpec(mode="percentile", window="lung")


def test_bad_percentiles_rejected():
    with pytest.raises(ValueError, match="percentiles"):
        IntensitySpec(percentiles=(99.0, 1.0))


def test_shape_kept():
    image = np.random.default_rng(0).normal(size=(3, 5, 7))
    assert normalize_intensity(image, IntensitySpec(mode="minmax")).shape == (3, 5, 7)
