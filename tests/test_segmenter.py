import warnings

import pytest
import torch
from tiny_checkpoints import build_reference_sam

from fmadapt.config import recipe_from_dict
from fmadapt.data.transforms import MEDSAM_PREPROCESS, SAM_PREPROCESS, ImageTransform
from fmadapt.errors import FmadaptWarning
from fmadapt.models import Segmenter, get_model_spec, get_segmenter_spec
from fmadapt.runs import build_model

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Segmenter.from_registry("sam_vit_tiny", image_size=SIZE, class_names=("liver", "spleen", "kidney")).eval()


@pytest.fixture(scope="module")
def embedding(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.encode(torch.randn(1, 3, SIZE, SIZE))


def test_attributes(model):
    assert model.image_size == SIZE
    assert model.spec is get_model_spec("sam_vit_tiny")
    assert isinstance(model.transform, ImageTransform)
    assert model.transform.spec == SAM_PREPROCESS
    assert model.transform.image_size == SIZE
    assert model.class_names == ("liver", "spleen", "kidney")
    assert model.class_embeddings.weight.shape == (3, 64)
    assert model.low_res_size == 16


def test_keys_match_segment_anything():
    ours = set(Segmenter.from_registry("sam_vit_tiny").state_dict())
    reference = set(build_reference_sam().state_dict())
    assert ours == reference


def test_no_class_embeddings_without_classes():
    model = Segmenter.from_registry("sam_vit_tiny", image_size=SIZE)
    assert not hasattr(model, "class_embeddings")
    with pytest.raises(ValueError, match="class_names"):
        model.decode_classes(torch.zeros(1, 64, 4, 4))


def test_encode_batch_shape(model):
    with torch.no_grad():
        out = model.encode(torch.zeros(2, 3, SIZE, SIZE))
    assert out.shape == (2, 64, 4, 4)


def test_encode_rejects_wrong_size(model):
    with pytest.raises(ValueError, match="3×64×64"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_encode_keeps_gradients(model):
    images = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
    model.encode(images).sum().backward()
    assert images.grad is not None
    assert model.image_encoder.patch_embed.proj.weight.grad is not None
    model.zero_grad()


def test_many_boxes_one_call(model, embedding):
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0]] * 5) + torch.arange(5.0)[:, None]
    logits, iou = model.decode_prompts(embedding, boxes=boxes, multimask_output=True)
    assert logits.shape == (5, 3, 16, 16)
    assert iou.shape == (5, 3)
    single, _ = model.decode_prompts(embedding, boxes=boxes[2:3], multimask_output=True)
    torch.testing.assert_close(logits[2:3], single, rtol=1e-4, atol=1e-5)


def test_points_and_mask_input(model, embedding):
    points = torch.tensor([[[10.0, 12.0], [40.0, 41.0]]])
    labels = torch.tensor([[1, 0]])
    logits, iou = model.decode_prompts(embedding, points=points, point_labels=labels)
    assert logits.shape == (1, 1, 16, 16)
    again, _ = model.decode_prompts(embedding, points=points, point_labels=labels, mask_input=logits)
    assert again.shape == (1, 1, 16, 16)
    assert not torch.equal(again, logits)


def test_mask_input_shared_across_prompts(model, embedding):
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 60.0, 50.0]])
    logits, _ = model.decode_prompts(embedding, boxes=boxes, mask_input=torch.zeros(1, 1, 16, 16))
    assert logits.shape == (2, 1, 16, 16)


def test_prompt_shape_errors(model, embedding):
    with pytest.raises(ValueError, match="P×4"):
        model.decode_prompts(embedding, boxes=torch.zeros(4))
    with pytest.raises(ValueError, match="together"):
        model.decode_prompts(embedding, points=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="point_labels must have shape"):
        model.decode_prompts(embedding, points=torch.zeros(1, 2, 2), point_labels=torch.ones(1, 3))
    with pytest.raises(ValueError, match="same number"):
        model.decode_prompts(embedding, boxes=torch.zeros(2, 4), points=torch.zeros(3, 1, 2),
                             point_labels=torch.ones(3, 1))
    with pytest.raises(ValueError, match="decode_classes"):
        model.decode_prompts(embedding)
    with pytest.raises(ValueError, match="1×64×4×4"):
        model.decode_prompts(torch.zeros(2, 64, 4, 4), boxes=torch.zeros(1, 4))


def test_decode_classes_shapes(model, embedding):
    logits, iou = model.decode_classes(embedding)
    assert logits.shape == (3, 16, 16)
    assert iou.shape == (3,)
    assert not torch.allclose(logits[0], logits[1])


def test_decode_classes_trains_embeddings(model, embedding):
    logits, _ = model.decode_classes(embedding)
    logits[1].sum().backward()
    grad = model.class_embeddings.weight.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0
    model.zero_grad()


def test_duplicate_class_names_rejected():
    with pytest.raises(ValueError, match="liver"):
        Segmenter.from_registry("sam_vit_tiny", image_size=SIZE, class_names=("liver", "liver"))


def test_preprocess_mismatch_rejected():
    with pytest.raises(ValueError, match="allow_preprocess_mismatch"):
        Segmenter.from_registry("sam_vit_tiny", image_size=SIZE, preprocess=MEDSAM_PREPROCESS)
    with pytest.warns(FmadaptWarning):
        model = Segmenter.from_registry(
            "sam_vit_tiny", image_size=SIZE, preprocess=MEDSAM_PREPROCESS, allow_preprocess_mismatch=True
        )
    assert model.transform.spec == MEDSAM_PREPROCESS


def test_medsam_transform_from_registry():
    model = Segmenter.from_registry("medsam_vit_tiny", image_size=SIZE)
    assert model.transform.spec == MEDSAM_PREPROCESS


def _fmadapt_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [warning for warning in caught if issubclass(warning.category, FmadaptWarning)]


def test_published_model_without_checkpoint_warns():
    (warning,) = _fmadapt_warnings(lambda: Segmenter.from_registry("sam_vit_b", image_size=SIZE))
    message = str(warning.message)
    assert "starts from random weights" in message
    assert f"checkpoint='checkpoints/{get_model_spec('sam_vit_b').checkpoint_file}'" in message
    assert "checkpoint=None" in message
    assert warning.filename == __file__


def test_dinov3_without_checkpoint_names_sources():
    (warning,) = _fmadapt_warnings(lambda: Segmenter.from_registry("dinov3_vits16", image_size=SIZE))
    spec = get_segmenter_spec("dinov3_vits16")
    assert spec.hf_model_id in str(warning.message)
    assert spec.meta_checkpoint_file in str(warning.message)


def test_explicit_none_checkpoint_is_silent():
    assert _fmadapt_warnings(lambda: Segmenter.from_registry("medsam_vit_b", image_size=SIZE, checkpoint=None)) == []


@pytest.mark.parametrize("name", ["sam_vit_tiny", "medsam_vit_tiny", "sam_vit_small", "dinov3_vit_tiny"])
def test_model_without_published_weights_is_silent(name):
    assert _fmadapt_warnings(lambda: Segmenter.from_registry(name, image_size=SIZE)) == []


def test_recipe_without_checkpoint_warns_once():
    recipe = recipe_from_dict(
        {
            "data": {"labels": ["liver"]},
            "model": {"name": "sam_vit_b", "image_size": SIZE},
            "adaptation": {"method": "none", "preset": "decoder"},
        }
    )
    (warning,) = _fmadapt_warnings(lambda: build_model(recipe))
    assert "model.checkpoint is not set" in str(warning.message)
