"""Export an adapted DINOv3 encoder as a plain Hugging Face model folder.

LoRA layers are merged into their base weights (W + (alpha / r) · B A), so the folder
contains ordinary DINOv3 weights that ``DinoV3Encoder.from_registry(name,
checkpoint=folder)`` loads with no LoRA code involved.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from os import PathLike, fspath
from pathlib import Path

from peft.tuners.lora import LoraLayer

from fmadapt.models.dinov3 import DinoV3Encoder

__all__ = ["EXPORT_INFO_FILE", "merged_encoder", "save_encoder_checkpoint"]

logger = logging.getLogger(__name__)

# Written next to config.json and model.safetensors; the DINOv3 loader does not read it.
EXPORT_INFO_FILE = "fmadapt_export.json"


def merged_encoder(encoder: DinoV3Encoder) -> DinoV3Encoder:
    """Return a copy of ``encoder`` with every LoRA layer merged into a plain ``nn.Linear``.

    The input is left unchanged. An encoder without LoRA is copied as is. Parameters of
    the copy have ``requires_grad`` True, as in a freshly built encoder.
    """
    if not isinstance(encoder, DinoV3Encoder):
        raise TypeError(f"encoder must be a DinoV3Encoder, got {type(encoder).__name__}")
    merged = copy.deepcopy(encoder).cpu()
    lora_names = [name for name, module in merged.named_modules() if isinstance(module, LoraLayer)]
    for name in lora_names:
        layer = merged.get_submodule(name)
        layer.merge(safe_merge=True)
        parent_name, _, child_name = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child_name, layer.get_base_layer())
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged


def save_encoder_checkpoint(
    encoder: DinoV3Encoder, folder: str | PathLike[str], *, info: dict | None = None
) -> Path:
    """Write the merged ``encoder`` to ``folder`` as config.json and model.safetensors.

    The folder is written under a temporary name beside it and renamed when complete,
    so an interrupted export leaves no partial folder. An existing folder is replaced.
    ``info`` (JSON-serialisable) is written to ``fmadapt_export.json`` together with the
    registry name.

    Returns:
        The folder path.
    """
    target = Path(fspath(folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    merged = merged_encoder(encoder)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        merged.backbone.save_pretrained(staging)
        details = {"model": merged.spec.name, **(info or {})}
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(details, indent=2), encoding="utf-8")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported the adapted %s encoder to %s", merged.spec.name, target)
    return target


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an existing ``target`` aside first."""
    if not target.exists():
        os.replace(staging, target)
        return
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
