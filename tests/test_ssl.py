"""Self-supervised adaptation (fmadapt pretrain): losses, collapse monitor, data, loop, resume, export."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from fmadapt import cli
from fmadapt.errors import RecipeError
from fmadapt.models.dinov3 import DinoV3Encoder
from fmadapt.train.ssl.config import load_pretrain_recipe, pretrain_recipe_from_dict, resolve_source_roots
from fmadapt.train.ssl.data import (
    MultiCropDataset,
    MultiCropSettings,
    list_image_files,
    load_pretrain_slices,
    normalise_pixels,
)
from fmadapt.train.ssl.losses import DinoLoss, IbotPatchLoss, koleo_loss
from fmadapt.train.ssl.loop import CollapseMonitor, build_student, collapse_metrics, image_entropy, pretrain

from conftest import REPO_ROOT, require_dataset

MODEL = "dinov3_vit_tiny"


# Losses computed by hand.


def test_dino_loss_hand_check():
    # B = 2 images, K = 2 prototypes, 2 global crops and no local crop, so the pairs
    # are (teacher crop 0, student crop 1) and (teacher crop 1, student crop 0).
    loss_fn = DinoLoss(2, student_temperature=1.0, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[0.5, 0.0]]))
    teacher_logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],     # crop 0: image 0, image 1
                                   [[1.5, 0.5], [0.5, 0.5]]])    # crop 1
    student_logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]],
                                   [[0.0, 1.0], [1.0, 3.0]]])
    targets = loss_fn.targets(teacher_logits, temperature=0.5)

    # Centering then sharpening: (t - c) / 0.5, then softmax.
    e = math.e
    p_crop0 = [[e / (e + 1), 1 / (e + 1)],                  # (1 - 0.5, 0 - 0) / 0.5 = (1, 0)
               [1 / (1 + e ** 3), e ** 3 / (1 + e ** 3)]]   # (0 - 0.5, 1 - 0) / 0.5 = (-1, 2)
    p_crop1 = [[e / (e + 1), 1 / (e + 1)],                  # (1.5 - 0.5, 0.5 - 0) / 0.5 = (2, 1)
               [1 / (1 + e), e / (1 + e)]]                  # (0.5 - 0.5, 0.5 - 0) / 0.5 = (0, 1)
    assert torch.allclose(targets, torch.tensor([p_crop0, p_crop1]), atol=1e-6)

    # Student with temperature 1: log q = s - log(sum exp s).
    def log_q(s):
        norm = math.log(sum(math.exp(v) for v in s))
        return [v - norm for v in s]

    def cross_entropy(p, s):
        return -sum(pk * qk for pk, qk in zip(p, log_q(s)))

    students = student_logits.tolist()
    teacher0_student1 = (cross_entropy(p_crop0[0], students[1][0]) + cross_entropy(p_crop0[1], students[1][1])) / 2
    teacher1_student0 = (cross_entropy(p_crop1[0], students[0][0]) + cross_entropy(p_crop1[1], students[0][1])) / 2
    expected = (teacher0_student1 + teacher1_student0) / 2

    assert loss_fn(student_logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_center_update_hand_check():
    loss_fn = DinoLoss(2, student_temperature=0.1, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([1.0, -2.0]))
    assert loss_fn.center[0].tolist() == pytest.approx([0.1, -0.2])
    loss_fn.update_center(torch.tensor([1.0, -2.0]))
    # 0.9 * 0.1 + 0.1 * 1 = 0.19 and 0.9 * -0.2 + 0.1 * -2 = -0.38
    assert loss_fn.center[0].tolist() == pytest.approx([0.19, -0.38])
    assert "center" in loss_fn.state_dict()


def test_ibot_loss_only_masked_patches():
    loss_fn = IbotPatchLoss(2, student_temperature=1.0, center_momentum=0.9)
    student = torch.tensor([[[1.0, 0.0], [5.0, -5.0]]])          # 1 image, N = 2 patches
    targets = torch.tensor([[[0.25, 0.75], [0.0, 1.0]]])
    masks = torch.tensor([[True, False]])
    # Only patch 0 counts: -(0.25 log q0 + 0.75 log q1) with q = softmax(1, 0).
    log_norm = math.log(math.e + 1)
    expected = -(0.25 * (1 - log_norm) + 0.75 * (0 - log_norm))
    assert loss_fn(student, targets, masks).item() == pytest.approx(expected, abs=1e-6)


def test_ibot_loss_without_masks_is_connected_zero():
    loss_fn = IbotPatchLoss(3, student_temperature=0.1, center_momentum=0.9)
    student = torch.randn(2, 4, 3, requires_grad=True)
    loss = loss_fn(student, torch.full((2, 4, 3), 1 / 3), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None


# Collapse monitor.


def test_koleo_loss_hand_check():
    # Unit vectors at 0, 90 and 180 degrees: the nearest neighbour of each end point is
    # the middle one (distance sqrt 2), and the middle one's nearest is also at sqrt 2.
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    expected = -math.log(math.sqrt(2.0))
    assert koleo_loss(features).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_loss_penalises_collapse():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(2, 16, 32, generator=generator)
    collapsed = spread[:, :1].expand(2, 16, 32) + 1e-4 * torch.randn(2, 16, 32, generator=generator)
    assert koleo_loss(collapsed).item() > koleo_loss(spread).item() + 5.0


def test_koleo_loss_gradient_spreads_pair():
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.1]]], requires_grad=True)
    koleo_loss(features).backward()
    # Descending the gradient moves the second vector away from the first (its y grows).
    assert features.grad[0, 1, 1].item() < 0.0


def test_koleo_loss_rejects_single_vector():
    with pytest.raises(ValueError, match="at least 2 vectors"):
        koleo_loss(torch.ones(3, 1, 8))


def test_collapse_fires_on_constant_output():
    monitor = CollapseMonitor(entropy_threshold=0.05, std_threshold=0.02)
    tokens = torch.ones(8, 32)
    probabilities = torch.zeros(8, 16)
    probabilities[:, 3] = 1.0
    entropy, spread = collapse_metrics(probabilities, tokens)
    report = monitor.check(entropy, spread)
    assert entropy == pytest.approx(0.0, abs=1e-6)
    assert spread == pytest.approx(0.0, abs=1e-6)
    assert report.collapsed
    assert len(report.reasons) == 2


def test_collapse_fires_on_uniform_targets():
    # Every image gets the uniform distribution. The batch mean then looks healthy
    # (entropy 1), although no target separates one image from another.
    monitor = CollapseMonitor(entropy_threshold=0.05, std_threshold=0.02, uniform_threshold=0.98)
    probabilities = torch.full((8, 16), 1.0 / 16)
    tokens = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    entropy, spread = collapse_metrics(probabilities, tokens)
    per_image = image_entropy(probabilities)
    report = monitor.check(entropy, spread, per_image)
    assert per_image == pytest.approx(1.0, abs=1e-6)
    assert entropy == pytest.approx(1.0, abs=1e-6)
    assert report.collapsed
    assert report.reasons == [f"per-image teacher entropy {per_image:.4f} > 0.98 (targets are near uniform)"]


def test_image_entropy_hand_check():
    # Each row spreads over two of four prototypes: entropy log 2 of a maximum log 4.
    probabilities = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert image_entropy(probabilities) == pytest.approx(0.5, abs=1e-6)
    assert image_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-6)


def test_collapse_silent_on_random_features():
    generator = torch.Generator().manual_seed(0)
    monitor = CollapseMonitor(entropy_threshold=0.05, std_threshold=0.02)
    tokens = torch.randn(64, 32, generator=generator)
    probabilities = torch.softmax(torch.randn(64, 16, generator=generator), dim=-1)
    entropy, spread = collapse_metrics(probabilities, tokens)
    assert 0.9 < entropy <= 1.0
    assert 0.8 < spread < 1.2
    assert not monitor.check(entropy, spread).collapsed


# Recipe and data.


def _recipe_dict(data_root, **sections):
    recipe = {
        "name": "ssl_test",
        "seed": 3,
        "data": {"sources": [{
            "root": str(require_dataset(data_root, "Dataset001_TotalSegCT")),
            "axis": 2,
            "intensity": {"mode": "ct_window", "window": "soft_tissue"},
        }]},
        "model": {"name": MODEL},
        "crops": {"global_size": 32, "local_size": 16, "local_crops": 2},
        "head": {"hidden_dim": 32, "bottleneck_dim": 16, "prototypes": 64, "patch_prototypes": 64},
        "objective": {"mask_probability": 1.0, "mask_ratio": [0.25, 0.5]},
        "teacher": {"momentum_start": 0.9, "momentum_end": 0.99},
        "train": {"steps": 3, "batch_size": 2, "learning_rate": 0.01, "warmup_steps": 1, "checkpoint_every": 100},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A tiny encoder with LayerScale raised to 0.5, so its features depend on the input."""
    folder = tmp_path_factory.mktemp("base") / "dinov3_tiny"
    torch.manual_seed(11)
    encoder = DinoV3Encoder.from_registry(MODEL)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "layer_scale" in name:
                parameter.fill_(0.5)
    encoder.backbone.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(data_root, base_checkpoint, tmp_path_factory):
    recipe = pretrain_recipe_from_dict(_recipe_dict(data_root, model={"checkpoint": str(base_checkpoint)}))
    result = pretrain(recipe, tmp_path_factory.mktemp("lora") / "run")
    return recipe, result


