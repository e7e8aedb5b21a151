"""Evaluate a run in several modes in one launch (for the sharded evaluation tests).

Usage: python sharded_evaluation_worker.py RUN_DIR MODE[,MODE...] [--protocol JSON] [evaluate.key=value ...]

``--protocol`` sets ProtocolSettings fields of the protocol modes as a JSON object, e.g.
'{"box_jitter": [3.0], "num_interactions": 2}'.

Failure injection for the tests, read by this script only: with FMADAPT_TEST_FAIL_CASE=CASE and
FMADAPT_TEST_FAIL_RANK=R, the process of rank R raises RuntimeError when it scores CASE in the
prompted or automatic mode.
"""

import argparse
import json
import os

import torch.distributed as dist

from fmadapt.evaluate import runner
from fmadapt.evaluate.protocols import PROTOCOL_MODES, ProtocolSettings

INJECTED_MESSAGE = "failure injected by sharded_evaluation_worker"


def inject_failure(case_id: str, rank: int) -> None:
    """Make ``runner._score_case`` raise RuntimeError for ``case_id`` on the process of ``rank``."""
    score_case = runner._score_case

    def failing_score_case(model, recipe, plan, case, *args, **kwargs):
        current_rank = dist.get_rank() if dist.is_initialized() else 0
        if case.case_id == case_id and current_rank == rank:
            raise RuntimeError(f"{INJECTED_MESSAGE} for case {case_id} on rank {rank}")
        return score_case(model, recipe, plan, case, *args, **kwargs)

    runner._score_case = failing_score_case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("modes")
    parser.add_argument("--protocol", default="{}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    fail_case = os.environ.get("FMADAPT_TEST_FAIL_CASE")
    if fail_case:
        inject_failure(fail_case, int(os.environ["FMADAPT_TEST_FAIL_RANK"]))
    fields = json.loads(args.protocol)
    for mode in args.modes.split(","):
        settings = ProtocolSettings(**fields) if mode in PROTOCOL_MODES else None
        runner.evaluate_run(args.run_dir, mode, overrides=args.overrides, protocol=settings)


if __name__ == "__main__":
    main()
