"""Save and load the trained parameters of a segmenter.

A trained-parameter folder contains two files:

- ``trained.safetensors``: every parameter that had ``requires_grad=True`` when it was saved
  (LoRA, adapters, decoder, heads), under its full name in the model.
- ``trained.json``: ``{"fmadapt_version": ..., "keys": [...], "config": {...}}``, where
  ``config`` is the dict given to ``save_trained_parameters`` (model name, image size, class
  names, LoRA or adapter settings, freezing preset).

To restore a model, build it, load its base checkpoint, apply the same LoRA or adapter settings,
then call ``load_trained_parameters``. The key names depend on the adapters, so the file does
not load into a model without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import fmadapt
from fmadapt.errors import CheckpointError

logger = logging.getLogger(__name__)

TENSORS_FILE = "trained.safetensors"
CONFIG_FILE = "trained.json"


def save_trained_parameters(model: nn.Module, directory: str | os.PathLike, *, config: dict) -> Path:
    """Write the trainable parameters of ``model`` and ``config`` to ``directory``.

    Both files are written atomically: each goes to a temporary file in ``directory`` that
    replaces the target only when complete. The folder is created when missing.

    Args:
        model: the trained model; parameters with ``requires_grad=True`` are saved.
        directory: output folder.
        config: JSON-serialisable settings needed to rebuild the model. Dataclass values (such
            as LoraSettings) are stored as dicts, tuples as lists and paths as strings.

    Returns:
        The path of ``trained.safetensors``.

    Raises:
        TypeError: if ``config`` is not a dict or contains a value that is not JSON-serialisable.
        ValueError: if no parameter of ``model`` has ``requires_grad=True``.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    tensors = {
        name: parameter.detach().contiguous().clone().cpu()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    if not tensors:
        raise ValueError(
            "model has no parameters with requires_grad=True, so there is nothing to save; "
            "call apply_freezing with the preset used in training first"
        )
    metadata = {"fmadapt_version": fmadapt.__version__, "keys": sorted(tensors), "config": config}
    config_text = json.dumps(metadata, indent=2, default=_to_json_value)

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path = folder / TENSORS_FILE
    _write_atomically(tensors_path, lambda temporary: save_file(tensors, str(temporary)))
    _write_atomically(folder / CONFIG_FILE, lambda temporary: temporary.write_text(config_text, encoding="utf-8"))
    logger.info("saved %d trained tensors to %s", len(tensors), tensors_path)
    return tensors_path


def load_trained_parameters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Copy the tensors saved in ``directory`` into the parameters of ``model``.

    Tensors are cast to each parameter's dtype and device. Parameters absent from the file
    keep their values, and ``requires_grad`` is not changed.

    Args:
        model: a model built like the saved one, with the same LoRA or adapters applied.
        directory: a folder written by ``save_trained_parameters``.

    Returns:
        The loaded parameter names, sorted.

    Raises:
        CheckpointError: if a file is missing or unreadable, the two files disagree, or a saved
            key is missing from ``model`` or has another shape there.
    """
    folder = Path(directory)
    metadata = _read_metadata(folder)
    tensors = _read_tensors(folder)
    if sorted(tensors) != metadata["keys"]:
        raise CheckpointError(
            f"{folder / TENSORS_FILE} and {folder / CONFIG_FILE} list different keys; "
            "the folder was changed after saving, so save the trained parameters again"
        )

    parameters = dict(model.named_parameters())
    _check_keys_fit(parameters, tensors, metadata["config"])
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    logger.info("loaded %d trained tensors from %s", len(tensors), folder)
    return sorted(tensors)


def read_trained_config(directory: str | os.PathLike) -> dict:
    """Return the ``config`` dict stored by ``save_trained_parameters`` in ``directory``.

    Raises:
        CheckpointError: if ``trained.json`` is missing or malformed.
    """
    return _read_metadata(Path(directory))["config"]


def _check_keys_fit(parameters: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], config: dict) -> None:
    missing = sorted(name for name in tensors if name not in parameters)
    if missing:
        raise CheckpointError(
            f"{len(missing)} saved parameters are missing from the model, for example {missing[:5]}; "
            "apply the same LoRA or adapter settings as in training before loading "
            f"(saved config: {_adapter_settings_text(config)})"
        )
    mismatched = [
        f"{name}: saved {tuple(tensor.shape)}, model {tuple(parameters[name].shape)}"
        for name, tensor in tensors.items()
        if tensor.shape != parameters[name].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} saved parameters have another shape in the model, for example {mismatched[:3]}; "
            "build the same model variant with the same LoRA rank and adapter reduction as in training"
        )


def _adapter_settings_text(config: dict) -> str:
    entries = {key: value for key, value in config.items() if "lora" in key or "adapter" in key}
    return json.dumps(entries) if entries else "no LoRA or adapter settings recorded"


def _read_metadata(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; pass a folder written by save_trained_parameters")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} could not be read as JSON: {error}") from error
    if not isinstance(metadata, dict) or not isinstance(metadata.get("keys"), list):
        raise CheckpointError(f"{path} lacks the 'keys' list; it was not written by save_trained_parameters")
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"{path} lacks the 'config' dict; it was not written by save_trained_parameters")
    return metadata


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; pass a folder written by save_trained_parameters")
    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path} could not be read as safetensors: {error}") from error


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(temporary_name)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _to_json_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"config contains a {type(value).__name__} value ({value!r:.80}) that is not JSON-serialisable; "
        "convert it to a str, number, list or dict"
    )
