import warnings

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos
from conftest import require_dataset
from tiny_checkpoints import save_tiny_checkpoint

from fmadapt.adapt.adapters import AdapterSettings, apply_adapters
from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.errors import FmadaptWarning
from fmadapt.inference import Predictor
from fmadapt.inference.predictor import bf16_is_native, resolve_precision
from fmadapt.models import Segmenter
from fmadapt.models.fused_attention import FusedSamAttention, relative_position_attention, relative_position_bias

SIZE = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Random relative-position tables (segment-anything starts them at zero), so the
    # relative-position term is exercised.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "sam_tiny.pth")


def _model(checkpoint, size=SIZE):
    return Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=size).eval()


def _images(seed=0, size=SIZE):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=generator)


def _image(height=100, width=120):
    rows, cols = np.mgrid[0:height, 0:width]
    disc = (rows - 50) ** 2 + (cols - 60) ** 2 < 30**2
    image = np.where(disc, 200, 40) + (rows + cols) % 17
    return np.stack([image, image * 0.8, image * 0.6], axis=-1).astype(np.uint8)


def test_bias_matches_decomposed_rel_pos():
    generator = torch.Generator().manual_seed(1)
    heads, height, width, channels = 2, 5, 7, 8
    query = torch.randn(1, heads, height * width, channels, generator=generator)
    rel_pos_h = torch.randn(2 * height - 1, channels, generator=generator)
    rel_pos_w = torch.randn(2 * width - 1, channels, generator=generator)
    zeros = torch.zeros(heads, height * width, height * width)

    expected = add_decomposed_rel_pos(
        zeros, query[0], rel_pos_h, rel_pos_w, (height, width), (height, width)
    )
    bias = relative_position_bias(query, rel_pos_h, rel_pos_w, (height, width))

    assert bias.shape == (1, heads, height * width, height * width)
    torch.testing.assert_close(bias[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(14, 14), (6, 9)])
def test_folded_attention_matches_mask(grid):
    # Non-square grids catch a row/column mix-up in the one-hot key codes.
    generator = torch.Generator().manual_seed(3)
    height, width = grid
    tokens, channels = height * width, 8
    query, key, value = (
        torch.randn(2, 3, tokens, channels, generator=generator, requires_grad=True) for _ in range(3)
    )
    rel_pos_h = torch.randn(2 * height - 1, channels, generator=generator)
    rel_pos_w = torch.randn(2 * width - 1, channels, generator=generator)
    scale = channels**-0.5

    folded = relative_position_attention(query, key, value, rel_pos_h, rel_pos_w, grid, scale)
    bias = relative_position_bias(query, rel_pos_h, rel_pos_w, grid)
    masked = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    assert folded.shape == masked.shape
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=1e-5)

    folded_grads = torch.autograd.grad(folded.square().sum(), (query, key, value))
    masked_grads = torch.autograd.grad(masked.square().sum(), (query, key, value))
    for folded_grad, masked_grad in zip(folded_grads, masked_grads):
        torch.testing.assert_close(folded_grad, masked_grad, atol=1e-4, rtol=1e-4)


def test_bias_entry_by_hand():
    # With one head, a 2×2 grid and 1 channel, entry [i, j] is q_i * (Rh[row_i - row_j + 1] + Rw[col_i - col_j + 1]).
    query = torch.tensor([[[[1.0], [2.0], [3.0], [4.0]]]])
    rel_pos_h = torch.tensor([[10.0], [20.0], [30.0]])
    rel_pos_w = torch.tensor([[1.0], [2.0], [3.0]])
    bias = relative_position_bias(query, rel_pos_h, rel_pos_w, (2, 2))[0, 0]

    # Token 3 (row 1, col 1) against token 0 (row 0, col 0) has offsets +1 and +1, giving Rh[2] + Rw[2] = 33.
    assert bias[3, 0].item() == pytest.approx(4.0 * 33.0)
    # Token 1 (row 0, col 1) against token 2 (row 1, col 0) gives Rh[0] + Rw[2] = 13.
    assert bias[1, 2].item() == pytest.approx(2.0 * 13.0)
    # A token against itself gives Rh[1] + Rw[1] = 22.
    assert bias[0, 0].item() == pytest.approx(1.0 * 22.0)


