"""Build the model a recipe describes, and rebuild a trained run from its folder.

The order matters because LoRA renames the base weights it wraps: build the registry
model, load the base checkpoint, add LoRA or adapters, choose what trains, and only then
load a run's trained parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fmadapt.adapt.adapters import AdapterSettings, apply_adapters
from fmadapt.adapt.freezing import apply_freezing
from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.adapt.trained_file import load_trained_parameters
from fmadapt.config import Recipe, expand_path, load_recipe
from fmadapt.errors import FmadaptWarning
from fmadapt.models.segmenter import Segmenter

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
SPLIT_FILE = "split.json"


def build_model(recipe: Recipe) -> Segmenter:
    """Build the recipe's Segmenter with its checkpoint, adapters and freezing preset.

    Without ``model.checkpoint`` the encoder and decoder start from random weights; a
    warning says so, because such a model is only useful to test the pipeline.
    """
    checkpoint = recipe.model.checkpoint
    if checkpoint:
        checkpoint = expand_path(checkpoint, "model.checkpoint")
    else:
        import warnings

        warnings.warn(
            f"model.checkpoint is not set, so {recipe.model.name} starts from random weights; "
            "set model.checkpoint=checkpoints/<file>.pth to adapt a pretrained model",
            FmadaptWarning,
            stacklevel=2,
        )
    model = Segmenter.from_registry(
        recipe.model.name,
        image_size=recipe.model.image_size,
        checkpoint=checkpoint,
        class_names=tuple(recipe.data.labels),
    )
    adaptation = recipe.adaptation
    if adaptation.method == "lora":
        lora = adaptation.lora
        apply_lora(
            model,
            LoraSettings(
                rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules)
            ),
        )
    elif adaptation.method == "adapters":
        adapters = adaptation.adapters
        apply_adapters(
            model,
            AdapterSettings(reduction=adapters.reduction, placement=adapters.placement, scale=adapters.scale),
        )
    apply_freezing(model, adaptation.preset)
    return model


def load_run(run_dir: str | Path) -> tuple[Recipe, Segmenter]:
    """Rebuild a trained model from a run folder written by ``fmadapt train``."""
    run_dir = Path(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise FileNotFoundError(
            f"{recipe_path} not found; RUN_DIR must be a folder written by `fmadapt train` (it contains "
            f"{RECIPE_FILE}, {SPLIT_FILE} and trained.safetensors)"
        )
    recipe = load_recipe(recipe_path)
    model = build_model(recipe)
    load_trained_parameters(model, run_dir)
    model.eval()
    return recipe, model
