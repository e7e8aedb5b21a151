"""Time one training step and measure its peak memory: LoRA against full fine-tuning.

The model is SAM ViT-B (``sam_vit_b``) with seeded random weights at a reduced image size
(256 by default, which gives the encoder a 16×16 token grid). The full 1024 input does
not train in reasonable time on a small CPU. Each step is one forward and backward pass of
``FewShotObjective`` in prompted mode (one box per image) plus one AdamW update.

Configurations, each measured in its own subprocess so the peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on
a GPU) belongs to that configuration alone:
- ``full``: every parameter trains (freezing preset ``full``); the reference.
- ``lora``: LoRA rank 8 on ``qkv`` of every encoder block, plus the mask decoder
  (preset ``adapters_decoder``).
- ``lora_checkpointing``: as ``lora``, with ``Segmenter.enable_gradient_checkpointing()``.

Reported: the median and the minimum step time after one warm-up step, the peak memory and
the peak minus the memory right after the model was built (the training overhead), and
ratios against ``full`` and against ``lora``. On a machine shared with other processes
the minimum is the better estimate of the uncontended step time.

Usage:
    python benchmarks/training_step.py --image-size 256 --batch-size 2 --repetitions 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fmadapt.adapt.freezing import apply_freezing
from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.adapt.summary import summarize_parameters
from fmadapt.models import Segmenter
from fmadapt.train.objective import FewShotObjective

logger = logging.getLogger("benchmarks.training_step")

CONFIGURATIONS = ("full", "lora", "lora_checkpointing")
MODEL_NAME = "sam_vit_b"
LORA_RANK = 8


def build_configuration(name: str, image_size: int) -> Segmenter:
    """Build the seeded random ViT-B segmenter for configuration ``name``, in training mode."""
    torch.manual_seed(0)
    model = Segmenter.from_registry(MODEL_NAME, image_size=image_size)
    if name == "full":
        apply_freezing(model, "full")
    else:
        apply_lora(model, LoraSettings(rank=LORA_RANK, alpha=2 * LORA_RANK, target_modules=("qkv",)))
        apply_freezing(model, "adapters_decoder")
    if name == "lora_checkpointing":
        model.enable_gradient_checkpointing()
    return model.train()


def make_batch(batch_size: int, image_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Make a seeded batch: B×3×S×S images, one square object per image with its XYXY box (model frame)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    low_res = image_size // 4
    targets = torch.zeros(batch_size, 1, low_res, low_res)
    targets[:, :, low_res // 4 : low_res // 2, low_res // 4 : low_res // 2] = 1.0
    box = torch.tensor([image_size / 4, image_size / 4, image_size / 2, image_size / 2])
    boxes = box.expand(batch_size, 1, 4).clone()
    present = torch.ones(batch_size, 1, dtype=torch.bool)
    batch = {"images": images, "targets": targets, "boxes": boxes, "present": present}
    return {key: value.to(device) for key, value in batch.items()}


def peak_memory_mib(device: torch.device) -> float:
    """Return the peak memory of this process so far in MiB: GPU allocations on CUDA, resident set size on CPU."""
    # NOTE: the CUDA branch has not been run; the recorded numbers come from the CPU branch.
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_configuration(name: str, image_size: int, batch_size: int, repetitions: int) -> dict[str, object]:
    """Build configuration ``name`` in this process and time its training steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_configuration(name, image_size).to(device)
    summary = summarize_parameters(model)
    objective = FewShotObjective(model, ["prompted"])
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = make_batch(batch_size, image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_after_build = peak_memory_mib(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(**batch)["loss"]
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    step()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_memory_mib(device)
    return {
        "configuration": name,
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "total_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "parameter_summary": str(summary),
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "step_seconds": times,
        "memory_after_build_mib": memory_after_build,
        "peak_memory_mib": peak,
        "training_memory_mib": peak - memory_after_build,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
    }


def run_in_subprocess(name: str, arguments: argparse.Namespace) -> dict[str, object]:
    """Run ``measure_configuration`` for ``name`` in a fresh Python process and return its result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--image-size",
        str(arguments.image_size),
        "--batch-size",
        str(arguments.batch_size),
        "--repetitions",
        str(arguments.repetitions),
    ]
    logger.info("measuring %s", name)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"configuration {name} failed with exit code {completed.returncode}:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(results: dict[str, dict]) -> dict[str, float]:
    """Return the time and memory ratios of LoRA against full fine-tuning and of checkpointing against LoRA."""
    full, lora, checkpointed = results["full"], results["lora"], results["lora_checkpointing"]
    return {
        "lora_speedup_vs_full": full["step_seconds_median"] / lora["step_seconds_median"],
        "lora_speedup_vs_full_by_min": full["step_seconds_min"] / lora["step_seconds_min"],
        "lora_peak_memory_ratio_vs_full": lora["peak_memory_mib"] / full["peak_memory_mib"],
        "lora_training_memory_ratio_vs_full": lora["training_memory_mib"] / full["training_memory_mib"],
        "checkpointing_time_ratio_vs_lora": checkpointed["step_seconds_median"] / lora["step_seconds_median"],
        "checkpointing_time_ratio_vs_lora_by_min": checkpointed["step_seconds_min"] / lora["step_seconds_min"],
        "checkpointing_peak_memory_saved_mib": lora["peak_memory_mib"] - checkpointed["peak_memory_mib"],
        "checkpointing_training_memory_ratio_vs_lora": (
            checkpointed["training_memory_mib"] / lora["training_memory_mib"]
        ),
    }


def machine_description() -> dict[str, object]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256, help="model input size S in pixels (S×S)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step")
    parser.add_argument("--repetitions", type=int, default=3, help="timed steps per configuration after one warm-up step")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    parser.add_argument("--worker", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.worker:
        result = measure_configuration(
            arguments.worker, arguments.image_size, arguments.batch_size, arguments.repetitions
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {name: run_in_subprocess(name, arguments) for name in CONFIGURATIONS}
    report = {
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "model": MODEL_NAME,
        "image_size": arguments.image_size,
        "batch_size": arguments.batch_size,
        "repetitions": arguments.repetitions,
        "configurations": results,
        "ratios": compare(results),
    }
    text = json.dumps(report, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
