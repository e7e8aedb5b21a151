"""Parts that join a DINOv3 encoder to segmentation: prompt neck, SAM decoder and semantic head.

A DINOv3 encoder returns a B×E×h×w map of patch tokens (h = w = S/16), which SAM's prompt
encoder and mask decoder cannot read directly. ``PromptNeck`` maps it to the decoder's
``prompt_embed_dim`` channels, and ``build_prompt_decoder`` builds segment-anything's
``PromptEncoder`` and ``MaskDecoder`` with the sizes of a registered SAM model, so their
weights can start from that model's checkpoint. ``SemanticHead`` predicts every class at
once from several encoder layers, for segmentation without prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d

from fmadapt.errors import CheckpointError
from fmadapt.models.registry import ModelSpec
from fmadapt.models.sam import _IOU_HEAD_DEPTH, _IOU_HEAD_HIDDEN_DIM, _MASK_IN_CHANNELS, _NUM_MULTIMASK_OUTPUTS

__all__ = [
    "DECODER_PREFIXES",
    "HEAD_LAYER_COUNT",
    "PromptNeck",
    "SemanticHead",
    "build_prompt_decoder",
    "default_head_layers",
    "read_decoder_state",
]

# Number of encoder layers the semantic head reads by default, evenly spaced and ending at
# the last block.
HEAD_LAYER_COUNT = 4
# State-dict prefixes of the parts a DINOv3 model can load from a SAM checkpoint.
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def default_head_layers(depth: int) -> tuple[int, ...]:
    """Return up to four block indices, evenly spaced over ``depth`` blocks and ending at the last.

    12 blocks give (2, 5, 8, 11), 24 give (5, 11, 17, 23), and 3 give (0, 1, 2).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    indices = {max(0, (step + 1) * depth // HEAD_LAYER_COUNT - 1) for step in range(HEAD_LAYER_COUNT)}
    return tuple(sorted(indices))


class PromptNeck(nn.Module):
    """Map a B×E×h×w encoder map to the B×D×h×w image embedding of SAM's mask decoder.

    D is ``out_channels`` (the decoder's ``prompt_embed_dim``). The layers have the
    shape of the neck in segment-anything's ``ImageEncoderViT``: a 1×1 convolution, a
    channel LayerNorm, a 3×3 convolution and a second channel LayerNorm, so the decoder
    reads normalised features as it does after a SAM encoder. No checkpoint contains this
    neck, so it starts untrained.

    Args:
        in_channels: E, channels of the encoder map.
        out_channels: D, channels the prompt encoder and mask decoder use.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        self.project = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.project_norm = LayerNorm2d(out_channels)
        self.mix = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.mix_norm = LayerNorm2d(out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map B×E×h×w features to B×D×h×w."""
        return self.mix_norm(self.mix(self.project_norm(self.project(features))))


class SemanticHead(nn.Module):
    """Per-class logits from several encoder layers (automatic segmentation).

    Each of the L input maps (B×E×h×w) gets its own 1×1 projection to ``channels``. The
    projections are concatenated and fused by a 3×3 convolution at h×w, then upsampled
    twice by 2 with a 3×3 convolution after each step, so the output is at 4h×4w (S/4 for
    a patch size of 16). A 1×1 convolution gives C logits per pixel. A linear layer on the
    pooled fused features predicts each class mask's IoU, the same score SAM's IoU head
    gives, so training and evaluation treat both model families alike.

    Args:
        in_channels: E, channels of every input map.
        num_layers: L, number of input maps.
        num_classes: C.
        channels: width of the projections and of the fused features.
    """

    def __init__(self, in_channels: int, num_layers: int, num_classes: int, *, channels: int) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_layers=num_layers, num_classes=num_classes, channels=channels)
        self.in_channels = in_channels
        self.num_layers = num_layers
        self.projections = nn.ModuleList(
            nn.Conv2d(in_channels, channels, kernel_size=1) for _ in range(num_layers)
        )
        self.fuse = _conv_block(num_layers * channels, channels)
        self.refine = nn.ModuleList(_conv_block(channels, channels) for _ in range(2))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.iou_head = nn.Linear(channels, num_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict B×C×4h×4w logits and B×C predicted IoU from L maps of shape B×E×h×w."""
        if len(maps) != self.num_layers:
            raise ValueError(f"SemanticHead expects {self.num_layers} maps, got {len(maps)}")
        projected = [projection(feature) for projection, feature in zip(self.projections, maps)]
        fused = self.fuse(torch.cat(projected, dim=1))
        scores = self.iou_head(fused.mean(dim=(2, 3)))

        features = fused
        for block in self.refine:
            features = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
            features = block(features)
        return self.classifier(features), scores


def build_prompt_decoder(sizes: ModelSpec, image_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    """Build segment-anything's prompt encoder and mask decoder with the decoder sizes of ``sizes``.

    Only ``prompt_embed_dim``, ``decoder_*`` and ``patch_size`` of the SAM spec are used,
    so the modules have the same keys and shapes as that SAM model's and load from its
    checkpoint. The prompt encoder works on an S×S model frame (S = ``image_size``) with an
    (S/16)×(S/16) embedding grid.
    """
    grid = image_size // sizes.patch_size
    prompt_encoder = PromptEncoder(
        embed_dim=sizes.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=_MASK_IN_CHANNELS,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=sizes.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=sizes.decoder_depth,
            embedding_dim=sizes.prompt_embed_dim,
            mlp_dim=sizes.decoder_mlp_dim,
            num_heads=sizes.decoder_num_heads,
        ),
        num_multimask_outputs=_NUM_MULTIMASK_OUTPUTS,
        iou_head_depth=_IOU_HEAD_DEPTH,
        iou_head_hidden_dim=_IOU_HEAD_HIDDEN_DIM,
    )
    return prompt_encoder, mask_decoder


def read_decoder_state(
    path: str | PathLike[str], model_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Read the ``prompt_encoder.*`` and ``mask_decoder.*`` tensors of a SAM-format file.

    ``model_state`` contains the model's tensors under those prefixes, and every one of them
    must be in the file with the same shape. Other keys of the file are skipped.

    Raises:
        CheckpointError: if the file has no decoder keys, its ``prompt_embed_dim`` (the
            width of ``prompt_encoder.no_mask_embed``) differs from the model's, or a
            decoder key is missing, extra or of another shape.
    """
    from fmadapt.models.checkpoint import read_state_dict

    state = read_state_dict(path)
    decoder_state = {key: value for key, value in state.items() if key.startswith(DECODER_PREFIXES)}
    if not decoder_state:
        raise CheckpointError(
            f"checkpoint {path} has no prompt_encoder.* or mask_decoder.* keys; pass a SAM or MedSAM file"
        )
    _check_decoder_width(decoder_state, model_state, path)
    missing = sorted(set(model_state) - set(decoder_state))
    unexpected = sorted(set(decoder_state) - set(model_state))
    mismatched = sorted(
        f"{key} file {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
        for key, value in decoder_state.items()
        if key in model_state and value.shape != model_state[key].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"the decoder in checkpoint {path} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {mismatched[:5]}; build the model with the "
            "decoder_model whose decoder sizes match the file's SAM model"
        )
    return decoder_state


def _check_decoder_width(
    decoder_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], path: str | PathLike[str]
) -> None:
    key = "prompt_encoder.no_mask_embed.weight"
    if key not in decoder_state or key not in model_state:
        return
    file_width, model_width = decoder_state[key].shape[-1], model_state[key].shape[-1]
    if file_width != model_width:
        raise CheckpointError(
            f"checkpoint {path} has a decoder with prompt_embed_dim {file_width}, but this model's decoder "
            f"uses {model_width}; build the model with a decoder_model of the file's size (published SAM "
            "and MedSAM files use 256)"
        )


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
        nn.GELU(),
    )


def _check_positive(**sizes: object) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
