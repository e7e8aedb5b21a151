"""Split an evaluation's cases over the processes of a launch and gather them in case order.

Under ``accelerate launch`` or ``torchrun``, process r of R evaluates cases r, r + R, r + 2R, ...
Cases go in rounds of R, and every round ends with two exchanges. First all processes share
whether their case failed, a small message, so that every process stops in the same round
when one of them fails. Then, unless one failed, the main process gathers the case results
in rank order, which is case order. Work on the main process alone, such as writing the
result files, ends with a broadcast of its outcome, so the other processes learn of its
failure as well.

A process that catches an exception keeps it and sends a :class:`ProcessFailure` in its place.
Every process then raises a :class:`ShardedEvaluationError` that names the failed case or
step, the rank and the original message. The callers remove their partial output in that
case, so no process waits for another that has already stopped.

NOTE: only exceptions are handled this way. A process that is killed or that crashes in C
code never reaches the next exchange, so the others wait until the launcher stops them
(``torchrun`` and ``accelerate launch`` stop the remaining processes when one exits).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

__all__ = [
    "ProcessFailure",
    "ProcessGroup",
    "ShardedEvaluationError",
    "choose_evaluation_device",
    "evaluation_device",
    "gather_cases",
    "join_process_group",
    "run_on_main",
]

Result = TypeVar("Result")


@dataclass(frozen=True)
class ProcessFailure:
    """Picklable record of an exception that one process caught.

    Attributes:
        rank: rank of the process that caught it.
        step: what the process was doing, e.g. "case brain1" or "writing /runs/a/eval_test_clicks".
        message: exception type and message, e.g. "DataError: label file is truncated".
    """

    rank: int
    step: str
    message: str


class ShardedEvaluationError(RuntimeError):
    """An evaluation stopped on every process because one or more processes failed.

    ``failures`` lists the :class:`ProcessFailure` of each process that failed, in rank order.
    """

    def __init__(self, failures: Sequence[ProcessFailure], world_size: int) -> None:
        self.failures = list(failures)
        details = "; ".join(
            f"process {failure.rank} of {world_size} failed on {failure.step}: {failure.message}"
            for failure in self.failures
        )
        super().__init__(f"sharded evaluation stopped on every process, because {details}")


@dataclass(frozen=True)
class ProcessGroup:
    """Rank and size of the torch.distributed group that shares an evaluation, or (0, 1) for one process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_to_main(self, value: object) -> list:
        """Return the value of every rank, in rank order, on the main process, and [] on the others."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered if self.is_main else []

    def broadcast_from_main(self, value: object) -> object:
        """Return the main process's value on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def raise_if_any_failed(self, failure: ProcessFailure | None, cause: BaseException | None = None) -> None:
        """Share this process's failure, or None, and raise ShardedEvaluationError on every rank if any failed.

        ``cause`` is the exception behind ``failure``, chained to the raised error on this rank.
        """
        if self.world_size == 1:
            failures = [failure]
        else:
            failures = [None] * self.world_size
            dist.all_gather_object(failures, failure)
        failed = [item for item in failures if item is not None]
        if failed:
            raise ShardedEvaluationError(failed, self.world_size) from cause


