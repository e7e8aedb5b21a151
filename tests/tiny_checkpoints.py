"""Build tiny SAM-architecture models and save them in the official checkpoint formats.

The weights come from segment-anything's own ``Sam`` class, so the saved keys are the
keys of the official SAM and MedSAM files. Other test modules import these helpers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from fmadapt.models.registry import ModelSpec, get_model_spec

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_reference_sam(
    spec: ModelSpec | str = "sam_vit_tiny", *, image_size: int | None = None, seed: int = 0
) -> Sam:
    """Build segment-anything's ``Sam`` with the sizes of ``spec`` and seeded random weights.

    segment-anything starts position embeddings and relative position tables at zero.
    Here they are random too, so that tests can tell a resized table from an untouched one.
    """
    if isinstance(spec, str):
        spec = get_model_spec(spec)
    size = image_size or spec.native_image_size
    grid = size // spec.patch_size
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.encoder_window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    with torch.no_grad():
        for name, parameter in sam.image_encoder.named_parameters():
            if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                parameter.normal_(0.0, 0.02)
    return sam.eval()


def sam_state_dict(sam: Sam, *, include_pixel_stats: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as the official files store it, with pixel_mean and pixel_std.

    segment-anything 1.0 registers those buffers as non-persistent, but released
    checkpoints made with earlier code contain them.
    """
    state = {key: value.clone() for key, value in sam.state_dict().items()}
    if include_pixel_stats:
        state["pixel_mean"] = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
        state["pixel_std"] = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    return state


def save_tiny_checkpoint(
    path: Path,
    spec: ModelSpec | str = "sam_vit_tiny",
    *,
    image_size: int | None = None,
    seed: int = 0,
    wrap: str | None = None,
    ddp_prefix: bool = False,
) -> Path:
    """Save a tiny reference SAM to ``path`` and return the path.

    The suffix picks the format: ``.safetensors`` or a torch file (``.pth``, ``.pt``,
    ``.bin``). ``wrap="model"`` or ``"state_dict"`` nests the weights as training
    scripts do, next to optimizer state and an epoch; ``ddp_prefix`` adds ``module.``.
    """
    state = sam_state_dict(build_reference_sam(spec, image_size=image_size, seed=seed))
    if ddp_prefix:
        state = {f"module.{key}": value for key, value in state.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
        return path
    content: object = state
    if wrap is not None:
        content = {wrap: state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 3}
    torch.save(content, path)
    return path
