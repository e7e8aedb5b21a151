"""Train and evaluate both recipes end to end on the real data, on a reduced setting."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmadapt.config import load_recipe
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.inference.label_maps import class_logits_automatic, embed_image, logits_to_label_map
from fmadapt.runs import load_run
from fmadapt.train.loop import train

from conftest import REPO_ROOT, require_dataset
from tiny_checkpoints import save_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

REDUCED = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=2",
]


def run_recipe(name, data_root, tmp_path, monkeypatch, extra=()):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    recipe = load_recipe(REPO_ROOT / "recipes" / name, REDUCED + list(extra))
    return train(recipe, tmp_path / "run")


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def check_evaluation(run_dir, mode, expected_folders, expected_rows):
    results = evaluate_run(run_dir, mode, overrides=["evaluate.max_cases=3"])
    assert [r.folder.name for r in results] == expected_folders
    for result in results:
        rows = read_rows(result.folder / "per_case.csv")
        assert len(rows) == expected_rows
        for row in rows:
            assert math.isfinite(float(row["dice"]))
            assert 0.0 <= float(row["dice"]) <= 1.0
        summary = json.loads((result.folder / "summary.json").read_text())
        assert summary["n_cases"] == 3
        assert not list(run_dir.glob("*.partial"))
    return results


def test_kvasir_recipe_end_to_end(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    result = run_recipe("kvasir_polyp_5shot_lora.yaml", data_root, tmp_path, monkeypatch)
    run_dir = result.run_dir
    for name in ("recipe.yaml", "split.json", "history.json", "trained.safetensors", "trained.json"):
        assert (run_dir / name).is_file(), name
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["cases"]["train"]) == 5
    assert len(split["cases"]["test"]) == 52 - 5 - 2
    history = json.loads((run_dir / "history.json").read_text())
    assert math.isfinite(history[0]["loss"])
    assert "validation_dice_prompted" in history[0]

    check_evaluation(run_dir, "prompted", ["eval_test_prompted_jitter0", "eval_test_prompted_jitter10"], 3)
    (automatic,) = check_evaluation(run_dir, "automatic", ["eval_test_automatic"], 3)
    prediction = nib.load(next((automatic.folder / "predictions").glob("*.nii.gz")))
    assert np.issubdtype(prediction.get_data_dtype(), np.integer)
    assert prediction.ndim == 2


def test_totalseg_recipe_end_to_end(data_root, tmp_path, monkeypatch):
    dataset = require_dataset(data_root, "Dataset001_TotalSegCT")
    result = run_recipe("totalseg_ct_fewshot_lora.yaml", data_root, tmp_path, monkeypatch)
    split = json.loads((result.run_dir / "split.json").read_text())
    assert split["mode"] == "slices"
    train_block, test_block = split["slice_ranges"]["train"], split["slice_ranges"]["test"]
    assert train_block[1] <= test_block[0]

    (automatic,) = evaluate_run(result.run_dir, "automatic")
    rows = read_rows(automatic.folder / "per_case.csv")
    assert [row["class_name"] for row in rows] == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert all(math.isfinite(float(row["dice"])) for row in rows)
    source = nib.load(dataset / "labelsTr" / "ts_ct_full.nii.gz")
    written = nib.load(automatic.folder / "predictions" / "ts_ct_full.nii.gz")
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine)
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    values = set(np.unique(np.asarray(written.dataobj)).tolist())
    assert values <= {0, 5, 1, 2, 3}

    prompted = evaluate_run(result.run_dir, "prompted")
    assert [r.folder.name for r in prompted] == ["eval_test_prompted_jitter0", "eval_test_prompted_jitter5"]


def test_saved_parameters_reproduce_trained_model(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    result = run_recipe("kvasir_polyp_5shot_lora.yaml", data_root, tmp_path, monkeypatch, ["train.steps_per_epoch=1"])
    trained = result.model.eval()
    saved = set(load_file(str(result.run_dir / "trained.safetensors")))
    requires_grad = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert saved == requires_grad

    _, reloaded = load_run(result.run_dir)
    image = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3)).astype(np.uint8)
    with torch.no_grad():
        first = embed_image(trained, image)
        second = embed_image(reloaded, image)
        assert torch.max(torch.abs(first - second)).item() < 1e-6
        low_first, _ = trained.decode_classes(first)
        low_second, _ = reloaded.decode_classes(second)
        assert torch.max(torch.abs(low_first - low_second)).item() < 1e-6
    assert torch.equal(class_logits_automatic(trained, first, (90, 130)), class_logits_automatic(reloaded, second, (90, 130)))


def test_recipe_with_named_checkpoint(data_root, tmp_path, monkeypatch):
    """A registry model with an official-format checkpoint file (saved at 256 px, run at 128 px)."""
    require_dataset(data_root, "Dataset001_TotalSegCT")
    checkpoint = save_tiny_checkpoint(tmp_path / "sam_tiny_official.pth", "sam_vit_tiny", seed=3)
    result = run_recipe(
        "totalseg_ct_fewshot_lora.yaml", data_root, tmp_path, monkeypatch, [f"model.checkpoint={checkpoint}"]
    )
    reference = torch.load(checkpoint, weights_only=True)
    loaded = result.model.state_dict()
    # Frozen prompt-encoder weights come straight from the file; LoRA wraps the qkv weights.
    name = "prompt_encoder.point_embeddings.0.weight"
    assert torch.equal(loaded[name], reference[name])
    assert torch.equal(loaded["image_encoder.blocks.0.attn.qkv.base_layer.weight"], reference["image_encoder.blocks.0.attn.qkv.weight"])
    assert loaded["image_encoder.pos_embed"].shape[1:3] == (8, 8)

    _, reloaded = load_run(result.run_dir)
    assert torch.equal(reloaded.state_dict()[name], reference[name])