def test_unknown_recipe_key_suggests_name(data_root):
    data = _recipe_dict(data_root, crops={"local_crop": 2})
    with pytest.raises(RecipeError, match="crops.local_crop.*local_crops"):
        pretrain_recipe_from_dict(data)


def test_recipe_rejects_empty_sources():
    with pytest.raises(RecipeError, match="data.sources"):
        pretrain_recipe_from_dict({"data": {"sources": []}})


def test_crop_size_must_fit_patches():
    with pytest.raises(ValueError, match="global_size 40 px.*patch size 16"):
        MultiCropSettings(
            global_size=40, local_size=16, local_crops=0, global_scale=(0.5, 1.0), local_scale=(0.1, 0.3),
            flip=False, patch_size=16, mask_probability=0.0, mask_ratio=(0.0, 0.0),
        )


def test_shipped_recipe_resolves(data_root, monkeypatch):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    recipe = load_pretrain_recipe(REPO_ROOT / "recipes" / "dinov3_ssl_ct.yaml")
    roots = resolve_source_roots(recipe)
    assert [root.name for root in roots] == [
        "Dataset001_TotalSegCT", "Dataset002_TotalSegMR", "Dataset003_PyRadiomicsBrainMR"]
    assert recipe.model.name == MODEL


def test_image_listing_skips_labels(data_root):
    root = require_dataset(data_root, "Dataset003_PyRadiomicsBrainMR")
    files = list_image_files(root)
    assert [path.name for path in files] == ["brain1_0000.nii.gz", "brain2_0000.nii.gz"]
    assert all(path.parent.name == "imagesTr" for path in files)


