"""DINOv3 from self-supervised adaptation to few-shot training and evaluation, on real CT slices."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from fmadapt import cli
from fmadapt.config import load_recipe
from fmadapt.errors import RecipeError
from fmadapt.runs import build_model, load_run
from fmadapt.train.ssl.config import load_pretrain_recipe
from fmadapt.train.ssl.loop import ENCODER_FOLDER

from conftest import REPO_ROOT, require_dataset
from tiny_checkpoints import build_reference_sam, save_tiny_checkpoint

CT_RECIPE = REPO_ROOT / "recipes" / "dinov3_fewshot_ct.yaml"
KVASIR_RECIPE = REPO_ROOT / "recipes" / "dinov3_fewshot_kvasir.yaml"
SSL_RECIPE = REPO_ROOT / "recipes" / "dinov3_ssl_ct.yaml"
ENCODER_PREFIX = "image_encoder.backbone."
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")

# Tiny few-shot settings: 64 px inputs, one epoch of two single-image steps.
TINY_FEWSHOT = [
    "model.image_size=64",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=2",
]


def tiny_pretrain_overrides(dataset):
    """Overrides that cut recipes/dinov3_ssl_ct.yaml to two steps on the CT images only."""
    source = f"{{root: {dataset}, axis: 2, intensity: {{mode: ct_window, window: soft_tissue}}}}"
    return [
        f"data.sources=[{source}]",
        "seed=5",
        "crops.global_size=32",
        "crops.local_size=16",
        "crops.local_crops=2",
        "head.hidden_dim=32",
        "head.bottleneck_dim=16",
        "head.prototypes=64",
        "head.patch_prototypes=64",
        "train.steps=2",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=100",
    ]


def encoder_weights(model):
    """Encoder base weights under the names of the exported file (LoRA layers left out)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(ENCODER_PREFIX) or ".lora_" in name:
            continue
        name = name[len(ENCODER_PREFIX):].replace(".base_layer.", ".")
        # transformers 5 keeps the blocks under model.layer; the file names them layer.N.
        weights[name.removeprefix("model.")] = tensor
    return weights


@pytest.fixture(scope="module")
def ssl_encoder(data_root, tmp_path_factory):
    """Encoder folder written by `fmadapt pretrain` after two steps on real CT slices."""
    dataset = require_dataset(data_root, "Dataset001_TotalSegCT")
    run_dir = tmp_path_factory.mktemp("pretrain") / "ssl"
    arguments = ["pretrain", str(SSL_RECIPE), "--output", str(run_dir), *tiny_pretrain_overrides(dataset)]
    assert cli.main(arguments) == 0
    return run_dir / ENCODER_FOLDER


@pytest.fixture
def ct_data(data_root, monkeypatch):
    require_dataset(data_root, "Dataset001_TotalSegCT")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    return data_root


@pytest.fixture(scope="module")
def fewshot_run(data_root, ssl_encoder, tmp_path_factory):
    """`fmadapt train` on the CT recipe, starting from the pretrained encoder folder."""
    run_dir = tmp_path_factory.mktemp("fewshot") / "run"
    overrides = [f"model.checkpoint={ssl_encoder}", *TINY_FEWSHOT]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        assert cli.main(["train", str(CT_RECIPE), "--output", str(run_dir), *overrides]) == 0
    return run_dir


def test_recipe_loads_pretrained_encoder(ct_data, ssl_encoder):
    exported = load_file(str(ssl_encoder / "model.safetensors"))
    recipe = load_recipe(CT_RECIPE, [f"model.checkpoint={ssl_encoder}", *TINY_FEWSHOT])
    loaded = encoder_weights(build_model(recipe))
    assert sorted(loaded) == sorted(exported)
    for name, tensor in exported.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_random_start_differs_from_pretrained(ct_data, ssl_encoder):
    exported = load_file(str(ssl_encoder / "model.safetensors"))
    recipe = load_recipe(CT_RECIPE, ["model.checkpoint=null", *TINY_FEWSHOT])
    random_start = encoder_weights(build_model(recipe))
    name = "layer.0.attention.q_proj.weight"
    assert not torch.equal(random_start[name], exported[name])


