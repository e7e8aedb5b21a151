"""Few-shot splits: which cases, or which slices of one case, train, validate and test.

The split is drawn once with the recipe seed, saved as ``split.json`` in the run folder and
read back by evaluation, so a run's test cases never change after training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fmadapt.config import SplitConfig
from fmadapt.errors import DataError, RecipeError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class SplitPlan:
    """Cases per split and, in slice mode, the slice range [start, stop) of each split.

    In ``cases`` mode every listed case contributes all its slices (volumes) or its single
    image (2D datasets). In ``slices`` mode all three lists name the same case and
    ``slice_ranges`` cuts it into contiguous blocks along the slice axis.
    """

    mode: str
    seed: int
    cases: dict[str, list[str]]
    slice_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def slice_range(self, split: str) -> tuple[int, int] | None:
        return tuple(self.slice_ranges[split]) if split in self.slice_ranges else None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "SplitPlan":
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} not found; is this a folder written by `fmadapt train`?")
        data = json.loads(path.read_text())
        ranges = {name: tuple(bounds) for name, bounds in data.get("slice_ranges", {}).items()}
        return cls(mode=data["mode"], seed=data["seed"], cases=data["cases"], slice_ranges=ranges)


def split_cases(case_ids: list[str], config: SplitConfig, seed: int) -> SplitPlan:
    """Draw ``config.train`` training and ``config.validation`` validation cases; the rest test.

    Raises:
        RecipeError: fewer cases than train + validation + 1 (at least one test case).
    """
    needed = config.train + config.validation + 1
    if len(case_ids) < needed:
        raise RecipeError(
            f"the dataset has {len(case_ids)} cases but data.split asks for {config.train} training and "
            f"{config.validation} validation cases plus at least one test case; lower data.split.train "
            "or data.split.validation, or use data.split.mode=slices for a single volume"
        )
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ordered = [case_ids[i] for i in order]
    train = sorted(ordered[: config.train])
    validation = sorted(ordered[config.train : config.train + config.validation])
    test = sorted(ordered[config.train + config.validation :])
    return SplitPlan(mode="cases", seed=seed, cases={"train": train, "validation": validation, "test": test})


def split_slices(case_id: str, extent: tuple[int, int], config: SplitConfig, seed: int) -> SplitPlan:
    """Cut the slices ``extent`` = [start, stop) of one case into contiguous blocks.

    The blocks are train, validation and test, in that order along the slice axis, sized by
    ``config.slice_fractions``. Callers pass the extent of the slices that contain the
    recipe's classes, so no block is empty background. Which training slices are used is
    drawn later, from the train block, with the same seed.
    """
    first, stop = extent
    num_slices = stop - first
    fractions = np.asarray(config.slice_fractions, dtype=float)
    bounds = first + np.round(np.cumsum(fractions) * num_slices).astype(int)
    starts = [first, int(bounds[0]), int(bounds[1])]
    stops = [int(bounds[0]), int(bounds[1]), stop]
    ranges = {name: (start, stop) for name, start, stop in zip(SPLIT_NAMES, starts, stops)}
    for name in ("train", "test"):
        start, stop = ranges[name]
        if stop <= start:
            raise RecipeError(
                f"data.split.slice_fractions {tuple(config.slice_fractions)} leaves the {name} block of case "
                f"{case_id} ({num_slices} slices) empty; give it a larger fraction"
            )
    cases = {name: [case_id] for name in SPLIT_NAMES}
    return SplitPlan(mode="slices", seed=seed, cases=cases, slice_ranges=ranges)


def draw_training_slices(candidates: list[int], count: int, seed: int, case_id: str) -> list[int]:
    """Draw ``count`` slice indices from ``candidates`` (foreground slices) with ``seed``."""
    if len(candidates) < count:
        raise DataError(
            f"case {case_id} has {len(candidates)} slices with foreground in the train block, fewer than "
            f"data.split.train={count}; lower it or widen the train block"
        )
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return sorted(int(candidates[i]) for i in chosen)