def test_encoder_output_matches_by_hand(checkpoint):
    model = _model(checkpoint)
    images = _images()
    with torch.inference_mode():
        expected = model.encode(images)
        switched = model.enable_fused_attention()
        fused = model.encode(images)

    assert switched == len(model.image_encoder.blocks)
    assert all(type(block.attn) is FusedSamAttention for block in model.image_encoder.blocks)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_state_dict_keys_unchanged(checkpoint):
    model = _model(checkpoint)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.enable_fused_attention()
    after = model.state_dict()

    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_enable_twice_and_disable(checkpoint):
    model = _model(checkpoint)
    depth = len(model.image_encoder.blocks)

    assert model.enable_fused_attention() == depth
    assert model.enable_fused_attention() == 0
    assert model.disable_fused_attention() == depth
    assert all(type(block.attn) is Attention for block in model.image_encoder.blocks)


def test_gradients_match_by_hand(checkpoint):
    images = _images(seed=2)
    gradients = []
    for fused in (False, True):
        model = _model(checkpoint).train()
        if fused:
            model.enable_fused_attention()
        model.encode(images).square().mean().backward()
        gradients.append({name: p.grad for name, p in model.image_encoder.named_parameters()})

    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, atol=1e-5, rtol=1e-3, msg=name)


def test_lora_and_adapters_still_apply(checkpoint):
    images = _images(seed=3)
    outputs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = _model(checkpoint)
        apply_lora(model, LoraSettings(rank=4, target_modules=("qkv",)))
        apply_adapters(model, AdapterSettings(reduction=4, placement="sequential"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name or "adapter" in name:
                    parameter.normal_(0.0, 0.05)
        if fused:
            assert model.enable_fused_attention() == len(model.image_encoder.blocks)
        with torch.inference_mode():
            outputs.append(model.encode(images))

    plain = _model(checkpoint)
    with torch.inference_mode():
        without_extras = plain.encode(images)
    assert not torch.allclose(outputs[0], without_extras, atol=1e-3)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)


def test_dinov3_selects_sdpa():
    torch.manual_seed(0)
    model = Segmenter.from_registry("dinov3_vit_tiny").eval()
    images = _images(seed=4)
    model.disable_fused_attention()
    assert model.image_encoder.backbone.config._attn_implementation == "eager"
    with torch.inference_mode():
        eager = model.encode(images)

    assert model.enable_fused_attention() == len(model.image_encoder.blocks)
    assert model.image_encoder.backbone.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        fused = model.encode(images)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_bf16_masks_agree_with_fp32(checkpoint):
    model = _model(checkpoint, size=256)
    image = _image()
    boxes = np.array([[30, 20, 90, 80], [10, 10, 60, 50], [50, 40, 115, 95]], dtype=np.float32)

    reference = Predictor(model, precision="fp32")
    reference.set_image(image)
    expected, _, _ = reference.predict(box=boxes, multimask_output=False)

    model.enable_fused_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FmadaptWarning)
        fast = Predictor(model, precision="bf16")
    fast.set_image(image)
    masks, _, _ = fast.predict(box=boxes, multimask_output=False)

    assert fast._embedding.dtype == torch.float32
    for row in range(len(boxes)):
        overlap = np.logical_and(masks[row], expected[row]).sum()
        dice = 2 * overlap / max(masks[row].sum() + expected[row].sum(), 1)
        assert dice > 0.95, f"box {row}: Dice {dice:.3f} between bf16 and fp32 masks"


def test_bf16_masks_agree_with_fp32_on_kvasir(checkpoint, data_root):
    """bf16 encoder and decoder against the fp32 path, on real photos at 256 px."""
    from fmadapt.data.io import read_image, read_mask

    folder = require_dataset(data_root, "2D_KvasirSEG_polyp")
    model = _model(checkpoint, size=256)
    reference = Predictor(model, precision="fp32")
    fast_model = _model(checkpoint, size=256)
    fast_model.enable_fused_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FmadaptWarning)
        fast = Predictor(fast_model, precision="bf16")

    for image_path in sorted((folder / "images").glob("*.jpg"))[:3]:
        image = read_image(image_path).array
        polyp = read_mask(folder / "masks" / image_path.name, threshold=128).array
        rows, cols = np.nonzero(polyp)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)
        reference.set_image(image)
        fast.set_image(image)
        expected, _, _ = reference.predict(box=box, multimask_output=False)
        masks, scores, low_res = fast.predict(box=box, multimask_output=False)

        assert scores.dtype == np.float32
        assert low_res.dtype == np.float32
        overlap = np.logical_and(masks[0], expected[0]).sum()
        dice = 2 * overlap / max(masks[0].sum() + expected[0].sum(), 1)
        assert dice >= 0.98, f"{image_path.name}: Dice {dice:.4f} between bf16 and fp32 masks"
    # The decoder ran on bf16 copies; the model's own weights stay float32.
    assert all(p.dtype == torch.float32 for p in fast_model.mask_decoder.parameters())


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_is_native(cpu) else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)
