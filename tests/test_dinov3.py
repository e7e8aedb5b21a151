"""DINOv3 encoders: registry sizes, dense maps, and both checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch

from fmadapt.errors import CheckpointError
from fmadapt.models.dinov3 import DinoV3Encoder, get_dinov3_spec, list_dinov3_models
from fmadapt.models.dinov3_checkpoint import (
    hf_to_meta_state_dict,
    load_dinov3_checkpoint,
    rope_periods,
)

TINY_NAMES = ("dinov3_vit_tiny", "dinov3_vitplus_tiny")
IMAGE_SIZE = 64


def random_encoder(name: str, seed: int) -> DinoV3Encoder:
    """Build an encoder with every parameter drawn at random, so that no block is an identity."""
    torch.manual_seed(seed)
    encoder = DinoV3Encoder(get_dinov3_spec(name))
    with torch.no_grad():
        for parameter_name, parameter in encoder.named_parameters():
            centre = 1.0 if ("norm" in parameter_name and parameter_name.endswith("weight")) else 0.0
            if "lambda1" in parameter_name:
                centre = 0.5
            parameter.normal_(centre, 0.1)
    return encoder.eval()


def meta_reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Write out the keys and shapes of Meta's DinoVisionTransformer state dict for ``name``.

    The list is written by hand from the files of facebookresearch/dinov3.
    models/vision_transformer.py has cls_token 1×1×E, storage_tokens 1×R×E, mask_token 1×E
    and norm. layers/block.py has norm1, attn, ls1, norm2, mlp and ls2 in each block.
    layers/attention.py has qkv (with a persistent bias_mask buffer) and proj.
    layers/ffn_layers.py has Mlp (fc1, fc2) and SwiGLUFFN (w1, w2, w3).
    layers/rope_position_encoding.py has a persistent periods buffer of head_dim / 4 values.
    LayerScale stores ``gamma``, the name transformers' convert_dinov3_vit_to_hf.py maps.
    """
    spec = get_dinov3_spec(name)
    size, hidden = spec.embed_dim, spec.mlp_hidden_dim
    shapes = {
        "cls_token": (1, 1, size),
        "storage_tokens": (1, spec.num_register_tokens, size),
        "mask_token": (1, size),
        "patch_embed.proj.weight": (size, 3, spec.patch_size, spec.patch_size),
        "patch_embed.proj.bias": (size,),
        "rope_embed.periods": (spec.head_dim // 4,),
        "norm.weight": (size,),
        "norm.bias": (size,),
    }
    if spec.gated_mlp:
        mlp = {"w1": (hidden, size), "w2": (hidden, size), "w3": (size, hidden)}
    else:
        mlp = {"fc1": (hidden, size), "fc2": (size, hidden)}
    for index in range(spec.depth):
        block = f"blocks.{index}."
        shapes.update({
            block + "norm1.weight": (size,),
            block + "norm1.bias": (size,),
            block + "attn.qkv.weight": (3 * size, size),
            block + "attn.qkv.bias": (3 * size,),
            block + "attn.qkv.bias_mask": (3 * size,),
            block + "attn.proj.weight": (size, size),
            block + "attn.proj.bias": (size,),
            block + "ls1.gamma": (size,),
            block + "norm2.weight": (size,),
            block + "norm2.bias": (size,),
            block + "ls2.gamma": (size,),
        })
        for layer_name, weight_shape in mlp.items():
            shapes[f"{block}mlp.{layer_name}.weight"] = weight_shape
            shapes[f"{block}mlp.{layer_name}.bias"] = (weight_shape[0],)
    return shapes


def features(encoder: DinoV3Encoder, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(images)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_meta_mapping_matches_meta_keys(name):
    encoder = random_encoder(name, seed=0)
    converted = hf_to_meta_state_dict(encoder.backbone.state_dict(), encoder.spec)
    reference = meta_reference_shapes(name)

    assert sorted(converted) == sorted(reference)
    for key, shape in reference.items():
        assert tuple(converted[key].shape) == shape, key


PUBLISHED_NAMES = ("dinov3_vits16", "dinov3_vitsplus16", "dinov3_vitb16", "dinov3_vitl16")


@pytest.mark.parametrize("name", PUBLISHED_NAMES)
def test_meta_mapping_published_sizes(name):
    # Built on the meta device: the keys and shapes of the released sizes, without their memory.
    with torch.device("meta"):
        encoder = DinoV3Encoder(get_dinov3_spec(name))
    converted = hf_to_meta_state_dict(encoder.backbone.state_dict(), encoder.spec)
    reference = meta_reference_shapes(name)

    assert sorted(converted) == sorted(reference)
    for key, shape in reference.items():
        assert tuple(converted[key].shape) == shape, key


def test_vits16_both_formats_full_size(tmp_path):
    """The smallest released size, saved in both formats at full size, loads to equal features."""
    source = random_encoder("dinov3_vits16", seed=4)
    images = torch.randn(1, 3, 96, 128)
    expected = features(source, images)
    hf_folder = tmp_path / "hf"
    source.backbone.save_pretrained(hf_folder)
    meta_file = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(hf_to_meta_state_dict(source.backbone.state_dict(), source.spec), meta_file)

    for checkpoint in (hf_folder, meta_file):
        target = DinoV3Encoder(get_dinov3_spec("dinov3_vits16")).eval()
        report = load_dinov3_checkpoint(target, checkpoint)
        assert report.missing == []
        assert report.unexpected == []
        assert report.mismatched == []
        assert (features(target, images) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", TINY_NAMES)
def test_both_formats_give_same_features(name, tmp_path):
    source = random_encoder(name, seed=1)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE + 32)
    expected = features(source, images)

    hf_folder = tmp_path / "hf"
    source.backbone.save_pretrained(hf_folder)
    meta_file = tmp_path / "meta.pth"
    torch.save(hf_to_meta_state_dict(source.backbone.state_dict(), source.spec), meta_file)

    from_hf = random_encoder(name, seed=2)
    from_meta = random_encoder(name, seed=3)
    assert (features(from_hf, images) - expected).abs().max() > 1e-3
    hf_report = load_dinov3_checkpoint(from_hf, hf_folder)
    meta_report = load_dinov3_checkpoint(from_meta, meta_file)

    hf_features = features(from_hf, images)
    meta_features = features(from_meta, images)
    assert (hf_features - meta_features).abs().max() < 1e-6
    assert (hf_features - expected).abs().max() < 1e-6
    model_keys = sorted(source.backbone.state_dict())
    for report in (hf_report, meta_report):
        assert sorted(report.matched) == model_keys
        assert report.missing == []
        assert report.unexpected == []
        assert report.mismatched == []
    assert "rope_embed.periods" in meta_report.ignored
    assert "blocks.0.attn.qkv.bias_mask" in meta_report.ignored


@pytest.mark.parametrize("name", TINY_NAMES)
def test_meta_tensors_keep_meta_meaning(name, tmp_path):
    # Independent of the inverse mapping: fresh Meta tensors, checked against Meta's
    # own formulas (qkv rows in q, k, v order, bias times bias_mask, Mlp
    # fc2(gelu(fc1 x)), SwiGLUFFN w3(silu(w1 x) * w2 x)).
    spec = get_dinov3_spec(name)
    size = spec.embed_dim
    state = hf_to_meta_state_dict(random_encoder(name, seed=20).backbone.state_dict(), spec)
    generator = torch.Generator().manual_seed(21)
    for key in list(state):
        is_qkv = key.startswith("blocks.0.attn.qkv.") and not key.endswith("bias_mask")
        if key.startswith("blocks.0.mlp.") or is_qkv:
            state[key] = torch.randn(state[key].shape, generator=generator) * 0.2
    state["blocks.0.attn.qkv.bias_mask"] = torch.cat([torch.full((size,), 0.5), torch.zeros(size), torch.ones(size)])
    path = tmp_path / "meta.pth"
    torch.save(state, path)

    encoder = random_encoder(name, seed=22)
    load_dinov3_checkpoint(encoder, path)
    block = encoder.blocks[0]
    qkv_weight = state["blocks.0.attn.qkv.weight"]
    qkv_bias = state["blocks.0.attn.qkv.bias"]

    assert torch.equal(block.attention.q_proj.weight, qkv_weight[:size])
    assert torch.equal(block.attention.k_proj.weight, qkv_weight[size : 2 * size])
    assert torch.equal(block.attention.v_proj.weight, qkv_weight[2 * size :])
    assert torch.allclose(block.attention.q_proj.bias, 0.5 * qkv_bias[:size])
    assert torch.equal(block.attention.v_proj.bias, qkv_bias[2 * size :])

    tokens = torch.randn(2, 7, size, generator=generator)

    def linear(layer: str, inputs: torch.Tensor) -> torch.Tensor:
        weight = state[f"blocks.0.mlp.{layer}.weight"]
        return torch.nn.functional.linear(inputs, weight, state[f"blocks.0.mlp.{layer}.bias"])

    if spec.gated_mlp:
        expected = linear("w3", torch.nn.functional.silu(linear("w1", tokens)) * linear("w2", tokens))
    else:
        expected = linear("fc2", torch.nn.functional.gelu(linear("fc1", tokens)))
    with torch.no_grad():
        assert torch.allclose(block.mlp(tokens), expected, atol=1e-6)


def test_meta_key_bias_and_bf16_periods(tmp_path):
    # Meta's files mask the key part of the qkv bias and store RoPE periods in bfloat16.
    source = random_encoder("dinov3_vit_tiny", seed=4)
    size = source.spec.embed_dim
    state = hf_to_meta_state_dict(source.backbone.state_dict(), source.spec)
    state["blocks.0.attn.qkv.bias"][size : 2 * size] = torch.randn(size)
    state["rope_embed.periods"] = state["rope_embed.periods"].to(torch.bfloat16)
    path = tmp_path / "meta.pth"
    torch.save(state, path)

    loaded = random_encoder("dinov3_vit_tiny", seed=5)
    load_dinov3_checkpoint(loaded, path)

    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (features(loaded, images) - features(source, images)).abs().max() < 1e-6


def test_wrong_rope_periods_raise(tmp_path):
    source = random_encoder("dinov3_vit_tiny", seed=6)
    state = hf_to_meta_state_dict(source.backbone.state_dict(), source.spec)
    state["rope_embed.periods"] = state["rope_embed.periods"] * 2.0
    path = tmp_path / "meta.pth"
    torch.save(state, path)

    with pytest.raises(CheckpointError, match="rope_embed.periods"):
        load_dinov3_checkpoint(random_encoder("dinov3_vit_tiny", seed=7), path)


def test_rope_periods_by_hand():
    # head_dim 32 for the tiny model: periods 100 ** (4i / 32) for i = 0..7.
    spec = get_dinov3_spec("dinov3_vit_tiny")
    expected = torch.tensor([100.0 ** (i / 8.0) for i in range(8)])

    assert torch.allclose(rope_periods(spec), expected, rtol=1e-6)


def test_dense_map_480x640():
    encoder = random_encoder("dinov3_vit_tiny", seed=8)
    images = torch.randn(1, 3, 480, 640)
    with torch.no_grad():
        dense = encoder(images)
        tokens = encoder.backbone(pixel_values=images).last_hidden_state

    assert tuple(dense.shape) == (1, 64, 30, 40)
    # 1 class token + 4 register tokens + 30 × 40 = 1200 patch tokens.
    assert tokens.shape[1] == 1 + 4 + 1200
    # Patch tokens are row-major after the five prefix tokens.
    assert torch.equal(dense[0, :, 0, 0], tokens[0, 5])
    assert torch.equal(dense[0, :, 0, 1], tokens[0, 6])
    assert torch.equal(dense[0, :, 1, 0], tokens[0, 5 + 40])
    assert torch.equal(dense[0, :, 29, 39], tokens[0, 1204])


def test_non_multiple_size_raises():
    encoder = random_encoder("dinov3_vit_tiny", seed=9)

    with pytest.raises(ValueError, match=r"481×640 .*multiple of the patch size 16.*496×640"):
        encoder(torch.randn(1, 3, 481, 640))


def test_unrelated_keys_raise(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3), "decoder.fc.bias": torch.zeros(4)}, path)

    with pytest.raises(CheckpointError, match="no key of checkpoint .* has a DINOv3 name"):
        load_dinov3_checkpoint(random_encoder("dinov3_vit_tiny", seed=10), path)


