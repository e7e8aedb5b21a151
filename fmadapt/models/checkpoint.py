"""Read pretrained weights from local files and load them into a model by key."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from os import PathLike, fspath
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmadapt.errors import CheckpointError
from fmadapt.models.manifest import read_manifest

__all__ = ["LoadReport", "load_checkpoint", "read_state_dict", "resize_position_embeddings"]

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts commonly nest the weights next to optimizer state.
_WRAPPER_KEYS = ("model", "state_dict")
_DDP_PREFIX = "module."
# segment-anything's Sam stores its input normalisation as buffers, and older releases
# saved them in the checkpoint. fmadapt keeps normalisation in ImageTransform instead.
KNOWN_IGNORED_KEYS = ("pixel_mean", "pixel_std")
_POS_EMBED_KEY = "image_encoder.pos_embed"
_REL_POS_SUFFIXES = (".attn.rel_pos_h", ".attn.rel_pos_w")
_REPORT_KEY_LIMIT = 5


@dataclass
class LoadReport:
    """Outcome of ``load_checkpoint``, as lists of state-dict keys.

    Attributes:
        matched: keys loaded into the model.
        missing: model keys the file does not contain (left as initialised).
        unexpected: file keys the model does not have (not loaded).
        resized: position-embedding keys interpolated to the model's image size.
        mismatched: keys present in both but with different shapes (not loaded).
        ignored: known keys dropped on purpose (SAM's pixel_mean and pixel_std).
    """

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    resized: list[str]
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Format the counts, and the first few keys of each non-empty problem list, as one line."""
        parts = [f"{len(self.matched)} keys loaded"]
        for label, keys in (
            ("resized", self.resized),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("ignored", self.ignored),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} ({_first_keys(keys)})")
        return ", ".join(parts)


def _first_keys(keys: Sequence[str]) -> str:
    listed = ", ".join(keys[:_REPORT_KEY_LIMIT])
    if len(keys) > _REPORT_KEY_LIMIT:
        listed += f", ... {len(keys) - _REPORT_KEY_LIMIT} more"
    return listed


def read_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file.

    Torch files are read with ``weights_only=True``, so they cannot run code. A dict
    that nests the weights under ``"model"`` or ``"state_dict"`` is unwrapped (other
    entries, such as optimizer state or the epoch, are dropped), and a ``module.``
    prefix on every key (saved from DistributedDataParallel) is removed.
    """
    checkpoint_path = Path(fspath(path))
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"checkpoint file {checkpoint_path} not found; put pretrained weights in the "
            "checkpoints/ folder (checkpoints/manifest.json lists the official files and "
            "checkpoints/README.md where to get them) and pass that path"
        )
    suffix = checkpoint_path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        loaded = _read_safetensors(checkpoint_path)
    elif suffix in TORCH_SUFFIXES:
        loaded = _read_torch(checkpoint_path)
    else:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} has suffix {suffix!r}; supported suffixes are "
            f"{list(TORCH_SUFFIXES) + [SAFETENSORS_SUFFIX]}"
        )
    return _strip_ddp_prefix(_unwrap(loaded, checkpoint_path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(fspath(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"failed to read safetensors file {path}: {error}") from error


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(_torch_load_failure_message(path, error)) from error


def _torch_load_failure_message(path: Path, error: BaseException) -> str:
    """Explain a failed torch.load: the file size, the official size of a file the manifest names, and what to do."""
    size = path.stat().st_size
    reason = _load_error_reason(error)
    message = f"failed to read checkpoint {path} ({size} bytes) with torch.load(weights_only=True): {reason}. "
    entry = next((entry for entry in read_manifest() if entry.file_name == path.name), None)
    if entry is not None and entry.size_bytes is not None and size != entry.size_bytes:
        return message + (
            f"The official {entry.file_name} is {entry.size_bytes} bytes, so this file is incomplete or a "
            f"different file. Download it again from {entry.source}"
        )
    if entry is not None and entry.size_bytes is not None:
        return message + (
            f"The file has the size of the official {entry.file_name} ({entry.size_bytes} bytes) but is damaged. "
            f"Check it with `fmadapt checkpoints --folder {path.parent}` and download it again from {entry.source}"
        )
    if "Unsupported global" in reason:
        return message + (
            "The file stores Python objects besides tensors, which fmadapt does not load. Save the model's "
            "state_dict() instead, or convert the file to safetensors"
        )
    return message + "The file is probably incomplete or damaged, so download or copy it again"


def _load_error_reason(error: BaseException) -> str:
    """Return the error type and the first sentence of its message.

    The message of a weights_only failure (torch 2.6 to 2.14) recommends weights_only=False,
    which would run code from the file and does not repair a truncated download, so only
    the text after "WeightsUnpickler error:" is used.
    """
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if not detail or "weights_only" in detail:
        return type(error).__name__
    return f"{type(error).__name__}: {detail}"


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    state = loaded
    for _ in range(len(_WRAPPER_KEYS)):
        if not isinstance(state, dict) or _all_tensors(state):
            break
        nested = next((state[key] for key in _WRAPPER_KEYS if isinstance(state.get(key), dict)), None)
        if nested is None:
            break
        state = nested

    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"checkpoint {path} contains {type(state).__name__}, not a dict of tensors; "
            "expected a state dict, optionally nested under 'model' or 'state_dict'"
        )
    bad = [str(key) for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is not a dict of tensors: {len(bad)} entries are not tensors "
            f"({_first_keys(bad)}); expected a state dict, optionally nested under 'model' or 'state_dict'"
        )
    return state


def _all_tensors(state: dict) -> bool:
    return all(isinstance(value, torch.Tensor) for value in state.values())


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith(_DDP_PREFIX) for key in state):
        return {key[len(_DDP_PREFIX):]: value for key, value in state.items()}
    return state


def resize_position_embeddings(state_dict: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Interpolate encoder position tables in ``state_dict`` to the model's image size.

    Changes ``state_dict`` in place and returns the keys it resized.
    ``image_encoder.pos_embed`` (1×h×w×E) is resized bicubically to the model's grid.
    Relative position tables ``image_encoder.blocks.N.attn.rel_pos_h`` and ``_w``
    ((2·size−1)×head_dim) are resized linearly where their length differs from the
    model's, which happens in global-attention blocks. Windowed blocks keep their
    tables because the window size does not depend on the image size.
    """
    target_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    resized = []
    for key, value in list(state_dict.items()):
        target = target_shapes.get(key)
        if target is None or tuple(value.shape) == target:
            continue
        if key == _POS_EMBED_KEY and value.ndim == 4 and value.shape[-1] == target[-1]:
            state_dict[key] = _resize_pos_embed(value, target[1:3])
            resized.append(key)
        elif key.endswith(_REL_POS_SUFFIXES) and value.ndim == 2 and value.shape[1] == target[1]:
            state_dict[key] = _resize_rel_pos(value, target[0])
            resized.append(key)
    if resized:
        logger.info("resized %d position tables to the model's image size: %s", len(resized), _first_keys(resized))
    return resized


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    channels_first = pos_embed.permute(0, 3, 1, 2).float()
    resized = F.interpolate(channels_first, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    as_signal = table.float().t().unsqueeze(0)
    resized = F.interpolate(as_signal, size=length, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype).contiguous()


def load_checkpoint(
    model: nn.Module,
    path: str | PathLike[str],
    *,
    required: Sequence[str] = ("image_encoder",),
) -> LoadReport:
    """Load the weights in ``path`` into ``model`` by key, resizing position tables first.

    Keys with matching names and shapes are loaded; others are reported. Raises
    CheckpointError when no key matches (a file for another model) or when any model key
    under a ``required`` prefix is missing from the file or has a different shape.
    """
    if isinstance(required, str):
        required = (required,)
    state = read_state_dict(path)
    ignored = sorted(key for key in state if key in KNOWN_IGNORED_KEYS)
    for key in ignored:
        del state[key]
    resized = resize_position_embeddings(state, model)

    model_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    matched = [key for key in model_shapes if key in state and tuple(state[key].shape) == model_shapes[key]]
    mismatched = [key for key in model_shapes if key in state and tuple(state[key].shape) != model_shapes[key]]
    missing = [key for key in model_shapes if key not in state]
    unexpected = sorted(key for key in state if key not in model_shapes)
    report = LoadReport(matched, missing, unexpected, resized, mismatched, ignored)

    if not matched:
        raise CheckpointError(
            f"no key of checkpoint {path} matches the model ({len(state)} keys such as "
            f"{_first_keys(sorted(state))}); check that the file belongs to this model family"
        )
    _check_required(report, required, path, state, model_shapes)

    model.load_state_dict({key: state[key] for key in matched}, strict=False)
    if missing or unexpected or mismatched:
        logger.warning("loaded checkpoint %s: %s", path, report.summary())
    else:
        logger.info("loaded checkpoint %s: %s", path, report.summary())
    return report


def _check_required(
    report: LoadReport,
    required: Sequence[str],
    path: str | PathLike[str],
    state: dict[str, torch.Tensor],
    model_shapes: dict[str, tuple[int, ...]],
) -> None:
    def under_required(key: str) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in required)

    missing = [key for key in report.missing if under_required(key)]
    mismatched = [
        f"{key} file {tuple(state[key].shape)} vs model {model_shapes[key]}"
        for key in report.mismatched
        if under_required(key)
    ]
    if missing or mismatched:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model under required prefixes {list(required)}: "
            f"{len(missing)} keys missing ({_first_keys(missing) or 'none'}), {len(mismatched)} with "
            f"a different shape ({_first_keys(mismatched) or 'none'}); check that the model name "
            "matches the checkpoint"
        )