def test_image_listing_without_labels_folder(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    from PIL import Image

    Image.fromarray(np.full((20, 30), 128, dtype=np.uint8)).save(tmp_path / "imagesTr" / "a_0000.png")
    assert list_image_files(tmp_path) == [tmp_path / "imagesTr" / "a_0000.png"]


def test_multicrop_items_deterministic(data_root):
    recipe = pretrain_recipe_from_dict(_recipe_dict(data_root))
    slices = load_pretrain_slices(recipe)
    assert all(s.image.shape[2] == 3 and s.image.min() >= 0 and s.image.max() <= 255 for s in slices)
    settings = MultiCropSettings.from_recipe(recipe, patch_size=16)
    spec = DinoV3Encoder.from_registry(MODEL).spec.preprocess
    dataset = MultiCropDataset(slices, settings, spec, length=4, seed=3)

    item = dataset[2]
    assert item["global_crops"].shape == (2, 3, 32, 32)
    assert item["local_crops"].shape == (2, 3, 16, 16)
    assert item["masks"].shape == (2, 4)
    # mask_probability 1 and ratios 0.25–0.5 of 4 patches: 1 or 2 masked patches per crop.
    assert set(item["masks"].sum(dim=1).tolist()) <= {1, 2}
    again = dataset[2]
    assert torch.equal(item["global_crops"], again["global_crops"])
    assert torch.equal(item["masks"], again["masks"])
    assert not torch.equal(item["global_crops"], dataset[3]["global_crops"])


def test_normalise_pixels_imagenet_stats():
    spec = DinoV3Encoder.from_registry(MODEL).spec.preprocess
    pixels = torch.full((1, 3, 2, 2), 255.0)
    # (1.0 - mean) / std per channel for white pixels.
    expected = [(1.0 - 0.485) / 0.229, (1.0 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
    assert normalise_pixels(pixels, spec)[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)


# Training loop, resume and export.


def test_lora_steps_change_adapters_only(lora_run):
    recipe, result = lora_run
    assert result.completed and result.step == 3
    assert all(math.isfinite(record["loss"]) for record in result.history)
    assert [record["step"] for record in result.history] == [1, 2, 3]

    set_seed(recipe.seed)
    initial = build_student(recipe).state_dict()
    trained = result.student.state_dict()
    lora_keys = [key for key in trained if "lora_" in key]
    frozen_keys = [key for key in trained if key.startswith("encoder.") and "lora_" not in key]
    assert lora_keys and frozen_keys
    for key in frozen_keys:
        assert torch.equal(trained[key], initial[key]), key
        assert torch.equal(result.teacher.state_dict()[key], initial[key]), key
    for key in lora_keys:
        assert not torch.equal(trained[key], initial[key]), key
    assert all(not p.requires_grad for name, p in result.student.named_parameters() if name in frozen_keys)


def test_exported_encoder_gives_adapted_features(lora_run, base_checkpoint, data_root):
    recipe, result = lora_run
    weights = load_file(result.encoder_dir / "model.safetensors")
    assert not [key for key in weights if "lora" in key or "base_layer" in key]

    exported = DinoV3Encoder.from_registry(MODEL, checkpoint=result.encoder_dir).eval()
    base = DinoV3Encoder.from_registry(MODEL, checkpoint=base_checkpoint).eval()
    adapted = result.teacher.encoder.eval()
    slices = load_pretrain_slices(recipe)
    image = torch.from_numpy(slices[len(slices) // 2].image[:64, :64]).permute(2, 0, 1)[None]
    images = normalise_pixels(image, exported.spec.preprocess)
    with torch.no_grad():
        expected = adapted(images)
        features = exported(images)
        base_features = base(images)
    assert (features - expected).abs().max().item() < 1e-5
    assert (features - base_features).abs().max().item() > 1e-4


def test_resume_matches_straight_run(data_root, tmp_path):
    recipe = pretrain_recipe_from_dict(_recipe_dict(data_root, train={"steps": 4}))
    straight = pretrain(recipe, tmp_path / "straight")
    first = pretrain(recipe, tmp_path / "resumed", stop_after=2)
    assert (first.step, first.completed, first.stop_reason) == (2, False, None)
    assert not (tmp_path / "resumed" / "encoder").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(recipe, tmp_path / "resumed")
    resumed = pretrain(recipe, tmp_path / "resumed", resume=True)

    assert straight.step == resumed.step == 4
    assert resumed.completed
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], abs=1e-5)
    for network in ("student", "teacher"):
        expected = getattr(straight, network).state_dict()
        for key, value in getattr(resumed, network).state_dict().items():
            assert torch.allclose(value, expected[key], atol=1e-6, rtol=0), f"{network} {key}"


def test_collapse_recorded_and_stops(data_root, tmp_path, caplog):
    data = _recipe_dict(data_root, collapse={"std_threshold": 10.0, "stop": True})
    result = pretrain(pretrain_recipe_from_dict(data), tmp_path / "run")
    assert (result.step, result.completed) == (1, False)
    assert "collapse" in result.stop_reason
    assert "collapse at step 1: feature std" in caplog.text
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["collapse"] and history[0]["feature_std"] < 10.0
    assert not (tmp_path / "run" / "encoder").exists()


def test_cli_pretrain_pauses_and_resumes(data_root, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe_dict(data_root, train={"steps": 2})))
    run = tmp_path / "run"
    assert cli.main(["pretrain", str(recipe_path), "--output", str(run), "--stop-after", "1"]) == 0
    assert (run / "checkpoints" / "step_000001").is_dir()
    assert cli.main(["pretrain", str(recipe_path), "--output", str(run), "--resume"]) == 0
    assert (run / "encoder" / "config.json").is_file()
    assert json.loads((run / "history.json").read_text())[-1]["step"] == 2
