import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmadapt.data.layout import to_hwc
from fmadapt.data.transforms import (
    MEDSAM_PREPROCESS,
    SAM_PREPROCESS,
    ImageTransform,
    PreprocessSpec,
    resolve_preprocess,
)
from fmadapt.errors import FmadaptWarning

BOX = [100.0, 50.0, 200.0, 150.0]


def test_sam_model_size_rounds_half_up():
    transform = ImageTransform(SAM_PREPROCESS, 1024)
    assert transform.model_size((300, 600)) == (512, 1024)
    # 5 * 8 / 16 = 2.5 rounds up to 3, as ResizeLongestSide does.
    assert ImageTransform(SAM_PREPROCESS, 8).model_size((5, 16)) == (3, 8)


def test_sam_box_mapping_numpy():
    transform = ImageTransform(SAM_PREPROCESS, 1024)
    mapped = transform.boxes_to_model(np.array(BOX), (300, 600))
    assert mapped.dtype == np.float32
    np.testing.assert_allclose(np.round(mapped, 2), [170.67, 85.33, 341.33, 256.0])
    back = transform.boxes_from_model(mapped, (300, 600))
    np.testing.assert_allclose(back, BOX, atol=1e-3)


def test_sam_box_mapping_tensor():
    transform = ImageTransform(SAM_PREPROCESS, 1024)
    mapped = transform.boxes_to_model(torch.tensor([BOX, BOX], dtype=torch.float64), (300, 600))
    assert isinstance(mapped, torch.Tensor)
    assert mapped.dtype == torch.float32
    assert mapped.shape == (2, 4)
    torch.testing.assert_close(mapped[1], torch.tensor([170.6667, 85.3333, 341.3333, 256.0]))


def test_sam_points_round_trip():
    transform = ImageTransform(SAM_PREPROCESS, 256)
    points = np.array([[[10.0, 20.0], [99.0, 0.0]]])
    mapped = transform.points_to_model(points, (100, 50))
    # The 100-pixel side becomes 256, so both axes scale by 2.56.
    np.testing.assert_allclose(mapped, points * 2.56, rtol=1e-6)
    np.testing.assert_allclose(transform.points_from_model(mapped, (100, 50)), points, rtol=1e-6)


def test_input_not_modified():
    transform = ImageTransform(SAM_PREPROCESS, 1024)
    box = np.array(BOX)
    transform.boxes_to_model(box, (300, 600))
    np.testing.assert_array_equal(box, BOX)


def test_medsam_box_scales_each_axis():
    transform = ImageTransform(MEDSAM_PREPROCESS, 1024)
    mapped = transform.boxes_to_model(np.array(BOX), (300, 600))
    # MedSAM: x by S / W = 1024/600, y by S / H = 1024/300.
    np.testing.assert_allclose(mapped, [100 * 1024 / 600, 50 * 1024 / 300, 200 * 1024 / 600, 150 * 1024 / 300], rtol=1e-6)
    np.testing.assert_allclose(transform.boxes_from_model(mapped, (300, 600)), BOX, rtol=1e-6)


def test_wrong_coordinate_width_raises():
    transform = ImageTransform(SAM_PREPROCESS, 64)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        transform.boxes_to_model(np.zeros(3), (10, 10))
    with pytest.raises(ValueError, match="XY points"):
        transform.points_to_model(np.zeros((2, 3)), (10, 10))


def test_sam_image_normalised_and_padded():
    transform = ImageTransform(SAM_PREPROCESS, 64)
    image = np.full((16, 32, 3), 200, dtype=np.float32)
    tensor = transform.image_to_tensor(image)
    assert tensor.shape == (3, 64, 64)
    assert tensor.dtype == torch.float32
    expected = (200 - 123.675) / 58.395
    torch.testing.assert_close(tensor[0, :32, :64], torch.full((32, 64), expected))
    # Padding is added after normalisation, so the padded area is exactly zero.
    assert torch.count_nonzero(tensor[:, 32:, :]) == 0


def test_medsam_image_minmax_square():
    transform = ImageTransform(MEDSAM_PREPROCESS, 64)
    rng = np.random.default_rng(0)
    image = rng.uniform(10, 110, size=(20, 40, 3)).astype(np.float32)
    tensor = transform.image_to_tensor(image)
    assert tensor.shape == (3, 64, 64)
    assert tensor.min().item() == pytest.approx(0.0, abs=1e-6)
    assert tensor.max().item() == pytest.approx(1.0, abs=1e-6)


def test_medsam_constant_image_no_nan():
    tensor = ImageTransform(MEDSAM_PREPROCESS, 64).image_to_tensor(np.full((8, 8, 3), 9.0))
    assert not torch.isnan(tensor).any()


