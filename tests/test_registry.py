import pytest
import torch
from segment_anything import sam_model_registry

from fmadapt.data.transforms import MEDSAM_PREPROCESS, SAM_PREPROCESS
from fmadapt.models import ModelSpec, Segmenter, build_sam, get_model_spec, list_models, register_model

SMALL_MODELS = ["sam_vit_tiny", "medsam_vit_tiny", "sam_vit_small"]
OFFICIAL = [("sam_vit_b", "vit_b"), ("sam_vit_l", "vit_l"), ("sam_vit_h", "vit_h"), ("medsam_vit_b", "vit_b")]


def _shapes(module):
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_expected_entries():
    names = list_models()
    for name in ["sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", *SMALL_MODELS]:
        assert name in names
    assert names == sorted(names)


@pytest.mark.parametrize(("name", "reference_key"), OFFICIAL)
def test_official_sizes_match_segment_anything(name, reference_key):
    # Built on the meta device: shapes without allocating 90M-640M parameters.
    with torch.device("meta"):
        reference = sam_model_registry[reference_key]()
        ours = build_sam(get_model_spec(name))
    assert _shapes(ours) == _shapes(reference)


def test_published_numbers():
    expected = {
        "sam_vit_b": (768, 12, 12, (2, 5, 8, 11)),
        "sam_vit_l": (1024, 24, 16, (5, 11, 17, 23)),
        "sam_vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    }
    for name, numbers in expected.items():
        spec = get_model_spec(name)
        got = (spec.encoder_embed_dim, spec.encoder_depth, spec.encoder_num_heads, spec.encoder_global_attn_indexes)
        assert got == numbers, name
        assert spec.native_image_size == 1024
        assert spec.preprocess == SAM_PREPROCESS


def test_medsam_uses_its_preprocessing():
    assert get_model_spec("medsam_vit_b").preprocess == MEDSAM_PREPROCESS
    assert get_model_spec("medsam_vit_tiny").preprocess == MEDSAM_PREPROCESS


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_run(name):
    spec = get_model_spec(name)
    model = Segmenter.from_registry(name, image_size=64)
    embedding = model.encode(torch.zeros(1, 3, 64, 64))
    assert embedding.shape == (1, spec.prompt_embed_dim, 4, 4)
    logits, iou = model.decode_prompts(embedding, boxes=torch.tensor([[4.0, 4.0, 40.0, 40.0]]))
    assert logits.shape == (1, 1, 16, 16)
    assert iou.shape == (1, 1)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError) as caught:
        get_model_spec("sam_vit_bb")
    assert "'sam_vit_b'" in str(caught.value)
    assert "medsam_vit_tiny" in str(caught.value)


def test_register_rejects_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model(get_model_spec("sam_vit_b"))


def test_spec_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelSpec(name="bad", encoder_embed_dim=100, encoder_depth=2, encoder_num_heads=3,
                  encoder_global_attn_indexes=(1,), preprocess=SAM_PREPROCESS)
    with pytest.raises(ValueError, match="outside"):
        ModelSpec(name="bad", encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=3,
                  encoder_global_attn_indexes=(2,), preprocess=SAM_PREPROCESS)


@pytest.mark.parametrize("size", [48, 100, 250])
def test_image_size_rules(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        build_sam(get_model_spec("sam_vit_tiny"), image_size=size)
