import numpy as np
import pytest

from fmadapt.data.layout import to_hwc


def _gray(height=5, width=7, dtype=np.int16):
    return np.arange(height * width, dtype=dtype).reshape(height, width)


def test_two_d_repeats_channel():
    gray = _gray()
    out = to_hwc(gray)
    assert out.shape == (5, 7, 3)
    assert out.dtype == np.int16
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


@pytest.mark.parametrize("make", [lambda g: g[:, :, None], lambda g: g[None, :, :]])
def test_single_channel_layouts(make):
    gray = _gray()
    out = to_hwc(make(gray))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, to_hwc(gray))


def test_rgb_unchanged():
    rgb = np.random.default_rng(0).integers(0, 255, size=(4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_hwc(rgb), rgb)


def test_rgba_drops_alpha():
    rgba = np.random.default_rng(1).integers(0, 255, size=(4, 6, 4), dtype=np.uint8)
    out = to_hwc(rgba)
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_channels_last_wins_when_ambiguous():
    # 1×5×3 reads as a one-pixel-high RGB image, not as one channel of 5×3.
    image = np.arange(15).reshape(1, 5, 3)
    out = to_hwc(image)
    assert out.shape == (1, 5, 3)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize(
    "shape",
    [(3, 8, 9), (2, 8, 9), (8, 9, 2), (1, 8, 9, 3), (2, 3, 8, 9), (10,), (8, 9, 5)],
)
def test_wrong_layout_names_shape(shape):
    with pytest.raises(ValueError) as caught:
        to_hwc(np.zeros(shape, dtype=np.float32))
    assert str(shape) in str(caught.value)
    assert "H×W×3" in str(caught.value)


def test_empty_image_raises():
    with pytest.raises(ValueError, match="empty"):
        to_hwc(np.zeros((0, 4)))


def test_non_array_raises_type_error():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        to_hwc([[1, 2], [3, 4]])
