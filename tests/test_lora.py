"""LoRA injection through peft into a small SAM-architecture model."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fmadapt.adapt import (
    LoraSettings,
    apply_freezing,
    apply_lora,
    load_base_state_dict,
    remap_base_state_dict,
)
from fmadapt.errors import CheckpointError
from fmadapt.models.segmenter import Segmenter

# Sizes of the registered sam_vit_tiny encoder.
DIM = 96
DEPTH = 4


def build_model(seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter.from_registry("sam_vit_tiny", image_size=64).eval()


def predict(model: Segmenter, images: torch.Tensor) -> torch.Tensor:
    """Return B×1×16×16 mask logits for one fixed XYXY box on each of B images."""
    box = torch.tensor([[8.0, 8.0, 40.0, 48.0]])
    logits = [model.decode_prompts(embedding[None], boxes=box)[0] for embedding in model.encode(images)]
    return torch.cat(logits)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def lora_parameter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def test_settings_defaults():
    settings = LoraSettings()
    assert settings.rank == 8
    assert settings.alpha == 16
    assert settings.target_modules == ("qkv",)
    assert settings.blocks is None


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"rank": 0}, ValueError, "rank must be at least 1"),
        ({"rank": 2.0}, TypeError, "rank must be an int"),
        ({"alpha": 0}, ValueError, "alpha must be positive"),
        ({"dropout": 1.0}, ValueError, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, ValueError, "dropout must be in [0, 1)"),
        ({"target_modules": "qkv"}, TypeError, "tuple of str"),
        ({"target_modules": ()}, ValueError, "empty"),
        ({"target_modules": ("qkv", "qkv")}, ValueError, "twice"),
        ({"blocks": (0, 0)}, ValueError, "repeats"),
        ({"blocks": (-1,)}, ValueError, "invalid block indices [-1]"),
    ],
)
def test_settings_invalid_values(kwargs, error, fragment):
    with pytest.raises(error) as info:
        LoraSettings(**kwargs)
    assert fragment in str(info.value)


def test_unknown_target_lists_layer_names():
    with pytest.raises(ValueError) as info:
        LoraSettings(target_modules=("qkv", "q_proj"))
    message = str(info.value)
    assert "['q_proj']" in message
    assert "['lin1', 'lin2', 'proj', 'qkv']" in message


def test_adapters_preset_trains_only_lora():
    model = apply_lora(build_model(), LoraSettings(rank=4))
    apply_freezing(model, "adapters")

    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == lora_parameter_names(model)
    assert len(trainable) == 2 * DEPTH


def test_injection_names_and_untouched_decoder():
    model = build_model()
    decoder_names = [name for name, _ in model.named_parameters() if not name.startswith("image_encoder.")]
    apply_lora(model, LoraSettings(rank=4))

    names = {name for name, _ in model.named_parameters()}
    assert "image_encoder.blocks.0.attn.qkv.base_layer.weight" in names
    assert "image_encoder.blocks.0.attn.qkv.lora_A.default.weight" in names
    assert "image_encoder.blocks.0.attn.qkv.lora_B.default.weight" in names
    assert "image_encoder.blocks.0.attn.qkv.weight" not in names
    assert "image_encoder.blocks.0.attn.proj.weight" in names
    assert not any(isinstance(m, LoraLayer) for m in model.prompt_encoder.modules())
    assert not any(isinstance(m, LoraLayer) for m in model.mask_decoder.modules())
    # The decoder keeps the requires_grad it had, because peft only touches the encoder.
    assert all(parameter.requires_grad for name, parameter in model.named_parameters() if name in decoder_names)


def test_fresh_lora_keeps_output():
    model = build_model()
    inputs = images()
    with torch.no_grad():
        before = predict(model, inputs)
        apply_lora(model, LoraSettings(rank=4, target_modules=("qkv", "proj", "lin1", "lin2")))
        after = predict(model, inputs)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # rank * (in_features + out_features) per targeted layer and block.
        (LoraSettings(rank=4, target_modules=("proj",)), DEPTH * 2 * 4 * DIM),
        (LoraSettings(rank=2, target_modules=("qkv",)), DEPTH * 2 * (DIM + 3 * DIM)),
        (LoraSettings(rank=3, target_modules=("lin1", "lin2")), DEPTH * 2 * 3 * (DIM + 4 * DIM)),
        (LoraSettings(rank=8, target_modules=("proj",), blocks=(1,)), 1 * 2 * 8 * DIM),
    ],
)
def test_parameter_count_follows_settings(settings, expected):
    model = apply_lora(build_model(), settings)
    lora_names = lora_parameter_names(model)
    count = sum(parameter.numel() for name, parameter in model.named_parameters() if name in lora_names)
    assert count == expected


def test_selected_blocks_only():
    model = apply_lora(build_model(), LoraSettings(rank=2, target_modules=("qkv", "lin2"), blocks=(1,)))
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == {"image_encoder.blocks.1.attn.qkv", "image_encoder.blocks.1.mlp.lin2"}


def test_alpha_scales_update():
    """With the same A and B, doubling alpha doubles the LoRA part of a layer's output."""
    deltas = []
    tokens = torch.randn(5, DIM, generator=torch.Generator().manual_seed(3))
    for alpha in (4.0, 8.0):
        model = apply_lora(build_model(), LoraSettings(rank=4, alpha=alpha, target_modules=("proj",)))
        layer = model.image_encoder.blocks[0].attn.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.linspace(-1, 1, 4 * DIM).reshape(4, DIM))
            layer.lora_B["default"].weight.fill_(0.5)
            deltas.append(layer(tokens) - layer.base_layer(tokens))
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], 2 * deltas[0])


