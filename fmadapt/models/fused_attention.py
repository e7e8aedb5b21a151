"""Fused attention for the image encoder: torch's scaled_dot_product_attention in place of the by-hand path.

segment-anything 1.0's ``Attention`` computes ``softmax(q·kᵀ·scale + rel) @ v`` step by step,
where ``rel`` is the decomposed relative-position term (one table per axis). As an additive
mask, ``rel`` would take heads × N × N values per image (12 × 4096 × 4096 for a global block
of ViT-B at 1024 px, 805 MB in fp32), written once and read again by the kernel. The fused
forward instead folds ``rel`` into the queries and keys:
rel[i, j] = q_i·Rh[row(i), row(j)] + q_i·Rw[col(i), col(j)] is the dot product of
[q_i·Rh[row(i), :], q_i·Rw[col(i), :]] with the one-hot code of (row(j), col(j)). With those
h + w channels appended to the scaled queries and to the keys (and zeros to the values,
because the fused kernels want one head size), ``scaled_dot_product_attention`` gives the
same result and never forms an N × N tensor outside its kernel. Parameters, buffers, hooks
and state-dict keys stay as they were, because only the module's class changes (to a
subclass with another ``forward``).

DINOv3 encoders come from transformers, whose attention already has an SDPA
implementation; enabling fused attention there selects it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = [
    "FusedSamAttention",
    "disable_fused_attention",
    "enable_fused_attention",
    "relative_position_bias",
    "relative_position_attention",
]

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


def relative_position_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Compute ``softmax(q·kᵀ·scale + rel) @ v`` without forming the N×N ``rel`` mask.

    Args:
        query, key, value: B×heads×N×c, N = h·w tokens in row-major order.
        rel_pos_h, rel_pos_w: the attention module's relative-position tables, as in
            ``relative_position_bias``.
        grid: (h, w) token grid of the queries and keys.
        scale: factor of q·kᵀ (segment-anything uses c ** -0.5).

    Returns:
        B×heads×N×c attended values, equal to the masked form up to rounding.
    """
    height, width = grid
    batch, heads, tokens, channels = query.shape
    table_h = get_rel_pos(height, height, rel_pos_h).to(query.dtype)
    table_w = get_rel_pos(width, width, rel_pos_w).to(query.dtype)
    grid_query = query.reshape(batch, heads, height, width, channels)
    along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, table_h).reshape(batch, heads, tokens, height)
    along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, table_w).reshape(batch, heads, tokens, width)
    # Zero channels up to a multiple of 8 add nothing to the dot products.
    # NOTE: the padding follows the head-size step of torch's CUDA flash kernels as
    # recalled, not as measured; this path has not run on a GPU.
    padding = -(channels + height + width) % 8
    query = F.pad(torch.cat([query * scale, along_h, along_w], dim=-1), (0, padding))

    positions = torch.arange(tokens, device=key.device)
    codes = torch.cat(
        [F.one_hot(positions // width, height), F.one_hot(positions % width, width)], dim=-1
    ).to(key.dtype)
    key = torch.cat([key, codes.expand(batch, heads, tokens, height + width)], dim=-1)
    key = F.pad(key, (0, padding))
    value = F.pad(value, (0, height + width + padding))
    attended = F.scaled_dot_product_attention(query, key, value, scale=1.0)
    return attended[..., :channels]


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

        if self.use_rel_pos:
            attended = relative_position_attention(
                query, key, value, self.rel_pos_h, self.rel_pos_w, (height, width), self.scale
            )
        else:
            attended = F.scaled_dot_product_attention(query, key, value, scale=self.scale)

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
