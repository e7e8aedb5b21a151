"""`fmadapt train` under `accelerate launch` with two CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, require_dataset

RECIPE = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
WORKER = REPO_ROOT / "tests" / "distributed_worker.py"
# No augmentation or jitter, so both layouts draw identical samples; only the split of
# each global batch over processes differs.
SETTINGS = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.max_validation_slices=1",
    "train.augment=false",
    "train.box_jitter=0",
]


def launch(arguments, data_root, processes):
    command = [sys.executable]
    if processes > 1:
        command += [
            "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
        ]
    environment = dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")
    completed = subprocess.run(command + arguments, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_two_process_cli_training(data_root, tmp_path):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    run_dir = tmp_path / "run"
    arguments = ["-m", "fmadapt", "train", str(RECIPE), "--output", str(run_dir), "train.batch_size=1", *SETTINGS]
    launch(arguments, data_root, processes=2)
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1
    # Each process runs steps_per_epoch steps on its own shard of the sampled batches.
    assert history[0]["steps"] == 2
    assert (run_dir / "trained.safetensors").is_file()
    assert not list(run_dir.glob("checkpoint*"))


def test_two_processes_match_one_process(data_root, tmp_path):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    two = tmp_path / "two"
    launch([str(WORKER), str(RECIPE), str(two / "run"), str(two / "params"), "train.batch_size=1", *SETTINGS],
           data_root, processes=2)
    one = tmp_path / "one"
    launch([str(WORKER), str(RECIPE), str(one / "run"), str(one / "params"), "train.batch_size=2", *SETTINGS],
           data_root, processes=1)

    rank0 = load_file(str(two / "params" / "rank0.safetensors"))
    rank1 = load_file(str(two / "params" / "rank1.safetensors"))
    single = load_file(str(one / "params" / "rank0.safetensors"))
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    largest = max(float((rank0[name] - single[name]).abs().max()) for name in rank0)
    assert largest < 1e-5
