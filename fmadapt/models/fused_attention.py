"""Fused attention for the image encoder: torch's scaled_dot_product_attention in place of the by-hand path.

segment-anything 1.0's ``Attention`` computes ``softmax(q·kᵀ·scale + rel) @ v`` step by step,
where ``rel`` is the decomposed relative-position term (one table per axis). The fused
forward here builds the same ``rel`` term as an additive attention mask and hands q, k, v
and the mask to ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
kernel for the device. Parameters, buffers, hooks and state-dict keys stay as they were,
because only the module's class changes (to a subclass with another ``forward``).

DINOv3 encoders come from transformers, whose attention already has an SDPA
implementation; enabling fused attention there selects it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = ["FusedSamAttention", "disable_fused_attention", "enable_fused_attention", "relative_position_bias"]

logger = logging.getLogger(__name__)


def relative_position_bias(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Build SAM's decomposed relative-position term as a B×heads×N×N additive mask.

    Args:
        query: B×heads×N×c unscaled queries, N = h·w tokens in row-major order.
        rel_pos_h, rel_pos_w: the attention module's (2h-1)×c and (2w-1)×c tables;
            other lengths are linearly resized, as segment-anything's ``get_rel_pos`` does.
        grid: (h, w) token grid of the queries and keys.

    Entry [b, n, i, j] is q_i·Rh[row(i), row(j)] + q_i·Rw[col(i), col(j)].
    """
    height, width = grid
    batch, heads, tokens, channels = query.shape
    table_h = get_rel_pos(height, height, rel_pos_h)
    table_w = get_rel_pos(width, width, rel_pos_w)
    grid_query = query.reshape(batch, heads, height, width, channels)
    along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, table_h.to(query.dtype))
    along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, table_w.to(query.dtype))
    bias = along_h[..., :, None] + along_w[..., None, :]
    return bias.reshape(batch, heads, tokens, tokens)


class FusedSamAttention(Attention):
    """segment-anything ``Attention`` whose forward calls ``scaled_dot_product_attention``.

    Never constructed directly: ``enable_fused_attention`` switches the class of existing
    modules, so their parameters (including LoRA-wrapped ``qkv``) and forward hooks stay.
    Input and output are B×h×w×E tokens, as in segment-anything.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)

        bias = None
        if self.use_rel_pos:
            bias = relative_position_bias(query, self.rel_pos_h, self.rel_pos_w, (height, width))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)

        attended = attended.reshape(batch, self.num_heads, height, width, -1)
        attended = attended.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(attended)


def enable_fused_attention(encoder: nn.Module) -> int:
    """Switch every attention module of ``encoder`` to its fused forward, in place.

    ``encoder`` is segment-anything's ``ImageEncoderViT`` (any module tree containing its
    ``Attention`` modules) or a ``DinoV3Encoder``. Calling it twice changes nothing.
    Returns the number of modules switched; for DINOv3 the transformers backbone is set
    to its "sdpa" attention and the count is its number of blocks.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation("sdpa")
        logger.info("set the DINOv3 backbone to transformers' sdpa attention")
        return len(encoder.blocks)

    switched = 0
    for module in encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedSamAttention
            switched += 1
    if switched:
        logger.info("switched %d SAM attention modules to scaled_dot_product_attention", switched)
    return switched


def disable_fused_attention(encoder: nn.Module) -> int:
    """Restore segment-anything's by-hand attention forward; returns the number of modules restored.

    For a DINOv3 encoder the backbone goes back to transformers' "eager" attention.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation("eager")
        return len(encoder.blocks)

    restored = 0
    for module in encoder.modules():
        if type(module) is FusedSamAttention:
            module.__class__ = Attention
            restored += 1
    return restored
