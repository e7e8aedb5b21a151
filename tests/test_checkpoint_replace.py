"""Checkpoint swap: a process stopped after any file-system call leaves one complete checkpoint.

The real SIGKILL tests (test_resume_kill.py) stop a run at two points. Here the swap of
``replace_checkpoint`` is stopped after every rename, unlink and rmdir in turn, starting
from each folder state that an earlier kill can leave behind.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from fmadapt.train.checkpointing import CHECKPOINT_DIR, PROGRESS_FILE, find_checkpoint, replace_checkpoint

STATE_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl")


class Stopped(BaseException):
    """Stand-in for SIGKILL, a BaseException so that rmtree(ignore_errors=True) lets it through."""


@contextmanager
def stop_after(calls: int):
    """Raise Stopped in place of the file-system call that follows ``calls`` completed ones."""
    originals = {name: getattr(os, name) for name in ("rename", "unlink", "rmdir")}
    done = 0

    def wrap(original):
        def call(*args, **kwargs):
            nonlocal done
            if done == calls:
                raise Stopped
            done += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(os, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def write_checkpoint(folder: Path, epochs_done: int, *, complete: bool = True) -> None:
    folder.mkdir(parents=True)
    for name in STATE_FILES:
        (folder / name).write_text(f"state after epoch {epochs_done}")
    if complete:
        (folder / PROGRESS_FILE).write_text(json.dumps({"epochs_done": epochs_done, "history": []}))


def half_deleted(folder: Path) -> None:
    """Leave ``folder`` as a stopped deletion does: the progress file and one state file gone."""
    write_checkpoint(folder, 0)
    (folder / PROGRESS_FILE).unlink()
    (folder / STATE_FILES[0]).unlink()


def checkpoint_only(run_dir: Path) -> None:
    write_checkpoint(run_dir / CHECKPOINT_DIR, 1)


def old_only(run_dir: Path) -> None:
    # Left by a kill between the two renames, then resumed from checkpoint.old.
    write_checkpoint(run_dir / (CHECKPOINT_DIR + ".old"), 1)


def checkpoint_and_half_deleted_old(run_dir: Path) -> None:
    # Left by a kill while checkpoint.old was being deleted after a swap.
    write_checkpoint(run_dir / CHECKPOINT_DIR, 1)
    half_deleted(run_dir / (CHECKPOINT_DIR + ".old"))


def assert_complete(folder: Path) -> int:
    """Check that every state file of ``folder`` matches its progress file, and return the epochs done."""
    epochs_done = json.loads((folder / PROGRESS_FILE).read_text())["epochs_done"]
    for name in STATE_FILES:
        assert (folder / name).read_text() == f"state after epoch {epochs_done}", (folder, name)
    return epochs_done


@pytest.mark.parametrize("initial_state", [checkpoint_only, old_only, checkpoint_and_half_deleted_old])
def test_swap_stopped_at_every_call(tmp_path, initial_state):
    calls = 0
    while True:
        run_dir = tmp_path / f"stopped_after_{calls}"
        initial_state(run_dir)
        write_checkpoint(run_dir / (CHECKPOINT_DIR + ".partial"), 2)
        try:
            with stop_after(calls):
                replace_checkpoint(run_dir)
        except Stopped:
            folder = find_checkpoint(run_dir)
            assert folder is not None, f"no complete checkpoint after {calls} calls: {sorted(os.listdir(run_dir))}"
            assert assert_complete(folder) in (1, 2)
            calls += 1
            continue
        break

    # The swap finished: only the new checkpoint is left.
    assert calls > 0
    assert sorted(os.listdir(run_dir)) == [CHECKPOINT_DIR]
    assert assert_complete(run_dir / CHECKPOINT_DIR) == 2
