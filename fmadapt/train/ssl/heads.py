"""Projection heads and the student / teacher network of DINO and iBOT self-distillation.

A network is a DINOv3 encoder with two projection heads: one for the class token (DINO
loss) and one for the patch tokens (iBOT loss). Each head is an MLP to a bottleneck,
an L2 normalisation, and a linear layer to K prototypes whose weight rows are normalised
to unit length, so a logit is the cosine similarity of a token to a prototype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmadapt.models.dinov3 import DinoV3Encoder

__all__ = ["NetworkOutput", "ProjectionHead", "SslNetwork", "encode_tokens"]


class ProjectionHead(nn.Module):
    """Map tokens (..., E) to prototype logits (..., K).

    Args:
        in_dim: token size E.
        hidden_dim: width of the two hidden layers (GELU).
        bottleneck_dim: size of the normalised bottleneck.
        prototypes: K, the number of output logits.
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("prototypes", prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProjectionHead {name} must be a positive int, got {value!r}")
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(tokens), dim=-1)
        return F.linear(bottleneck, F.normalize(self.prototypes, dim=-1))


def encode_tokens(
    encoder: DinoV3Encoder, images: torch.Tensor, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder and return its final-normalised class token and patch tokens.

    Args:
        encoder: the DINOv3 encoder, with or without LoRA layers.
        images: B×3×H×W model inputs.
        masks: optional B×N bool, True where a patch embedding is replaced by the
            model's mask token (N = h·w patches in row-major order).

    Returns:
        (class tokens B×E, patch tokens B×N×E).
    """
    height, width = encoder.check_images(images)
    if masks is not None and tuple(masks.shape) != (images.shape[0], height * width):
        raise ValueError(
            f"masks must have shape B×N = {(images.shape[0], height * width)} for {tuple(images.shape)} "
            f"images, got {tuple(masks.shape)}"
        )
    tokens = encoder.backbone(pixel_values=images, bool_masked_pos=masks).last_hidden_state
    return tokens[:, 0], tokens[:, encoder.spec.num_prefix_tokens :]


@dataclass
class NetworkOutput:
    """Outputs of one network call, crop-major.

    Attributes:
        class_tokens: V×B×E class tokens of every crop (global crops first).
        class_logits: V×B×K class-head logits.
        patch_logits: G×B×N×K' patch-head logits of the global crops.
    """

    class_tokens: torch.Tensor
    class_logits: torch.Tensor
    patch_logits: torch.Tensor


class SslNetwork(nn.Module):
    """A DINOv3 encoder with a class-token head and a patch-token head.

    The same class serves as student (masked global crops and local crops) and as
    teacher (unmasked global crops only). Global and local crops go through one
    ``forward`` call, because DDP expects one forward pass per backward pass.
    """

    def __init__(self, encoder: DinoV3Encoder, class_head: ProjectionHead, patch_head: ProjectionHead) -> None:
        super().__init__()
        if not isinstance(encoder, DinoV3Encoder):
            raise TypeError(f"encoder must be a DinoV3Encoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.class_head = class_head
        self.patch_head = patch_head

    def forward(
        self,
        global_crops: torch.Tensor,
        masks: torch.Tensor | None = None,
        local_crops: torch.Tensor | None = None,
    ) -> NetworkOutput:
        """Encode the crops of a batch.

        Args:
            global_crops: B×G×3×S×S.
            masks: B×G×N bool patch masks of the global crops, or None for no masking.
            local_crops: B×L×3×s×s, or None (or L = 0) for no local crops.
        """
        batch, global_count = global_crops.shape[:2]
        flat_masks = None if masks is None else masks.transpose(0, 1).flatten(0, 1)
        class_tokens, patch_tokens = encode_tokens(self.encoder, _crop_major(global_crops), flat_masks)
        if local_crops is not None and local_crops.shape[1] > 0:
            local_class, _ = encode_tokens(self.encoder, _crop_major(local_crops))
            class_tokens = torch.cat([class_tokens, local_class])

        class_tokens = class_tokens.reshape(-1, batch, class_tokens.shape[-1])
        patch_logits = self.patch_head(patch_tokens)
        return NetworkOutput(
            class_tokens=class_tokens,
            class_logits=self.class_head(class_tokens),
            patch_logits=patch_logits.reshape(global_count, batch, *patch_logits.shape[1:]),
        )


def _crop_major(crops: torch.Tensor) -> torch.Tensor:
    """B×V×3×H×W -> (V·B)×3×H×W, crop 0 of every image first."""
    return crops.transpose(0, 1).flatten(0, 1)
