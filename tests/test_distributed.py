"""`fmadapt train` under `accelerate launch` with two CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, require_dataset


def test_two_process_training_on_cpu(data_root, tmp_path):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "2", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "fmadapt", "train", str(REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"),
        "--output", str(run_dir),
        "model.name=sam_vit_tiny", "model.image_size=128", "train.epochs=1",
        "train.steps_per_epoch=2", "train.batch_size=1", "train.max_validation_slices=1",
    ]
    environment = dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1
    # Each process runs steps_per_epoch steps on its own shard of the sampled batches.
    assert history[0]["steps"] == 2
    assert (run_dir / "trained.safetensors").is_file()
    assert not list(run_dir.glob("*.tmp"))
