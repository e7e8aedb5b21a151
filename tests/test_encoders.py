"""The ImageEncoder contract, checked on every family with tiny configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fmadapt.models.dinov3 import DinoV3Encoder, get_dinov3_spec
from fmadapt.models.encoders import ADAPTER_TARGET_NAMES, ImageEncoder, SamImageEncoder
from fmadapt.models.registry import get_model_spec

SAM_IMAGE_SIZE = 128
FAMILIES = ("sam", "dinov3", "dinov3_gated")


def build_encoder(family: str) -> ImageEncoder:
    torch.manual_seed(0)
    if family == "sam":
        return SamImageEncoder.from_spec(get_model_spec("sam_vit_tiny"), image_size=SAM_IMAGE_SIZE).eval()
    name = "dinov3_vitplus_tiny" if family == "dinov3_gated" else "dinov3_vit_tiny"
    return DinoV3Encoder(get_dinov3_spec(name)).eval()


@pytest.fixture(params=FAMILIES)
def encoder(request) -> ImageEncoder:
    return build_encoder(request.param)


def sample_images(batch: int = 2, size: int = SAM_IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_contract_attributes(encoder):
    assert isinstance(encoder, ImageEncoder)
    assert isinstance(encoder.blocks, nn.ModuleList)
    assert len(encoder.blocks) > 0
    assert encoder.get_submodule(encoder.blocks_path) is encoder.blocks
    assert encoder.patch_size == 16
    assert encoder.embed_dim > 0
    assert encoder.block_embed_dim > 0


def test_lora_targets_are_linear(encoder):
    assert encoder.lora_targets
    for block in encoder.blocks:
        for name, path in encoder.lora_targets.items():
            assert isinstance(block.get_submodule(path), nn.Linear), (name, path)


def test_adapter_targets_resolve(encoder):
    assert sorted(encoder.adapter_targets) == sorted(ADAPTER_TARGET_NAMES)
    for block in encoder.blocks:
        for path in encoder.adapter_targets.values():
            assert isinstance(block.get_submodule(path), nn.Module)


def test_adapter_target_outputs_tensor(encoder):
    outputs = {}
    hooks = [
        encoder.blocks[0].get_submodule(path).register_forward_hook(
            lambda module, inputs, output, key=key: outputs.setdefault(key, output)
        )
        for key, path in encoder.adapter_targets.items()
    ]
    with torch.no_grad():
        encoder(sample_images(batch=1))
    for hook in hooks:
        hook.remove()

    for key in ADAPTER_TARGET_NAMES:
        assert isinstance(outputs[key], torch.Tensor), key
        assert outputs[key].shape[-1] == encoder.block_embed_dim, key


def test_target_module_names_resolve(encoder):
    first_target = next(iter(encoder.lora_targets))
    names = encoder.target_module_names([first_target], blocks=[0, -1])

    assert len(names) == 2
    assert names[0].startswith(encoder.blocks_path + ".0.")
    assert names[1].startswith(f"{encoder.blocks_path}.{len(encoder.blocks) - 1}.")
    for name in names:
        assert isinstance(encoder.get_submodule(name), nn.Linear)


def test_unknown_lora_target_raises(encoder):
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        encoder.target_module_names(["no_such_layer"])


def test_forward_shape(encoder):
    with torch.no_grad():
        dense = encoder(sample_images(batch=2))

    grid = SAM_IMAGE_SIZE // 16
    assert tuple(dense.shape) == (2, encoder.embed_dim, grid, grid)


def test_intermediate_maps_shapes(encoder):
    with torch.no_grad():
        maps = encoder.intermediate_maps(sample_images(batch=2), [0, -1])

    grid = SAM_IMAGE_SIZE // 16
    assert len(maps) == 2
    for dense in maps:
        assert tuple(dense.shape) == (2, encoder.block_embed_dim, grid, grid)
    assert not torch.equal(maps[0], maps[1])


def test_last_map_leads_to_forward(encoder):
    images = sample_images(batch=1)
    with torch.no_grad():
        dense = encoder(images)
        last = encoder.intermediate_maps(images, [-1])[0]
        if isinstance(encoder, SamImageEncoder):
            # SAM's neck turns the last block output into the dense map.
            last = encoder.image_encoder.neck(last)

    assert torch.allclose(last, dense, atol=1e-6)


def test_gradients_reach_first_block(encoder):
    encoder.train()
    dense = encoder(sample_images(batch=1))
    dense.square().mean().backward()

    gradients = [parameter.grad for parameter in encoder.blocks[0].parameters()]
    assert all(gradient is not None for gradient in gradients)
    assert any(gradient.abs().sum() > 0 for gradient in gradients)


def test_layer_index_out_of_range(encoder):
    depth = len(encoder.blocks)

    with pytest.raises(ValueError, match=f"layer index {depth} is out of range"):
        encoder.intermediate_maps(sample_images(batch=1), [depth])


def test_invalid_images_raise(encoder):
    with pytest.raises(ValueError, match="B×3×H×W"):
        encoder(torch.randn(1, 1, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))
    with pytest.raises(TypeError, match="floating-point"):
        encoder(torch.zeros(1, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        encoder(torch.randn(1, 3, SAM_IMAGE_SIZE + 8, SAM_IMAGE_SIZE))


def test_sam_matches_wrapped_encoder():
    encoder = build_encoder("sam")
    images = sample_images(batch=1)
    with torch.no_grad():
        wrapped = encoder(images)
        direct = encoder.image_encoder(images)

    assert torch.equal(wrapped, direct)
    assert encoder.embed_dim == 64
    assert encoder.block_embed_dim == 96


def test_sam_rejects_other_sizes():
    encoder = build_encoder("sam")

    with pytest.raises(ValueError, match=f"must be {SAM_IMAGE_SIZE}×{SAM_IMAGE_SIZE}"):
        encoder(torch.randn(1, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE + 16))


def test_dinov3_non_square_input():
    encoder = build_encoder("dinov3")
    with torch.no_grad():
        dense = encoder(torch.randn(1, 3, 64, 160))

    assert tuple(dense.shape) == (1, encoder.embed_dim, 4, 10)


def test_sam_state_dict_has_sam_names():
    encoder = build_encoder("sam")
    keys = list(encoder.state_dict())

    assert "image_encoder.patch_embed.proj.weight" in keys
    assert "image_encoder.blocks.0.attn.qkv.weight" in keys
    assert all(key.startswith("image_encoder.") for key in keys)
