"""Bottleneck adapters in the blocks of a small SAM image encoder."""

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from fmadapt.adapt import AdapterSettings, BottleneckAdapter, apply_adapters, apply_freezing, load_base_state_dict
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


def target_mask() -> torch.Tensor:
    """B×1×16×16 target: foreground inside the prompt box, in the 16×16 logit frame."""
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 2:12, 2:10] = 1.0
    return mask


def randomize_adapters(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                for parameter in module.parameters():
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def test_settings_defaults():
    settings = AdapterSettings()
    assert settings.reduction == 4
    assert settings.placement == "sequential"
    assert settings.scale == 0.5
    assert settings.blocks is None


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"reduction": 0}, ValueError, "reduction must be at least 1"),
        ({"reduction": 2.5}, TypeError, "reduction must be an int"),
        ({"placement": "serial"}, ValueError, "('sequential', 'parallel')"),
        ({"scale": "0.5"}, TypeError, "scale must be a number"),
        ({"blocks": ()}, ValueError, "pass None"),
        ({"blocks": [0]}, TypeError, "tuple of int"),
    ],
)
def test_settings_invalid_values(kwargs, error, fragment):
    with pytest.raises(error) as info:
        AdapterSettings(**kwargs)
    assert fragment in str(info.value)


def test_bottleneck_shapes_and_zero_output():
    adapter = BottleneckAdapter(DIM, 16)
    assert adapter.down.weight.shape == (16, DIM)
    assert adapter.up.weight.shape == (DIM, 16)
    tokens = torch.randn(2, 4, 4, DIM)
    output = adapter(tokens)
    assert output.shape == tokens.shape
    assert torch.count_nonzero(output) == 0


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_fresh_adapters_keep_output(placement):
    model = build_model()
    inputs = images()
    with torch.no_grad():
        before = predict(model, inputs)
        apply_adapters(model, AdapterSettings(placement=placement))
        after = predict(model, inputs)
    assert torch.equal(before, after)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_base_key_names_unchanged(placement):
    model = build_model()
    base_keys = set(model.state_dict())
    apply_adapters(model, AdapterSettings(placement=placement, reduction=8))

    keys = set(model.state_dict())
    assert base_keys <= keys
    new_keys = keys - base_keys
    child = "attn_adapter" if placement == "sequential" else "mlp_adapter"
    expected = {
        f"image_encoder.blocks.{index}.{child}.{layer}.{kind}"
        for index in range(DEPTH)
        for layer in ("down", "up")
        for kind in ("weight", "bias")
    }
    assert new_keys == expected
    hidden = DIM // 8
    assert model.state_dict()[f"image_encoder.blocks.0.{child}.down.weight"].shape == (hidden, DIM)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_base_checkpoint_loads_after_apply(placement):
    source = build_model(seed=0)
    model = apply_adapters(build_model(seed=3), AdapterSettings(placement=placement))
    load_base_state_dict(model, source.state_dict())

    inputs = images()
    with torch.no_grad():
        torch.testing.assert_close(predict(model, inputs), predict(source, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_gradient_step_changes_output(placement):
    model = apply_adapters(build_model(), AdapterSettings(placement=placement))
    apply_freezing(model, "adapters")
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    inputs = images()
    with torch.no_grad():
        before = predict(model, inputs)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.binary_cross_entropy_with_logits(predict(model, inputs), target_mask())
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        after = predict(model, inputs)
    assert (after - before).abs().max() > 1e-6
    for name, parameter in model.named_parameters():
        if name in base_before:
            assert torch.equal(parameter, base_before[name]), name


def test_sequential_block_matches_formula():
    """Global-attention block: h = x + a + adapter(a) with a = attn(norm1(x)), out = h + mlp(norm2(h))."""
    model = build_model()
    reference = copy.deepcopy(model.image_encoder.blocks[1])
    apply_adapters(model, AdapterSettings(placement="sequential", blocks=(1,)))
    randomize_adapters(model)
    block = model.image_encoder.blocks[1]
    x = torch.randn(1, 4, 4, DIM, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        attention = reference.attn(reference.norm1(x))
        hidden = x + attention + block.attn_adapter(attention)
        expected = hidden + reference.mlp(reference.norm2(hidden))
        torch.testing.assert_close(block(x), expected)
        assert (block(x) - reference(x)).abs().max() > 1e-4


def test_sequential_windowed_block_matches_formula():
    """Windowed block: the hook receives the attention output still split into windows."""
    model = build_model()
    reference = copy.deepcopy(model.image_encoder.blocks[0])
    window = reference.window_size
    assert window == 8
    apply_adapters(model, AdapterSettings(placement="sequential", blocks=(0,)))
    randomize_adapters(model)
    block = model.image_encoder.blocks[0]
    x = torch.randn(1, 4, 4, DIM, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        # The 4×4 token grid is padded to one 8×8 window before attention.
        windows, padded_size = window_partition(reference.norm1(x), window)
        attention = reference.attn(windows)
        adapted = window_unpartition(attention + block.attn_adapter(attention), window, padded_size, (4, 4))
        hidden = x + adapted
        expected = hidden + reference.mlp(reference.norm2(hidden))
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_parallel_block_matches_formula(scale):
    """h = x + attn(norm1(x)), out = h + mlp(n) + scale * adapter(n) with n = norm2(h)."""
    model = build_model()
    reference = copy.deepcopy(model.image_encoder.blocks[1])
    apply_adapters(model, AdapterSettings(placement="parallel", scale=scale, blocks=(1,)))
    randomize_adapters(model)
    block = model.image_encoder.blocks[1]
    x = torch.randn(1, 4, 4, DIM, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        hidden = x + reference.attn(reference.norm1(x))
        normed = reference.norm2(hidden)
        expected = hidden + reference.mlp(normed) + scale * block.mlp_adapter(normed)
        torch.testing.assert_close(block(x), expected)


def test_selected_blocks_only():
    model = apply_adapters(build_model(), AdapterSettings(blocks=(1,)))
    assert not hasattr(model.image_encoder.blocks[0], "attn_adapter")
    assert isinstance(model.image_encoder.blocks[1].attn_adapter, BottleneckAdapter)


def test_deepcopy_uses_copied_adapters():
    model = apply_adapters(build_model(), AdapterSettings(placement="parallel"))
    copied = copy.deepcopy(model)
    randomize_adapters(copied)
    inputs = images()
    with torch.no_grad():
        original_output = predict(model, inputs)
        assert torch.equal(original_output, predict(build_model(), inputs))
        assert (predict(copied, inputs) - original_output).abs().max() > 1e-6


def test_second_application_raises():
    model = apply_adapters(build_model(), AdapterSettings(blocks=(0,)))
    with pytest.raises(ValueError, match="block 0 already has an adapter"):
        apply_adapters(model, AdapterSettings(placement="parallel"))


def test_reduction_larger_than_dim_raises():
    with pytest.raises(ValueError) as info:
        apply_adapters(build_model(), AdapterSettings(reduction=DIM + 1))
    assert f"at most {DIM}" in str(info.value)


def test_block_index_out_of_range():
    with pytest.raises(ValueError, match="invalid block indices"):
        apply_adapters(build_model(), AdapterSettings(blocks=(DEPTH,)))
