"""Freezing presets and parameter summaries."""

import warnings

import pytest
import torch
from torch import nn

from fmadapt.adapt import (
    FREEZING_PRESETS,
    AdapterSettings,
    LoraSettings,
    apply_adapters,
    apply_freezing,
    apply_lora,
    summarize_parameters,
)
from fmadapt.errors import FmadaptWarning
from fmadapt.models.segmenter import Segmenter


def build_model(class_names: tuple[str, ...] = ()) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter.from_registry("sam_vit_tiny", image_size=64, class_names=class_names)


def adapted_model(class_names: tuple[str, ...] = ("liver", "spleen")) -> Segmenter:
    """Model with LoRA rank 2 on qkv and parallel bottleneck adapters on block 1."""
    model = build_model(class_names)
    apply_lora(model, LoraSettings(rank=2))
    apply_adapters(model, AdapterSettings(placement="parallel", blocks=(1,)))
    return model


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or "_adapter." in name


def names_of(model: nn.Module, predicate) -> set[str]:
    return {name for name, _ in model.named_parameters() if predicate(name)}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_presets_listed():
    assert set(FREEZING_PRESETS) == {
        "adapters",
        "adapters_decoder",
        "decoder",
        "decoder_prompt",
        "adapters_decoder_prompt",
        "full",
    }


@pytest.mark.parametrize(
    ("preset", "prefixes", "adapters"),
    [
        ("adapters", (), True),
        ("adapters_decoder", ("mask_decoder.",), True),
        ("decoder", ("mask_decoder.",), False),
        ("decoder_prompt", ("mask_decoder.", "prompt_encoder."), False),
        ("adapters_decoder_prompt", ("mask_decoder.", "prompt_encoder."), True),
    ],
)
def test_preset_trains_expected_parameters(preset, prefixes, adapters):
    model = adapted_model()
    apply_freezing(model, preset)

    expected = names_of(model, lambda name: name.startswith(prefixes + ("class_embeddings.",)))
    if adapters:
        expected |= names_of(model, is_adapter_name)
    assert trainable_names(model) == expected
    assert "class_embeddings.weight" in trainable_names(model)
    assert "image_encoder.blocks.0.attn.qkv.base_layer.weight" not in trainable_names(model)


def test_full_preset_trains_everything():
    model = adapted_model()
    apply_freezing(model, "adapters")
    apply_freezing(model, "full")
    assert trainable_names(model) == names_of(model, lambda name: True)


def test_full_preset_without_adapters():
    model = build_model()
    apply_freezing(model, "full")
    assert trainable_names(model) == names_of(model, lambda name: True)


def test_decoder_preset_without_adapters():
    model = build_model()
    apply_freezing(model, "decoder")
    assert trainable_names(model) == names_of(model, lambda name: name.startswith("mask_decoder."))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as info:
        apply_freezing(adapted_model(), "decoder_only")
    message = str(info.value)
    assert "'decoder_only'" in message
    for preset in FREEZING_PRESETS:
        assert f"'{preset}'" in message


def test_preset_type_checked():
    with pytest.raises(TypeError, match="preset must be a str"):
        apply_freezing(adapted_model(), None)


@pytest.mark.parametrize("preset", ["adapters", "adapters_decoder", "adapters_decoder_prompt"])
def test_adapter_preset_without_adapters_raises(preset):
    model = build_model()
    with pytest.raises(ValueError) as info:
        apply_freezing(model, preset)
    assert "apply_lora or apply_adapters" in str(info.value)
    # Nothing was changed before the error.
    assert trainable_names(model) == names_of(model, lambda name: True)


def test_unknown_part_frozen_with_warning():
    model = adapted_model(class_names=())
    model.extra_head = nn.Linear(4, 3)
    with pytest.warns(FmadaptWarning, match="extra_head.weight"):
        apply_freezing(model, "adapters_decoder")
    assert not model.extra_head.weight.requires_grad

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_freezing(model, "full")
    assert model.extra_head.weight.requires_grad


def test_summary_counts_match_numel():
    model = adapted_model()
    apply_freezing(model, "adapters_decoder")
    summary = summarize_parameters(model)

    def count(predicate, trainable_only=False):
        return sum(
            p.numel()
            for name, p in model.named_parameters()
            if predicate(name) and (p.requires_grad or not trainable_only)
        )

    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encoder_base(name):
        return name.startswith("image_encoder.") and not is_adapter_name(name)

    expected_parts = {
        "image_encoder": encoder_base,
        "adapters": is_adapter_name,
        "prompt_encoder": lambda name: name.startswith("prompt_encoder."),
        "mask_decoder": lambda name: name.startswith("mask_decoder."),
        "class_embeddings": lambda name: name.startswith("class_embeddings."),
    }
    for part, predicate in expected_parts.items():
        assert summary.by_part[part] == (count(predicate, trainable_only=True), count(predicate)), part
    assert summary.by_part["other"] == (0, 0)


def test_summary_adapter_count_by_hand():
    """LoRA rank 2 on qkv (96 -> 288) in 4 blocks, adapter 96 -> 24 -> 96 in one block."""
    summary = summarize_parameters(adapted_model(class_names=()))
    lora = 4 * 2 * (96 + 288)
    bottleneck = (96 * 24 + 24) + (24 * 96 + 96)
    assert summary.by_part["adapters"] == (lora + bottleneck, lora + bottleneck)
    assert summary.by_part["class_embeddings"] == (0, 0)


def test_summary_table_text():
    model = adapted_model()
    apply_freezing(model, "decoder")
    summary = summarize_parameters(model)
    lines = str(summary).splitlines()

    assert lines[0].split() == ["part", "trainable", "total", "percent"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == [
        "image_encoder", "adapters", "prompt_encoder", "mask_decoder", "class_embeddings", "other", "all"
    ]
    decoder_total = sum(p.numel() for p in model.mask_decoder.parameters())
    assert rows["mask_decoder"] == [f"{decoder_total:,}", f"{decoder_total:,}", "100.00%"]
    assert rows["adapters"][0] == "0"
    assert rows["adapters"][2] == "0.00%"
    assert rows["other"] == ["0", "0", "0.00%"]
