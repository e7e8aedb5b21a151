"""The ``fmadapt`` command: train, evaluate, quickstart, models, checkpoints."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fmadapt import __version__

logger = logging.getLogger("fmadapt")


def _train(args: argparse.Namespace) -> int:
    from fmadapt.config import load_recipe
    from fmadapt.train.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe, args.output, resume=args.resume)
    logger.info("training finished; run folder: %s", result.run_dir)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fmadapt.evaluate.runner import evaluate_run

    for result in evaluate_run(args.run_dir, args.mode, args.split, args.overrides):
        mean = result.summary["overall"]["dice"]["mean"]
        logger.info("%s: mean Dice %s; results in %s", result.folder.name, "n/a" if mean != mean else f"{mean:.4f}", result.folder)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from fmadapt.quickstart import run_quickstart

    run_quickstart(args.output, overrides=args.overrides)
    return 0


def _models(args: argparse.Namespace) -> int:
    from fmadapt.models.registry import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        sys.stdout.write(f"{name:16s} {spec.description}\n")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from fmadapt.models.manifest import read_manifest, verify_checkpoint

    failed = 0
    for entry in read_manifest():
        path = Path(args.folder) / entry.file_name
        if not path.is_file():
            sys.stdout.write(f"{entry.model:14s} {entry.file_name:24s} missing (download: {entry.source})\n")
            continue
        result = verify_checkpoint(path, entry)
        failed += not result.ok
        sys.stdout.write(f"{entry.model:14s} {entry.file_name:24s} {result.status.value}: {result.message}\n")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmadapt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fmadapt {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="few-shot fine-tuning from a YAML recipe")
    train.add_argument("recipe", help="path of the YAML recipe")
    train.add_argument("--output", help="run folder (default: <output_dir>/<name> from the recipe)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in --output from its last epoch checkpoint")
    train.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. train.epochs=3")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on held-out cases")
    evaluate.add_argument("run_dir", help="folder written by `fmadapt train`")
    evaluate.add_argument("--mode", required=True, choices=["prompted", "automatic"],
                          help="prompted: ground-truth box per class and slice; automatic: no prompt")
    evaluate.add_argument("--split", choices=["train", "validation", "test"], default=None,
                          help="which split to evaluate (default: the recipe's evaluate.split, normally test)")
    evaluate.add_argument("overrides", nargs="*", help="evaluate.* overrides as key=value, e.g. evaluate.max_cases=5")
    evaluate.set_defaults(handler=_evaluate)

    quickstart = commands.add_parser(
        "quickstart", help="few-shot white-matter segmentation on nilearn's MNI152 template, then both evaluations"
    )
    quickstart.add_argument("--output", default="runs/quickstart", help="folder for the data copy and the run")
    quickstart.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. train.epochs=2")
    quickstart.set_defaults(handler=_quickstart)

    models = commands.add_parser("models", help="list the model registry")
    models.set_defaults(handler=_models)

    checkpoints = commands.add_parser(
        "checkpoints", help="check the official checkpoint files in a folder against their size and SHA-256"
    )
    checkpoints.add_argument("--folder", default="checkpoints", help="folder that contains the .pth files")
    checkpoints.set_defaults(handler=_checkpoints)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train R.yaml --output D a.b=1`), which argparse's
    # nargs="*" positional does not collect, so key=value leftovers are added here.
    args, extra = parser.parse_known_args(argv)
    unknown = [token for token in extra if "=" not in token or token.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        # User errors get one readable line; --log-level DEBUG adds the traceback.
        logger.error("%s", error)
        logger.debug("traceback of the error above", exc_info=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
