"""Recipe schema of ``fmadapt pretrain``: self-supervised adaptation of a DINOv3 encoder.

A pretrain recipe names unlabelled image sources (dataset folders), the encoder and its
starting checkpoint, and how the encoder is adapted (LoRA or full training). It also sets
the multi-crop and masking settings, the projection heads and the DINO and iBOT objective.
Finally it gives the teacher's EMA schedule, the optimisation settings and the collapse monitor. It is loaded with the
strict YAML rules and dotted overrides of ``fmadapt.config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmadapt.config import (
    MIXED_PRECISION,
    IntensityConfig,
    _build,
    _check_choice,
    apply_overrides,
    expand_path,
)
from fmadapt.errors import RecipeError

PRETRAIN_METHODS = ("lora", "full")
EXPORT_SOURCES = ("teacher", "student")


@dataclass
class SourceConfig:
    """One folder of unlabelled images.

    ``root`` is an nnU-Net v2 or 2D dataset folder (its dataset.json is read, its labels
    never are). ``axis`` is the spatial axis that volumes are sliced across (ignored for
    2D images), and ``intensity`` maps each volume to 0–255 before slicing.
    ``include_test_images`` adds nnU-Net's imagesTs to imagesTr.
    """

    root: str = ""
    axis: int = 2
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    include_test_images: bool = True


@dataclass
class PretrainDataConfig:
    """Image sources and which slices to keep.

    A slice is kept when at least ``min_content_fraction`` of its pixels are above 0 after
    intensity scaling, so air-only and blank slices are skipped.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    min_content_fraction: float = 0.1


@dataclass
class PretrainModelConfig:
    """DINOv3 registry name and optional local checkpoint (Hugging Face folder or Meta ``.pth``)."""

    name: str = "dinov3_vit_tiny"
    checkpoint: str | None = None