def test_trained_run_keeps_pretrained_base(fewshot_run, ssl_encoder):
    exported = load_file(str(ssl_encoder / "model.safetensors"))
    recipe, model = load_run(fewshot_run)
    assert recipe.model.checkpoint == str(ssl_encoder)
    # adapters_decoder trains LoRA on q and v but freezes every encoder base weight.
    loaded = encoder_weights(model)
    for name, tensor in exported.items():
        assert torch.equal(loaded[name], tensor), name
    lora = [name for name in model.state_dict() if ".lora_B." in name]
    assert any(model.state_dict()[name].abs().sum() > 0 for name in lora)


@pytest.mark.parametrize("mode, folders", [
    ("prompted", ["eval_test_prompted_jitter0", "eval_test_prompted_jitter5"]),
    ("automatic", ["eval_test_automatic"]),
])
def test_pretrained_run_evaluates(fewshot_run, data_root, monkeypatch, mode, folders):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    assert cli.main(["evaluate", str(fewshot_run), "--mode", mode]) == 0
    for folder in folders:
        summary = json.loads((fewshot_run / folder / "summary.json").read_text())
        assert summary["n_cases"] == 1
        dice = summary["overall"]["dice"]["mean"]
        assert math.isfinite(dice)
        assert 0.0 <= dice <= 1.0
        for name in ("liver", "spleen", "kidney_right", "kidney_left"):
            assert math.isfinite(summary["per_class"][name]["dice"]["mean"]), name


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_decoder_checkpoint_sets_decoder(ct_data, tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth", "sam_vit_tiny", image_size=64, seed=7)
    reference = build_reference_sam("sam_vit_tiny", image_size=64, seed=7).state_dict()
    overrides = ["model.checkpoint=null", f"model.decoder_checkpoint={path}", *TINY_FEWSHOT]
    model = build_model(load_recipe(CT_RECIPE, overrides))
    state = model.state_dict()
    decoder_keys = [name for name in state if name.startswith(DECODER_PREFIXES)]
    assert len(decoder_keys) > 20
    for name in decoder_keys:
        assert torch.equal(state[name], reference[name]), name

    without = build_model(load_recipe(CT_RECIPE, ["model.checkpoint=null", *TINY_FEWSHOT]))
    name = "mask_decoder.iou_token.weight"
    assert not torch.equal(without.state_dict()[name], reference[name])


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_decoder_checkpoint_kept_by_run(ct_data, tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth", "sam_vit_tiny", image_size=64, seed=7)
    reference = build_reference_sam("sam_vit_tiny", image_size=64, seed=7).state_dict()
    overrides = ["model.checkpoint=null", f"model.decoder_checkpoint={path}", *TINY_FEWSHOT]
    assert cli.main(["train", str(CT_RECIPE), "--output", str(tmp_path / "run"), *overrides]) == 0

    recipe, model = load_run(tmp_path / "run")
    assert recipe.model.decoder_checkpoint == str(path)
    # The prompt encoder is frozen under adapters_decoder, so it still contains the file's weights.
    state = model.state_dict()
    for name in state:
        if name.startswith("prompt_encoder."):
            assert torch.equal(state[name], reference[name]), name


def test_missing_encoder_folder_named(ct_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(CT_RECIPE, TINY_FEWSHOT)
    with pytest.raises(FileNotFoundError) as info:
        build_model(recipe)
    message = str(info.value)
    assert "model.checkpoint" in message
    assert str(tmp_path / "runs" / "dinov3_ssl_ct" / "encoder") in message
    assert "fmadapt pretrain recipes/dinov3_ssl_ct.yaml" in message


def test_missing_encoder_folder_stops_train(data_root, tmp_path, monkeypatch, caplog):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    arguments = ["train", str(KVASIR_RECIPE), "--output", str(tmp_path / "run"), *TINY_FEWSHOT]
    with caplog.at_level(logging.ERROR, logger="fmadapt"):
        assert cli.main(arguments) == 2
    assert "model.checkpoint" in caplog.text
    assert str(tmp_path / "runs" / "dinov3_ssl_ct" / "encoder") in caplog.text
    assert not (tmp_path / "run" / "trained.safetensors").exists()


def test_missing_decoder_checkpoint_named(ct_data, tmp_path):
    missing = tmp_path / "absent_sam.pth"
    recipe = load_recipe(CT_RECIPE, ["model.checkpoint=null", f"model.decoder_checkpoint={missing}"])
    with pytest.raises(FileNotFoundError) as info:
        build_model(recipe)
    assert "model.decoder_checkpoint" in str(info.value)
    assert str(missing) in str(info.value)


@pytest.mark.filterwarnings("ignore:model.checkpoint is not set")
def test_sam_lora_targets_rejected_for_dinov3(ct_data):
    recipe = load_recipe(CT_RECIPE, ["model.checkpoint=null", "adaptation.lora.target_modules=[qkv]"])
    with pytest.raises(RecipeError) as info:
        build_model(recipe)
    message = str(info.value)
    assert "['qkv']" in message
    assert "SAM-family" in message
    assert "adaptation.lora.target_modules=[q, v]" in message


def test_dinov3_recipes_point_at_pretrain_output(monkeypatch, tmp_path):
    monkeypatch.setenv("FMADAPT_DATA", str(tmp_path))
    pretrain = load_pretrain_recipe(SSL_RECIPE)
    encoder_folder = f"{pretrain.output_dir}/{pretrain.name}/{ENCODER_FOLDER}"
    for path in (CT_RECIPE, KVASIR_RECIPE):
        recipe = load_recipe(path)
        assert recipe.model.name == pretrain.model.name, path.name
        assert recipe.model.checkpoint == encoder_folder, path.name
        assert recipe.adaptation.lora.target_modules == ["q", "v"], path.name


def test_ct_recipe_split_matches_sam_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("FMADAPT_DATA", str(tmp_path))
    dinov3 = load_recipe(CT_RECIPE)
    sam = load_recipe(REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml")
    assert dinov3.data == sam.data
    assert dinov3.data.labels == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert dinov3.evaluate == sam.evaluate


def _largest_training_slices(recipe, count):
    """The ``count`` training slices of the recipe's split with the most labelled pixels."""
    from fmadapt.config import resolve_data_root
    from fmadapt.data.datasets import read_dataset
    from fmadapt.train.loop import plan_split
    from fmadapt.train.samples import class_ids, training_slices

    info = read_dataset(resolve_data_root(recipe))
    label_ids = list(class_ids(info, recipe).values())
    samples = training_slices(info, plan_split(info, recipe, label_ids), recipe, label_ids)
    samples.sort(key=lambda sample: -int((sample.label > 0).sum()))
    return samples[:count], len(label_ids)


def _hard_dice(logits, targets):
    predicted = (logits > 0).float()
    return float(2 * (predicted * targets).sum() / (predicted.sum() + targets.sum()))


def test_dinov3_path_fits_two_slices(ct_data):
    """Both heads of a random-start DINOv3 model can fit two real CT slices.

    A path that cannot fit its own training images (a wrong neck, a detached head or
    targets at the wrong size) fails here. Held-out Dice from random weights is too low
    to separate such a bug from an untrained encoder.
    """
    from fmadapt.train.dataset import PromptedSliceDataset
    from fmadapt.train.objective import FewShotObjective

    recipe = load_recipe(CT_RECIPE, ["model.checkpoint=null", "adaptation.preset=full"])
    samples, num_classes = _largest_training_slices(recipe, 2)
    torch.manual_seed(0)
    model = build_model(recipe)
    dataset = PromptedSliceDataset(samples, model.transform, num_classes, box_jitter=0, seed=0)
    batch = {key: torch.stack([dataset[i][key] for i in range(len(dataset))]) for key in dataset[0]}
    objective = FewShotObjective(model, ["prompted", "automatic"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(200):
        losses = objective(batch["images"], batch["targets"], batch["boxes"], batch["present"])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    with torch.no_grad():
        embeddings = model.encode(batch["images"])
        for index in range(len(samples)):
            present = batch["present"][index].nonzero().squeeze(1)
            targets = batch["targets"][index]
            prompted, _ = model.decode_prompts(
                embeddings[index : index + 1], boxes=batch["boxes"][index, present], multimask_output=False
            )
            automatic, _ = model.decode_classes(embeddings[index : index + 1])
            assert _hard_dice(prompted[:, 0], targets[present]) > 0.9
            assert _hard_dice(automatic, targets) > 0.7
