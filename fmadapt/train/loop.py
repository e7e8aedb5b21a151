"""Few-shot fine-tuning with Hugging Face Accelerate.

The same code runs on one CPU, one GPU, or several processes under ``accelerate launch``:
Accelerate wraps the model for DDP and shards the sampled batches across processes. Only
the main process writes files and runs validation.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from fmadapt import __version__
from fmadapt.adapt.summary import summarize_parameters
from fmadapt.adapt.trained_file import save_trained_parameters
from fmadapt.config import Recipe, load_recipe, resolve_data_root, save_recipe
from fmadapt.data.datasets import DatasetInfo, read_dataset
from fmadapt.evaluate.metrics import dice
from fmadapt.inference.cache import EmbeddingCache
from fmadapt.inference.label_maps import class_logits_automatic, class_logits_from_boxes, embed_image
from fmadapt.data.prompts import box_from_mask
from fmadapt.data.slices import foreground_slices
from fmadapt.errors import DataError, RecipeError
from fmadapt.runs import RECIPE_FILE, SPLIT_FILE, base_fingerprint, build_model, check_checkpoint_paths
from fmadapt.train.augment import AugmentSettings
from fmadapt.train.checkpointing import (
    find_checkpoint,
    load_training_state,
    remove_training_state,
    save_training_state,
)
from fmadapt.train.dataset import PromptedSliceDataset
from fmadapt.train.embedding_cache import TrainingEmbeddings, open_training_cache
from fmadapt.train.objective import FewShotObjective
from fmadapt.train.samples import (
    SliceSample,
    class_ids,
    load_normalised_case,
    split_slices_for_evaluation,
    training_slices,
)
from fmadapt.train.splits import SplitPlan, split_cases, split_slices

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"


@dataclass
class TrainResult:
    """Result of a training run: its folder, the per-epoch history and the trained model in memory."""

    run_dir: Path
    history: list[dict]
    model: torch.nn.Module


def plan_split(info: DatasetInfo, recipe: Recipe, label_ids: list[int]) -> SplitPlan:
    """Draw the run's split with the recipe seed (see ``SplitConfig``)."""
    split = recipe.data.split
    case_ids = [case.case_id for case in info.cases]
    if split.mode == "cases":
        return split_cases(case_ids, split, recipe.seed)
    case_id = split.case or case_ids[0]
    case = load_normalised_case(info, case_id, recipe, label_ids)
    classes = list(range(1, len(label_ids) + 1))
    with_foreground = foreground_slices(case.label, recipe.data.axis, classes, min_pixels=1)
    if not with_foreground:
        raise DataError(f"case {case_id} contains none of the classes {recipe.data.labels}; check data.labels")
    extent = (with_foreground[0], with_foreground[-1] + 1)
    return split_slices(case_id, extent, split, recipe.seed)


def validation_samples(info: DatasetInfo, plan: SplitPlan, recipe: Recipe, label_ids: list[int]) -> list[SliceSample]:
    """Validation slices with foreground, at most ``train.max_validation_slices``, evenly spaced."""
    samples: list[SliceSample] = []
    for case_id in plan.cases["validation"]:
        case = load_normalised_case(info, case_id, recipe, label_ids)
        slices, _ = split_slices_for_evaluation(case, plan, "validation", recipe.data.axis)
        samples.extend(s for s in slices if s.label.any())
    limit = recipe.train.max_validation_slices
    if len(samples) > limit:
        keep = np.linspace(0, len(samples) - 1, limit).round().astype(int)
        samples = [samples[i] for i in keep]
    return samples


def validate(
    segmenter, samples: list[SliceSample], num_classes: int, modes: list[str], cache: EmbeddingCache | None = None
) -> dict[str, float]:
    """Mean 2D Dice over validation slices and present classes, per mode (boxes without jitter).

    With ``cache`` (decoder-only training), the embeddings of the slices are read from it
    after the first epoch.
    """
    scores: dict[str, list[float]] = {mode: [] for mode in modes}
    segmenter.eval()
    for sample in samples:
        embedding = embed_image(segmenter, sample.image, cache)
        size = sample.label.shape[:2]
        boxes = {c: box_from_mask(sample.label == c) for c in range(1, num_classes + 1)}
        boxes = {c: box for c, box in boxes.items() if box is not None}
        logits = {}
        if "prompted" in modes:
            logits["prompted"] = class_logits_from_boxes(segmenter, embedding, boxes, size, num_classes)
        if "automatic" in modes:
            logits["automatic"] = class_logits_automatic(segmenter, embedding, size)
        for mode, class_logits in logits.items():
            for c in boxes:
                scores[mode].append(dice(class_logits[c - 1].numpy() > 0, sample.label == c))
    segmenter.train()
    return {f"validation_dice_{mode}": float(np.mean(v)) if v else float("nan") for mode, v in scores.items()}


