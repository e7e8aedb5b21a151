"""Device choice and one-process paths of fmadapt.evaluate.sharding. The two-process paths are tested in test_sharded_*.py.

The accelerator branches are checked through choose_evaluation_device with the device type
and count given, so they run on machines without a GPU.
"""

import numpy as np
import pytest
import torch

from fmadapt.evaluate.protocol_settings import ProtocolSettings, case_generator
from fmadapt.evaluate.sharding import (
    ProcessFailure,
    ProcessGroup,
    ShardedEvaluationError,
    choose_evaluation_device,
    evaluation_device,
    gather_cases,
    join_process_group,
    run_on_main,
)


def test_device_is_cpu_without_accelerator():
    assert choose_evaluation_device(None, 0, 0) == torch.device("cpu")
    assert choose_evaluation_device(None, 0, 3) == torch.device("cpu")


def test_device_follows_local_rank():
    assert choose_evaluation_device("cuda", 2, 0) == torch.device("cuda", 0)
    assert choose_evaluation_device("cuda", 2, 1) == torch.device("cuda", 1)
    assert choose_evaluation_device("xpu", 4, 3) == torch.device("xpu", 3)


def test_device_shared_by_extra_processes():
    assert choose_evaluation_device("cuda", 2, 2) == torch.device("cuda", 0)
    assert choose_evaluation_device("cuda", 2, 3) == torch.device("cuda", 1)


def test_device_rejects_invalid_inputs():
    with pytest.raises(ValueError, match="LOCAL_RANK must be >= 0, got -1"):
        choose_evaluation_device("cuda", 2, -1)
    with pytest.raises(ValueError, match="device_count must be >= 1 for accelerator 'cuda', got 0"):
        choose_evaluation_device("cuda", 0, 0)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the CPU fallback on a machine without accelerator")
def test_evaluation_device_on_cpu_machine(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert evaluation_device() == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert evaluation_device() == torch.device("cpu")


def test_evaluation_device_rejects_invalid_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'first'"):
        evaluation_device()


def test_unlaunched_process_group_is_single(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = join_process_group()
    assert group == ProcessGroup(0, 1)
    assert group.is_main


def test_single_process_gathers_in_case_order():
    collected = []
    gather_cases(["a", "b", "c"], ProcessGroup(), lambda index: index * 10, collected.append)
    assert collected == [0, 10, 20]


def test_single_process_keeps_original_exception():
    def evaluate(index):
        if index == 1:
            raise KeyError("missing slice")
        return index

    def write():
        raise OSError("disk full")

    with pytest.raises(KeyError, match="missing slice"):
        gather_cases(["a", "b"], ProcessGroup(), evaluate, lambda result: None)
    with pytest.raises(OSError, match="disk full"):
        run_on_main(ProcessGroup(), "writing results", write)
    assert run_on_main(ProcessGroup(), "writing results", lambda: 7) == 7


def test_error_names_rank_case_and_message():
    failures = [ProcessFailure(1, "case brain2", "DataError: label values [200] are not in dataset.json")]
    error = ShardedEvaluationError(failures, 2)
    assert str(error) == (
        "sharded evaluation stopped on every process, because process 1 of 2 failed on case brain2: "
        "DataError: label values [200] are not in dataset.json"
    )
    assert error.failures == failures


def test_case_generator_depends_on_seed_and_case():
    first = case_generator(3, "brain1").random(4)
    assert np.array_equal(case_generator(3, "brain1").random(4), first)
    assert not np.array_equal(case_generator(4, "brain1").random(4), first)
    assert not np.array_equal(case_generator(3, "brain2").random(4), first)


def test_settings_reject_invalid_seed():
    for seed in (-1, 1.5, "7", True):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            ProtocolSettings(seed=seed)
    assert ProtocolSettings(seed=np.int64(5)).seed == 5
