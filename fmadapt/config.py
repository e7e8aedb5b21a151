"""Recipe schema: typed dataclasses loaded from YAML with strict keys and dotted overrides.

A recipe describes one few-shot run: which data, which model and checkpoint, how the
encoder is adapted, how training runs and how evaluation is done. ``load_recipe`` reads a
YAML file, applies ``key=value`` overrides such as ``train.epochs=3``, expands environment
variables in paths and validates every value. The resolved recipe is saved with each run so
``fmadapt evaluate`` rebuilds exactly the trained model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from fmadapt.errors import RecipeError

SPLIT_MODES = ("cases", "slices")
ADAPTATION_METHODS = ("lora", "adapters", "none")
TRAIN_MODES = ("prompted", "automatic")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("cosine", "constant")


@dataclass
class IntensityConfig:
    """Intensity scaling to 0–255 before the model's own preprocessing.

    ``mode`` is one of ``auto``, ``ct_window``, ``percentile``, ``minmax`` or ``none``; a CT
    window is given by name (``soft_tissue``) or by ``width`` and ``level`` in HU.
    """

    mode: str = "auto"
    window: str | None = None
    width: float | None = None
    level: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)


@dataclass
class SplitConfig:
    """Division of cases, or of the slices of one case, into train, validation and test.

    ``mode: cases`` draws ``train`` cases at random with the recipe seed, then ``validation``
    cases from the rest; the remaining cases are the test split. ``mode: slices`` uses one
    case (``case``) and cuts its slices along the slice axis into contiguous blocks, in the
    order train, validation, test, by ``slice_fractions``. Contiguous blocks keep neighbouring,
    nearly identical slices out of different splits. ``train`` is then the number of training
    slices drawn (with foreground) from the train block.
    """

    mode: str = "cases"
    train: int = 5
    validation: int = 2
    case: str | None = None
    slice_fractions: tuple[float, float, float] = (0.5, 0.15, 0.35)


@dataclass
class DataConfig:
    """Dataset folder, the classes to segment and how 2D samples are taken from it."""

    root: str = ""
    labels: list[str] = field(default_factory=list)
    axis: int | None = None
    min_foreground_pixels: int = 10
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    """Registry model, encoder input size in pixels and optional local checkpoint files.

    ``checkpoint`` is a SAM or MedSAM ``.pth`` for the SAM family, or for a ``dinov3_*``
    model a Hugging Face folder or Meta ``.pth``, such as the ``encoder`` folder that
    ``fmadapt pretrain`` writes. ``decoder_checkpoint`` is a SAM-format ``.pth`` whose
    ``prompt_encoder.*`` and ``mask_decoder.*`` weights are loaded after ``checkpoint``, so
    a DINOv3 model's decoder can start from SAM or MedSAM. Its prompt embedding size must
    match the model's decoder.
    """

    name: str = "sam_vit_b"
    image_size: int | None = None
    checkpoint: str | None = None
    decoder_checkpoint: str | None = None


@dataclass
class LoraConfigSection:
    """LoRA rank, scaling, dropout and the encoder Linear layers it wraps."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["qkv"])


@dataclass
class AdapterConfigSection:
    """Bottleneck adapter width (embedding size divided by ``reduction``) and placement."""

    reduction: int = 4
    placement: str = "sequential"
    scale: float = 0.5


@dataclass
class AdaptationConfig:
    """Encoder adaptation method (LoRA, adapters or none) and the freezing preset that picks what trains."""

    method: str = "lora"
    preset: str = "adapters_decoder"
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    adapters: AdapterConfigSection = field(default_factory=AdapterConfigSection)


@dataclass
class TrainConfig:
    """Optimisation settings.

    ``box_jitter`` is the maximum shift of each box side in pixels. ``augment`` turns on
    random flips, quarter turns and crops (``crop_scale`` = side fraction range).
    ``scheduler`` is ``cosine`` or ``constant`` after ``warmup_steps`` optimizer steps of
    linear warm-up; ``max_grad_norm`` clips the gradient norm (null turns clipping off).
    ``mixed_precision`` is ``no``, ``bf16`` (CPU or GPU) or ``fp16`` (GPU, with a grad scaler).
    ``gradient_checkpointing`` recomputes encoder block activations in the backward pass,
    trading time for memory. ``cache_dir`` (null: off) is a folder of memory-mapped image
    embeddings that decoder-only training reads and writes (``$VARIABLES`` are expanded). It
    needs a frozen encoder and pays off with ``augment: false``, because augmented images
    differ on every step.
    """

    modes: list[str] = field(default_factory=lambda: list(TRAIN_MODES))
    epochs: int = 10
    steps_per_epoch: int = 20
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    box_jitter: float = 10.0
    iou_loss_weight: float = 1.0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    max_validation_slices: int = 32
    cache_dir: str | None = None


