"""Run recipes end to end (train, prompted and automatic evaluation) and tabulate Dice and time.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/recipe_results.py --output runs/bench \
        recipes/kvasir_polyp_5shot_lora.yaml recipes/totalseg_ct_fewshot_lora.yaml [key=value ...]

Writes ``results.json`` and ``results.md`` (a Markdown table) into ``--output`` and prints
the table. Each recipe runs in this process, one after the other, so times are wall-clock
seconds on this machine with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from fmadapt.config import load_recipe
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.train.loop import train


def run_recipe(path: Path, output: Path, overrides: list[str]) -> dict:
    recipe = load_recipe(path, overrides)
    run_dir = output / recipe.name
    start = time.perf_counter()
    result = train(recipe, run_dir)
    train_seconds = time.perf_counter() - start
    rows = {}
    for mode in ("prompted", "automatic"):
        for evaluation in evaluate_run(run_dir, mode):
            overall = evaluation.summary["overall"]
            rows[evaluation.folder.name] = {
                "dice": overall["dice"]["mean"],
                "dice_std": overall["dice"]["std"],
                "per_class_dice": {name: stats["dice"]["mean"] for name, stats in evaluation.summary["per_class"].items()},
                "hd95_mm": overall["hd95"]["mean"],
                "nsd": overall["nsd"]["mean"],
                "n_cases": evaluation.summary["n_cases"],
            }
    return {
        "recipe": str(path),
        "overrides": overrides,
        "model": recipe.model.name,
        "image_size": recipe.model.image_size,
        "checkpoint": recipe.model.checkpoint,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "last_epoch": result.history[-1],
        "evaluations": rows,
    }


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| recipe | evaluation | cases | mean Dice (± sd) | NSD | HD95 (mm) | train + eval time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        name = Path(result["recipe"]).stem
        for evaluation, row in result["evaluations"].items():
            spread = "" if row["dice_std"] is None else f" ± {row['dice_std']:.3f}"
            hd95 = "n/a" if row["hd95_mm"] is None else f"{row['hd95_mm']:.1f}"
            lines.append(
                f"| {name} | {evaluation} | {row['n_cases']} | {row['dice']:.3f}{spread} | {row['nsd']:.3f} | "
                f"{hd95} | {result['total_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="recipe files, then optional key=value overrides for all")
    parser.add_argument("--output", default="runs/bench", help="folder for the runs and the result files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipes = [Path(item) for item in args.recipes if "=" not in item]
    overrides = [item for item in args.recipes if "=" in item]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = [run_recipe(path, output, overrides) for path in recipes]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (output / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    table = markdown_table(results)
    (output / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
