"""Run `fmadapt train` in this process, record what it trains on, and stop at a kill point.

Used by test_resume_kill.py, which sends SIGKILL to this process. Nothing here changes what
the run computes: the hooks only record, or sleep before the next step.

Usage: python resume_kill_worker.py RECORD_FOLDER KILL_POINT [fmadapt train arguments ...]

RECORD_FOLDER receives, each line flushed at once so that the parent can watch it:
- ``items.txt``: one line per training item the dataset returns, ``EPOCH INDEX SHA256``,
  with the 1-based epoch, the dataset index and a hash of the item's tensors (so
  augmentation and box jitter are compared too, not only the sample order).
- ``checkpoints.jsonl``: after each completed ``save_training_state``, the epochs done
  and the SHA-256 of every file in the ``checkpoint`` folder.
- ``paused``: written when the worker reaches its kill point; it then sleeps until killed.

KILL_POINT is one of:
- ``none``: train to the end.
- ``item:EPOCH:N``: after the dataset returned the N-th item of epoch EPOCH. Accelerate's
  data loader fetches one batch ahead, so with batch size 1 the optimizer has stepped
  N - 2 times in that epoch by then.
- ``save:EPOCH:FILES``: inside Accelerate's ``save_state`` after epoch EPOCH, once its
  ``save`` function has written FILES files into ``checkpoint.partial``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import accelerate.checkpointing
import torch

import fmadapt.train.loop as loop
from fmadapt.cli import main as fmadapt_main
from fmadapt.train.checkpointing import CHECKPOINT_DIR
from fmadapt.train.dataset import PromptedSliceDataset


class Recorder:
    """The record files, current epoch and kill point of one worker."""

    def __init__(self, folder: Path, kill_point: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.items = (folder / "items.txt").open("a")
        self.checkpoints = (folder / "checkpoints.jsonl").open("a")
        self.kind, *numbers = kill_point.split(":")
        if self.kind not in ("none", "item", "save") or len(numbers) != (0 if self.kind == "none" else 2):
            raise SystemExit(f"invalid kill point {kill_point!r}; use none, item:EPOCH:N or save:EPOCH:FILES")
        self.target_epoch, self.target_count = (int(n) for n in numbers) if numbers else (0, 0)
        self.epoch = 0
        self.items_in_epoch = 0
        self.files_in_save = 0

    def start_epoch(self, epoch_index: int) -> None:
        """Start counting items and saved files for the 0-based epoch ``epoch_index``."""
        self.epoch = epoch_index + 1
        self.items_in_epoch = 0
        self.files_in_save = 0

    def item(self, index: int, item: dict[str, torch.Tensor]) -> None:
        digest = hashlib.sha256()
        for key in sorted(item):
            value = item[key]
            digest.update(key.encode())
            digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
        self.items.write(f"{self.epoch} {index} {digest.hexdigest()}\n")
        self.items.flush()
        self.items_in_epoch += 1
        if self.kind == "item" and (self.epoch, self.items_in_epoch) == (self.target_epoch, self.target_count):
            self.pause()

    def file_saved(self) -> None:
        self.files_in_save += 1
        if self.kind == "save" and (self.epoch, self.files_in_save) == (self.target_epoch, self.target_count):
            self.pause()

    def checkpoint_saved(self, run_dir: Path, epochs_done: int) -> None:
        folder = run_dir / CHECKPOINT_DIR
        hashes = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
        }
        self.checkpoints.write(json.dumps({"epochs_done": epochs_done, "files": hashes}) + "\n")
        self.checkpoints.flush()

    def pause(self) -> None:
        (self.folder / "paused").write_text(f"epoch {self.epoch}\n")
        while True:
            time.sleep(60)


def install_hooks(recorder: Recorder) -> None:
    original_train_epoch = loop._train_epoch
    original_getitem = PromptedSliceDataset.__getitem__
    original_save = accelerate.checkpointing.save
    original_save_state = loop.save_training_state

    epoch_signature = inspect.signature(original_train_epoch)

    def train_epoch(*args, **kwargs):
        recorder.start_epoch(epoch_signature.bind(*args, **kwargs).arguments["epoch"])
        return original_train_epoch(*args, **kwargs)

    def getitem(self, index):
        item = original_getitem(self, index)
        recorder.item(index, item)
        return item

    def save(*args, **kwargs):
        result = original_save(*args, **kwargs)
        recorder.file_saved()
        return result

    def save_training_state(accelerator, run_dir, epochs_done, history):
        folder = original_save_state(accelerator, run_dir, epochs_done, history)
        recorder.checkpoint_saved(Path(run_dir), epochs_done)
        return folder

    loop._train_epoch = train_epoch
    PromptedSliceDataset.__getitem__ = getitem
    # save_accelerator_state looks up `save` in accelerate.checkpointing at call time.
    accelerate.checkpointing.save = save
    # loop imported save_training_state by name, so the wrapper replaces that name.
    loop.save_training_state = save_training_state


def main() -> int:
    record_folder, kill_point, *arguments = sys.argv[1:]
    install_hooks(Recorder(Path(record_folder), kill_point))
    return fmadapt_main(["train", *arguments])


if __name__ == "__main__":
    sys.exit(main())
