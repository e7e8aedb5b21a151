"""Bottleneck adapters for the blocks of an image encoder (SAM or DINOv3).

The encoder declares where adapters go (``ImageEncoder.adapter_targets``): the module whose
output is the attention branch, and the MLP. Two placements are offered:

- ``sequential``: the adapter follows the attention, ``a + adapter(a)`` where ``a`` is the
  attention target's output, before the residual connection (and before DINOv3's LayerScale).
- ``parallel``: the adapter is a branch beside the MLP, ``mlp(n) + scale * adapter(n)``
  where ``n`` is the normalised MLP input.

The adapter is registered as a new child of the block (``attn_adapter`` or ``mlp_adapter``),
and a forward hook on the target module adds its output. The block keeps its class, its
forward and its parameter names, so a base checkpoint with the encoder's own keys still
loads after the adapters are applied (the new adapter keys are then missing from it). The
hooks are bound methods of the adapter, so ``copy.deepcopy`` of the model copies them
together with the adapter they call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from fmadapt.models.encoders import ImageEncoder, SamImageEncoder

logger = logging.getLogger(__name__)

PLACEMENTS = ("sequential", "parallel")

# Child names given to the adapter inside each block, by placement.
ADAPTER_CHILD_NAMES = {"sequential": "attn_adapter", "parallel": "mlp_adapter"}


@dataclass(frozen=True)
class AdapterSettings:
    """Bottleneck adapter settings for the image encoder.

    Attributes:
        reduction: the hidden size of each adapter is ``dim // reduction``, where ``dim`` is the
            encoder's embedding size E.
        placement: ``sequential`` (after the attention) or ``parallel`` (beside the MLP).
        scale: factor on the adapter branch of the ``parallel`` placement. The ``sequential``
            placement adds the adapter output unscaled and ignores this value.
        blocks: indices of the encoder blocks that get an adapter; None selects every block.
    """

    reduction: int = 4
    placement: Literal["parallel", "sequential"] = "sequential"
    scale: float = 0.5
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int):
            raise TypeError(f"AdapterSettings.reduction must be an int, got {self.reduction!r}")
        if self.reduction < 1:
            raise ValueError(f"AdapterSettings.reduction must be at least 1, got {self.reduction}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterSettings.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"AdapterSettings.scale must be a number, got {self.scale!r}")
        if self.blocks is not None:
            check_block_indices(self.blocks, argument="AdapterSettings.blocks")


class BottleneckAdapter(nn.Module):
    """Bottleneck MLP: Linear(E -> hidden), GELU, Linear(hidden -> E).

    The up projection starts at zero, so a fresh adapter outputs zeros and leaves the model it
    is added to unchanged until it is trained.

    Args:
        dim: embedding size E of the tokens it receives.
        hidden: bottleneck size.
        scale: factor on the output when used as a branch beside the MLP (``add_beside_mlp``).
    """

    def __init__(self, dim: int, hidden: int, *, scale: float = 1.0) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"BottleneckAdapter sizes must be positive, got dim={dim}, hidden={hidden}")
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens of shape (..., E) to an update of the same shape."""
        return self.up(self.act(self.down(tokens)))

    def add_to_attention_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook for the attention target: return ``a + adapter(a)`` for attention output a."""
        return output + self(output)

    def add_beside_mlp(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook for the MLP: return ``mlp(n) + scale * adapter(n)`` for MLP input n."""
        return output + self.scale * self(inputs[0])


def check_block_indices(blocks: object, *, argument: str, depth: int | None = None) -> None:
    """Check a tuple of encoder block indices, against ``depth`` blocks when it is given.

    Raises:
        TypeError: if ``blocks`` is not a tuple of int.
        ValueError: if it is empty, repeats an index, or has an index outside [0, depth).
    """
    if not isinstance(blocks, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in blocks):
        raise TypeError(f"{argument} must be a tuple of int or None, got {blocks!r}")
    if not blocks:
        raise ValueError(f"{argument} is empty; pass None to select every block")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{argument} repeats a block index: {blocks!r}")
    invalid = [i for i in blocks if i < 0 or (depth is not None and i >= depth)]
    if invalid:
        allowed = f"0 to {depth - 1}" if depth is not None else "non-negative"
        raise ValueError(
            f"{argument} has invalid block indices {invalid}; the image encoder has indices {allowed}"
        )