def test_missing_key_strict_raises(tmp_path):
    source = random_encoder("dinov3_vit_tiny", seed=11)
    state = hf_to_meta_state_dict(source.backbone.state_dict(), source.spec)
    del state["blocks.1.ls2.gamma"]
    path = tmp_path / "meta.pth"
    torch.save(state, path)
    encoder = random_encoder("dinov3_vit_tiny", seed=12)
    missing_key = f"{encoder.blocks_path.removeprefix('backbone.')}.1.layer_scale2.lambda1"

    with pytest.raises(CheckpointError, match=rf"1 keys missing \({missing_key}\)"):
        load_dinov3_checkpoint(encoder, path)


def test_missing_key_reported_when_lenient(tmp_path):
    source = random_encoder("dinov3_vit_tiny", seed=13)
    state = hf_to_meta_state_dict(source.backbone.state_dict(), source.spec)
    del state["blocks.1.ls2.gamma"]
    path = tmp_path / "meta.pth"
    torch.save(state, path)
    encoder = random_encoder("dinov3_vit_tiny", seed=14)
    missing_key = f"{encoder.blocks_path.removeprefix('backbone.')}.1.layer_scale2.lambda1"
    before = encoder.backbone.state_dict()[missing_key].clone()

    report = load_dinov3_checkpoint(encoder, path, strict=False)

    assert report.missing == [missing_key]
    assert len(report.matched) == len(source.backbone.state_dict()) - 1
    assert torch.equal(encoder.backbone.state_dict()[missing_key], before)
    cls_key = "embeddings.cls_token"
    assert torch.equal(encoder.backbone.state_dict()[cls_key], source.backbone.state_dict()[cls_key])


