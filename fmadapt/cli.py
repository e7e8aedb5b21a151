"""The ``fmadapt`` command: train, pretrain, evaluate, evaluate-folder, compare, quickstart, models, checkpoints."""

from __future__ import annotations

import argparse
import json
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


def _pretrain(args: argparse.Namespace) -> int:
    from fmadapt.train.ssl.config import load_pretrain_recipe
    from fmadapt.train.ssl.loop import pretrain

    recipe = load_pretrain_recipe(args.recipe, args.overrides)
    result = pretrain(recipe, args.output, resume=args.resume, stop_after=args.stop_after)
    if result.completed:
        logger.info("pretraining finished at step %d; encoder checkpoint: %s", result.step, result.encoder_dir)
        return 0
    if result.stop_reason is None:
        logger.info("pretraining paused at step %d; continue with --resume --output %s", result.step, result.run_dir)
        return 0
    logger.error("pretraining stopped at step %d: %s; run folder: %s", result.step, result.stop_reason, result.run_dir)
    return 1


def _evaluate(args: argparse.Namespace) -> int:
    from fmadapt.evaluate.protocols import PROTOCOL_MODES, ProtocolSettings
    from fmadapt.evaluate.runner import evaluate_run

    protocol_options = {name: getattr(args, name) for name in _PROTOCOL_OPTIONS if getattr(args, name) is not None}
    protocol = None
    if args.mode in PROTOCOL_MODES:
        protocol = ProtocolSettings(**protocol_options)
    elif protocol_options:
        logger.warning("--mode %s ignores the protocol options %s", args.mode, ", ".join(sorted(protocol_options)))
    overrides = list(args.overrides)
    if args.cache is not None:
        # A JSON string is a quoted YAML scalar, so a path such as "2024" stays a string.
        overrides.append(f"evaluate.cache_dir={json.dumps(args.cache)}")
    for result in evaluate_run(args.run_dir, args.mode, args.split, overrides, protocol):
        mean = result.summary["overall"]["dice"]["mean"]
        logger.info("%s: mean Dice %s; results in %s", result.folder.name, "n/a" if mean != mean else f"{mean:.4f}", result.folder)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from fmadapt.quickstart import run_quickstart

    run_quickstart(args.output, overrides=args.overrides)
    return 0


def _models(args: argparse.Namespace) -> int:
    from fmadapt.models import get_segmenter_spec, list_segmenter_models

    for name in list_segmenter_models():
        spec = get_segmenter_spec(name)
        sys.stdout.write(f"{name:20s} {spec.description}\n")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from fmadapt.models.manifest import read_manifest, verify_checkpoint

    folder = Path(args.folder)
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(
            f"checkpoint folder {folder} {state}; pass the folder that contains the .pth files with --folder"
        )
    failed = 0
    for entry in read_manifest():
        path = folder / entry.file_name
        if not path.is_file():
            sys.stdout.write(f"{entry.model:14s} {entry.file_name:24s} missing (download: {entry.source})\n")
            continue
        result = verify_checkpoint(path, entry)
        failed += not result.ok
        sys.stdout.write(f"{entry.model:14s} {entry.file_name:24s} {result.status.value}: {result.message}\n")
    return 1 if failed else 0


