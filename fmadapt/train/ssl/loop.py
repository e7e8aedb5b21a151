"""``fmadapt pretrain``: DINO + iBOT self-distillation of a DINOv3 encoder with Accelerate.

The student (encoder with LoRA layers, or fully trainable, plus two projection heads)
learns to match an EMA teacher across multi-crop views and masked patches. The same code
runs on one CPU, one GPU or several processes under ``accelerate launch``. Checkpoints
hold the student, optimizer, teacher, loss centers, step counter and RNG states, so a
resumed run continues from the saved step. The finished run exports the teacher's (or
student's) encoder with LoRA merged, in the Hugging Face folder format.

Run folder: ``recipe.yaml``, ``history.json`` (one record per step),
``checkpoints/step_NNNNNN/`` and, when complete, ``encoder/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from peft import LoraConfig, inject_adapter_in_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fmadapt.config import save_recipe
from fmadapt.models.dinov3 import DinoV3Encoder
from fmadapt.train.ssl.config import PretrainRecipe
from fmadapt.train.ssl.data import MultiCropDataset, MultiCropSettings, load_pretrain_slices
from fmadapt.train.ssl.export import save_encoder_checkpoint
from fmadapt.train.ssl.heads import ProjectionHead, SslNetwork
from fmadapt.train.ssl.losses import DinoLoss, IbotPatchLoss, koleo_loss

__all__ = [
    "CollapseMonitor",
    "CollapseReport",
    "PretrainResult",
    "build_student",
    "collapse_metrics",
    "image_entropy",
    "pretrain",
]

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
HISTORY_FILE = "history.json"
CHECKPOINT_FOLDER = "checkpoints"
ENCODER_FOLDER = "encoder"
_CHECKPOINT_PREFIX = "step_"


@dataclass
class CollapseReport:
    """Collapse measures of one step and the names of those past their threshold."""

    entropy: float
    feature_std: float
    reasons: list[str] = field(default_factory=list)
    image_entropy: float | None = None

    @property
    def collapsed(self) -> bool:
        return bool(self.reasons)


@dataclass(frozen=True)
class CollapseMonitor:
    """Flag a step whose teacher output or features have collapsed (thresholds as in ``CollapseConfig``).

    Two collapses show in the teacher's targets: every image on one prototype (the
    entropy of the batch-mean distribution falls) and every image on a uniform
    distribution (the entropy of each image's own distribution rises to its maximum).
    The third, features that no longer depend on the image, shows in the class tokens.
    """

    entropy_threshold: float
    std_threshold: float
    uniform_threshold: float = 1.0

    def check(self, entropy: float, feature_std: float, image_entropy: float | None = None) -> CollapseReport:
        report = CollapseReport(entropy, feature_std, image_entropy=image_entropy)
        if entropy < self.entropy_threshold:
            report.reasons.append(f"teacher entropy {entropy:.4f} < {self.entropy_threshold}")
        if feature_std < self.std_threshold:
            report.reasons.append(f"feature std {feature_std:.4f} < {self.std_threshold}")
        if image_entropy is not None and image_entropy > self.uniform_threshold:
            report.reasons.append(
                f"per-image teacher entropy {image_entropy:.4f} > {self.uniform_threshold} (targets are near uniform)"
            )
        return report


def collapse_metrics(teacher_probabilities: torch.Tensor, class_tokens: torch.Tensor) -> tuple[float, float]:
    """Return (normalised entropy, relative feature std) of one batch of teacher outputs.

    Args:
        teacher_probabilities: ...×K teacher targets. The entropy of their mean
            distribution is divided by log K, giving a value in [0, 1].
        class_tokens: ...×E class tokens, at least 2 in all. They are L2-normalised, and
            the per-channel standard deviation across tokens is averaged and multiplied
            by sqrt(E), which gives about 1 for independent random directions and 0
            when every token is the same.
    """
    mean_distribution = teacher_probabilities.detach().reshape(-1, teacher_probabilities.shape[-1]).float().mean(0)
    entropy = -(mean_distribution * mean_distribution.clamp_min(1e-12).log()).sum()
    prototypes = teacher_probabilities.shape[-1]
    normalised_entropy = float(entropy / math.log(prototypes)) if prototypes > 1 else 0.0
    tokens = torch.nn.functional.normalize(class_tokens.detach().reshape(-1, class_tokens.shape[-1]).float(), dim=-1)
    if tokens.shape[0] < 2:
        raise ValueError(f"class_tokens must contain at least 2 tokens to measure a spread, got {tokens.shape[0]}")
    spread = tokens.std(dim=0, unbiased=False).mean() * math.sqrt(tokens.shape[-1])
    return normalised_entropy, float(spread)


def image_entropy(teacher_probabilities: torch.Tensor) -> float:
    """Return the mean over images of each ...×K teacher distribution's entropy divided by log K.

    A value of 1 means every target is uniform over the K prototypes. Such targets teach
    the student nothing, while a teacher that still separates images gives values well below 1.
    """
    probabilities = teacher_probabilities.detach().reshape(-1, teacher_probabilities.shape[-1]).float()
    prototypes = probabilities.shape[-1]
    if prototypes < 2:
        return 0.0
    entropies = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)
    return float(entropies.mean() / math.log(prototypes))


@dataclass
class PretrainResult:
    """Outcome of one ``pretrain`` call.

    ``completed`` is true when all steps are done, and only then is ``encoder_dir`` set.
    ``stop_reason`` is the reason a run stopped early, and None for a completed run or
    one paused by ``stop_after``.
    """

    run_dir: Path
    step: int
    completed: bool
    stop_reason: str | None
    history: list[dict]
    encoder_dir: Path | None
    student: SslNetwork
    teacher: SslNetwork


class _StepCounter:
    """Optimizer steps done, saved with each checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def build_student(recipe: PretrainRecipe) -> SslNetwork:
    """Build the student: the registry encoder with its checkpoint, LoRA or full training, and heads."""
    encoder = DinoV3Encoder.from_registry(recipe.model.name, checkpoint=recipe.model.checkpoint)
    if recipe.adaptation.method == "lora":
        lora = recipe.adaptation.lora
        blocks = None if lora.blocks is None else list(lora.blocks)
        targets = encoder.target_module_names(list(lora.target_modules), blocks)
        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
        )
        inject_adapter_in_model(config, encoder)
        logger.info("applied LoRA rank %d to %d encoder layers", lora.rank, len(targets))
    head = recipe.head
    class_head = ProjectionHead(encoder.embed_dim, head.hidden_dim, head.bottleneck_dim, head.prototypes)
    patch_head = ProjectionHead(encoder.embed_dim, head.hidden_dim, head.bottleneck_dim, head.patch_prototypes)
    return SslNetwork(encoder, class_head, patch_head)


