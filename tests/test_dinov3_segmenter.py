"""Segmenter on a tiny DINOv3 encoder: prompt neck, SAM decoder, semantic head, adaptation, runs."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from tiny_checkpoints import build_reference_sam, save_tiny_checkpoint

from fmadapt import cli
from fmadapt.adapt import (
    FREEZING_PRESETS,
    AdapterSettings,
    BottleneckAdapter,
    LoraSettings,
    apply_adapters,
    apply_freezing,
    apply_lora,
    load_trained_parameters,
    save_trained_parameters,
    summarize_parameters,
)
from fmadapt.config import load_recipe
from fmadapt.errors import CheckpointError, RecipeError
from fmadapt.inference import Predictor
from fmadapt.models.dinov3 import DINOV3_PREPROCESS, DinoV3Encoder, get_dinov3_spec
from fmadapt.models.encoders import LORA_TARGET_NAMES
from fmadapt.models.heads import default_head_layers
from fmadapt.models.segmenter import Segmenter, get_segmenter_spec
from fmadapt.runs import build_model, load_run

from conftest import REPO_ROOT, require_dataset

SIZE = 64
CLASSES = ("liver", "spleen", "kidney")
# dinov3_vit_tiny: 3 blocks of 64 channels; its decoder has sam_vit_tiny's sizes (D = 64).
DEPTH = 3
DIM = 64
DECODER_DIM = 64
BLOCKS_PATH = "image_encoder.backbone.model.layer"


def build_dinov3(seed: int = 0, class_names=CLASSES, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter.from_registry("dinov3_vit_tiny", image_size=SIZE, class_names=class_names, **kwargs).eval()


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def outputs(model: Segmenter, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Embedding, box-prompted logits and automatic logits of the first image."""
    embedding = model.encode(inputs[:1])
    prompted, _ = model.decode_prompts(embedding, boxes=torch.tensor([[6.0, 8.0, 40.0, 50.0]]))
    automatic, scores = model.decode_classes(embedding)
    return [embedding, prompted, automatic, scores]


@pytest.fixture(scope="module")
def model():
    return build_dinov3()


@pytest.fixture(scope="module")
def embedding(model):
    with torch.no_grad():
        return model.encode(images(1))


def test_spec_lookup_covers_both_registries():
    assert get_segmenter_spec("dinov3_vit_tiny") is get_dinov3_spec("dinov3_vit_tiny")
    assert get_segmenter_spec("sam_vit_tiny").family == "sam"
    with pytest.raises(ValueError, match="Did you mean 'dinov3_vit_tiny'"):
        get_segmenter_spec("dinov3_vit_tiyn")


def test_default_head_layers_by_hand():
    assert default_head_layers(12) == (2, 5, 8, 11)
    assert default_head_layers(24) == (5, 11, 17, 23)
    assert default_head_layers(3) == (0, 1, 2)
    assert default_head_layers(1) == (0,)


def test_attributes(model):
    assert model.is_dinov3
    assert isinstance(model.image_encoder, DinoV3Encoder)
    assert model.encoder is model.image_encoder
    assert model.transform.spec == DINOV3_PREPROCESS
    assert model.decoder_model == "sam_vit_tiny"
    assert model.prompt_embed_dim == DECODER_DIM
    assert model.head_layers == (0, 1, 2)
    assert model.embedding_channels == DECODER_DIM + 3 * DIM
    assert model.low_res_size == SIZE // 4
    assert not hasattr(model, "class_embeddings")


def test_embedding_layout(model):
    inputs = images(2)
    with torch.no_grad():
        embedding = model.encode(inputs)
        maps = model.image_encoder.intermediate_maps(inputs, [0, 1, 2])
        neck = model.neck(maps[-1])
    assert embedding.shape == (2, DECODER_DIM + 3 * DIM, 4, 4)
    torch.testing.assert_close(embedding[:, :DECODER_DIM], neck, rtol=0, atol=0)
    for index, feature in enumerate(maps):
        start = DECODER_DIM + index * DIM
        torch.testing.assert_close(embedding[:, start : start + DIM], feature, rtol=0, atol=0)


