"""Settings of the prompt protocols, box noise and the random generator of each case."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from fmadapt.data.prompts import jitter_box
from fmadapt.evaluate.clicks import CLICK_MODES
from fmadapt.evaluate.interactive import START_PROMPTS, InteractiveSettings
from fmadapt.evaluate.propagation import KEY_SLICE_RULES

__all__ = ["JITTER_UNITS", "ProtocolSettings", "case_generator", "noisy_box"]

JITTER_UNITS = ("pixels", "fraction")


@dataclass(frozen=True)
class ProtocolSettings:
    """Every setting of the prompt protocols; all of them are saved in ``protocol.json``.

    Attributes:
        seed: seed (>= 0) of click and box noise draws, combined with each case id by
            :func:`case_generator`; None takes the recipe seed.
        box_jitter: box noise levels (>= 0), one evaluation each.
        jitter_unit: "pixels" or "fraction" (of the box side).
        num_positive: positive clicks per object in ``clicks`` mode (>= 0).
        num_negative: negative clicks per object in ``clicks`` mode (>= 0).
        click_mode: "center" (farthest-from-border pixel) or "random" first positive click.
        num_interactions: budget N of the iterative protocol, first prompt included.
        start: first prompt of the iterative protocol, "box" or "click".
        feed_logits: pass the previous low-res logits as mask input in iterative mode.
        key_slice: "largest" or "middle" object slice for the 3D propagation box.
        margin: pixels added to every side of each propagated box.
        min_area: predictions with fewer pixels end propagation.
    """

    seed: int | None = None
    box_jitter: tuple[float, ...] = (0.0,)
    jitter_unit: str = "pixels"
    num_positive: int = 1
    num_negative: int = 0
    click_mode: str = "center"
    num_interactions: int = 5
    start: str = "box"
    feed_logits: bool = True
    key_slice: str = "largest"
    margin: float = 0.0
    min_area: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "box_jitter", tuple(float(level) for level in self.box_jitter))
        if not self.box_jitter or any(not math.isfinite(level) or level < 0 for level in self.box_jitter):
            raise ValueError(f"box_jitter must list finite noise levels >= 0, got {self.box_jitter}")
        for name, value, choices in (
            ("jitter_unit", self.jitter_unit, JITTER_UNITS),
            ("click_mode", self.click_mode, CLICK_MODES),
            ("start", self.start, START_PROMPTS),
            ("key_slice", self.key_slice, KEY_SLICE_RULES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.num_positive < 0 or self.num_negative < 0 or self.num_positive + self.num_negative == 0:
            raise ValueError(
                f"num_positive ({self.num_positive}) and num_negative ({self.num_negative}) must be >= 0 "
                "with at least one click"
            )
        integer = isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
        if self.seed is not None and not (integer and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, or None for the recipe seed, got {self.seed!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number of pixels >= 0, got {self.margin}")
        self.interactive()  # validates num_interactions

    def interactive(self) -> InteractiveSettings:
        """Return the settings of :func:`fmadapt.evaluate.interactive.run_interactive`."""
        return InteractiveSettings(self.num_interactions, self.start, self.click_mode, self.feed_logits)


def noisy_box(
    box: np.ndarray, image_size: tuple[int, int], level: float, unit: str, rng: np.random.Generator
) -> np.ndarray:
    """Add box noise: each XYXY coordinate moves by a uniform shift in [-s, s].

    ``s`` is ``level`` pixels for ``unit="pixels"``, and ``level`` times the box width
    (x coordinates) or height (y coordinates) in pixels, ``x1 - x0 + 1``, for
    ``unit="fraction"``. The result is sorted so x0 <= x1 and y0 <= y1 and clipped to the
    H×W image. Level 0 returns the box unchanged without drawing from ``rng``.
    """
    if unit not in JITTER_UNITS:
        raise ValueError(f"unit must be one of {JITTER_UNITS}, got {unit!r}")
    box = np.asarray(box, dtype=np.float32)
    if level == 0:
        return box
    if unit == "pixels":
        return jitter_box(box, image_size, max_shift=level, rng=rng)
    height, width = image_size
    sides = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, dtype=np.float64)
    shifted = box + rng.uniform(-1.0, 1.0, size=4) * level * sides
    x0, x1 = np.clip(sorted((shifted[0], shifted[2])), 0, width - 1)
    y0, y1 = np.clip(sorted((shifted[1], shifted[3])), 0, height - 1)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def case_generator(seed: int, case_id: str) -> np.random.Generator:
    """Return the generator of one case's click and box noise draws, seeded by ``seed`` and the case id.

    A generator per case gives each case the same draws whichever process evaluates it and
    whichever other cases are evaluated with it. The id enters through SHA-256, because
    Python's ``hash`` of a string changes between processes.
    """
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
