"""Check one GPU: ViT-B LoRA training throughput and peak memory, and image embedding throughput.

Everything uses SAM ViT-B (``sam_vit_b``) with seeded random weights, because no real
weights are available offline; the throughput does not depend on the weight values.

Training, at each ``--image-sizes`` side S (1024 and 512 by default), with bf16 mixed
precision through Accelerate as ``fmadapt train`` sets it up: the model of
benchmarks/training_step.py's ``lora`` configuration (LoRA rank 8 on ``qkv`` of every
encoder block plus the mask decoder), one step = forward and backward of
``FewShotObjective`` in prompted mode (one box per random image), gradient clipping at
norm 1.0 and one AdamW update. Each size runs with segment-anything's by-hand attention
(what ``fmadapt train`` uses) and with ``enable_fused_attention()``. Reported: images/s
(batch size / median step time) and the peak of ``torch.cuda.max_memory_allocated``
during the steps.

Embedding, at ``--embedding-size`` (1024 by default): ``set_image`` on one seeded random
S×S RGB image, preprocessing included. The reference is segment-anything's
``SamPredictor`` (fp32) with the same weights, timed in the same run. fmadapt's
``Predictor`` runs in fp32 and bf16, each with by-hand and with fused attention.

Times come from one process, with ``torch.cuda.synchronize`` after every call. A
configuration that runs out of GPU memory is recorded as such and the script goes on.
Configurations that would start after ``--time-limit`` seconds are recorded as skipped.

Usage:
    python benchmarks/gpu_check.py --output runs/bench/gpu_check.json
    # smoke run on a CPU (checks that the script works; the numbers mean little):
    python benchmarks/gpu_check.py --device cpu --image-sizes 128 --embedding-size 128 \\
        --steps 2 --warmup 1 --repetitions 2 --output runs/bench/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from fmadapt.inference import Predictor
from fmadapt.models import Segmenter, get_segmenter_spec
from fmadapt.models.sam import build_sam, check_image_size
from fmadapt.train.objective import FewShotObjective
from training_step import LORA_RANK, MODEL_NAME, build_configuration, make_batch, peak_memory_mib

logger = logging.getLogger("benchmarks.gpu_check")

ATTENTION = ("by-hand", "fused")
MAX_GRAD_NORM = 1.0
NATIVE_SIZE = 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(function, device: torch.device, warmup: int, repetitions: int) -> list[float]:
    """Run ``function`` ``warmup`` times, then time ``repetitions`` calls and return their seconds."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure_training(
    accelerator: Accelerator, image_size: int, attention: str, batch_size: int, warmup: int, steps: int
) -> dict[str, object]:
    """Time LoRA training steps of the seeded ViT-B at ``image_size`` with ``attention``."""
    device = accelerator.device
    model = build_configuration("lora", image_size)
    if attention == "fused":
        model.enable_fused_attention()
    objective = FewShotObjective(model, ["prompted"])
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    batch = make_batch(batch_size, image_size, device)
    release_memory(device)
    reset_peak_memory(device)
    memory_after_build = peak_memory_mib(device)
    losses: list[float] = []

    def step() -> None:
        loss = objective(**batch)["loss"]
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(objective.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    try:
        times = time_calls(step, device, warmup, steps)
        peak = peak_memory_mib(device)
    finally:
        accelerator.free_memory()
        del objective, optimizer, model, trainable, batch
        release_memory(device)
    median = statistics.median(times)
    return {
        "image_size": image_size,
        "attention": attention,
        "batch_size": batch_size,
        "images_per_second": batch_size / median,
        "step_seconds_median": median,
        "step_seconds": times,
        "memory_after_build_mib": memory_after_build,
        "peak_memory_mib": peak,
        "losses_finite": all(np.isfinite(losses)),
    }


def build_reference_sam(image_size: int, seed: int = 0) -> Sam:
    """Build segment-anything's ViT-B ``Sam`` at ``image_size`` with seeded random weights."""
    torch.manual_seed(seed)
    if image_size == NATIVE_SIZE:
        sam = sam_model_registry["vit_b"]()
    else:
        # segment-anything's builder fixes the input at 1024, so smaller smoke sizes take
        # the same ViT-B modules from fmadapt's builder.
        parts = build_sam(get_segmenter_spec(MODEL_NAME), image_size=image_size)
        sam = Sam(parts.image_encoder, parts.prompt_encoder, parts.mask_decoder)
    with torch.no_grad():
        # segment-anything starts the relative-position tables at zero; random values
        # make the fused path build a real attention mask.
        for name, parameter in sam.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0.0, 0.02)
    return sam.eval()


def measure_embedding_path(set_image, image: np.ndarray, device: torch.device, warmup: int, repetitions: int) -> dict:
    release_memory(device)
    reset_peak_memory(device)
    times = time_calls(lambda: set_image(image), device, warmup, repetitions)
    median = statistics.median(times)
    return {
        "images_per_second": 1.0 / median,
        "seconds_median": median,
        "seconds": times,
        "peak_memory_mib": peak_memory_mib(device),
    }


