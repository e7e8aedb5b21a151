"""Build the model a recipe describes, and rebuild a trained run from its folder.

The order matters because LoRA renames the base weights it wraps: build the registry
model, load the base checkpoint, add LoRA or adapters, choose what trains, and only then
load a run's trained parameters.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import torch

from fmadapt.adapt.adapters import AdapterSettings, apply_adapters
from fmadapt.adapt.freezing import apply_freezing
from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.adapt.trained_file import load_trained_parameters, read_trained_config
from fmadapt.config import Recipe, expand_path, load_recipe
from fmadapt.errors import CheckpointError, FmadaptWarning, RecipeError
from fmadapt.models.dinov3 import list_dinov3_models
from fmadapt.models.segmenter import Segmenter

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
SPLIT_FILE = "split.json"


def build_model(recipe: Recipe) -> Segmenter:
    """Build the recipe's Segmenter with its checkpoints, adapters and freezing preset.

    ``model.checkpoint`` loads into the whole model (SAM family) or into the encoder
    (``dinov3_*``, a Hugging Face folder or Meta ``.pth``). ``model.decoder_checkpoint``
    then loads the prompt encoder and mask decoder from a SAM-format file. Without
    ``model.checkpoint`` the encoder and decoder start from random weights, and a
    FmadaptWarning is issued because such a model is only useful to test the pipeline.

    Raises:
        FileNotFoundError: a checkpoint path is set but does not exist. The message names
            the path and the recipe key.
        RecipeError: a LoRA target is not declared by the model's encoder.
    """
    checkpoint = _checkpoint_path(recipe, "model.checkpoint", recipe.model.checkpoint)
    decoder_checkpoint = _checkpoint_path(recipe, "model.decoder_checkpoint", recipe.model.decoder_checkpoint)
    if checkpoint is None:
        warnings.warn(
            f"model.checkpoint is not set, so {recipe.model.name} starts from random weights; "
            "set model.checkpoint=checkpoints/<file>.pth to adapt a pretrained model",
            FmadaptWarning,
            stacklevel=2,
        )
    # Random initialisation follows the recipe seed, so a run without a checkpoint can be
    # rebuilt with the same frozen base weights when its trained file is loaded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Segmenter.from_registry(
            recipe.model.name,
            image_size=recipe.model.image_size,
            checkpoint=checkpoint,
            decoder_checkpoint=decoder_checkpoint,
            class_names=tuple(recipe.data.labels),
        )
        _apply_adaptation(model, recipe)
    apply_freezing(model, recipe.adaptation.preset)
    return model


def check_checkpoint_paths(recipe: Recipe) -> None:
    """Raise FileNotFoundError at once when a checkpoint setting names a missing file."""
    _checkpoint_path(recipe, "model.checkpoint", recipe.model.checkpoint)
    _checkpoint_path(recipe, "model.decoder_checkpoint", recipe.model.decoder_checkpoint)


def _checkpoint_path(recipe: Recipe, key: str, value: str | None) -> str | None:
    """Expand ``$VARIABLES`` in a checkpoint setting and check that the file or folder exists."""
    if not value:
        return None
    path = expand_path(value, key)
    if Path(path).exists():
        return path
    hint = "Place the file there or correct the path."
    if recipe.model.name in list_dinov3_models() and key == "model.checkpoint":
        hint = (
            "To start from an encoder adapted by `fmadapt pretrain`, run the pretrain recipe first, for example "
            "`fmadapt pretrain recipes/dinov3_ssl_ct.yaml --output runs/dinov3_ssl_ct`, and point the key at "
            "the run's encoder folder. Published DINOv3 weights are a Hugging Face folder or a Meta .pth file."
        )
    raise FileNotFoundError(
        f"{key} is {value!r}, but {Path(path).resolve()} was not found. {hint} "
        f"To use another file, override the key: {key}=/path/to/checkpoint"
    )


def _apply_adaptation(model: Segmenter, recipe: Recipe) -> None:
    adaptation = recipe.adaptation
    if adaptation.method == "lora":
        lora = adaptation.lora
        _check_lora_targets(model, lora.target_modules)
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


def _check_lora_targets(model: Segmenter, target_modules: list[str]) -> None:
    declared = model.encoder.lora_targets
    unknown = [name for name in target_modules if name not in declared]
    if not unknown:
        return
    if model.is_dinov3:
        example = "[q, v]"
        reason = (
            "The default [qkv] is the SAM-family name; DINOv3 encoders have separate q, k and v "
            "projections, so a dinov3_* recipe must set its own targets. "
        )
    else:
        example = "[qkv]"
        reason = ""
    raise RecipeError(
        f"adaptation.lora.target_modules contains {unknown}, which the {model.spec.name} encoder does "
        f"not declare. {reason}Choose from {sorted(declared)}, for example "
        f"adaptation.lora.target_modules={example}"
    )


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the sum and absolute sum of every frozen parameter, in name order.

    Saved with a run and checked when it is loaded, so trained parameters are never put on
    a base model whose frozen weights differ (another checkpoint, another seed).
    """
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            continue
        values = parameter.detach().double()
        digest.update(name.encode())
        digest.update(f"{values.sum().item():.6e},{values.abs().sum().item():.6e}".encode())
    return digest.hexdigest()


def _run_folder_hint(run_dir: Path) -> str:
    """Explain what RUN_DIR must contain, naming the direct subfolders that are run folders."""
    expected = (
        f"RUN_DIR must be a folder written by `fmadapt train` (it contains {RECIPE_FILE}, {SPLIT_FILE} "
        "and trained.safetensors)"
    )
    runs = []
    if run_dir.is_dir():
        runs = sorted(child for child in run_dir.iterdir() if (child / RECIPE_FILE).is_file())
    if len(runs) == 1:
        return f"; did you mean {runs[0]}? {expected}"
    if runs:
        return f"; did you mean one of {', '.join(str(run) for run in runs)}? {expected}"
    return f"; {expected}"


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Segmenter]:
    """Rebuild a trained model from a run folder written by ``fmadapt train``.

    ``overrides`` (``key=value``) may change ``evaluate.*`` keys and ``data.root``, the dataset
    folder, so a run can be evaluated after its data has moved. Every other key must stay as
    it was when the model was trained.
    """
    run_dir = Path(run_dir)
    for override in overrides or []:
        key = override.split("=", 1)[0].strip()
        if not (key.startswith("evaluate.") or key == "data.root"):
            raise RecipeError(
                f"override {override!r} would change how the trained model was built; only evaluate.* keys "
                "and data.root (the dataset folder) can be overridden when evaluating a run"
            )
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} not found{_run_folder_hint(run_dir)}")
    recipe = load_recipe(recipe_path, overrides)
    model = build_model(recipe)
    expected = read_trained_config(run_dir).get("base_fingerprint")
    if expected is not None and expected != base_fingerprint(model):
        raise CheckpointError(
            f"the frozen base weights rebuilt from {recipe_path} differ from those the run in {run_dir} was "
            f"trained on; check that model.checkpoint ({recipe.model.checkpoint!r}) is the same file as in training"
        )
    load_trained_parameters(model, run_dir)
    model.eval()
    return recipe, model