def model_encoder(model: nn.Module) -> ImageEncoder:
    """Return the ``ImageEncoder`` of ``model``, whose declared targets LoRA and adapters use.

    A Segmenter's ``encoder`` is used when present. Otherwise ``model.image_encoder`` must be an
    ``ImageEncoder`` or segment-anything's ``ImageEncoderViT``, which is viewed through
    ``SamImageEncoder`` (sharing its modules).

    Raises:
        TypeError: if the model has neither, or the encoder has no blocks.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, ImageEncoder):
        encoder = getattr(model, "image_encoder", None)
        if isinstance(encoder, ImageEncoderViT):
            encoder = SamImageEncoder(encoder)
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(
            f"model must have an image_encoder attribute (an ImageEncoder such as DinoV3Encoder, or "
            f"segment-anything's ImageEncoderViT), got {type(model).__name__} without one"
        )
    if len(encoder.blocks) == 0:
        raise TypeError(f"the image encoder ({type(encoder).__name__}) has no transformer blocks to adapt")
    return encoder


def has_adapters(model: nn.Module) -> bool:
    """Return whether any module of ``model`` is a BottleneckAdapter."""
    return any(isinstance(module, BottleneckAdapter) for module in model.modules())


def apply_adapters(model: nn.Module, settings: AdapterSettings) -> nn.Module:
    """Add a bottleneck adapter to each selected block of the model's image encoder, in place.

    The adapter hooks the module that the encoder's ``adapter_targets`` names for the
    placement (``"attention"`` for sequential, ``"mlp"`` for parallel). Adapter parameters
    are created with ``requires_grad=True`` on the device and dtype of that module, and every
    existing parameter keeps its name and ``requires_grad``. Call ``apply_freezing``
    afterwards to choose what trains.

    Args:
        model: a Segmenter, or a module with an ``image_encoder`` (see ``model_encoder``).
        settings: reduction, placement, scale and blocks.

    Returns:
        The same ``model`` object, modified.

    Raises:
        TypeError: if ``settings`` is not an AdapterSettings.
        ValueError: if a block already has an adapter, a block index is out of range, or
            ``dim // reduction`` is zero.
    """
    if not isinstance(settings, AdapterSettings):
        raise TypeError(f"settings must be an AdapterSettings, got {type(settings).__name__}")
    encoder = model_encoder(model)
    blocks = encoder.blocks
    indices = tuple(range(len(blocks))) if settings.blocks is None else settings.blocks
    check_block_indices(indices, argument="AdapterSettings.blocks", depth=len(blocks))
    for index in indices:
        if any(hasattr(blocks[index], name) for name in ADAPTER_CHILD_NAMES.values()):
            raise ValueError(
                f"image encoder block {index} already has an adapter; build a fresh model to apply new adapters"
            )

    for index in indices:
        _add_adapter(blocks[index], encoder, settings)
    logger.info(
        "applied %s bottleneck adapters (reduction %d) to %d encoder blocks",
        settings.placement,
        settings.reduction,
        len(indices),
    )
    return model


def _add_adapter(block: nn.Module, encoder: ImageEncoder, settings: AdapterSettings) -> None:
    dim = encoder.block_embed_dim
    hidden = dim // settings.reduction
    if hidden < 1:
        raise ValueError(
            f"AdapterSettings.reduction={settings.reduction} leaves no hidden units for embedding size {dim}; "
            f"use a reduction of at most {dim}"
        )
    target_name = "attention" if settings.placement == "sequential" else "mlp"
    target = block.get_submodule(encoder.adapter_targets[target_name])
    reference = next(target.parameters())
    adapter = BottleneckAdapter(dim, hidden, scale=settings.scale)
    adapter.to(device=reference.device, dtype=reference.dtype)
    block.add_module(ADAPTER_CHILD_NAMES[settings.placement], adapter)
    if settings.placement == "sequential":
        # The attention output of a windowed SAM block is still split into windows here,
        # which does not matter because the adapter acts on each token separately.
        target.register_forward_hook(adapter.add_to_attention_output)
    else:
        target.register_forward_hook(adapter.add_beside_mlp)
