"""Freezing presets: which parts of a segmenter train.

Each preset names the parts (see ``fmadapt.adapt.summary.PARTS``) whose parameters get
``requires_grad=True``. Every other parameter is frozen. The automatic-mode
``class_embeddings`` and ``semantic_head`` and the DINOv3 ``neck`` train under every preset
when the model has them, because no pretrained checkpoint contains them, so they start
untrained and the model cannot segment without them.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from fmadapt.adapt.summary import (
    ADAPTERS,
    CLASS_EMBEDDINGS,
    MASK_DECODER,
    NECK,
    OTHER,
    PARTS,
    PROMPT_ENCODER,
    SEMANTIC_HEAD,
    parameter_parts,
)
from fmadapt.errors import FmadaptWarning

logger = logging.getLogger(__name__)

FREEZING_PRESETS: dict[str, frozenset[str]] = {
    "adapters": frozenset({ADAPTERS}),
    "adapters_decoder": frozenset({ADAPTERS, MASK_DECODER}),
    "decoder": frozenset({MASK_DECODER}),
    "decoder_prompt": frozenset({MASK_DECODER, PROMPT_ENCODER}),
    "adapters_decoder_prompt": frozenset({ADAPTERS, MASK_DECODER, PROMPT_ENCODER}),
    "full": frozenset(PARTS),
}

# Parts that train whatever the preset.
ALWAYS_TRAINED = frozenset({CLASS_EMBEDDINGS, NECK, SEMANTIC_HEAD})

# Presets that are meaningless without LoRA or bottleneck adapters. "full" trains whatever exists.
PRESETS_NEEDING_ADAPTERS = frozenset(
    name for name, parts in FREEZING_PRESETS.items() if ADAPTERS in parts and name != "full"
)


def trained_parts(preset: str) -> frozenset[str]:
    """Return the parts that train under ``preset``, including ``ALWAYS_TRAINED``.

    Raises:
        TypeError: if ``preset`` is not a str.
        ValueError: if ``preset`` is not a key of ``FREEZING_PRESETS``.
    """
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a str, got {preset!r} ({type(preset).__name__})")
    if preset not in FREEZING_PRESETS:
        raise ValueError(f"unknown freezing preset {preset!r}; choose one of {sorted(FREEZING_PRESETS)}")
    return FREEZING_PRESETS[preset] | ALWAYS_TRAINED


def apply_freezing(model: nn.Module, preset: str) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` according to ``preset``.

    Parameters that belong to no known part (``other``) train only under ``full``. When the
    preset freezes some of them, a FmadaptWarning names them, because a new head outside the
    known parts usually has to train.

    Args:
        model: a segmenter with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` (and
            for DINOv3 ``neck``).
        preset: a key of ``FREEZING_PRESETS``.

    Raises:
        TypeError: if ``preset`` is not a str.
        ValueError: if ``preset`` is unknown, or trains adapters but the model has none.
    """
    parts_to_train = trained_parts(preset)
    parts = parameter_parts(model)
    if preset in PRESETS_NEEDING_ADAPTERS and ADAPTERS not in parts.values():
        raise ValueError(
            f"freezing preset {preset!r} trains adapters, but the model has none; call apply_lora or "
            "apply_adapters before apply_freezing, or use the 'decoder' or 'decoder_prompt' preset"
        )

    frozen_other: list[str] = []
    for name, parameter in model.named_parameters():
        part = parts[name]
        parameter.requires_grad_(part in parts_to_train)
        if part == OTHER and part not in parts_to_train:
            frozen_other.append(name)

    if frozen_other:
        warnings.warn(
            f"freezing preset {preset!r} froze {len(frozen_other)} parameters outside the known parts "
            f"{[part for part in PARTS if part not in (ADAPTERS, OTHER)]}, for example {frozen_other[:3]}; "
            "use the 'full' preset or set requires_grad on them after apply_freezing if they should train",
            FmadaptWarning,
            stacklevel=2,
        )
    present_parts = parts_to_train & set(parts.values())
    logger.info("applied freezing preset %r: training parts %s", preset, sorted(present_parts))