def test_box_prompts_shape(model, embedding):
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 12.0, 60.0, 50.0]])
    logits, iou = model.decode_prompts(embedding, boxes=boxes, multimask_output=True)
    assert logits.shape == (2, 3, 16, 16)
    assert iou.shape == (2, 3)
    single, _ = model.decode_prompts(embedding, boxes=boxes[1:], multimask_output=True)
    torch.testing.assert_close(logits[1:], single, rtol=1e-4, atol=1e-5)


def test_point_and_mask_prompts_shape(model, embedding):
    points = torch.tensor([[[10.0, 12.0], [40.0, 41.0]]])
    labels = torch.tensor([[1, 0]])
    logits, iou = model.decode_prompts(embedding, points=points, point_labels=labels)
    assert logits.shape == (1, 1, 16, 16)
    assert iou.shape == (1, 1)
    refined, _ = model.decode_prompts(embedding, points=points, point_labels=labels, mask_input=logits)
    assert refined.shape == (1, 1, 16, 16)
    assert not torch.equal(refined, logits)
    mask_only, _ = model.decode_prompts(embedding, mask_input=logits, multimask_output=True)
    assert mask_only.shape == (1, 3, 16, 16)


def test_decode_classes_uses_semantic_head(model, embedding):
    logits, scores = model.decode_classes(embedding)
    assert logits.shape == (3, 16, 16)
    assert scores.shape == (3,)
    maps = list(embedding[:, DECODER_DIM:].split(DIM, dim=1))
    expected_logits, expected_scores = model.semantic_head(maps)
    torch.testing.assert_close(logits, expected_logits[0], rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores[0], rtol=0, atol=0)


def test_decode_classes_trains_head_and_encoder():
    model = build_dinov3()
    logits, scores = model.decode_classes(model.encode(images(1)))
    (logits.sum() + scores.sum()).backward()
    assert model.semantic_head.classifier.weight.grad.abs().sum() > 0
    assert model.image_encoder.backbone.embeddings.patch_embeddings.weight.grad.abs().sum() > 0
    # The prompt neck is in the graph through the embedding but does not affect the classes.
    assert torch.count_nonzero(model.neck.project.weight.grad) == 0


def test_embedding_shape_checked(model):
    with pytest.raises(ValueError, match=f"1×{DECODER_DIM + 3 * DIM}×4×4"):
        model.decode_classes(torch.zeros(1, DECODER_DIM, 4, 4))


def test_no_semantic_head_without_classes():
    model = build_dinov3(class_names=())
    assert not hasattr(model, "semantic_head")
    assert model.embedding_channels == DECODER_DIM
    with torch.no_grad():
        assert model.encode(images(1)).shape == (1, DECODER_DIM, 4, 4)
    with pytest.raises(ValueError, match="head_layers needs class_names"):
        build_dinov3(class_names=(), head_layers=(1,))


def test_custom_head_layers():
    model = build_dinov3(head_layers=(-1, 0))
    assert model.head_layers == (2, 0)
    assert model.semantic_head.num_layers == 2
    with pytest.raises(ValueError, match="repeats"):
        build_dinov3(head_layers=(2, -1))


def test_dinov3_options_rejected_for_sam():
    with pytest.raises(ValueError, match="only to DINOv3"):
        Segmenter.from_registry("sam_vit_tiny", image_size=SIZE, decoder_model="sam_vit_b")


def test_predictor_non_square_image(model):
    image = np.random.default_rng(0).integers(0, 256, size=(50, 90, 3)).astype(np.uint8)
    predictor = Predictor(model)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(box=np.array([10, 5, 70, 40]))
    assert masks.shape == (3, 50, 90)
    assert masks.dtype == bool
    assert scores.shape == (3,)
    assert low_res.shape == (3, 16, 16)
    masks, _, _ = predictor.predict(
        points=np.array([[[20, 20]], [[60, 30]]]), point_labels=np.array([[1], [1]]), multimask_output=False
    )
    assert masks.shape == (2, 1, 50, 90)


