from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIG_FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"

# File name: (distributed type, machines, processes).
EXPECTED = {
    "one_gpu.yaml": (DistributedType.NO, 1, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 1, 4),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 2, 8),
    "fsdp.yaml": (DistributedType.FSDP, 1, 4),
}


def test_folder_has_every_config():
    assert sorted(path.name for path in CONFIG_FOLDER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = load_config_from_file(str(CONFIG_FOLDER / name))
    distributed_type, machines, processes = EXPECTED[name]

    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert config.num_machines == machines
    assert config.num_processes == processes
    assert config.mixed_precision == "no"
    assert config.use_cpu is False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_reads_config(name):
    arguments = launch_command_parser().parse_args(
        ["--config_file", str(CONFIG_FOLDER / name), "-m", "fmadapt", "train", "recipe.yaml"]
    )
    _validate_launch_command(arguments)
    distributed_type, machines, processes = EXPECTED[name]

    assert arguments.num_processes == processes
    assert arguments.num_machines == machines
    assert arguments.mixed_precision == "no"
    assert arguments.multi_gpu is (distributed_type == DistributedType.MULTI_GPU)
    assert arguments.use_fsdp is (distributed_type == DistributedType.FSDP)


def test_fsdp_settings():
    config = load_config_from_file(str(CONFIG_FOLDER / "fsdp.yaml"))
    fsdp = config.fsdp_config

    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_multi_node_main_process():
    config = load_config_from_file(str(CONFIG_FOLDER / "multi_node.yaml"))
    assert config.machine_rank == 0
    assert config.main_process_port == 29500
    assert config.main_process_ip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_precision_comment_complete(name):
    lines = (CONFIG_FOLDER / name).read_text().splitlines()
    key_line = next(index for index, line in enumerate(lines) if line.startswith("mixed_precision:"))
    comment = []
    for line in reversed(lines[:key_line]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.lstrip("# ").strip())
    text = " ".join(comment)
    assert "train.mixed_precision" in text
    assert text.endswith(".")