def _make_teacher(student: SslNetwork) -> SslNetwork:
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def _cosine(start: float, end: float, step: int, total: int) -> float:
    """Value at ``step`` of a half cosine from ``start`` (step 0) to ``end`` (step ``total``)."""
    progress = min(step / max(total, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _learning_rate(recipe: PretrainRecipe, step: int) -> float:
    train = recipe.train
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    decay_steps = max(train.steps - train.warmup_steps, 1)
    return _cosine(train.learning_rate, train.min_learning_rate, step - train.warmup_steps, decay_steps)


def _teacher_temperature(recipe: PretrainRecipe, step: int) -> float:
    objective = recipe.objective
    if step >= objective.teacher_warmup_steps:
        return objective.teacher_temperature
    fraction = step / objective.teacher_warmup_steps
    start = objective.teacher_temperature_start
    return start + fraction * (objective.teacher_temperature - start)


def _parameter_groups(student: SslNetwork, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms, tokens and LayerScale are not decayed."""
    trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    decayed = [p for name, p in trainable if p.ndim >= 2 and not name.startswith("encoder.backbone.embeddings.")]
    decayed_ids = {id(p) for p in decayed}
    plain = [p for _, p in trainable if id(p) not in decayed_ids]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@torch.no_grad()
def _update_teacher(student: SslNetwork, teacher: SslNetwork, momentum: float) -> None:
    """EMA of the trainable student parameters; frozen ones are equal in both and stay untouched."""
    for (name, source), (_, target) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        if source.requires_grad:
            target.mul_(momentum).add_(source.detach(), alpha=1.0 - momentum)


def _run_dir(recipe: PretrainRecipe, output: str | Path | None) -> Path:
    run_dir = Path(output) if output else Path(recipe.output_dir) / recipe.name
    if (run_dir / ENCODER_FOLDER).exists():
        raise FileExistsError(
            f"{run_dir} already contains a finished pretraining run ({ENCODER_FOLDER}/); "
            "pass --output with a new folder"
        )
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the checkpoint folder with the highest step in ``run_dir``, or None."""
    folder = run_dir / CHECKPOINT_FOLDER
    if not folder.is_dir():
        return None
    found = [path for path in folder.iterdir() if path.is_dir() and path.name.startswith(_CHECKPOINT_PREFIX)]
    found = [path for path in found if path.name[len(_CHECKPOINT_PREFIX) :].isdigit()]
    return max(found, key=lambda path: int(path.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, history: list[dict], keep: int) -> None:
    """Save the Accelerate state under a temporary name and rename it when every process has written."""
    folder = run_dir / CHECKPOINT_FOLDER / f"{_CHECKPOINT_PREFIX}{step:06d}"
    staging = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(staging / HISTORY_FILE, history)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        _write_json(run_dir / HISTORY_FILE, history)
        _remove_old_checkpoints(folder.parent, keep)
        logger.info("saved checkpoint %s", folder)
    accelerator.wait_for_everyone()


def _remove_old_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step_NNNNNN`` folders; staging folders are left alone."""
    saved = [path for path in folder.iterdir() if path.is_dir() and path.name[len(_CHECKPOINT_PREFIX) :].isdigit()]
    saved.sort(key=lambda path: int(path.name[len(_CHECKPOINT_PREFIX) :]))
    for path in saved[: max(len(saved) - keep, 0)]:
        shutil.rmtree(path)


def _write_json(path: Path, data) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(staging, path)


class _Objective:
    """One training step's forward passes, losses and center updates."""

    def __init__(self, recipe: PretrainRecipe, accelerator: Accelerator, teacher: SslNetwork) -> None:
        objective = recipe.objective
        self.recipe = recipe
        self.accelerator = accelerator
        self.teacher = teacher
        self.dino = DinoLoss(recipe.head.prototypes, student_temperature=objective.student_temperature,
                             center_momentum=objective.center_momentum).to(accelerator.device)
        self.ibot = IbotPatchLoss(recipe.head.patch_prototypes, student_temperature=objective.student_temperature,
                                  center_momentum=objective.center_momentum).to(accelerator.device)
        collapse = recipe.collapse
        self.monitor = CollapseMonitor(collapse.entropy_threshold, collapse.std_threshold, collapse.uniform_threshold)

    def __call__(self, student, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        temperature = _teacher_temperature(self.recipe, step)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_out = self.teacher(batch["global_crops"])
        with self.accelerator.autocast():
            student_out = student(batch["global_crops"], batch["masks"], batch["local_crops"])
        class_targets = self.dino.targets(teacher_out.class_logits.float(), temperature)
        patch_targets = self.ibot.targets(teacher_out.patch_logits.float(), temperature)
        dino_loss = self.dino(student_out.class_logits.float(), class_targets)
        ibot_loss = self.ibot(student_out.patch_logits.float(), patch_targets, batch["masks"].transpose(0, 1))
        global_views = batch["global_crops"].shape[1]
        koleo = koleo_loss(student_out.class_tokens[:global_views].float())
        objective = self.recipe.objective
        loss = objective.dino_weight * dino_loss + objective.ibot_weight * ibot_loss + objective.koleo_weight * koleo

        reduce = self.accelerator.reduce
        self.dino.update_center(reduce(teacher_out.class_logits.float().mean(dim=(0, 1)), "mean"))
        self.ibot.update_center(reduce(teacher_out.patch_logits.float().mean(dim=(0, 1, 2)), "mean"))
        entropy, spread = collapse_metrics(class_targets, teacher_out.class_tokens)
        per_image = image_entropy(class_targets)
        measures = reduce(torch.tensor([entropy, spread, per_image], device=self.accelerator.device), "mean")
        report = self.monitor.check(float(measures[0]), float(measures[1]), float(measures[2]))
        record = {
            "loss_dino": float(reduce(dino_loss.detach(), "mean")),
            "loss_ibot": float(reduce(ibot_loss.detach(), "mean")),
            "loss_koleo": float(reduce(koleo.detach(), "mean")),
            "teacher_temperature": temperature,
            "teacher_entropy": report.entropy,
            "teacher_image_entropy": report.image_entropy,
            "feature_std": report.feature_std,
            "collapse": report.reasons,
        }
        return loss, record


def pretrain(
    recipe: PretrainRecipe,
    output: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> PretrainResult:
    """Adapt the recipe's encoder by self-distillation and export it when all steps are done.

    Args:
        recipe: a validated pretrain recipe.
        output: run folder; default ``<output_dir>/<name>``.
        resume: continue from the newest checkpoint of the run folder (no checkpoint:
            start at step 0).
        stop_after: stop after this many steps in this call and save a checkpoint, for
            time-limited jobs; a later call with ``resume=True`` continues.

    Raises:
        FileExistsError: the run folder contains a finished run, or contains checkpoints
            and ``resume`` is false.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be None or at least 1 step, got {stop_after}")
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(recipe.seed)
    run_dir = _run_dir(recipe, output)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise FileExistsError(
            f"{run_dir} contains checkpoints ({checkpoint.name}); pass --resume to continue, or a new --output"
        )

    student = build_student(recipe)
    teacher = _make_teacher(student).to(accelerator.device)
    settings = MultiCropSettings.from_recipe(recipe, student.encoder.patch_size)
    slices = load_pretrain_slices(recipe)
    length = recipe.train.steps * recipe.train.batch_size * accelerator.num_processes
    dataset = MultiCropDataset(slices, settings, student.encoder.spec.preprocess, length=length, seed=recipe.seed)
    loader = DataLoader(dataset, batch_size=recipe.train.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(_parameter_groups(student, recipe.train.weight_decay), lr=recipe.train.learning_rate)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    objective = _Objective(recipe, accelerator, teacher)
    counter = _StepCounter()
    accelerator.register_for_checkpointing(teacher, objective.dino, objective.ibot, counter)

    history: list[dict] = []
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        history = json.loads((checkpoint / HISTORY_FILE).read_text(encoding="utf-8"))
        logger.info("resumed from %s at step %d", checkpoint, counter.step)
    elif resume:
        logger.info("no checkpoint in %s; starting at step 0", run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / RECIPE_FILE)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        total = sum(p.numel() for p in student.parameters())
        logger.info("%d slices; %d trainable of %d parameters", len(slices), trainable, total)

    session = _Session(recipe, accelerator, student, optimizer, loader, objective, counter, history, run_dir)
    stop_reason = _train_steps(session, stop_after)
    completed = counter.step >= recipe.train.steps and stop_reason is None
    encoder_dir = None
    unwrapped = accelerator.unwrap_model(student)
    if completed and accelerator.is_main_process:
        source = teacher if recipe.export.encoder == "teacher" else unwrapped
        info = {"recipe": recipe.name, "steps": counter.step, "network": recipe.export.encoder}
        encoder_dir = save_encoder_checkpoint(source.encoder, run_dir / ENCODER_FOLDER, info=info)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return PretrainResult(run_dir, counter.step, completed, stop_reason, history, encoder_dir, unwrapped, teacher)


@dataclass
class _Session:
    """The prepared objects of one ``pretrain`` call."""

    recipe: PretrainRecipe
    accelerator: Accelerator
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    objective: _Objective
    counter: _StepCounter
    history: list[dict]
    run_dir: Path


def _train_steps(session: _Session, stop_after: int | None) -> str | None:
    """Run steps from ``counter.step`` to ``train.steps`` or ``stop_after`` more steps.

    Returns why the run stopped early (collapse with ``collapse.stop``, or a non-finite
    loss), or None when it reached ``train.steps`` or paused at ``stop_after``.
    """
    recipe, accelerator, student, counter = session.recipe, session.accelerator, session.student, session.counter
    optimizer, history, train = session.optimizer, session.history, recipe.train
    start = counter.step
    batches = accelerator.skip_first_batches(session.loader, start) if start else session.loader
    progress = tqdm(
        total=train.steps, initial=start, desc="pretrain", disable=not accelerator.is_main_process, leave=False
    )
    stop_reason = None
    student.train()
    for batch in batches:
        if counter.step >= train.steps:
            break
        step = counter.step
        learning_rate = _learning_rate(recipe, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        loss, record = session.objective(student, batch, step)
        accelerator.backward(loss)
        if train.clip_grad_norm > 0:
            accelerator.clip_grad_norm_(student.parameters(), train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        momentum = _cosine(recipe.teacher.momentum_start, recipe.teacher.momentum_end, step, train.steps)
        _update_teacher(accelerator.unwrap_model(student), session.objective.teacher, momentum)
        counter.step += 1

        record = {"step": counter.step, "loss": float(accelerator.reduce(loss.detach(), "mean")),
                  "learning_rate": learning_rate, "teacher_momentum": momentum, **record}
        history.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if not math.isfinite(record["loss"]):
            stop_reason = f"loss is {record['loss']} at step {counter.step}"
            logger.error("%s; stopping. Lower train.learning_rate or check the data", stop_reason)
        if record["collapse"] and accelerator.is_main_process:
            logger.warning("collapse at step %d: %s", counter.step, "; ".join(record["collapse"]))
        if record["collapse"] and recipe.collapse.stop:
            stop_reason = f"collapse at step {counter.step}"
        paused = stop_after is not None and train.steps > counter.step >= start + stop_after
        if counter.step % train.checkpoint_every == 0 or counter.step == train.steps or stop_reason or paused:
            _save_checkpoint(accelerator, session.run_dir, counter.step, history, train.keep_checkpoints)
        if stop_reason or paused:
            break
    progress.close()
    return stop_reason
