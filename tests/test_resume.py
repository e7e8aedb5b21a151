"""Epoch checkpoints: an interrupted run resumes to the same parameters as an uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file

import fmadapt.train.loop as loop
from fmadapt.config import load_recipe
from fmadapt.errors import RecipeError
from fmadapt.train.checkpointing import CHECKPOINT_DIR, find_checkpoint

from conftest import REPO_ROOT, require_dataset

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

SETTINGS = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=1",
    "train.warmup_steps=1",
]


def recipe(data_root, monkeypatch):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    return load_recipe(REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml", SETTINGS)


def test_resume_matches_uninterrupted_run(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "Dataset001_TotalSegCT")
    straight = loop.train(recipe(data_root, monkeypatch), tmp_path / "straight")
    expected = load_file(str(straight.run_dir / "trained.safetensors"))
    assert find_checkpoint(straight.run_dir) is None

    original_epoch = loop._train_epoch

    def killed_in_second_epoch(accelerator, objective, optimizer, scheduler, loader, epoch, settings):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill during epoch 2")
        return original_epoch(accelerator, objective, optimizer, scheduler, loader, epoch, settings)

    monkeypatch.setattr(loop, "_train_epoch", killed_in_second_epoch)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe(data_root, monkeypatch), interrupted)
    assert (interrupted / CHECKPOINT_DIR).is_dir()
    assert not (interrupted / "trained.safetensors").exists()

    with pytest.raises(FileExistsError, match="--resume"):
        loop.train(recipe(data_root, monkeypatch), interrupted)

    monkeypatch.setattr(loop, "_train_epoch", original_epoch)
    changed = recipe(data_root, monkeypatch)
    changed.train.learning_rate = 0.5
    with pytest.raises(RecipeError, match="recipe differs"):
        loop.train(changed, interrupted, resume=True)

    resumed = loop.train(recipe(data_root, monkeypatch), interrupted, resume=True)
    assert [record["epoch"] for record in resumed.history] == [1, 2]
    assert resumed.history[1]["learning_rate"] == pytest.approx(straight.history[1]["learning_rate"])
    actual = load_file(str(interrupted / "trained.safetensors"))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=1e-6), name


def test_resume_without_checkpoint_rejected(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "Dataset001_TotalSegCT")
    original_epoch = loop._train_epoch

    def killed(accelerator, objective, optimizer, scheduler, loader, epoch, settings):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "_train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe(data_root, monkeypatch), tmp_path / "run")
    monkeypatch.setattr(loop, "_train_epoch", original_epoch)
    # Killed before the first checkpoint: nothing to resume.
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        loop.train(recipe(data_root, monkeypatch), tmp_path / "run", resume=True)


def test_checkpoint_swap_keeps_previous_on_failure(tmp_path):
    from fmadapt.train.checkpointing import PROGRESS_FILE

    complete = tmp_path / (CHECKPOINT_DIR + ".old")
    complete.mkdir()
    (complete / PROGRESS_FILE).write_text('{"epochs_done": 1, "history": []}')
    (tmp_path / (CHECKPOINT_DIR + ".partial")).mkdir()
    # A kill between the two renames leaves only checkpoint.old complete.
    assert find_checkpoint(tmp_path) == complete