_PROTOCOL_OPTIONS = (
    "seed", "box_jitter", "jitter_unit", "num_positive", "num_negative", "click_mode",
    "num_interactions", "start", "feed_logits", "key_slice", "margin", "min_area",
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {text!r}; choose one of {', '.join(LOG_LEVELS)}")
    return level


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,5,10, got {text!r}") from None


def _add_protocol_options(evaluate: argparse.ArgumentParser) -> None:
    """Options of the clicks, iterative and propagate3d modes; unset ones keep ProtocolSettings defaults."""
    group = evaluate.add_argument_group("prompt protocols (clicks, iterative, propagate3d)")
    group.add_argument("--seed", type=int, help="seed of click and box noise draws (default: the recipe seed)")
    group.add_argument("--box-jitter", dest="box_jitter", type=_float_list,
                       help="comma-separated box noise levels, one evaluation each (default: 0)")
    group.add_argument("--jitter-unit", dest="jitter_unit", choices=["pixels", "fraction"],
                       help="box noise in pixels or as a fraction of the box side (default: pixels)")
    group.add_argument("--positive-clicks", dest="num_positive", type=int,
                       help="positive clicks per object in clicks mode (default: 1)")
    group.add_argument("--negative-clicks", dest="num_negative", type=int,
                       help="negative clicks per object in clicks mode (default: 0)")
    group.add_argument("--click-mode", dest="click_mode", choices=["center", "random"],
                       help="first positive click at the object pixel farthest from its border, or at random "
                       "(default: center)")
    group.add_argument("--interactions", dest="num_interactions", type=int,
                       help="iterative mode: budget of interactions, the first prompt included (default: 5)")
    group.add_argument("--start", choices=["box", "click"], help="iterative mode: first prompt (default: box)")
    group.add_argument("--no-mask-input", dest="feed_logits", action="store_const", const=False,
                       help="iterative mode: do not feed the previous low-res logits back as mask input")
    group.add_argument("--key-slice", dest="key_slice", choices=["largest", "middle"],
                       help="propagate3d: which object slice gets the box (default: largest)")
    group.add_argument("--margin", type=float,
                       help="propagate3d: pixels added to each side of every propagated box (default: 0)")
    group.add_argument("--min-area", dest="min_area", type=int,
                       help="propagate3d: predictions with fewer pixels end propagation (default: 1)")


def _evaluate_folder(args: argparse.Namespace) -> int:
    from fmadapt.evaluate.detection import DetectionSettings
    from fmadapt.evaluate.folder import evaluate_folder, write_folder_detection, write_folder_overlays
    from fmadapt.evaluate.report import write_report

    evaluation = evaluate_folder(
        args.prediction_dir,
        args.reference_dir,
        labels=args.labels,
        tolerance_mm=args.tolerance_mm,
        output_dir=args.output,
        splits_file=args.splits,
        fold=args.fold,
        allow_missing=args.allow_missing,
    )
    if args.images:
        write_folder_overlays(evaluation, args.images)
    if args.detection:
        settings = DetectionSettings(
            min_size=args.min_size, size_unit=args.size_unit, connectivity=args.connectivity, hit_threshold=args.hit_threshold
        )
        write_folder_detection(evaluation, settings, args.min_size_sweep or ())
    report = write_report(evaluation.output_dir)
    dice = evaluation.summary["foreground_mean"]["Dice"]
    logger.info("foreground mean Dice %s over %d cases; report: %s", "n/a" if dice != dice else f"{dice:.4f}", len(evaluation.cases), report)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fmadapt.evaluate.compare import compare_runs, format_comparison

    comparison = compare_runs(args.runs, args.metric)
    sys.stdout.write(format_comparison(comparison, per_case=not args.summary_only))
    return 0


def _add_evaluate_folder_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate-folder", help="score a folder of NIfTI predictions (e.g. nnU-Net's) against reference label maps"
    )
    parser.add_argument("prediction_dir", help="folder of CASE.nii.gz predictions")
    parser.add_argument("reference_dir", help="folder of CASE.nii.gz reference label maps, e.g. nnU-Net's labelsTr")
    parser.add_argument("--labels", nargs="+", help="label ids or dataset.json names (default: dataset.json's foreground labels)")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default: 2.0)")
    parser.add_argument("--output", help="folder for summary.json, per_case.csv and report.md (default: PRED_DIR/fmadapt_evaluation)")
    parser.add_argument("--splits", help="nnU-Net splits_final.json; with --fold, only that fold's validation cases count")
    parser.add_argument("--fold", type=int, help="fold index (0-based) in --splits")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score reference cases without a prediction as empty predictions instead of failing")
    parser.add_argument("--images", help="folder of CASE_0000.nii.gz images; draws overlays.png of the worst, median and best case")
    group = parser.add_argument_group("lesion detection")
    group.add_argument("--detection", action="store_true", help="also write detection.json and froc.png per label")
    group.add_argument("--min-size", type=float, default=0.0, help="remove predicted components smaller than this (default: 0)")
    group.add_argument("--size-unit", choices=["voxels", "mm3"], default="voxels", help="unit of --min-size (default: voxels)")
    group.add_argument("--min-size-sweep", nargs="+", type=float, help="minimum sizes to report beside --min-size")
    group.add_argument("--connectivity", choices=["face", "full"], default="face",
                       help="face: voxels sharing a face form a component; full: also edges and corners (default: face)")
    group.add_argument("--hit-threshold", type=float, default=0.1,
                       help="fraction of a lesion a predicted component must cover to detect it (default: 0.1)")
    parser.set_defaults(handler=_evaluate_folder)


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compare", help="compare evaluation runs case by case with a paired Wilcoxon test")
    parser.add_argument("runs", nargs="+", help="per_case.csv files or evaluation folders; the first is the baseline")
    parser.add_argument("--metric", nargs="+", default=["dice"], choices=["dice", "iou", "nsd", "hd95"],
                        help="metrics to compare (default: dice)")
    parser.add_argument("--summary-only", action="store_true", help="leave out the per-case differences")
    parser.set_defaults(handler=_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmadapt", description="Adapt SAM, MedSAM and DINOv3 models to medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"fmadapt {__version__}")
    parser.add_argument("--log-level", default="INFO", type=_log_level, metavar="LEVEL",
                        help=f"logging level: {', '.join(LOG_LEVELS)}, any case (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="few-shot fine-tuning from a YAML recipe")
    train.add_argument("recipe", help="path of the YAML recipe")
    train.add_argument("--output", help="run folder (default: <output_dir>/<name> from the recipe)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in --output from its last epoch checkpoint")
    train.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. train.epochs=3")
    train.set_defaults(handler=_train, override_example="train.epochs=3")

    pretrain = commands.add_parser(
        "pretrain", help="self-supervised adaptation (DINO + iBOT) of a DINOv3 encoder on unlabelled images"
    )
    pretrain.add_argument("recipe", help="path of the YAML pretrain recipe, such as recipes/dinov3_ssl_ct.yaml")
    pretrain.add_argument("--output", help="run folder (default: <output_dir>/<name> from the recipe)")
    pretrain.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run folder")
    pretrain.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                          help="stop after this many optimizer steps and save a checkpoint; continue later with --resume")
    pretrain.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. train.steps=50")
    pretrain.set_defaults(handler=_pretrain, override_example="train.steps=50")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on held-out cases")
    evaluate.add_argument("run_dir", help="folder written by `fmadapt train`")
    evaluate.add_argument("--mode", required=True,
                          choices=["prompted", "automatic", "clicks", "iterative", "propagate3d"],
                          help="prompted: ground-truth box per class and slice; automatic: no prompt; "
                          "clicks: simulated clicks per object; iterative: a first prompt then correction "
                          "clicks; propagate3d: one box on a key slice propagated through the volume")
    evaluate.add_argument("--split", choices=["train", "validation", "test"], default=None,
                          help="which split to evaluate (default: the recipe's evaluate.split, normally test)")
    evaluate.add_argument("--cache", metavar="DIR",
                          help="folder of cached image embeddings: reused when the images, weights and "
                          "preprocessing match, written otherwise (sets evaluate.cache_dir; default: off)")
    evaluate.add_argument("overrides", nargs="*",
                          help="evaluate.* keys, or data.root=DIR when the run's data has moved, as key=value, "
                          "e.g. evaluate.max_cases=5")
    _add_protocol_options(evaluate)
    evaluate.set_defaults(handler=_evaluate, override_example="evaluate.max_cases=5")

    quickstart = commands.add_parser(
        "quickstart", help="few-shot white-matter segmentation on nilearn's MNI152 template, then both evaluations"
    )
    quickstart.add_argument("--output", default="runs/quickstart", help="folder for the data copy and the run")
    quickstart.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. train.epochs=2")
    quickstart.set_defaults(handler=_quickstart, override_example="train.epochs=2")

    models = commands.add_parser("models", help="list the model registry")
    models.set_defaults(handler=_models)

    checkpoints = commands.add_parser(
        "checkpoints", help="check the official checkpoint files in a folder against their size and SHA-256"
    )
    checkpoints.add_argument("--folder", default="checkpoints", help="folder that contains the .pth files")
    checkpoints.set_defaults(handler=_checkpoints)

    _add_evaluate_folder_parser(commands)
    _add_compare_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train R.yaml --output D a.b=1`), which argparse's
    # nargs="*" positional does not collect, so leftovers that are not options are added here.
    args, extra = parser.parse_known_args(argv)
    options = [token for token in extra if token.startswith("-")]
    if options or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
        malformed = [token for token in args.overrides if "=" not in token]
        if malformed:
            parser.error(
                f"{args.command} overrides are key=value, for example {args.override_example}; "
                f"got {', '.join(repr(token) for token in malformed)}"
            )
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        # User errors get one readable line; --log-level DEBUG adds the traceback.
        logger.error("%s", error)
        logger.debug("traceback of the error above", exc_info=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
