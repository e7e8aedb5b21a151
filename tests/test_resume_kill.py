"""`fmadapt train` killed with SIGKILL, then `--resume`: the same run as an uninterrupted one.

Each run is a real subprocess (tests/resume_kill_worker.py, which calls the CLI's main and
records the items it trains on). The parent waits for the worker's kill point and sends
SIGKILL, so nothing in the training process gets to clean up.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmadapt.train.checkpointing import CHECKPOINT_DIR, PROGRESS_FILE, find_checkpoint

from conftest import REPO_ROOT, require_dataset

EPOCHS = 3
STEPS_PER_EPOCH = 5
RECIPE = REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml"
WORKER = REPO_ROOT / "tests" / "resume_kill_worker.py"
# Cosine schedule with warm-up, augmentation and box jitter stay on, so a resume that
# lost the scheduler state or a random number generator would train on other values.
SETTINGS = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.modes=[prompted]",
    f"train.epochs={EPOCHS}",
    f"train.steps_per_epoch={STEPS_PER_EPOCH}",
    "train.batch_size=1",
    "train.warmup_steps=2",
    "train.max_validation_slices=0",
]
TIMEOUT_S = 120


def worker_command(record: Path, kill_point: str, run_dir: Path, *options: str) -> list[str]:
    return [sys.executable, str(WORKER), str(record), kill_point, str(RECIPE), "--output", str(run_dir),
            *options, *SETTINGS]


def worker_environment(data_root: Path) -> dict[str, str]:
    # One thread per worker keeps the order of float reductions the same in every run,
    # whatever the core count, because the runs are compared to 1e-6.
    return dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")


def run_to_end(record: Path, run_dir: Path, data_root: Path, *options: str) -> None:
    completed = subprocess.run(
        worker_command(record, "none", run_dir, *options),
        env=worker_environment(data_root),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def run_and_kill(record: Path, kill_point: str, run_dir: Path, data_root: Path) -> None:
    """Start the worker, wait until it reaches ``kill_point``, then SIGKILL it."""
    paused = record / "paused"
    log = record.parent / (record.name + ".log")
    record.mkdir(parents=True)
    with log.open("w") as stderr:
        process = subprocess.Popen(
            worker_command(record, kill_point, run_dir),
            env=worker_environment(data_root),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not paused.exists():
                if process.poll() is not None:
                    pytest.fail(f"worker exited with {process.returncode} before {kill_point}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"worker did not reach {kill_point} within {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.02)
        finally:
            # Also ends a worker that missed its kill point, so no process outlives the test.
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def read_items(record: Path) -> list[tuple[int, int, str]]:
    """Return (epoch, dataset index, item SHA-256) in the order the worker's dataset returned them."""
    rows = []
    for line in (record / "items.txt").read_text().splitlines():
        epoch, index, digest = line.split()
        rows.append((int(epoch), int(index), digest))
    return rows


def read_checkpoint_hashes(record: Path) -> dict[int, dict[str, str]]:
    """Return the checkpoint file hashes the worker recorded, by epochs done."""
    lines = (record / "checkpoints.jsonl").read_text().splitlines()
    return {entry["epochs_done"]: entry["files"] for entry in map(json.loads, lines)}


def epoch_items(items: list[tuple[int, int, str]], epoch: int) -> list[tuple[int, int, str]]:
    return [item for item in items if item[0] == epoch]


def assert_same_run(run_dir: Path, straight_dir: Path) -> None:
    """Check that ``run_dir`` finished with the split, history and parameters of ``straight_dir``."""
    assert (run_dir / "split.json").read_text() == (straight_dir / "split.json").read_text()
    assert not list(run_dir.glob(CHECKPOINT_DIR + "*"))

    history = json.loads((run_dir / "history.json").read_text())
    expected_history = json.loads((straight_dir / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))
    for record, expected in zip(history, expected_history):
        assert record.keys() == expected.keys()
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, abs=1e-6), (record["epoch"], key)

    actual = load_file(str(run_dir / "trained.safetensors"))
    expected = load_file(str(straight_dir / "trained.safetensors"))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=0, atol=1e-6), name


def assert_checkpoint_after_first_epoch(run_dir: Path, record: Path) -> None:
    """Check that the killed run left the complete, unchanged checkpoint of epoch 1."""
    folder = find_checkpoint(run_dir)
    assert folder == run_dir / CHECKPOINT_DIR
    assert json.loads((folder / PROGRESS_FILE).read_text())["epochs_done"] == 1
    recorded = read_checkpoint_hashes(record)
    assert list(recorded) == [1]
    current = {path.name: path for path in sorted(folder.iterdir())}
    assert sorted(current) == sorted(recorded[1])
    for name, path in current.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[1][name], name
    assert not (run_dir / "trained.safetensors").exists()


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """An uninterrupted run: (run folder, recorded items)."""
    require_dataset(data_root, "Dataset001_TotalSegCT")
    folder = tmp_path_factory.mktemp("straight")
    run_to_end(folder / "record", folder / "run", data_root)
    items = read_items(folder / "record")
    assert [epoch for epoch, _, _ in items] == [e for e in range(1, EPOCHS + 1) for _ in range(STEPS_PER_EPOCH)]
    return folder / "run", items


def test_kill_mid_epoch_then_resume(straight, data_root, tmp_path):
    straight_dir, straight_items = straight
    run_dir = tmp_path / "run"
    # Killed after the 4th item of epoch 2: two optimizer steps of epoch 2 are done.
    run_and_kill(tmp_path / "killed", "item:2:4", run_dir, data_root)
    assert_checkpoint_after_first_epoch(run_dir, tmp_path / "killed")
    killed_items = read_items(tmp_path / "killed")
    assert epoch_items(killed_items, 1) == epoch_items(straight_items, 1)
    assert epoch_items(killed_items, 2) == epoch_items(straight_items, 2)[:4]

    run_to_end(tmp_path / "resumed", run_dir, data_root, "--resume")
    resumed_items = read_items(tmp_path / "resumed")
    assert resumed_items == [item for item in straight_items if item[0] >= 2]
    assert_same_run(run_dir, straight_dir)


def test_kill_inside_checkpoint_save(straight, data_root, tmp_path):
    straight_dir, straight_items = straight
    run_dir = tmp_path / "run"
    # Accelerate has written the model and optimizer files of epoch 2, not yet the rest.
    run_and_kill(tmp_path / "killed", "save:2:2", run_dir, data_root)
    partial = run_dir / (CHECKPOINT_DIR + ".partial")
    assert partial.is_dir(), "the save should write into checkpoint.partial, not into the checkpoint itself"
    assert sorted(path.name for path in partial.iterdir()) == ["model.safetensors", "optimizer.bin"]
    assert_checkpoint_after_first_epoch(run_dir, tmp_path / "killed")
    assert epoch_items(read_items(tmp_path / "killed"), 2) == epoch_items(straight_items, 2)

    run_to_end(tmp_path / "resumed", run_dir, data_root, "--resume")
    assert read_items(tmp_path / "resumed") == [item for item in straight_items if item[0] >= 2]
    assert_same_run(run_dir, straight_dir)