def test_hf_config_mismatch_raises(tmp_path):
    source = random_encoder("dinov3_vit_tiny", seed=15)
    folder = tmp_path / "hf"
    source.backbone.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["use_gated_mlp"] = True
    config_path.write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="use_gated_mlp True .*expected False"):
        load_dinov3_checkpoint(random_encoder("dinov3_vit_tiny", seed=16), folder)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dinov3_checkpoint(random_encoder("dinov3_vit_tiny", seed=18), tmp_path / "absent")


def test_published_sizes():
    # Values from Meta's hub/backbones.py and transformers' get_dinov3_config.
    published = {
        "dinov3_vits16": (384, 12, 6, 1536, False),
        "dinov3_vitsplus16": (384, 12, 6, 1536, True),
        "dinov3_vitb16": (768, 12, 12, 3072, False),
        "dinov3_vitl16": (1024, 24, 16, 4096, False),
    }
    for name, (size, depth, heads, hidden, gated) in published.items():
        spec = get_dinov3_spec(name)
        assert (spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_hidden_dim, spec.gated_mlp) == (
            size, depth, heads, hidden, gated,
        ), name
        assert spec.num_register_tokens == 4
        assert spec.patch_size == 16
        assert spec.rope_theta == 100.0
        assert spec.preprocess.value_scale == pytest.approx(1 / 255)
        assert spec.preprocess.pixel_mean == (0.485, 0.456, 0.406)
        assert spec.preprocess.pixel_std == (0.229, 0.224, 0.225)
    assert set(published) <= set(list_dinov3_models())


