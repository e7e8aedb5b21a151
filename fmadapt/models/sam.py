"""Build SAM-architecture parts from segment-anything's own modules."""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from fmadapt.models.registry import ModelSpec

__all__ = ["MIN_IMAGE_SIZE", "SamParts", "build_sam", "check_image_size"]

MIN_IMAGE_SIZE = 64
# Fixed in every published SAM and MedSAM checkpoint (segment-anything 1.0 build_sam.py).
_MASK_IN_CHANNELS = 16
_NUM_MULTIMASK_OUTPUTS = 3
_IOU_HEAD_DEPTH = 3
_IOU_HEAD_HIDDEN_DIM = 256
_MLP_RATIO = 4.0


class SamParts(nn.Module):
    """The three SAM modules, under the attribute names of segment-anything's ``Sam``.

    Unlike ``Sam`` it has no ``forward`` (whose ``no_grad`` would block training) and no
    pixel statistics, which live in the model's ``ImageTransform``.
    """

    def __init__(self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def check_image_size(spec: ModelSpec, image_size: int) -> int:
    """Validate the model input side S: an int multiple of ``spec.patch_size``, at least 64."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__} {image_size!r}")
    if image_size < MIN_IMAGE_SIZE or image_size % spec.patch_size:
        raise ValueError(
            f"image_size must be a multiple of {spec.patch_size} (the patch size of "
            f"{spec.name!r}) and at least {MIN_IMAGE_SIZE}, got {image_size}; "
            f"the model was trained at {spec.native_image_size}"
        )
    return image_size


def build_sam(spec: ModelSpec, *, image_size: int | None = None) -> SamParts:
    """Build the image encoder, prompt encoder and mask decoder of ``spec``, untrained.

    ``image_size`` is the input side S in pixels (default ``spec.native_image_size``).
    The encoder outputs E×(S/16)×(S/16) embeddings with E = ``spec.prompt_embed_dim``,
    and the decoder returns masks at S/4×S/4.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    size = check_image_size(spec, spec.native_image_size if image_size is None else image_size)
    grid = size // spec.patch_size

    image_encoder = ImageEncoderViT(
        img_size=size,
        patch_size=spec.patch_size,
        embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_num_heads,
        mlp_ratio=_MLP_RATIO,
        out_chans=spec.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.encoder_window_size,
        global_attn_indexes=tuple(spec.encoder_global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(size, size),
        mask_in_chans=_MASK_IN_CHANNELS,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=spec.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        num_multimask_outputs=_NUM_MULTIMASK_OUTPUTS,
        iou_head_depth=_IOU_HEAD_DEPTH,
        iou_head_hidden_dim=_IOU_HEAD_HIDDEN_DIM,
    )
    return SamParts(image_encoder, prompt_encoder, mask_decoder)