def test_decoder_loads_from_sam_checkpoint(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth", "sam_vit_tiny", image_size=SIZE, seed=4)
    reference = build_reference_sam("sam_vit_tiny", image_size=SIZE, seed=4).state_dict()
    model = build_dinov3(decoder_checkpoint=path)
    decoder_keys = [key for key in model.state_dict() if key.startswith(("prompt_encoder.", "mask_decoder."))]
    assert len(decoder_keys) > 0
    state = model.state_dict()
    for key in decoder_keys:
        assert torch.equal(state[key], reference[key]), key
    fresh = build_dinov3()
    assert not torch.equal(fresh.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    assert torch.equal(fresh.neck.project.weight, model.neck.project.weight)


def test_decoder_checkpoint_width_mismatch(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth", "sam_vit_tiny", image_size=SIZE)
    with pytest.raises(CheckpointError, match="prompt_embed_dim 64, but this model's decoder uses 128"):
        build_dinov3(decoder_model="sam_vit_small", decoder_checkpoint=path)


def test_decoder_checkpoint_without_decoder_keys(tmp_path):
    path = tmp_path / "encoder_only.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 96)}, path)
    with pytest.raises(CheckpointError, match="no prompt_encoder"):
        build_dinov3(decoder_checkpoint=path)


def test_declared_lora_targets_match_encoders():
    for name in ("dinov3_vit_tiny", "dinov3_vitplus_tiny"):
        declared = set(DinoV3Encoder(get_dinov3_spec(name)).lora_targets)
        assert declared <= set(LORA_TARGET_NAMES["dinov3"]), name
    assert "gate" in DinoV3Encoder(get_dinov3_spec("dinov3_vitplus_tiny")).lora_targets


def test_lora_on_declared_targets():
    model = build_dinov3()
    inputs = images()
    with torch.no_grad():
        before = outputs(model, inputs)
    apply_lora(model, LoraSettings(rank=2, target_modules=("q", "v"), blocks=(0, 2)))
    with torch.no_grad():
        after = outputs(model, inputs)

    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == {
        f"{BLOCKS_PATH}.{block}.attention.{layer}" for block in (0, 2) for layer in ("q_proj", "v_proj")
    }
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert lora == 2 * 2 * 2 * (DIM + DIM)  # blocks × layers × rank × (in + out)
    for first, second in zip(before, after):
        assert torch.equal(first, second)


def test_lora_rejects_other_family_target():
    with pytest.raises(ValueError) as info:
        apply_lora(build_dinov3(), LoraSettings(target_modules=("qkv",)))
    assert "['qkv']" in str(info.value)
    assert "'q'" in str(info.value)


@pytest.mark.parametrize(("placement", "child", "target"), [
    ("sequential", "attn_adapter", "attention.o_proj"),
    ("parallel", "mlp_adapter", "mlp"),
])
def test_adapters_on_declared_targets(placement, child, target):
    model = build_dinov3()
    inputs = images()
    with torch.no_grad():
        before = outputs(model, inputs)
        apply_adapters(model, AdapterSettings(placement=placement, reduction=8, scale=0.5))
        after = outputs(model, inputs)
    for first, second in zip(before, after):
        assert torch.equal(first, second)

    block = model.image_encoder.blocks[1]
    adapter = getattr(block, child)
    assert isinstance(adapter, BottleneckAdapter)
    assert adapter.down.weight.shape == (DIM // 8, DIM)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        tokens = torch.randn(1, 5, DIM, generator=generator)
        hooked = block.get_submodule(target)(tokens)
        handles = dict(block.get_submodule(target)._forward_hooks)
        block.get_submodule(target)._forward_hooks.clear()
        plain = block.get_submodule(target)(tokens)
        block.get_submodule(target)._forward_hooks.update(handles)
    expected = plain + adapter(plain) if placement == "sequential" else plain + 0.5 * adapter(tokens)
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, plain)


@pytest.mark.parametrize("preset", sorted(FREEZING_PRESETS))
def test_freezing_presets(preset):
    model = build_dinov3()
    apply_lora(model, LoraSettings(rank=2, target_modules=("q", "v")))
    apply_freezing(model, preset)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}
    lora_trained = {p.requires_grad for name, p in model.named_parameters() if ".lora_" in name}

    expected = {"neck", "semantic_head"}
    if "decoder" in preset or preset == "full":
        expected.add("mask_decoder")
    if "prompt" in preset or preset == "full":
        expected.add("prompt_encoder")
    if preset == "full":
        expected.add("image_encoder")
    assert trained == expected
    assert lora_trained == {preset.startswith("adapters") or preset == "full"}


def test_summary_lists_dinov3_parts():
    model = build_dinov3()
    apply_freezing(model, "decoder")
    summary = summarize_parameters(model)
    neck_total = sum(p.numel() for p in model.neck.parameters())
    head_total = sum(p.numel() for p in model.semantic_head.parameters())
    assert summary.by_part["neck"] == (neck_total, neck_total)
    assert summary.by_part["semantic_head"] == (head_total, head_total)
    rows = [line.split()[0] for line in str(summary).splitlines()[1:]]
    assert rows == [
        "image_encoder", "adapters", "neck", "prompt_encoder", "mask_decoder",
        "class_embeddings", "semantic_head", "other", "all",
    ]


def adapted(seed: int) -> Segmenter:
    model = build_dinov3(seed=seed)
    apply_lora(model, LoraSettings(rank=2, target_modules=("q", "proj")))
    apply_adapters(model, AdapterSettings(placement="parallel", blocks=(1,)))
    apply_freezing(model, "adapters_decoder")
    return model


def test_trained_file_round_trip(tmp_path):
    trained = adapted(seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    save_trained_parameters(trained, tmp_path / "run", config={"model": "dinov3_vit_tiny"})

    restored = adapted(seed=0)
    load_trained_parameters(restored, tmp_path / "run")
    inputs = images()
    with torch.no_grad():
        for first, second in zip(outputs(trained, inputs), outputs(restored, inputs)):
            assert torch.max(torch.abs(first - second)).item() < 1e-6
        unloaded = outputs(adapted(seed=0), inputs)
    assert not torch.allclose(unloaded[2], outputs(trained, inputs)[2].detach())


def kvasir_recipe(monkeypatch, data_root, extra=()):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    overrides = ["model.name=dinov3_vit_tiny", "model.image_size=64", *extra]
    return load_recipe(REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml", overrides)


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_recipe_lora_targets_checked(monkeypatch, tmp_path):
    recipe = kvasir_recipe(monkeypatch, tmp_path)
    with pytest.raises(RecipeError) as info:
        build_model(recipe)
    message = str(info.value)
    assert "adaptation.lora.target_modules" in message
    assert "['qkv']" in message
    assert "'v'" in message


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_recipe_adapters_on_dinov3(monkeypatch, tmp_path):
    recipe = kvasir_recipe(monkeypatch, tmp_path, ["adaptation.method=adapters"])
    model = build_model(recipe)
    adapters = [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]
    assert adapters == [f"{BLOCKS_PATH}.{block}.attn_adapter" for block in range(DEPTH)]
    assert all(p.requires_grad for name, p in model.named_parameters() if "attn_adapter" in name)


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_train_and_evaluate_commands(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    run_dir = tmp_path / "run"
    recipe = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
    overrides = [
        "model.name=dinov3_vit_tiny",
        "model.image_size=64",
        "adaptation.lora.target_modules=[q,v]",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.batch_size=1",
        "train.max_validation_slices=2",
    ]
    assert cli.main(["train", str(recipe), "--output", str(run_dir), *overrides]) == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert math.isfinite(history[0]["loss"])
    assert math.isfinite(history[0]["validation_dice_automatic"])

    for mode, folder in (("prompted", "eval_test_prompted_jitter0"), ("automatic", "eval_test_automatic")):
        assert cli.main(["evaluate", str(run_dir), "--mode", mode, "evaluate.max_cases=2"]) == 0
        rows = read_rows(run_dir / folder / "per_case.csv")
        assert len(rows) == 2
        for row in rows:
            assert 0.0 <= float(row["dice"]) <= 1.0
        summary = json.loads((run_dir / folder / "summary.json").read_text())
        assert summary["n_cases"] == 2
        assert math.isfinite(summary["overall"]["dice"]["mean"])

    _, reloaded = load_run(run_dir)
    assert reloaded.is_dinov3
    assert any(isinstance(module, LoraLayer) for module in reloaded.modules())
