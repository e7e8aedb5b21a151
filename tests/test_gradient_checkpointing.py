import pytest
import torch
from segment_anything.modeling.image_encoder import Block
from tiny_checkpoints import save_tiny_checkpoint

from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.models import Segmenter
from fmadapt.models.checkpointing import CheckpointedSamBlock, enable_gradient_checkpointing

SIZE = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "sam_tiny.pth")


def _images(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=generator)


def _gradients(model, images):
    model.zero_grad(set_to_none=True)
    model.encode(images).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_sam_gradients_equal_plain(checkpoint):
    model = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE).train()
    images = _images()
    expected = _gradients(model, images)

    assert model.enable_gradient_checkpointing() == len(model.image_encoder.blocks)
    assert all(type(block) is CheckpointedSamBlock for block in model.image_encoder.blocks)
    checkpointed = _gradients(model, images)

    assert sorted(checkpointed) == sorted(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_lora_gradients_equal_plain(checkpoint):
    torch.manual_seed(0)
    model = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE)
    apply_lora(model, LoraSettings(rank=4, target_modules=("qkv", "proj")))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.train()
    images = _images(seed=1)
    expected = _gradients(model, images)

    model.enable_gradient_checkpointing()
    checkpointed = _gradients(model, images)

    assert expected and sorted(checkpointed) == sorted(expected)
    assert all("lora_" in name for name in expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_recomputes_only_in_training(checkpoint, monkeypatch):
    model = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE)
    model.enable_gradient_checkpointing()
    calls = []
    original = Block.forward

    def counting_forward(block, tokens):
        calls.append(block)
        return original(block, tokens)

    monkeypatch.setattr(Block, "forward", counting_forward)
    depth = len(model.image_encoder.blocks)
    images = _images(seed=2)

    model.eval()
    model.encode(images).sum().backward()
    assert len(calls) == depth

    calls.clear()
    model.train()
    model.encode(images).sum().backward()
    assert len(calls) == 2 * depth


def test_state_dict_and_disable(checkpoint):
    model = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE)
    keys = list(model.state_dict())
    depth = len(model.image_encoder.blocks)

    assert model.enable_gradient_checkpointing() == depth
    assert list(model.state_dict()) == keys
    assert model.disable_gradient_checkpointing() == depth
    assert all(type(block) is Block for block in model.image_encoder.blocks)


def test_dinov3_gradients_equal_plain():
    torch.manual_seed(0)
    model = Segmenter.from_registry("dinov3_vit_tiny").train()
    images = _images(seed=3)
    expected = _gradients(model, images)

    assert model.enable_gradient_checkpointing() == len(model.image_encoder.blocks)
    assert model.image_encoder.backbone.is_activation_checkpointing
    checkpointed = _gradients(model, images)

    assert sorted(checkpointed) == sorted(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_rejects_module_without_blocks():
    with pytest.raises(ValueError, match="nothing to checkpoint"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
