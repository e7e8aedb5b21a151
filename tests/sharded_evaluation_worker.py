"""Evaluate a run in several modes in one launch (for test_sharded_evaluation.py).

Usage: python sharded_evaluation_worker.py RUN_DIR MODE[,MODE...] [evaluate.key=value ...]
"""

import sys

from fmadapt.evaluate.runner import evaluate_run


def main() -> None:
    run_dir, modes, *overrides = sys.argv[1:]
    for mode in modes.split(","):
        evaluate_run(run_dir, mode, overrides=overrides)


if __name__ == "__main__":
    main()