def join_process_group() -> ProcessGroup:
    """Return the group of the processes that a launcher started, or the one-process group.

    A group that is already set up is used as it is. Otherwise, when ``torchrun`` or
    ``accelerate launch`` set WORLD_SIZE above 1, this joins the launched processes over gloo,
    because only pickled CPU objects travel between them. The group stays open for later
    evaluations in the process and is destroyed at exit, since gloo can abort a process that
    exits with its group open.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return ProcessGroup()
        dist.init_process_group("gloo")
        atexit.register(_leave_process_group)
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def choose_evaluation_device(accelerator: str | None, device_count: int, local_rank: int) -> torch.device:
    """Return the device of the process with ``local_rank`` on its machine.

    Args:
        accelerator: device type of the available accelerator ("cuda", "xpu", "mps"), or None
            when there is none.
        device_count: number of accelerator devices on the machine.
        local_rank: rank of the process among the processes of its machine (>= 0).

    Without an accelerator every process runs on the CPU. Otherwise process ``local_rank`` gets
    device ``local_rank`` modulo ``device_count``, the rule of accelerate's
    ``PartialState.set_device`` (accelerate 1.16) that places the processes in training, so
    more processes than devices share them in turn.

    Raises:
        ValueError: ``local_rank`` is negative, or an accelerator is given with no device.
    """
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    if accelerator is None:
        return torch.device("cpu")
    if device_count < 1:
        raise ValueError(f"device_count must be >= 1 for accelerator {accelerator!r}, got {device_count}")
    return torch.device(accelerator, local_rank % device_count)


def evaluation_device() -> torch.device:
    """Return the device this process evaluates on.

    That is accelerator device LOCAL_RANK (0 without a launcher) modulo the device count when
    torch finds an accelerator, and the CPU otherwise, as the training loop's Accelerator
    places a process.
    """
    local_rank = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(local_rank)
    except ValueError:
        raise ValueError(
            f"LOCAL_RANK must be an integer, got {local_rank!r}; set it to the process's rank on its machine or unset it"
        ) from None
    if not torch.accelerator.is_available():
        return choose_evaluation_device(None, 0, rank)
    accelerator = torch.accelerator.current_accelerator().type
    return choose_evaluation_device(accelerator, torch.accelerator.device_count(), rank)


def gather_cases(
    case_ids: Sequence[str],
    group: ProcessGroup,
    evaluate_case: Callable[[int], Result],
    collect: Callable[[Result], None],
    skip_case: Callable[[int], None] | None = None,
    description: str = "",
) -> None:
    """Evaluate this process's share of the cases and pass every result to ``collect`` on the main process.

    ``evaluate_case(index)`` runs for the indices rank, rank + R, ... of ``case_ids``, and the
    main process calls ``collect(result)`` for all of them in case order. ``skip_case(index)``,
    when given, runs for every other index, in case order between them, for work that each
    process must repeat, such as random draws that later cases depend on.

    In one process, exceptions propagate unchanged. Under several, an exception in any of the
    callables makes every process raise :class:`ShardedEvaluationError`, at the end of the
    round (``evaluate_case``, ``skip_case``) or of the next round (``collect``).
    """
    failure: ProcessFailure | None = None
    cause: Exception | None = None
    rounds = range(0, len(case_ids), group.world_size)
    for first in tqdm(rounds, desc=description, leave=False, disable=not group.is_main):
        indices = range(first, min(first + group.world_size, len(case_ids)))
        if group.world_size == 1:
            for index in indices:
                collect(evaluate_case(index))
            continue

        own = None
        # A failure left from collecting the previous round skips this process's case.
        for index in indices if failure is None else ():
            try:
                if index == first + group.rank:
                    own = (index, evaluate_case(index))
                elif skip_case is not None:
                    skip_case(index)
            except Exception as error:
                failure, cause = ProcessFailure(group.rank, f"case {case_ids[index]}", _describe(error)), error
                break
        group.raise_if_any_failed(failure, cause)

        # The last round may leave some ranks without a case; they send None.
        for gathered in group.gather_to_main(own):
            if gathered is None:
                continue
            index, result = gathered
            try:
                collect(result)
            except Exception as error:
                step = f"collecting the result of case {case_ids[index]}"
                failure, cause = ProcessFailure(group.rank, step, _describe(error)), error
                break
    if group.world_size > 1:
        group.raise_if_any_failed(failure, cause)


def run_on_main(group: ProcessGroup, step: str, action: Callable[[], Result]) -> Result:
    """Run ``action`` on the main process only and return its result on every process.

    ``step`` names the work in the error, e.g. "writing /runs/a/eval_test_clicks". In one
    process, exceptions propagate unchanged. Under several, an exception in ``action`` makes
    every process raise :class:`ShardedEvaluationError`.
    """
    if group.world_size == 1:
        return action()
    value, failure, cause = None, None, None
    if group.is_main:
        try:
            value = action()
        except Exception as error:
            failure = ProcessFailure(group.rank, step, _describe(error))
            cause = error
    value, failure = group.broadcast_from_main((value, failure))
    if failure is not None:
        raise ShardedEvaluationError([failure], group.world_size) from cause
    return value


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
