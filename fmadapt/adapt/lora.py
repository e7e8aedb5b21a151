"""LoRA for the image encoder (SAM or DINOv3), injected with peft.

The encoder declares which Linear layers of a block LoRA may wrap
(``ImageEncoder.lora_targets``, such as ``qkv`` for SAM or ``q`` and ``v`` for DINOv3), and
``LoraSettings.target_modules`` names them. peft replaces each targeted ``nn.Linear`` with a
LoRA layer that keeps the original layer as ``base_layer``, so the injection renames the
base weights::

    image_encoder.blocks.0.attn.qkv.weight  ->  image_encoder.blocks.0.attn.qkv.base_layer.weight
    (new)                                        image_encoder.blocks.0.attn.qkv.lora_A.default.weight
    (new)                                        image_encoder.blocks.0.attn.qkv.lora_B.default.weight

Untargeted layers keep their names. Load weights in this order:

1. build the model,
2. load the pretrained base checkpoint (the encoder's own key names),
3. apply LoRA or bottleneck adapters,
4. load the trained-parameter file (``fmadapt.adapt.trained_file``).

When a base checkpoint has to be loaded after step 3, ``load_base_state_dict`` renames its
keys with ``remap_base_state_dict`` and checks that only adapter parameters are left missing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fmadapt.adapt.adapters import check_block_indices, model_encoder
from fmadapt.adapt.summary import ADAPTERS, parameter_parts
from fmadapt.errors import CheckpointError
from fmadapt.models.encoders import LORA_TARGET_NAMES

logger = logging.getLogger(__name__)

# peft's name for the single adapter that fmadapt injects; it appears in every LoRA key.
LORA_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA settings for the image encoder.

    Attributes:
        rank: rank r of the update ``B @ A``; A is r x in_features, B is out_features x r.
        alpha: scaling numerator, so the update is multiplied by ``alpha / rank``.
        dropout: dropout probability on the LoRA branch input, in [0, 1).
        target_modules: Linear layers to adapt in each block, by the names the encoder
            declares: ``qkv``, ``proj`` (attention) and ``lin1``, ``lin2`` (MLP) for SAM;
            ``q``, ``k``, ``v``, ``proj``, ``up``, ``down`` and ``gate`` (SwiGLU only) for
            DINOv3. Names of any architecture pass here, and ``apply_lora`` checks them
            against the model's encoder.
        blocks: indices of the encoder blocks to adapt; None adapts every block.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("qkv",)
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        _check_alpha(self.alpha)
        _check_dropout(self.dropout)
        _check_target_modules(self.target_modules)
        if self.blocks is not None:
            check_block_indices(self.blocks, argument="LoraSettings.blocks")


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"LoraSettings.rank must be an int, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"LoraSettings.rank must be at least 1, got {rank}; typical values are 4 to 32")


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"LoraSettings.alpha must be a number, got {alpha!r} ({type(alpha).__name__})")
    if not alpha > 0:
        raise ValueError(f"LoraSettings.alpha must be positive, got {alpha}; a common choice is 2 * rank")


def _check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"LoraSettings.dropout must be a number, got {dropout!r} ({type(dropout).__name__})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {dropout}")


def _check_target_modules(targets: object) -> None:
    if not isinstance(targets, tuple) or not all(isinstance(name, str) for name in targets):
        raise TypeError(
            f"LoraSettings.target_modules must be a tuple of str, got {targets!r}; "
            f"for example ('qkv',) or ('qkv', 'proj')"
        )
    choices = " and ".join(
        f"{sorted(names)} ({architecture} encoders)" for architecture, names in LORA_TARGET_NAMES.items()
    )
    if not targets:
        raise ValueError(f"LoraSettings.target_modules is empty; choose from {choices}")
    known = {name for names in LORA_TARGET_NAMES.values() for name in names}
    unknown = [name for name in targets if name not in known]
    if unknown:
        raise ValueError(
            f"LoraSettings.target_modules contains unknown layer names {unknown}; "
            f"the Linear layers of an encoder block are {choices}"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoraSettings.target_modules lists a layer twice: {targets!r}")


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject peft LoRA layers into the model's image encoder in place.

    The prompt encoder, mask decoder and any other part of the model are left untouched. peft
    (checked with 0.21) sets ``requires_grad=False`` on every base parameter of the image
    encoder and True on the new LoRA parameters. Call ``apply_freezing`` afterwards to choose
    what trains.

    Args:
        model: a Segmenter, or a module with an ``image_encoder`` (see ``model_encoder``).
        settings: rank, alpha, dropout, target layers and blocks.

    Returns:
        The same ``model`` object, modified.

    Raises:
        TypeError: if ``settings`` is not a LoraSettings.
        ValueError: if the model already has LoRA layers, a block index is out of range, or
            the encoder does not declare a target name.
    """
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"settings must be a LoraSettings, got {type(settings).__name__}")
    encoder = model_encoder(model)
    if has_lora(model):
        raise ValueError(
            "the image encoder already has LoRA layers; build a fresh model to apply different LoRA settings"
        )

    depth = len(encoder.blocks)
    indices = tuple(range(depth)) if settings.blocks is None else settings.blocks
    check_block_indices(indices, argument="LoraSettings.blocks", depth=depth)
    target_names = encoder.target_module_names(settings.target_modules, indices)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_names,
        bias="none",
    )
    inject_adapter_in_model(config, encoder, adapter_name=LORA_ADAPTER_NAME)
    logger.info(
        "applied LoRA rank %d alpha %g to %d layers of the image encoder",
        settings.rank,
        settings.alpha,
        len(target_names),
    )
    return model