def prepare_run_dir(recipe: Recipe, output: str | Path | None, resume: bool) -> Path:
    """Return the run folder: ``output`` or ``<output_dir>/<name>``.

    Raises when the folder contains a finished run, when it contains an unfinished one and
    ``resume`` is false, and when ``resume`` is true but there is nothing to resume.
    """
    run_dir = Path(output) if output else Path(recipe.output_dir) / recipe.name
    if (run_dir / "trained.safetensors").exists():
        raise FileExistsError(
            f"{run_dir} already contains a trained run; pass --output with a new folder or delete it"
        )
    checkpoint = find_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no training checkpoint to resume; run without --resume")
    if not resume and checkpoint is not None:
        raise FileExistsError(
            f"{run_dir} contains an unfinished run (checkpoint {checkpoint.name}); pass --resume to continue it "
            "or choose a new --output folder"
        )
    if resume:
        saved = load_recipe(run_dir / RECIPE_FILE)
        if saved.to_dict() != recipe.to_dict():
            raise RecipeError(
                f"the recipe differs from the one saved in {run_dir / RECIPE_FILE}; resume with the same "
                "recipe and overrides as the interrupted run"
            )
    return run_dir


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.warmup_steps`` optimizer steps, then ``train.scheduler``."""
    total = max(1, recipe.train.epochs * recipe.train.steps_per_epoch // recipe.train.gradient_accumulation_steps)
    warmup = recipe.train.warmup_steps
    cosine = recipe.train.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def has_accelerator() -> bool:
    """Return True when torch finds an available GPU or another accelerator device."""
    # current_accelerator() names CUDA on a CUDA build even without a GPU, so ask for
    # availability instead.
    return bool(torch.accelerator.is_available())


def make_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerator with the recipe's precision and accumulation.

    On a machine without an accelerator the Accelerator is created with ``cpu=True``, so
    several processes started by ``torchrun`` or ``accelerate launch --multi_gpu`` train
    together over gloo instead of each training alone.

    Unused-parameter detection stays on in DDP: SAM's decoder computes four mask tokens but
    single-mask training uses one, and prompted-only training leaves the class embeddings
    unused, so some trainable parameters get no gradient in a step.
    """
    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        cpu=not has_accelerator(),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        kwargs_handlers=[kwargs],
    )