def measure_embedding(
    device: torch.device, image_size: int, warmup: int, repetitions: int, deadline: float
) -> dict[str, dict]:
    """Time ``set_image`` of SamPredictor and of fmadapt's Predictor in each precision and attention."""
    reference_sam = build_reference_sam(image_size)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "sam_vit_b_random.pth"
        torch.save(reference_sam.state_dict(), checkpoint)
        model = Segmenter.from_registry(MODEL_NAME, image_size=image_size, checkpoint=checkpoint).eval().to(device)
    image = np.random.default_rng(0).integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)

    results: dict[str, dict] = {}
    reference = SamPredictor(reference_sam.to(device))
    results["segment_anything_fp32"] = measure_embedding_path(reference.set_image, image, device, warmup, repetitions)
    del reference, reference_sam
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model, precision=precision)
        for attention in ATTENTION:
            name = f"fmadapt_{precision}_{attention}"
            if time.monotonic() > deadline:
                results[name] = {"skipped": "time limit reached"}
                continue
            if attention == "fused":
                model.enable_fused_attention()
            else:
                model.disable_fused_attention()
            results[name] = measure_embedding_path(predictor.set_image, image, device, warmup, repetitions)
    reference_seconds = results["segment_anything_fp32"]["seconds_median"]
    for result in results.values():
        if "seconds_median" in result:
            result["speedup_vs_segment_anything"] = reference_seconds / result["seconds_median"]
    del model
    release_memory(device)
    return results


def machine_description(device: torch.device) -> dict[str, object]:
    description: dict[str, object] = {
        "device": str(device),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "accelerate": importlib.metadata.version("accelerate"),
        "segment_anything": importlib.metadata.version("segment-anything"),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description.update({
            "gpu": properties.name,
            "gpu_memory_gib": properties.total_memory / 2**30,
            "compute_capability": f"{properties.major}.{properties.minor}",
            # TF32 changes fp32 matrix-multiply speed, so the settings in force are kept.
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        })
    return description


def markdown_tables(report: dict) -> str:
    """Format the training and embedding results of ``report`` as two Markdown tables."""
    memory = "peak GPU memory (MiB)" if report["machine"]["device"].startswith("cuda") else "peak RSS (MiB)"
    lines = [
        f"LoRA training, bf16, batch {report['batch_size']}:",
        "",
        f"| image size | attention | images/s | median step (ms) | {memory} | after build (MiB) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in report["training"]:
        if "images_per_second" not in row:
            lines.append(f"| {row['image_size']} | {row['attention']} | {row.get('skipped') or row['error']} | | | |")
            continue
        lines.append(
            f"| {row['image_size']} | {row['attention']} | {row['images_per_second']:.2f} | "
            f"{1000 * row['step_seconds_median']:.1f} | {row['peak_memory_mib']:.0f} | "
            f"{row['memory_after_build_mib']:.0f} |"
        )
    lines += [
        "",
        f"Embedding one {report['embedding_size']}×{report['embedding_size']} image (`set_image`):",
        "",
        f"| path | images/s | median (ms) | speed-up vs SamPredictor | {memory} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["embedding"].items():
        if "images_per_second" not in row:
            lines.append(f"| {name} | {row.get('skipped') or row['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {row['images_per_second']:.2f} | {1000 * row['seconds_median']:.1f} | "
            f"{row['speedup_vs_segment_anything']:.2f}× | {row['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda for the real check; cpu only for a smoke run of the script")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[1024, 512],
                        help="training input sides S in pixels (S×S), each a multiple of 16 and at least 64")
    parser.add_argument("--embedding-size", type=int, default=NATIVE_SIZE,
                        help="input side of the embedding check in pixels; 1024 is SAM's native size")
    parser.add_argument("--batch-size", type=int, default=4, help="images per training step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps or embeddings before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--repetitions", type=int, default=10, help="timed set_image calls per embedding path")
    parser.add_argument("--time-limit", type=float, default=270.0,
                        help="seconds after which configurations not yet started are skipped")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/gpu_check.json"), help="JSON file for the results")
    arguments = parser.parse_args(argv)

    spec = get_segmenter_spec(MODEL_NAME)
    for size in [*arguments.image_sizes, arguments.embedding_size]:
        try:
            check_image_size(spec, size)
        except ValueError as error:
            parser.error(str(error))
    for name in ("batch_size", "steps", "repetitions"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    if arguments.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {arguments.warmup}")
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA GPU on this machine; use --device cpu for a smoke run")
    if arguments.device == "cuda" and not torch.cuda.is_bf16_supported():
        parser.error(f"--device cuda: {torch.cuda.get_device_name()} has no bf16 support, which the check needs")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.monotonic()
    deadline = start + arguments.time_limit
    # cpu=True keeps Accelerate off any GPU in a smoke run, as make_accelerator does on a CPU-only machine.
    accelerator = Accelerator(cpu=arguments.device == "cpu", mixed_precision="bf16")
    device = accelerator.device

    logger.info("embedding at %d px on %s", arguments.embedding_size, device)
    embedding = measure_embedding(device, arguments.embedding_size, arguments.warmup, arguments.repetitions, deadline)

    training = []
    for image_size in arguments.image_sizes:
        for attention in ATTENTION:
            row: dict[str, object] = {"image_size": image_size, "attention": attention}
            if time.monotonic() > deadline:
                row["skipped"] = "time limit reached"
            else:
                logger.info("training at %d px, %s attention", image_size, attention)
                try:
                    row = measure_training(
                        accelerator, image_size, attention, arguments.batch_size, arguments.warmup, arguments.steps
                    )
                except torch.OutOfMemoryError as error:
                    logger.warning("training at %d px with %s attention ran out of memory: %s", image_size, attention, error)
                    row["error"] = "out of memory"
                    release_memory(device)
            training.append(row)

    report = {
        "command": " ".join(sys.argv),
        "machine": machine_description(device),
        "model": MODEL_NAME,
        "lora_rank": LORA_RANK,
        "batch_size": arguments.batch_size,
        "warmup": arguments.warmup,
        "steps": arguments.steps,
        "repetitions": arguments.repetitions,
        "embedding_size": arguments.embedding_size,
        "training": training,
        "embedding": embedding,
        "total_seconds": time.monotonic() - start,
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = arguments.output.with_name(arguments.output.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, arguments.output)
    sys.stdout.write(markdown_tables(report) + "\n")
    logger.info("results in %s after %.0f s", arguments.output, report["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