def has_lora(model: nn.Module) -> bool:
    """Return whether any module of ``model`` is a peft LoRA layer."""
    return any(isinstance(module, LoraLayer) for module in model.modules())


def remap_base_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename base-model keys to the names they have after LoRA injection.

    A key ``<layer>.weight`` or ``<layer>.bias`` of a layer that peft wrapped becomes
    ``<layer>.base_layer.weight`` or ``<layer>.base_layer.bias``. Every other key is kept as is,
    so the function is harmless on a model without LoRA.

    Args:
        model: the model after ``apply_lora``; key names are relative to it.
        state_dict: base weights with the key names of the model before injection.

    Returns:
        A new dict with the same tensors under the renamed keys.
    """
    wrapped_layers = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        layer_name, _, parameter_name = key.rpartition(".")
        if layer_name in wrapped_layers:
            key = f"{layer_name}.base_layer.{parameter_name}"
        remapped[key] = tensor
    return remapped


def load_base_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load base (pretrained) weights into a model that already has LoRA or adapters.

    Keys are renamed with ``remap_base_state_dict``. Adapter parameters (LoRA A/B and bottleneck
    adapters) may be missing because a base checkpoint never has them. Every other parameter and
    buffer must be present.

    Args:
        model: the model after ``apply_lora`` or ``apply_adapters``.
        state_dict: base weights with the key names of the model before adapters were applied,
            such as the ``state_dict()`` of the same model variant without adapters. Official
            checkpoint files are loaded with ``Segmenter.from_registry`` before adapters are
            applied instead.

    Raises:
        CheckpointError: if the state dict lacks a base key, has a key the model does not know,
            or has a tensor of the wrong shape.
    """
    remapped = remap_base_state_dict(model, state_dict)
    parts = parameter_parts(model)
    model_keys = set(model.state_dict())
    unexpected = sorted(set(remapped) - model_keys)
    missing = sorted(key for key in model_keys - set(remapped) if parts.get(key) != ADAPTERS)
    if unexpected or missing:
        raise CheckpointError(
            f"base state dict does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}; check that the checkpoint is for "
            "this model variant and that it has the key names of the model before adapters were applied"
        )
    try:
        model.load_state_dict(remapped, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"base state dict does not fit the model: {error}") from error
    logger.info("loaded %d base tensors into a model with adapters", len(remapped))