def test_block_index_out_of_range():
    with pytest.raises(ValueError) as info:
        apply_lora(build_model(), LoraSettings(blocks=(0, 5)))
    assert "[5]" in str(info.value)
    assert "0 to 3" in str(info.value)


def test_second_injection_raises():
    model = apply_lora(build_model(), LoraSettings(rank=2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoraSettings(rank=2))


def test_model_without_encoder_raises():
    with pytest.raises(TypeError, match="image_encoder"):
        apply_lora(nn.Linear(2, 2), LoraSettings())


def test_base_state_dict_loads_after_injection():
    source = build_model(seed=0)
    base_state = source.state_dict()
    target = apply_lora(build_model(seed=5), LoraSettings(rank=4, target_modules=("qkv", "lin1")))

    load_base_state_dict(target, base_state)

    block = target.image_encoder.blocks[0]
    assert torch.equal(block.attn.qkv.base_layer.weight, source.image_encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(block.mlp.lin1.base_layer.bias, source.image_encoder.blocks[0].mlp.lin1.bias)
    assert torch.equal(target.mask_decoder.iou_token.weight, source.mask_decoder.iou_token.weight)
    inputs = images()
    with torch.no_grad():
        torch.testing.assert_close(predict(target, inputs), predict(source, inputs), rtol=0, atol=0)


def test_remap_renames_only_wrapped_layers():
    model = apply_lora(build_model(), LoraSettings(rank=2, target_modules=("proj",), blocks=(0,)))
    tensor = torch.zeros(1)
    remapped = remap_base_state_dict(
        model,
        {
            "image_encoder.blocks.0.attn.proj.weight": tensor,
            "image_encoder.blocks.1.attn.proj.weight": tensor,
            "mask_decoder.iou_token.weight": tensor,
        },
    )
    assert set(remapped) == {
        "image_encoder.blocks.0.attn.proj.base_layer.weight",
        "image_encoder.blocks.1.attn.proj.weight",
        "mask_decoder.iou_token.weight",
    }


def test_plain_load_fails_without_remap():
    base_state = build_model().state_dict()
    model = apply_lora(build_model(seed=2), LoraSettings(rank=2))
    with pytest.raises(RuntimeError, match="base_layer"):
        model.load_state_dict(base_state)


def test_incomplete_base_state_dict_raises():
    base_state = build_model().state_dict()
    del base_state["image_encoder.blocks.1.norm2.weight"]
    base_state["image_encoder.extra.weight"] = torch.zeros(1)
    model = apply_lora(build_model(seed=2), LoraSettings(rank=2))
    with pytest.raises(CheckpointError) as info:
        load_base_state_dict(model, base_state)
    message = str(info.value)
    assert "image_encoder.blocks.1.norm2.weight" in message
    assert "image_encoder.extra.weight" in message
    assert "lora_A" not in message


def test_wrong_shape_base_state_dict_raises():
    base_state = build_model().state_dict()
    base_state["mask_decoder.iou_token.weight"] = torch.zeros(3, 3)
    model = apply_lora(build_model(seed=2), LoraSettings(rank=2))
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_base_state_dict(model, base_state)
