"""Gradient checkpointing of image-encoder blocks: recompute block activations in the backward pass.

Each encoder block's forward runs under ``torch.utils.checkpoint.checkpoint`` while the
module is in training mode and autograd is on, so only the block inputs are kept for the
backward pass and the block is run again there. This trades about one extra encoder
forward for activation memory that no longer grows with depth. In eval mode, or under
``no_grad``/``inference_mode``, blocks run normally.

SAM blocks switch to a subclass with a checkpointed ``forward`` (parameters, hooks and
state-dict keys stay). DINOv3 blocks are transformers layers, which have their own
checkpointing switch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import Block
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedSamBlock", "disable_gradient_checkpointing", "enable_gradient_checkpointing"]

logger = logging.getLogger(__name__)


class CheckpointedSamBlock(Block):
    """segment-anything ``Block`` that recomputes its activations in the backward pass.

    Never constructed directly: ``enable_gradient_checkpointing`` switches the class of
    existing blocks. Input and output are B×h×w×E tokens.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            # use_reentrant=False gives correct gradients when the block input does not
            # require grad (frozen patch embedding) and supports hooks inside the block.
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def enable_gradient_checkpointing(encoder: nn.Module) -> int:
    """Checkpoint every block of ``encoder`` in training mode, in place; returns the number of blocks.

    ``encoder`` is segment-anything's ``ImageEncoderViT`` (or a module tree containing its
    blocks) or a ``DinoV3Encoder``. Calling it twice changes nothing.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "activation_checkpointing_enable"):
        # transformers 5 names it activation checkpointing; gradient_checkpointing_enable
        # is its deprecated alias there.
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        logger.info("enabled transformers gradient checkpointing on %d DINOv3 blocks", len(encoder.blocks))
        return len(encoder.blocks)

    switched = 0
    for module in encoder.modules():
        if isinstance(module, Block):
            if type(module) is Block:
                module.__class__ = CheckpointedSamBlock
            switched += 1
    if switched == 0:
        raise ValueError(
            f"{type(encoder).__name__} contains no segment-anything Block and is not a DINOv3 encoder, "
            "so there is nothing to checkpoint; pass the model's image encoder"
        )
    logger.info("enabled gradient checkpointing on %d SAM encoder blocks", switched)
    return switched


def disable_gradient_checkpointing(encoder: nn.Module) -> int:
    """Run every block of ``encoder`` without checkpointing again; returns the number of blocks."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "activation_checkpointing_disable"):
        backbone.activation_checkpointing_disable()
        return len(encoder.blocks)

    restored = 0
    for module in encoder.modules():
        if type(module) is CheckpointedSamBlock:
            module.__class__ = Block
            restored += 1
    return restored
