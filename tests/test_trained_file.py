"""Trained-parameter files: save after training, restore into a rebuilt model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import save_tiny_checkpoint
from torch import nn

import fmadapt
from fmadapt.adapt import (
    AdapterSettings,
    LoraSettings,
    apply_adapters,
    apply_freezing,
    apply_lora,
    load_trained_parameters,
    read_trained_config,
    save_trained_parameters,
)
from fmadapt.adapt.trained_file import _write_atomically
from fmadapt.errors import CheckpointError
from fmadapt.models.segmenter import Segmenter

CLASS_NAMES = ("liver", "spleen")


def build_model(checkpoint, seed: int = 0) -> Segmenter:
    """Build sam_vit_tiny at 64 pixels and load the base checkpoint, as users do."""
    torch.manual_seed(seed)
    return Segmenter.from_registry("sam_vit_tiny", image_size=64, checkpoint=checkpoint, class_names=CLASS_NAMES)


def apply_settings(model: Segmenter, settings) -> Segmenter:
    for item in settings:
        if isinstance(item, LoraSettings):
            apply_lora(model, item)
        else:
            apply_adapters(model, item)
    return model


def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def outputs(model: Segmenter, inputs: torch.Tensor) -> torch.Tensor:
    """Box-prompt logits B×1×16×16 and per-class logits B×C×16×16, concatenated on dim 1."""
    box = torch.tensor([[8.0, 8.0, 40.0, 48.0]])
    results = []
    for embedding in model.encode(inputs):
        prompted, _ = model.decode_prompts(embedding[None], boxes=box)
        automatic, _ = model.decode_classes(embedding[None])
        results.append(torch.cat([prompted[0], automatic]))
    return torch.stack(results)


def train_one_step(model: Segmenter, inputs: torch.Tensor) -> None:
    """One Adam step on binary cross-entropy against a box-shaped target for every output."""
    target = torch.zeros(2, 1 + len(CLASS_NAMES), 16, 16)
    target[:, :, 2:12, 2:10] = 1.0
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.binary_cross_entropy_with_logits(outputs(model, inputs), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "sam_vit_tiny.pth", image_size=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint):
    """A LoRA + adapter model after one training step, saved to a 'run' folder.

    Shared by the tests of this module, so tests that change the folder work on a copy.
    """
    tmp_path = tmp_path_factory.mktemp("trained")
    settings = (LoraSettings(rank=4, target_modules=("qkv", "proj")), AdapterSettings(placement="parallel"))
    model = apply_settings(build_model(checkpoint).train(), settings)
    apply_freezing(model, "adapters_decoder")
    train_one_step(model, images())
    config = {"model": "sam_vit_tiny", "image_size": 64, "class_names": CLASS_NAMES,
              "lora": settings[0], "adapters": settings[1], "preset": "adapters_decoder"}
    save_trained_parameters(model.eval(), tmp_path / "run", config=config)
    return model, settings, tmp_path / "run"


@pytest.mark.parametrize(
    ("settings", "preset"),
    [
        ((LoraSettings(rank=4, target_modules=("qkv", "lin2")),), "adapters_decoder"),
        ((AdapterSettings(placement="sequential", reduction=8),), "adapters"),
        ((AdapterSettings(placement="parallel"),), "adapters_decoder_prompt"),
        ((), "decoder_prompt"),
    ],
)
def test_round_trip_reproduces_outputs(tmp_path, checkpoint, settings, preset):
    inputs = images()
    model = apply_settings(build_model(checkpoint).train(), settings)
    apply_freezing(model, preset)
    train_one_step(model, inputs)
    model.eval()
    path = save_trained_parameters(model, tmp_path / "run", config={"preset": preset})

    expected_keys = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(load_file(str(path))) == expected_keys

    rebuilt = apply_settings(build_model(checkpoint, seed=9), settings).eval()
    with torch.no_grad():
        trained_output = outputs(model, inputs)
        assert (outputs(rebuilt, inputs) - trained_output).abs().max() > 1e-4
        loaded = load_trained_parameters(rebuilt, tmp_path / "run")
        difference = (outputs(rebuilt, inputs) - trained_output).abs().max()
    assert loaded == sorted(expected_keys)
    assert difference < 1e-6


def test_saved_keys_match_trainable(trained):
    model, _, folder = trained
    saved = load_file(str(folder / "trained.safetensors"))
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}

    assert set(saved) == set(trainable)
    assert "class_embeddings.weight" in saved
    assert "image_encoder.blocks.0.attn.qkv.lora_B.default.weight" in saved
    assert "image_encoder.blocks.2.mlp_adapter.up.weight" in saved
    assert "mask_decoder.iou_token.weight" in saved
    assert "image_encoder.blocks.0.attn.qkv.base_layer.weight" not in saved
    assert "prompt_encoder.no_mask_embed.weight" not in saved
    for name, tensor in saved.items():
        assert torch.equal(tensor, trainable[name].detach()), name
    # The step moved the zero-initialised LoRA B away from zero.
    assert saved["image_encoder.blocks.0.attn.qkv.lora_B.default.weight"].abs().max() > 0


def test_json_contents(trained):
    _, _, folder = trained
    metadata = json.loads((folder / "trained.json").read_text())

    assert metadata["fmadapt_version"] == fmadapt.__version__
    assert metadata["keys"] == sorted(load_file(str(folder / "trained.safetensors")))
    assert metadata["config"]["model"] == "sam_vit_tiny"
    assert metadata["config"]["class_names"] == ["liver", "spleen"]
    assert metadata["config"]["lora"] == {
        "rank": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["qkv", "proj"], "blocks": None
    }
    assert metadata["config"]["adapters"]["placement"] == "parallel"


def test_read_trained_config(trained):
    _, _, folder = trained
    config = read_trained_config(folder)
    assert config["preset"] == "adapters_decoder"
    assert config["image_size"] == 64
    assert set(config) == {"model", "image_size", "class_names", "lora", "adapters", "preset"}


def test_folder_contains_two_files(trained, tmp_path):
    model, _, original = trained
    folder = shutil.copytree(original, tmp_path / "run")
    save_trained_parameters(model, folder, config={"again": True})
    assert sorted(path.name for path in folder.iterdir()) == ["trained.json", "trained.safetensors"]
    assert read_trained_config(folder) == {"again": True}


def test_load_without_adapters_raises(trained, checkpoint):
    _, _, folder = trained
    plain = build_model(checkpoint)
    with pytest.raises(CheckpointError) as info:
        load_trained_parameters(plain, folder)
    message = str(info.value)
    assert "missing from the model" in message
    assert "lora_A" in message
    assert "apply the same LoRA or adapter settings" in message
    assert '"rank": 4' in message


def test_load_with_other_rank_raises(trained, checkpoint):
    _, settings, folder = trained
    other_lora = LoraSettings(rank=2, target_modules=("qkv", "proj"))
    other = apply_settings(build_model(checkpoint), (other_lora, settings[1]))
    with pytest.raises(CheckpointError) as info:
        load_trained_parameters(other, folder)
    assert "saved (4, 96), model (2, 96)" in str(info.value)


def test_missing_folder_raises(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="trained.json not found"):
        load_trained_parameters(build_model(checkpoint), tmp_path / "absent")


def test_edited_key_list_raises(trained, tmp_path):
    model, _, original = trained
    folder = shutil.copytree(original, tmp_path / "run")
    metadata = json.loads((folder / "trained.json").read_text())
    metadata["keys"] = metadata["keys"][1:]
    (folder / "trained.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="list different keys"):
        load_trained_parameters(model, folder)


def test_malformed_json_raises(trained, tmp_path):
    model, _, original = trained
    folder = shutil.copytree(original, tmp_path / "run")
    (folder / "trained.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not be read as JSON"):
        load_trained_parameters(model, folder)


def test_nothing_trainable_raises(tmp_path, checkpoint):
    model = build_model(checkpoint)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        save_trained_parameters(model, tmp_path / "run", config={})
    assert not (tmp_path / "run").exists()


def test_config_must_be_json(tmp_path, checkpoint):
    model = build_model(checkpoint)
    with pytest.raises(TypeError, match="config contains a object value"):
        save_trained_parameters(model, tmp_path / "run", config={"bad": object()})
    with pytest.raises(TypeError, match="config must be a dict"):
        save_trained_parameters(model, tmp_path / "run", config=[("preset", "full")])
    assert not (tmp_path / "run").exists()


def test_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "trained.json"
    target.write_text("old")

    def write_then_fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_atomically(target, write_then_fail)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["trained.json"]
