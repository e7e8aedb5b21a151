"""Compare starting points of a DINOv3 few-shot run: random, unadapted and SSL-adapted encoders.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/dinov3_starting_points.py \
        --output runs/bench/dinov3_starts [--pretrained PATH] [--seeds 0 1 2] \
        [--ssl-steps 100] [--ssl-override key=value ...] [key=value ...]

Steps:
1. Self-supervised adaptation with recipes/dinov3_ssl_ct.yaml (DINO + iBOT on unlabelled CT
   and MR slices), once, with the recipe seed. It starts from ``--pretrained`` and trains
   LoRA layers when that is given, and otherwise starts from random weights and trains every
   parameter. Its exported encoder folder is the "ssl" starting point.
2. For each starting point and each seed, few-shot training with the same recipe
   (default recipes/dinov3_fewshot_ct.yaml) and the same overrides, so every starting point
   gets the same few-shot budget. The starting points are "random" (no checkpoint),
   "unadapted" (``--pretrained`` itself, measured only when given) and "ssl".
3. Evaluation of each run on the held-out split in prompted mode (ground-truth boxes, no
   jitter) and automatic mode. The per-run score is the summary's mean Dice over its
   case-and-class rows, and the table gives the mean and sample standard deviation of
   that score over the seeds.

With the CT recipe the held-out slices do not depend on the seed, because its slice split
cuts fixed contiguous blocks, so every run is scored on the same slices. The seed changes
which training slices are drawn, the random initialisation and the data order.

Writes ``results.json`` and ``results.md`` into ``--output`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fmadapt.config import load_recipe
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.train.loop import train
from fmadapt.train.ssl.config import load_pretrain_recipe
from fmadapt.train.ssl.loop import pretrain

logger = logging.getLogger("benchmarks.dinov3_starting_points")

REPO_ROOT = Path(__file__).resolve().parents[1]
SSL_RECIPE = REPO_ROOT / "recipes" / "dinov3_ssl_ct.yaml"
FEWSHOT_RECIPE = REPO_ROOT / "recipes" / "dinov3_fewshot_ct.yaml"
MODES = ("prompted", "automatic")
STARTING_POINTS = ("random", "unadapted", "ssl")
UNADAPTED_MISSING = "not measured: no pretrained DINOv3 weights were given (--pretrained PATH)"


def run_ssl(args: argparse.Namespace, output: Path) -> dict:
    """Run the self-supervised adaptation and return where it started and its encoder folder."""
    overrides = [f"model.name={args.model}", f"train.steps={args.ssl_steps}"]
    if args.pretrained:
        overrides += [f"model.checkpoint={args.pretrained}", "adaptation.method=lora"]
        start = f"pretrained weights {args.pretrained} (LoRA on q and v)"
    else:
        overrides += ["model.checkpoint=null", "adaptation.method=full"]
        start = "random weights (no --pretrained; every parameter trained)"
    overrides += args.ssl_override
    recipe = load_pretrain_recipe(SSL_RECIPE, overrides)
    logger.info("self-supervised adaptation from %s, %d steps", start, recipe.train.steps)
    began = time.perf_counter()
    result = pretrain(recipe, output / "pretrain")
    seconds = time.perf_counter() - began
    last = result.history[-1] if result.history else {}
    return {
        "start": start,
        "overrides": overrides,
        "steps": result.step,
        "completed": result.completed,
        "stop_reason": result.stop_reason,
        "encoder": None if result.encoder_dir is None else str(result.encoder_dir),
        "last_step": last,
        "seconds": round(seconds, 1),
    }


def starting_checkpoints(args: argparse.Namespace, ssl: dict) -> dict[str, str | None]:
    """Checkpoint of each starting point that can be measured (None: random weights)."""
    checkpoints: dict[str, str | None] = {"random": None}
    if args.pretrained:
        checkpoints["unadapted"] = args.pretrained
    if ssl["encoder"] is not None:
        checkpoints["ssl"] = ssl["encoder"]
    return checkpoints


def run_fewshot(recipe_path: Path, checkpoint: str | None, seed: int, overrides: list[str], run_dir: Path) -> dict:
    """Train one few-shot run and return its mean Dice per evaluation mode and its times."""
    settings = [f"seed={seed}", f"model.checkpoint={checkpoint or 'null'}", "evaluate.box_jitter=[0]", *overrides]
    recipe = load_recipe(recipe_path, settings)
    began = time.perf_counter()
    train(recipe, run_dir)
    train_seconds = time.perf_counter() - began
    dice = {}
    for mode in MODES:
        (evaluation,) = evaluate_run(run_dir, mode)
        dice[mode] = evaluation.summary["overall"]["dice"]["mean"]
    return {
        "seed": seed,
        "dice": dice,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - began, 1),
    }


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Mean, sample standard deviation and per-seed values of the mean Dice, per mode."""
    summary = {}
    for mode in MODES:
        values = [run["dice"][mode] for run in runs]
        summary[mode] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values,
        }
    return summary


