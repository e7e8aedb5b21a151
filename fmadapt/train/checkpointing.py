"""Training-state checkpoints that survive a killed process, and resuming from them.

``save_training_state`` writes Accelerate's state (model, optimizer, registered scheduler,
random number generators of every process) plus ``progress.json`` (epochs done, history)
into ``checkpoint.partial`` and only then swaps it in as ``checkpoint``. The previous
checkpoint is moved to ``checkpoint.old`` for the moment of the swap, so a process killed
at any point leaves one complete checkpoint that ``find_checkpoint`` returns.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
PROGRESS_FILE = "progress.json"


def find_checkpoint(run_dir: Path) -> Path | None:
    """Return the complete checkpoint folder of ``run_dir``, or None when there is none."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        folder = run_dir / name
        if (folder / PROGRESS_FILE).is_file():
            return folder
    return None


def save_training_state(accelerator: Accelerator, run_dir: Path, epochs_done: int, history: list[dict]) -> Path:
    """Save the state after ``epochs_done`` epochs; every process must call this."""
    partial = run_dir / (CHECKPOINT_DIR + ".partial")
    final = run_dir / CHECKPOINT_DIR
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # progress.json is written last: a folder without it is incomplete.
        (partial / PROGRESS_FILE).write_text(json.dumps({"epochs_done": epochs_done, "history": history}, indent=2))
        replace_checkpoint(run_dir)
        logger.info("saved training state after epoch %d to %s", epochs_done, final)
    accelerator.wait_for_everyone()
    return final


def replace_checkpoint(run_dir: Path) -> None:
    """Swap the complete ``checkpoint.partial`` in as ``checkpoint`` and delete the one it replaces.

    ``checkpoint.old`` is deleted only while ``checkpoint`` exists, because after a kill
    between the two renames and a resume from it, ``checkpoint.old`` is the only complete one.
    """
    partial = run_dir / (CHECKPOINT_DIR + ".partial")
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        _remove_checkpoint(old)
        final.rename(old)
    partial.rename(final)
    _remove_checkpoint(old)


def _remove_checkpoint(folder: Path) -> None:
    # The progress file goes first, so a folder that is only partly deleted never looks complete.
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def load_training_state(accelerator: Accelerator, run_dir: Path) -> tuple[int, list[dict]]:
    """Restore the last complete checkpoint of ``run_dir``; returns (epochs done, history)."""
    folder = find_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(
            f"no complete training checkpoint in {run_dir}; start the run without --resume"
        )
    accelerator.load_state(str(folder))
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    logger.info("resuming %s after epoch %d", run_dir, progress["epochs_done"])
    return int(progress["epochs_done"]), list(progress["history"])


def remove_training_state(run_dir: Path) -> None:
    """Delete the checkpoint folders once the trained parameters are saved."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".partial"):
        _remove_checkpoint(run_dir / name)