@dataclass
class PretrainLoraConfig:
    """LoRA rank, scaling and dropout, the encoder's ``lora_targets`` names and block indices (null: all)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    blocks: list[int] | None = None


@dataclass
class PretrainAdaptationConfig:
    """``lora`` trains LoRA layers and the heads only; ``full`` trains every encoder parameter."""

    method: str = "lora"
    lora: PretrainLoraConfig = field(default_factory=PretrainLoraConfig)


@dataclass
class CropConfig:
    """Multi-crop sizes in pixels (multiples of the patch size) and area fractions of the slice."""

    global_size: int = 64
    local_size: int = 32
    local_crops: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    flip: bool = True


@dataclass
class HeadConfig:
    """Projection heads: MLP width, bottleneck size and number of prototypes K (class and patch heads)."""

    hidden_dim: int = 256
    bottleneck_dim: int = 64
    prototypes: int = 1024
    patch_prototypes: int = 1024


@dataclass
class ObjectiveConfig:
    """DINO (class token) and iBOT (masked patches) losses with centering and sharpening.

    The teacher temperature rises linearly from ``teacher_temperature_start`` to
    ``teacher_temperature`` over ``teacher_warmup_steps``. Each global crop of the
    student is masked with probability ``mask_probability``, and a masked crop hides a
    fraction drawn uniformly from ``mask_ratio`` of its patches.
    """

    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    teacher_temperature_start: float = 0.04
    teacher_warmup_steps: int = 0
    center_momentum: float = 0.9
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass
class TeacherConfig:
    """EMA momentum of the teacher, raised from ``momentum_start`` to ``momentum_end`` on a cosine."""

    momentum_start: float = 0.996
    momentum_end: float = 1.0


@dataclass
class PretrainTrainConfig:
    """Optimisation: steps, per-process batch size, AdamW with linear warmup and cosine decay.

    ``clip_grad_norm`` of 0 turns clipping off. A checkpoint is written every
    ``checkpoint_every`` steps and at the end; only the newest ``keep_checkpoints`` stay.
    """

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.04
    clip_grad_norm: float = 3.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    mixed_precision: str = "no"


@dataclass
class CollapseConfig:
    """Collapse thresholds, checked on the teacher every step.

    ``entropy_threshold`` applies to the entropy of the batch-mean teacher distribution
    divided by log K (1 when the batch spreads over all prototypes, 0 when every image
    picks the same one). ``std_threshold`` applies to the standard deviation across the
    batch of the L2-normalised class tokens, averaged over channels and multiplied by
    sqrt(E), which is about 1 for independent random directions. ``uniform_threshold``
    applies to the mean over images of each teacher distribution's entropy divided by
    log K, which reaches 1 when every target is uniform. ``stop`` ends the run at the
    first step that collapses.
    """

    entropy_threshold: float = 0.05
    std_threshold: float = 0.02
    uniform_threshold: float = 0.98
    stop: bool = False


@dataclass
class ExportConfig:
    """Source network of the exported encoder checkpoint: ``teacher`` (usual for DINO) or ``student``."""

    encoder: str = "teacher"


@dataclass
class PretrainRecipe:
    """One self-supervised adaptation run."""

    name: str = "pretrain"
    seed: int = 0
    output_dir: str = "runs"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    adaptation: PretrainAdaptationConfig = field(default_factory=PretrainAdaptationConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_pretrain_recipe(recipe: PretrainRecipe) -> None:
    """Check ranges and choices that the types alone do not express.

    Raises:
        RecipeError: naming the first invalid key, its value and the allowed range.
    """
    _check_choice("adaptation.method", recipe.adaptation.method, PRETRAIN_METHODS)
    _check_choice("train.mixed_precision", recipe.train.mixed_precision, MIXED_PRECISION)
    _check_choice("export.encoder", recipe.export.encoder, EXPORT_SOURCES)
    if not recipe.data.sources:
        raise RecipeError(
            "recipe key 'data.sources' is empty; add at least one source, such as "
            "{root: $FMADAPT_DATA/Dataset001_TotalSegCT}"
        )
    for index, source in enumerate(recipe.data.sources):
        if not source.root:
            raise RecipeError(f"recipe key 'data.sources[{index}].root' is empty; set it to a dataset folder")
        if source.axis not in (0, 1, 2):
            raise RecipeError(f"recipe key 'data.sources[{index}].axis' must be 0, 1 or 2, got {source.axis}")
    _check_fraction("data.min_content_fraction", recipe.data.min_content_fraction, allow_one=True)
    _check_counts(recipe)
    _check_crops(recipe.crops)
    _check_objective(recipe.objective)
    if recipe.objective.koleo_weight > 0 and recipe.train.batch_size < 2:
        raise RecipeError(
            f"recipe key 'objective.koleo_weight' is {recipe.objective.koleo_weight}, but the KoLeo term compares "
            f"the images of a batch and 'train.batch_size' is {recipe.train.batch_size}; set train.batch_size >= 2 "
            "or objective.koleo_weight=0"
        )
    _check_teacher(recipe.teacher)
    _check_train(recipe.train)
    for key in ("entropy_threshold", "std_threshold"):
        if getattr(recipe.collapse, key) < 0:
            raise RecipeError(f"recipe key 'collapse.{key}' must be >= 0, got {getattr(recipe.collapse, key)}")
    if not 0.0 < recipe.collapse.uniform_threshold <= 1.0:
        raise RecipeError(
            f"recipe key 'collapse.uniform_threshold' must be in (0, 1], got {recipe.collapse.uniform_threshold}; "
            "1 turns the uniform-target check off"
        )


def _check_counts(recipe: PretrainRecipe) -> None:
    at_least_one = {
        "adaptation.lora.rank": recipe.adaptation.lora.rank,
        "head.hidden_dim": recipe.head.hidden_dim,
        "head.bottleneck_dim": recipe.head.bottleneck_dim,
        "head.prototypes": recipe.head.prototypes,
        "head.patch_prototypes": recipe.head.patch_prototypes,
        "train.steps": recipe.train.steps,
        "train.batch_size": recipe.train.batch_size,
        "train.checkpoint_every": recipe.train.checkpoint_every,
        "train.keep_checkpoints": recipe.train.keep_checkpoints,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise RecipeError(f"recipe key '{key}' must be at least 1, got {value}")
    if recipe.adaptation.lora.alpha <= 0:
        raise RecipeError(f"recipe key 'adaptation.lora.alpha' must be > 0, got {recipe.adaptation.lora.alpha}")
    _check_fraction("adaptation.lora.dropout", recipe.adaptation.lora.dropout, allow_one=False)
    if not recipe.adaptation.lora.target_modules:
        raise RecipeError(
            "recipe key 'adaptation.lora.target_modules' is empty; list encoder LoRA targets such as [q, v]"
        )


def _check_crops(crops: CropConfig) -> None:
    for key in ("global_size", "local_size"):
        if getattr(crops, key) < 1:
            raise RecipeError(f"recipe key 'crops.{key}' must be at least 1 pixel, got {getattr(crops, key)}")
    if crops.local_crops < 0:
        raise RecipeError(f"recipe key 'crops.local_crops' must be >= 0, got {crops.local_crops}")
    for key in ("global_scale", "local_scale"):
        low, high = getattr(crops, key)
        if not 0.0 < low <= high <= 1.0:
            raise RecipeError(f"recipe key 'crops.{key}' must satisfy 0 < low <= high <= 1, got {[low, high]}")


def _check_objective(objective: ObjectiveConfig) -> None:
    for key in ("student_temperature", "teacher_temperature", "teacher_temperature_start"):
        if not getattr(objective, key) > 0:
            raise RecipeError(f"recipe key 'objective.{key}' must be > 0, got {getattr(objective, key)}")
    if objective.teacher_warmup_steps < 0:
        raise RecipeError(
            f"recipe key 'objective.teacher_warmup_steps' must be >= 0, got {objective.teacher_warmup_steps}"
        )
    _check_fraction("objective.center_momentum", objective.center_momentum, allow_one=True)
    _check_fraction("objective.mask_probability", objective.mask_probability, allow_one=True)
    for key in ("dino_weight", "ibot_weight", "koleo_weight"):
        if getattr(objective, key) < 0:
            raise RecipeError(f"recipe key 'objective.{key}' must be >= 0, got {getattr(objective, key)}")
    if objective.dino_weight == 0 and objective.ibot_weight == 0:
        raise RecipeError("recipe keys 'objective.dino_weight' and 'objective.ibot_weight' are both 0; set one above 0")
    low, high = objective.mask_ratio
    if not 0.0 <= low <= high < 1.0:
        raise RecipeError(f"recipe key 'objective.mask_ratio' must satisfy 0 <= low <= high < 1, got {[low, high]}")


def _check_teacher(teacher: TeacherConfig) -> None:
    start, end = teacher.momentum_start, teacher.momentum_end
    if not 0.0 <= start <= end <= 1.0:
        raise RecipeError(
            f"recipe keys 'teacher.momentum_start' and 'teacher.momentum_end' must satisfy "
            f"0 <= start <= end <= 1, got {start} and {end}"
        )


def _check_train(train: PretrainTrainConfig) -> None:
    if not train.learning_rate > 0:
        raise RecipeError(f"recipe key 'train.learning_rate' must be > 0, got {train.learning_rate}")
    if not 0 <= train.min_learning_rate <= train.learning_rate:
        raise RecipeError(
            f"recipe key 'train.min_learning_rate' must be between 0 and train.learning_rate "
            f"({train.learning_rate}), got {train.min_learning_rate}"
        )
    for key in ("warmup_steps", "weight_decay", "clip_grad_norm"):
        if getattr(train, key) < 0:
            raise RecipeError(f"recipe key 'train.{key}' must be >= 0, got {getattr(train, key)}")


def _check_fraction(key: str, value: float, *, allow_one: bool) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise RecipeError(f"recipe key '{key}' must be in {bound}, got {value}")


def pretrain_recipe_from_dict(data: dict[str, Any]) -> PretrainRecipe:
    """Build and validate a PretrainRecipe from nested dicts (YAML content)."""
    recipe = _build(PretrainRecipe, data)
    validate_pretrain_recipe(recipe)
    return recipe


def load_pretrain_recipe(path: str | Path, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a YAML pretrain recipe, apply ``key=value`` overrides and validate it.

    Raises:
        FileNotFoundError: the recipe file does not exist.
        RecipeError: a key is unknown or a value is invalid; the message names the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe file {path} not found; pass the path of a YAML recipe such as recipes/dinov3_ssl_ct.yaml"
        )
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must contain a mapping at the top level")
    return pretrain_recipe_from_dict(apply_overrides(data, overrides or []))


def resolve_source_roots(recipe: PretrainRecipe) -> list[Path]:
    """Return each source folder with environment variables expanded, failing on a missing one.

    Raises:
        RecipeError: a variable is unset or a folder does not exist.
    """
    roots = []
    for index, source in enumerate(recipe.data.sources):
        key = f"data.sources[{index}].root"
        root = Path(expand_path(source.root, key))
        if not root.is_dir():
            raise RecipeError(
                f"data folder {root} (recipe key '{key}' = {source.root!r}) not found; "
                "check FMADAPT_DATA or correct the path"
            )
        roots.append(root)
    return roots