def test_layouts_give_same_encoder_input():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(30, 45), dtype=np.uint8)
    rgba = np.concatenate([np.repeat(gray[:, :, None], 3, axis=2), np.full((30, 45, 1), 255, np.uint8)], axis=2)
    transform = ImageTransform(SAM_PREPROCESS, 64)
    reference = transform.image_to_tensor(to_hwc(gray))
    for variant in (gray[:, :, None], gray[None, :, :], rgba):
        torch.testing.assert_close(transform.image_to_tensor(to_hwc(variant)), reference, rtol=0, atol=0)


def test_image_to_tensor_rejects_wrong_layout():
    transform = ImageTransform(SAM_PREPROCESS, 64)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        transform.image_to_tensor(np.zeros((3, 8, 8)))


def test_sam_masks_to_original_crops_padding():
    transform = ImageTransform(SAM_PREPROCESS, 64)
    low_res = torch.zeros(2, 1, 16, 16)
    low_res[..., :8, :] = 5.0  # the image occupies the top half (32 of 64 rows)
    low_res[..., 8:, :] = -5.0  # padding
    full = transform.masks_to_original(low_res, (20, 40))
    assert full.shape == (2, 1, 20, 40)
    # Only the image area is kept, so no padding logit reaches the bottom rows.
    assert (full[..., :15, :] > 0).all()


@pytest.mark.parametrize(
    "original_size",
    [(1070, 1348), (1348, 1070), (1024, 1024), (512, 512), (37, 1500)],
    ids=["landscape", "portrait", "no-resize", "upsample", "thin"],
)
def test_sam_masks_to_original_equals_three_steps(original_size):
    # segment-anything's postprocess_masks, step by step: to S×S, crop, to H×W.
    transform = ImageTransform(SAM_PREPROCESS, 1024)
    low_res = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 8
    height, width = original_size
    new_height, new_width = transform.model_size(original_size)
    expected = F.interpolate(low_res[None], (1024, 1024), mode="bilinear", align_corners=False)
    expected = expected[..., :new_height, :new_width]
    expected = F.interpolate(expected, (height, width), mode="bilinear", align_corners=False)[0]

    full = transform.masks_to_original(low_res, original_size)
    assert full.shape == (3, height, width)
    # Logits reach about ±30 here; float32 rounding of either path stays below 1e-3.
    torch.testing.assert_close(full, expected, atol=1e-3, rtol=1e-4)
    assert ((full > 0) == (expected > 0)).float().mean().item() > 0.99999


def test_medsam_masks_to_original_one_step():
    transform = ImageTransform(MEDSAM_PREPROCESS, 64)
    low_res = torch.randn(3, 16, 16)
    full = transform.masks_to_original(low_res, (30, 50))
    expected = torch.nn.functional.interpolate(low_res[None], (30, 50), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(full, expected)


def test_masks_to_low_res_sam_layout():
    transform = ImageTransform(SAM_PREPROCESS, 64)
    mask = torch.ones(20, 40, dtype=torch.bool)
    low = transform.masks_to_low_res(mask, 16)
    assert low.shape == (16, 16)
    assert low.dtype == torch.float32
    # 20×40 becomes 32×64 in the model frame, which is 8 of 16 low-res rows.
    assert (low[:8] > 0.99).all()
    assert (low[8:] == 0).all()


def test_masks_round_trip_keeps_region():
    transform = ImageTransform(SAM_PREPROCESS, 256)
    mask = torch.zeros(90, 120)
    mask[20:70, 30:100] = 1.0
    low = transform.masks_to_low_res(mask, 64)
    back = transform.masks_to_original(low * 20 - 10, (90, 120)) > 0
    agreement = (back == mask.bool()).float().mean().item()
    assert agreement > 0.98


def test_spec_validation():
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(resize="crop", value_scale=1.0, pixel_mean=None, pixel_std=None)
    with pytest.raises(ValueError, match="both"):
        PreprocessSpec(resize="square", value_scale=1.0, pixel_mean=(0, 0, 0), pixel_std=None)
    with pytest.raises(ValueError, match="3 values"):
        PreprocessSpec(resize="square", value_scale=1.0, pixel_mean=(0, 0), pixel_std=(1, 1))


def test_resolve_preprocess_rejects_mismatch():
    assert resolve_preprocess(SAM_PREPROCESS, None) is SAM_PREPROCESS
    with pytest.raises(ValueError, match="allow_preprocess_mismatch"):
        resolve_preprocess(SAM_PREPROCESS, MEDSAM_PREPROCESS, model_name="'sam_vit_b'")


def test_resolve_preprocess_warns_when_allowed():
    with pytest.warns(FmadaptWarning):
        chosen = resolve_preprocess(SAM_PREPROCESS, MEDSAM_PREPROCESS, allow_preprocess_mismatch=True)
    assert chosen is MEDSAM_PREPROCESS
