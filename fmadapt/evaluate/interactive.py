"""Iterative correction on one 2D image: a first prompt, then one correction click at a time.

Interaction 1 is the first prompt, a box or one positive click. Every later interaction adds
a click at the centre of the largest error region of the current prediction
(:func:`fmadapt.evaluate.clicks.correction_click`). The model then predicts again from all
clicks so far, the first box if there was one, and the previous low-res logits as ``mask_input``.
The budget of N interactions therefore allows N - 1 correction clicks.

Dice is recorded after every interaction. When a prediction equals the reference there is
nothing left to correct, so the protocol stops and the remaining interactions keep the last
Dice and mask, as a user who is done would. The area under the Dice curve treats the curve
as a step function over [0, N] that keeps each Dice for one interaction. Divided by N, that
area is the mean Dice over the N interactions and lies in [0, 1].

The protocol takes any prompt function, so it runs on a Predictor
(:func:`predictor_prompt_function`) or on any other segmenter of one image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmadapt.data.prompts import box_from_mask
from fmadapt.evaluate.clicks import CLICK_MODES, Click, clicks_to_arrays, correction_click, initial_clicks
from fmadapt.evaluate.metrics import dice
from fmadapt.inference.predictor import Predictor

__all__ = [
    "START_PROMPTS",
    "InteractiveResult",
    "InteractiveSettings",
    "PromptFunction",
    "predictor_prompt_function",
    "run_interactive",
]

logger = logging.getLogger(__name__)

START_PROMPTS = ("box", "click")

# predict(box, points, point_labels, mask_input) -> (H×W bool mask, low-res logits or None).
# box is a (4,) XYXY box or None, points an N×2 XY array with (N,) labels or both None, and
# mask_input the low-res logits that the previous call returned, or None.
PromptFunction = Callable[
    [np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None],
    tuple[np.ndarray, np.ndarray | None],
]


@dataclass(frozen=True)
class InteractiveSettings:
    """Settings of the iterative protocol.

    Attributes:
        num_interactions: budget N >= 1, the first prompt included.
        start: "box" (the object's box) or "click" (one positive click).
        click_mode: where the first click goes when ``start="click"``: "center" (object pixel
            farthest from its border) or "random" (a random object pixel, drawn with the rng).
        feed_logits: pass the previous low-res logits as ``mask_input`` to each correction.
    """

    num_interactions: int = 5
    start: str = "box"
    click_mode: str = "center"
    feed_logits: bool = True

    def __post_init__(self) -> None:
        count = self.num_interactions
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise TypeError(f"num_interactions must be an int, got {count!r}")
        if count < 1:
            raise ValueError(f"num_interactions must be >= 1 (the first prompt counts as one), got {count}")
        if self.start not in START_PROMPTS:
            raise ValueError(f"start must be one of {START_PROMPTS}, got {self.start!r}")
        if self.click_mode not in CLICK_MODES:
            raise ValueError(f"click_mode must be one of {CLICK_MODES}, got {self.click_mode!r}")


@dataclass
class InteractiveResult:
    """Outcome of the iterative protocol on one object.

    Attributes:
        dice: N Dice values, one after each interaction; held after an early stop.
        masks: H×W bool predictions of the interactions that ran (``interactions_used``).
        clicks: every click given, in order.
        box: the first box (XYXY pixels), or None when the protocol started with a click.
        interactions_used: interactions that ran before the budget ended or the
            prediction became perfect.
    """

    dice: list[float]
    masks: list[np.ndarray]
    clicks: list[Click] = field(default_factory=list)
    box: np.ndarray | None = None
    interactions_used: int = 0

    @property
    def stopped_early(self) -> bool:
        """Whether a perfect prediction ended the protocol before the budget."""
        return self.interactions_used < len(self.dice)

    @property
    def auc(self) -> float:
        """Area under the Dice curve divided by N: the mean of the N Dice values."""
        return float(np.mean(self.dice))

    def mask_after(self, interaction: int) -> np.ndarray:
        """Return the prediction after ``interaction`` (1..N); after an early stop, the last one."""
        if not 1 <= interaction <= len(self.dice):
            raise ValueError(f"interaction must be in 1..{len(self.dice)}, got {interaction}")
        return self.masks[min(interaction, self.interactions_used) - 1]


def run_interactive(
    predict: PromptFunction,
    reference: np.ndarray,
    settings: InteractiveSettings,
    *,
    box: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> InteractiveResult:
    """Run the iterative correction protocol on one object of one image.

    Args:
        predict: the prompt function that segments the image (see ``PromptFunction``).
        reference: H×W bool ground-truth mask of the object; must not be empty.
        settings: budget, first prompt and click placement.
        box: XYXY first box for ``start="box"``, for example a jittered one. Default: the
            reference's own box (``box_from_mask``).
        rng: random source, needed for ``click_mode="random"``.

    Returns:
        The Dice curve, the masks, the clicks and the number of interactions used.

    Raises:
        ValueError: the reference is empty, or ``box`` is given with ``start="click"``.
    """
    if not isinstance(settings, InteractiveSettings):
        raise TypeError(f"settings must be an InteractiveSettings, got {type(settings).__name__}")
    reference = np.asarray(reference).astype(bool)
    if reference.ndim != 2 or not reference.any():
        raise ValueError(f"reference must be a non-empty H×W mask, got shape {reference.shape} with no foreground")
    clicks: list[Click] = []
    if settings.start == "box":
        box = box_from_mask(reference) if box is None else np.asarray(box, dtype=np.float32)
    else:
        if box is not None:
            raise ValueError("box was given but settings.start is 'click'; set start='box' or drop the box")
        clicks = initial_clicks(reference, num_positive=1, mode=settings.click_mode, rng=rng)

    result = InteractiveResult(dice=[], masks=[], clicks=clicks, box=box)
    logits = None
    for interaction in range(1, settings.num_interactions + 1):
        if interaction > 1:
            click = correction_click(result.masks[-1], reference)
            if click is None:
                break
            clicks.append(click)
        points, labels = clicks_to_arrays(clicks) if clicks else (None, None)
        mask_input = logits if settings.feed_logits else None
        mask, logits = predict(box, points, labels, mask_input)
        result.masks.append(np.asarray(mask, dtype=bool))
        result.dice.append(dice(result.masks[-1], reference))
        result.interactions_used = interaction

    result.dice.extend([result.dice[-1]] * (settings.num_interactions - result.interactions_used))
    return result


def predictor_prompt_function(predictor: Predictor) -> PromptFunction:
    """Wrap a Predictor, whose image is already set, as a prompt function.

    A single click without a box or mask input is ambiguous, so the decoder proposes three
    masks and the one with the highest predicted IoU is kept. Every other prompt requests
    one mask. The low-res logits of the kept mask are returned for the next ``mask_input``.
    """
    if not isinstance(predictor, Predictor):
        raise TypeError(f"predictor must be a Predictor, got {type(predictor).__name__}")

    def predict(box, points, point_labels, mask_input):
        ambiguous = box is None and mask_input is None and points is not None and len(points) == 1
        masks, scores, low_res = predictor.predict(
            box=box, points=points, point_labels=point_labels, mask_input=mask_input, multimask_output=ambiguous
        )
        best = int(np.argmax(scores))
        return masks[best], low_res[best]

    return predict