def markdown_table(results: dict) -> str:
    lines = [
        "| starting point | mode | mean Dice ± sd over seeds | per seed |",
        "|---|---|---:|---|",
    ]
    for name in STARTING_POINTS:
        entry = results["starting_points"][name]
        if not entry["measured"]:
            lines.append(f"| {name} | both | {entry['reason']} | |")
            continue
        for mode, stats in entry["summary"].items():
            spread = "" if stats["std"] is None else f" ± {stats['std']:.3f}"
            per_seed = ", ".join(f"{value:.3f}" for value in stats["per_seed"])
            lines.append(f"| {name} | {mode} | {stats['mean']:.3f}{spread} | {per_seed} |")
    return "\n".join(lines)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="few-shot recipe overrides as key=value, applied to every run")
    parser.add_argument("--output", default="runs/bench/dinov3_starts", help="folder for the runs and the result files")
    parser.add_argument("--pretrained", help="published DINOv3 weights of --model: a Hugging Face folder or Meta .pth")
    parser.add_argument("--recipe", type=Path, default=FEWSHOT_RECIPE, help="few-shot recipe (default: %(default)s)")
    parser.add_argument("--model", default="dinov3_vit_tiny", help="DINOv3 registry name used in every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="few-shot seeds (at least 3 for a spread)")
    parser.add_argument("--ssl-steps", type=int, default=100, help="optimizer steps of the self-supervised adaptation")
    parser.add_argument("--ssl-override", action="append", default=[], metavar="KEY=VALUE",
                        help="pretrain recipe override, repeatable, e.g. --ssl-override train.batch_size=4")
    args = parser.parse_args()
    if args.pretrained and not Path(args.pretrained).exists():
        parser.error(f"--pretrained {args.pretrained} not found; pass a Hugging Face folder or Meta .pth of {args.model}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main() -> None:
    args = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.name={args.model}", *args.overrides]
    began = time.perf_counter()

    ssl = run_ssl(args, output)
    checkpoints = starting_checkpoints(args, ssl)
    starting_points: dict[str, dict] = {}
    for name in STARTING_POINTS:
        if name not in checkpoints:
            reason = UNADAPTED_MISSING if name == "unadapted" else f"not measured: pretraining stopped ({ssl['stop_reason']})"
            logger.warning("starting point %s %s", name, reason)
            starting_points[name] = {"measured": False, "reason": reason}
            continue
        runs = []
        for seed in args.seeds:
            run_dir = output / name / f"seed{seed}"
            runs.append(run_fewshot(args.recipe, checkpoints[name], seed, overrides, run_dir))
            logger.info("%s seed %d: %s", name, seed, runs[-1]["dice"])
        starting_points[name] = {
            "measured": True,
            "checkpoint": checkpoints[name],
            "runs": runs,
            "summary": summarise(runs),
        }

    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "recipe": str(args.recipe),
        "overrides": overrides,
        "seeds": args.seeds,
        "ssl": ssl,
        "starting_points": starting_points,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    write_atomic(output / "results.json", json.dumps(results, indent=2))
    table = markdown_table(results)
    write_atomic(output / "results.md", f"SSL start: {ssl['start']}\n\n{table}\n")
    print(f"SSL start: {ssl['start']}")
    print(table)
    if "unadapted" not in checkpoints:
        print(f"unadapted encoder: {UNADAPTED_MISSING}")


if __name__ == "__main__":
    main()