def test_vits16_parameter_count_by_hand():
    # Per block with E = 384, MLP width 1536: q, k, v, o weights 4E², q, v, o biases 3E,
    # two LayerScales 2E, two LayerNorms 4E, MLP 2·E·1536 + 1536 + E.
    size, hidden = 384, 1536
    block = 4 * size**2 + 3 * size + 2 * size + 4 * size + 2 * size * hidden + hidden + size
    # Class, mask and 4 register tokens, the 16×16 patch projection with bias, final norm.
    expected = 12 * block + 6 * size + (3 * 16 * 16 * size + size) + 2 * size
    with torch.device("meta"):
        encoder = DinoV3Encoder(get_dinov3_spec("dinov3_vits16"))

    assert sum(parameter.numel() for parameter in encoder.parameters()) == expected


@pytest.mark.parametrize(
    ("name", "millions"),
    [("dinov3_vitsplus16", 29), ("dinov3_vitb16", 86), ("dinov3_vitl16", 300)],
)
def test_parameter_counts_match_readme(name, millions):
    # Meta's README.md lists 29M, 86M and 300M parameters, rounded to the million.
    with torch.device("meta"):
        encoder = DinoV3Encoder(get_dinov3_spec(name))

    count = sum(parameter.numel() for parameter in encoder.parameters())
    assert abs(count / 1e6 - millions) / millions < 0.02


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'dinov3_vitb16'"):
        get_dinov3_spec("dinov3_vitb_16")


def test_rope_rescale_off_by_default():
    encoder = random_encoder("dinov3_vit_tiny", seed=19).train()
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)

    assert torch.equal(features(encoder, images), features(encoder, images))