@dataclass
class EvaluateConfig:
    """Evaluation settings: NSD tolerance in mm (pixels for 2D images) and box jitter levels.

    ``max_cases`` evaluates only the first cases of the split (in split order), for quick looks.
    Automatic evaluation also scores each probability cut-off of ``threshold_sweep`` (in
    (0, 1]) and each minimum component size of ``min_size_sweep_mm3`` (mm³; pixels for 2D
    images). ``detection: true`` adds lesion-level detection (FROC, per-lesion Dice).
    ``cache_dir`` (null: off) is a folder of memory-mapped image embeddings, so evaluating
    the same images with the same encoder again skips the encoder (``$VARIABLES`` are expanded).
    """

    nsd_tolerance_mm: float = 2.0
    box_jitter: list[float] = field(default_factory=lambda: [0.0, 10.0])
    split: str = "test"
    write_predictions: bool = True
    max_cases: int | None = None
    detection: bool = False
    threshold_sweep: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    min_size_sweep_mm3: list[float] = field(default_factory=lambda: [10.0, 50.0, 100.0, 500.0])
    cache_dir: str | None = None


@dataclass
class Recipe:
    """One few-shot run: data, model, adaptation, training and evaluation settings."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(name: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to ``annotation``, raising RecipeError that names ``key``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is None and annotation is type(None):
        if value is not None:
            raise RecipeError(f"recipe key '{key}' must be null, got {value!r}")
        return None
    if args and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{key}' must be a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if len(args) > 1 and args[-1] is not Ellipsis and len(items) != len(args):
                raise RecipeError(f"recipe key '{key}' needs {len(args)} values, got {value!r}")
            return tuple(items)
        return items
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"recipe key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"recipe key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"recipe key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"recipe key '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise RecipeError(
                f"unknown recipe key '{prefix}{key}'.{_closest(str(key), names)} "
                f"Allowed keys here: {', '.join(names)}"
            )
    kwargs = {name: _convert(data[name], hints[name], prefix + name) for name in names if name in data}
    return cls(**kwargs)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(
            f"recipe key '{key}' is {value!r}; allowed values: {', '.join(choices)}.{_closest(value, list(choices))}"
        )


def validate_recipe(recipe: Recipe) -> None:
    """Check value ranges and choices that the types alone do not express."""
    _check_choice("data.split.mode", recipe.data.split.mode, SPLIT_MODES)
    _check_choice("adaptation.method", recipe.adaptation.method, ADAPTATION_METHODS)
    _check_choice("train.mixed_precision", recipe.train.mixed_precision, MIXED_PRECISION)
    _check_choice("train.scheduler", recipe.train.scheduler, SCHEDULERS)
    for mode in recipe.train.modes:
        _check_choice("train.modes", mode, TRAIN_MODES)
    if not recipe.train.modes:
        raise RecipeError("recipe key 'train.modes' is empty; list 'prompted', 'automatic' or both")
    if not recipe.data.labels:
        raise RecipeError("recipe key 'data.labels' is empty; name at least one class to segment")

    _validate_train(recipe)
    _validate_split(recipe)
    _validate_evaluate(recipe)


def _validate_train(recipe: Recipe) -> None:
    positive = {
        "train.epochs": recipe.train.epochs,
        "train.steps_per_epoch": recipe.train.steps_per_epoch,
        "train.batch_size": recipe.train.batch_size,
        "data.split.train": recipe.data.split.train,
        "train.gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"recipe key '{key}' must be at least 1, got {value}")
    if recipe.train.warmup_steps < 0:
        raise RecipeError(f"recipe key 'train.warmup_steps' must be >= 0, got {recipe.train.warmup_steps}")
    if recipe.train.max_grad_norm is not None and recipe.train.max_grad_norm <= 0:
        raise RecipeError(f"recipe key 'train.max_grad_norm' must be > 0 or null, got {recipe.train.max_grad_norm}")
    if recipe.train.learning_rate <= 0:
        raise RecipeError(f"recipe key 'train.learning_rate' must be > 0, got {recipe.train.learning_rate}")

    low, high = recipe.train.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise RecipeError(f"recipe key 'train.crop_scale' must satisfy 0 < low <= high <= 1, got {recipe.train.crop_scale}")
    if recipe.train.box_jitter < 0 or any(j < 0 for j in recipe.evaluate.box_jitter):
        raise RecipeError(
            "recipe keys 'train.box_jitter' and 'evaluate.box_jitter' must be >= 0 pixels, got "
            f"{recipe.train.box_jitter} and {recipe.evaluate.box_jitter}"
        )


def _validate_split(recipe: Recipe) -> None:
    if recipe.data.split.mode != "slices":
        return
    if recipe.data.axis is None:
        raise RecipeError("recipe key 'data.axis' must be set (0, 1 or 2) when data.split.mode is 'slices'")
    fractions = recipe.data.split.slice_fractions
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise RecipeError(f"recipe key 'data.split.slice_fractions' must be >= 0 and sum to 1, got {fractions}")


def _validate_evaluate(recipe: Recipe) -> None:
    if recipe.evaluate.max_cases is not None and recipe.evaluate.max_cases < 1:
        raise RecipeError(f"recipe key 'evaluate.max_cases' must be at least 1 or null, got {recipe.evaluate.max_cases}")
    if recipe.evaluate.nsd_tolerance_mm < 0:
        raise RecipeError(f"recipe key 'evaluate.nsd_tolerance_mm' must be >= 0, got {recipe.evaluate.nsd_tolerance_mm}")
    if any(not 0.0 < cut <= 1.0 for cut in recipe.evaluate.threshold_sweep):
        raise RecipeError(
            f"recipe key 'evaluate.threshold_sweep' must list probabilities in (0, 1], got {recipe.evaluate.threshold_sweep}"
        )
    if any(not 0.0 <= size < float("inf") for size in recipe.evaluate.min_size_sweep_mm3):
        raise RecipeError(
            f"recipe key 'evaluate.min_size_sweep_mm3' must list finite sizes >= 0 mm³, got {recipe.evaluate.min_size_sweep_mm3}"
        )


_ENV_PATTERN = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_path(value: str, key: str) -> str:
    """Expand ``$NAME`` / ``${NAME}`` in a path; an unset variable is an error naming it."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise RecipeError(
                f"recipe key '{key}' is {value!r}, but the environment variable {name} is not set. "
                f"Set {name} to the folder that contains the data (for example "
                f"`export {name}=/path/to/data`) or override the key: `{key}=/path/to/folder`."
            )
        return os.environ[name]

    return os.path.expanduser(_ENV_PATTERN.sub(substitute, value))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} must look like key=value, for example train.epochs=3")
        dotted, raw = override.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {override!r}: '{part}' is not a section of the recipe")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from nested dicts (YAML content)."""
    recipe = _build(Recipe, data)
    validate_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides and validate it.

    Raises:
        FileNotFoundError: the recipe file does not exist.
        RecipeError: a key is unknown or a value is invalid; the message names the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found; pass the path of a YAML recipe such as recipes/kvasir_polyp_5shot_lora.yaml")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must contain a mapping at the top level")
    return recipe_from_dict(apply_overrides(data, overrides or []))


def resolve_data_root(recipe: Recipe) -> Path:
    """Return the recipe's data folder, failing at once when it is unset or missing."""
    if not recipe.data.root:
        raise RecipeError("recipe key 'data.root' is empty; set it to the dataset folder (data.root=/path/to/dataset)")
    root = Path(expand_path(recipe.data.root, "data.root"))
    if not root.is_dir():
        raise RecipeError(
            f"data folder {root} (recipe key 'data.root' = {recipe.data.root!r}) not found. "
            "Check FMADAPT_DATA or override the path: data.root=/path/to/dataset"
        )
    return root


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        yaml.safe_dump(_plain(recipe.to_dict()), handle, sort_keys=False)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
