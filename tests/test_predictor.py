import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from tiny_checkpoints import build_reference_sam, save_tiny_checkpoint

from fmadapt.data.intensity import IntensitySpec
from fmadapt.inference import Predictor, select_best_mask
from fmadapt.models import Segmenter

HEIGHT, WIDTH = 90, 140


def _gradient_image(height, width):
    rows, cols = np.mgrid[0:height, 0:width]
    red = cols * 255 / width
    green = rows * 255 / height
    blue = ((rows + cols) % 64) * 4
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def model(checkpoint):
    return Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint).eval()


@pytest.fixture(scope="module")
def predictor(model):
    predictor = Predictor(model)
    predictor.set_image(_gradient_image(HEIGHT, WIDTH))
    return predictor


def test_state_before_and_after_set_image(model):
    predictor = Predictor(model)
    assert not predictor.is_image_set
    assert predictor.original_size is None
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 10, 10]))
    predictor.set_image(_gradient_image(30, 40))
    assert predictor.is_image_set
    assert predictor.original_size == (30, 40)
    predictor.reset_image()
    assert not predictor.is_image_set


def test_single_box_three_masks(predictor):
    masks, scores, low_res = predictor.predict(box=np.array([20, 15, 100, 70]))
    assert masks.shape == (3, HEIGHT, WIDTH)
    assert masks.dtype == bool
    assert scores.shape == (3,)
    assert low_res.shape == (3, 64, 64)