def train(recipe: Recipe, output: str | Path | None = None, *, resume: bool = False) -> TrainResult:
    """Fine-tune the recipe's model on its few-shot training split and save the run.

    Writes to the run folder: ``recipe.yaml`` (resolved), ``split.json``, ``history.json``
    (losses and validation Dice per epoch), ``trained.safetensors`` and ``trained.json``.
    After each epoch the training state goes to ``checkpoint/``; ``resume=True`` continues
    an interrupted run from there with the same data order, optimizer and scheduler state.
    The checkpoint folder is removed once the trained parameters are saved.

    With ``train.cache_dir`` and a frozen encoder, training and validation images are encoded
    once and their embeddings read back from that folder. Each epoch's history record then
    has ``embedding_cache_hits``, ``embedding_cache_misses`` and ``embedding_cache_hit_rate``
    of the training images (see :mod:`fmadapt.train.embedding_cache`).
    """
    accelerator = make_accelerator(recipe)
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        logger.info(
            "%d processes: DDP unused-parameter detection is on, because trainable parameters such as "
            "the unused mask tokens of single-mask decoding get no gradient in some steps",
            accelerator.num_processes,
        )
    set_seed(recipe.seed)
    root = resolve_data_root(recipe)
    # Checked before the run folder is written, so a wrong path or a cache setting that
    # cannot work with the preset leaves nothing behind.
    check_checkpoint_paths(recipe)
    model = build_model(recipe)
    cache = open_training_cache(recipe, model)
    run_dir = prepare_run_dir(recipe, output, resume)

    info = read_dataset(root)
    label_ids = list(class_ids(info, recipe).values())
    plan = SplitPlan.load(run_dir / SPLIT_FILE) if resume else plan_split(info, recipe, label_ids)
    if accelerator.is_main_process and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / RECIPE_FILE)
        plan.save(run_dir / SPLIT_FILE)
        counts = {name: len(cases) for name, cases in plan.cases.items()}
        logger.info("run folder %s; cases per split %s (listed in %s)", run_dir, counts, SPLIT_FILE)

    if recipe.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if accelerator.is_main_process:
        logger.info("parameters:\n%s", summarize_parameters(model))
    num_classes = len(label_ids)
    samples = training_slices(info, plan, recipe, label_ids)
    dataset = PromptedSliceDataset(
        samples,
        model.transform,
        num_classes,
        box_jitter=recipe.train.box_jitter,
        seed=recipe.seed,
        augment=AugmentSettings(crop_scale=tuple(recipe.train.crop_scale)) if recipe.train.augment else None,
        image_digests=cache is not None,
    )
    num_samples = recipe.train.steps_per_epoch * recipe.train.batch_size * accelerator.num_processes
    generator = torch.Generator()
    sampler = RandomSampler(dataset, replacement=True, num_samples=num_samples, generator=generator)
    loader = DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=sampler)

    embeddings = TrainingEmbeddings(cache) if cache is not None else None
    objective = FewShotObjective(model, recipe.train.modes, recipe.train.iou_loss_weight, embeddings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay)
    scheduler = make_scheduler(optimizer, recipe)
    objective, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    # Registered rather than prepared, so it steps once per optimizer step on every process.
    accelerator.register_for_checkpointing(scheduler)
    validation = validation_samples(info, plan, recipe, label_ids) if accelerator.is_main_process else []

    start_epoch, history = load_training_state(accelerator, run_dir) if resume else (0, [])
    for epoch in range(start_epoch, recipe.train.epochs):
        # Seeding by epoch makes the data order and augmentation of an epoch independent of
        # how the run got there, so a resumed run trains on the same batches.
        generator.manual_seed(recipe.seed + epoch)
        dataset.reseed(recipe.seed, accelerator.process_index, epoch)
        record = _train_epoch(accelerator, objective, optimizer, scheduler, loader, epoch, recipe)
        if embeddings is not None:
            record.update(_cache_counts(accelerator, embeddings))
        if accelerator.is_main_process and validation:
            segmenter = accelerator.unwrap_model(objective).segmenter
            record.update(validate(segmenter, validation, num_classes, recipe.train.modes, cache))
        history.append(record)
        if accelerator.is_main_process:
            logger.info("epoch %d: %s", epoch + 1, _format(record))
        save_training_state(accelerator, run_dir, epoch + 1, history)

    if accelerator.is_main_process:
        segmenter = accelerator.unwrap_model(objective).segmenter
        config = _trained_config(recipe, plan)
        config["base_fingerprint"] = base_fingerprint(segmenter)
        save_trained_parameters(segmenter, run_dir, config=config)
        _write_json(run_dir / HISTORY_FILE, history)
        remove_training_state(run_dir)
        logger.info("saved trained parameters to %s", run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, history, accelerator.unwrap_model(objective).segmenter)


def _train_epoch(accelerator: Accelerator, objective, optimizer, scheduler, loader, epoch: int, recipe: Recipe) -> dict:
    objective.train()
    totals: dict[str, float] = {}
    steps = 0
    description = f"epoch {epoch + 1}/{recipe.train.epochs}"
    progress = tqdm(loader, desc=description, disable=not accelerator.is_main_process, leave=False)
    for batch in progress:
        with accelerator.accumulate(objective):
            losses = objective(**batch)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and recipe.train.max_grad_norm is not None:
                accelerator.clip_grad_norm_(objective.parameters(), recipe.train.max_grad_norm)
            # The prepared optimizer skips its step until the accumulation window is full.
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        steps += 1
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        progress.set_postfix(loss=f"{float(losses['loss'].detach()):.4f}")
    record = {"epoch": epoch + 1, "steps": steps, "learning_rate": scheduler.get_last_lr()[0]}
    record.update({name if name == "loss" else f"loss_{name}": total / max(steps, 1) for name, total in totals.items()})
    return record


def _cache_counts(accelerator: Accelerator, embeddings: TrainingEmbeddings) -> dict:
    """Embedding cache hits, misses and hit rate of the epoch's training images, summed over processes."""
    counts = torch.tensor(embeddings.take_counts(), dtype=torch.int64, device=accelerator.device)
    hits, misses = (int(value) for value in accelerator.reduce(counts, reduction="sum"))
    rate = hits / (hits + misses) if hits + misses else float("nan")
    return {"embedding_cache_hits": hits, "embedding_cache_misses": misses, "embedding_cache_hit_rate": rate}


def _trained_config(recipe: Recipe, plan: SplitPlan) -> dict:
    return {
        "model": recipe.model.name,
        "image_size": recipe.model.image_size,
        "checkpoint": recipe.model.checkpoint,
        "class_names": list(recipe.data.labels),
        "adaptation": recipe.to_dict()["adaptation"],
        "split_seed": plan.seed,
        "fmadapt_version": __version__,
    }


def _format(record: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
