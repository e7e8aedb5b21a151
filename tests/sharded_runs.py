"""Start sharded_evaluation_worker.py in two CPU processes and compare evaluation files.

``launch_worker`` goes through ``accelerate launch`` as a user would. ``start_worker_processes``
starts the two processes itself, with the environment torchrun sets, so a test reads the exit
code and output of each process, and no launcher stops one when the other exits.
"""

import csv
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from conftest import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "sharded_evaluation_worker.py"
METRIC_COLUMNS = ("dice", "iou", "nsd", "hd95", "tp", "fp", "fn", "tn", "n_pred", "n_ref")


def launch_worker(arguments, data_root, timeout=300):
    """Run the worker with ``arguments`` under ``accelerate launch`` in two processes and check it succeeds."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(WORKER), *[str(argument) for argument in arguments],
    ]
    environment = dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]


@dataclass
class ProcessOutcome:
    returncode: int
    stderr: str


def start_worker_processes(arguments, data_root, extra_environment, log_dir, timeout=240):
    """Run the worker in two processes joined over gloo; return each one's outcome in rank order.

    Each process writes its stderr to ``log_dir/rank<R>.log``, since a full pipe would block it.
    Fails the test when a process is still running ``timeout`` seconds after the start, and
    stops both.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes, logs = [], []
    for rank in range(2):
        environment = dict(
            os.environ,
            FMADAPT_DATA=str(data_root),
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            **extra_environment,
        )
        command = [sys.executable, str(WORKER), *[str(argument) for argument in arguments]]
        logs.append(log_dir / f"rank{rank}.log")
        with logs[-1].open("w") as log:
            processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=log))
    deadline = time.monotonic() + timeout
    try:
        for rank, process in enumerate(processes):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {rank} was still running after {timeout} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [ProcessOutcome(process.returncode, log.read_text()) for process, log in zip(processes, logs)]


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def assert_same_rows(sharded_rows, single_rows, metric_columns=METRIC_COLUMNS):
    """Check the rows have the same cases and columns, and metrics equal within 1e-6."""
    assert [row.get("case") for row in sharded_rows] == [row.get("case") for row in single_rows]
    for sharded, single in zip(sharded_rows, single_rows):
        assert list(sharded) == list(single)
        for column in single:
            if column in metric_columns:
                expected, actual = float(single[column]), float(sharded[column])
                if math.isnan(expected):
                    assert math.isnan(actual), (sharded["case"], column)
                else:
                    assert actual == pytest.approx(expected, abs=1e-6, rel=0), (sharded["case"], column)
            else:
                assert sharded[column] == single[column], (sharded["case"], column)