def test_five_boxes_one_call(predictor):
    boxes = np.array([[10 + i, 10, 80 + i, 60] for i in range(5)], dtype=np.float32)
    masks, scores, low_res = predictor.predict(box=boxes, multimask_output=False)
    assert masks.shape == (5, 1, HEIGHT, WIDTH)
    assert scores.shape == (5, 1)
    assert low_res.shape == (5, 1, 64, 64)
    single, _, _ = predictor.predict(box=boxes[3], multimask_output=False, return_logits=True)
    batch, _, _ = predictor.predict(box=boxes, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(batch[3], single, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_decoder_batch_size_same_results(model, batch_size):
    # 7 prompts in chunks of 3 leave a partial last chunk; per-prompt mask inputs must
    # follow their prompts into the chunks.
    image = _gradient_image(HEIGHT, WIDTH)
    boxes = np.array([[5 + 4 * i, 8 + i, 70 + 3 * i, 60 + 2 * i] for i in range(7)], dtype=np.float32)
    mask_input = np.random.default_rng(0).normal(size=(7, 64, 64)).astype(np.float32)
    whole = Predictor(model, decoder_batch_size=100)
    chunked = Predictor(model, decoder_batch_size=batch_size)
    for predictor in (whole, chunked):
        predictor.set_image(image)
    for prompt_masks in (None, mask_input):
        expected = whole.predict(box=boxes, mask_input=prompt_masks, multimask_output=True, return_logits=True)
        outputs = chunked.predict(box=boxes, mask_input=prompt_masks, multimask_output=True, return_logits=True)
        for output, reference in zip(outputs, expected):
            assert output.shape == reference.shape
            np.testing.assert_allclose(output, reference, atol=1e-4)


def test_decoder_batch_size_default_and_errors(model):
    from fmadapt.inference.predictor import CPU_DECODER_BATCH_SIZE

    assert Predictor(model).decoder_batch_size == CPU_DECODER_BATCH_SIZE
    for value in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="decoder_batch_size must be a positive int"):
            Predictor(model, decoder_batch_size=value)


def test_points(predictor):
    masks, scores, _ = predictor.predict(points=np.array([[50, 40], [10, 5]]), point_labels=np.array([1, 0]))
    assert masks.shape == (3, HEIGHT, WIDTH)
    batched, _, _ = predictor.predict(
        points=np.array([[[50, 40]], [[70, 20]]]), point_labels=np.array([[1], [1]]), multimask_output=False
    )
    assert batched.shape == (2, 1, HEIGHT, WIDTH)


def test_mask_input_round_trip(predictor):
    box = np.array([20, 15, 100, 70])
    _, scores, low_res = predictor.predict(box=box)
    best = low_res[np.argmax(scores)]
    masks, _, refined = predictor.predict(box=box, mask_input=best[None], multimask_output=False)
    assert masks.shape == (1, HEIGHT, WIDTH)
    assert refined.shape == (1, 64, 64)
    assert not np.allclose(refined[0], best)


def test_return_logits_thresholds_to_masks(predictor):
    box = np.array([20, 15, 100, 70])
    masks, _, _ = predictor.predict(box=box)
    logits, _, _ = predictor.predict(box=box, return_logits=True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(masks, logits > 0)


def test_input_errors(predictor):
    with pytest.raises(ValueError, match="together"):
        predictor.predict(points=np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        predictor.predict(box=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="point_labels must have shape"):
        predictor.predict(points=np.array([[1, 2], [3, 4]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="1 \\(foreground\\)"):
        predictor.predict(points=np.array([[1, 2]]), point_labels=np.array([2]))
    with pytest.raises(ValueError, match="64×64"):
        predictor.predict(box=np.array([1, 2, 30, 40]), mask_input=np.zeros((1, 32, 32)))


def test_select_best_mask():
    masks = np.zeros((3, 2, 2), dtype=bool)
    masks[1] = True
    best, score = select_best_mask(masks, np.array([0.2, 0.9, 0.5]))
    assert best.all()
    assert score == pytest.approx(0.9)
    batched, scores = select_best_mask(np.stack([masks, masks[::-1]]), np.array([[0.1, 0.8, 0.3], [0.7, 0.1, 0.2]]))
    assert batched.shape == (2, 2, 2)
    np.testing.assert_allclose(scores, [0.8, 0.7])
    with pytest.raises(ValueError, match="K×H×W"):
        select_best_mask(masks, np.array([0.1, 0.2]))


def test_gray_layouts_give_same_masks(model):
    gray = _gradient_image(40, 60)[:, :, 0]
    outputs = []
    for image in (gray, gray[:, :, None], gray[None]):
        predictor = Predictor(model)
        predictor.set_image(image)
        outputs.append(predictor.predict(box=np.array([5, 5, 40, 30]), return_logits=True)[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_ct_slice_with_window(model):
    hu = np.linspace(-1000, 1000, 48 * 64).reshape(48, 64).astype(np.int16)
    predictor = Predictor(model, intensity=IntensitySpec(mode="ct_window", window="abdomen"))
    predictor.set_image(hu)
    masks, _, _ = predictor.predict(box=np.array([10, 10, 50, 40]))
    assert masks.shape == (3, 48, 64)


@pytest.mark.parametrize("size", [(128, 256), (90, 140), (200, 120)])
def test_matches_segment_anything_predictor(model, size):
    height, width = size
    image = _gradient_image(height, width)
    box = np.array([0.2 * width, 0.3 * height, 0.7 * width, 0.8 * height])

    reference = SamPredictor(build_reference_sam())
    reference.set_image(image)
    expected, expected_scores, expected_low = reference.predict(box=box, return_logits=True)

    ours = Predictor(model)
    ours.set_image(image)
    logits, scores, low_res = ours.predict(box=box, return_logits=True)

    assert logits.shape == expected.shape == (3, height, width)
    scale = np.abs(expected).max()
    if max(height, width) == 256:
        # No resize is needed, so both paths see the same pixels.
        np.testing.assert_allclose(logits, expected, atol=1e-5 * max(scale, 1.0))
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    else:
        # segment-anything resizes with PIL to uint8 and fmadapt with torch in float32,
        # so logits differ by a few percent of their range at most.
        assert np.abs(logits - expected).max() < 0.03 * scale
        np.testing.assert_allclose(scores, expected_scores, atol=1e-3)
    agreement = ((logits > 0) == (expected > 0)).mean()
    assert agreement > 0.99
    assert np.abs(low_res - expected_low).max() < 0.03 * np.abs(expected_low).max()


def test_real_ct_slice_box(model, data_root):
    from conftest import require_dataset
    from PIL import Image

    folder = require_dataset(data_root, "2D_SAMMed2D_CTslices")
    image = np.asarray(Image.open(folder / "images" / "s0114_111.png").convert("RGB"))
    height, width = image.shape[:2]
    assert height != width

    predictor = Predictor(model)
    predictor.set_image(image)
    box = np.array([0.25 * width, 0.25 * height, 0.75 * width, 0.75 * height])
    masks, scores, low_res = predictor.predict(box=box)

    assert masks.shape == (3, height, width)
    assert np.isfinite(scores).all()
    assert low_res.shape == (3, 64, 64)

    reference = SamPredictor(build_reference_sam())
    reference.set_image(image)
    expected, _, _ = reference.predict(box=box)
    assert (masks == expected).mean() > 0.99


@pytest.mark.parametrize(
    "box, problem",
    [
        ([np.nan, 0, 5, 5], "NaN or infinity"),
        ([0, 0, np.inf, 5], "NaN or infinity"),
        ([50, 50, 10, 10], "x1 < x0 or y1 < y0"),
        ([10, 50, 40, 20], "x1 < x0 or y1 < y0"),
    ],
)
def test_invalid_box_rejected(predictor, box, problem):
    with pytest.raises(ValueError) as caught:
        predictor.predict(box=np.array(box, dtype=np.float32))
    message = str(caught.value)
    assert problem in message
    assert str(np.array(box, dtype=np.float32).tolist()) in message
    assert "XYXY" in message


def test_invalid_box_in_batch_named(predictor):
    boxes = np.array([[10, 10, 40, 40], [10, 10, 40, 40], [60, 10, 20, 40]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"box 2 of 3 \[60\.0, 10\.0, 20\.0, 40\.0\]"):
        predictor.predict(box=boxes)


def test_box_past_image_border_allowed(predictor):
    masks, scores, _ = predictor.predict(box=np.array([-20, -10, WIDTH + 30, HEIGHT + 5]))
    assert masks.shape == (3, HEIGHT, WIDTH)
    assert np.isfinite(scores).all()


def test_non_finite_points_rejected(predictor):
    with pytest.raises(ValueError, match="points must be finite"):
        predictor.predict(points=np.array([[np.nan, 5.0]]), point_labels=np.array([1]))


def test_predict_without_prompt_names_arguments(predictor):
    with pytest.raises(ValueError) as caught:
        predictor.predict()
    message = str(caught.value)
    assert "predict needs a prompt" in message
    for argument in ("box", "points", "point_labels", "mask_input"):
        assert argument in message
    assert "decode_prompts" not in message


def test_mask_input_alone_is_a_prompt(predictor):
    masks, scores, _ = predictor.predict(mask_input=np.zeros((64, 64), dtype=np.float32), multimask_output=False)
    assert masks.shape == (1, HEIGHT, WIDTH)
    assert np.isfinite(scores).all()
