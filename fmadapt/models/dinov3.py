"""DINOv3 ViT encoders built with transformers' ``DINOv3ViTModel``, and their registry.

Sizes come from two sources, both read for this module:

- Meta's ``dinov3/hub/backbones.py`` (facebookresearch/dinov3), functions ``dinov3_vits16``,
  ``dinov3_vits16plus``, ``dinov3_vitb16`` and ``dinov3_vitl16``: ``embed_dim``, ``depth``,
  ``num_heads``, ``ffn_ratio``, ``ffn_layer`` ("mlp" or "swiglu"), ``n_storage_tokens=4``,
  ``patch_size=16``, ``layerscale_init=1e-5``, ``pos_embed_rope_base=100``,
  ``pos_embed_rope_rescale_coords=2`` and ``norm_layer="layernormbf16"``, which
  ``dinov3/models/vision_transformer.py`` maps to ``nn.LayerNorm(eps=1e-5)``.
- transformers' ``convert_dinov3_vit_to_hf.py`` (``get_dinov3_config``): the same sizes
  as ``intermediate_size`` (1536, 1536, 3072, 4096) and ``hidden_act`` ("gelu", or
  "silu" for the SwiGLU MLP of ViT-S+). Meta's ``SwiGLUFFN`` (``dinov3/layers/ffn_layers.py``)
  gives the same ViT-S+ width: int(384 · 6 · 2/3) = 1536, a multiple of 8.

The LVD-1689M weights registered here expect RGB scaled to [0, 1] and then normalised
with the ImageNet mean and std: the "Image transforms" section of Meta's README.md, the
``get_transform`` of the conversion script and ``DINOv3ViTImageProcessor`` in
transformers 5.x. The satellite (SAT-493M) weights use other statistics and are not
registered.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from fmadapt.data.transforms import PreprocessSpec
from fmadapt.models.encoders import ImageEncoder

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fmadapt.models.checkpoint import LoadReport

__all__ = [
    "DINOV3_PREPROCESS",
    "DinoV3Encoder",
    "DinoV3Spec",
    "dinov3_config",
    "get_dinov3_spec",
    "list_dinov3_models",
    "register_dinov3_model",
]

# ImageNet statistics on 0–1 values, so value_scale maps 0–255 input to 0–1 first. The
# resize mode is fmadapt's choice: RoPE positions work at any aspect ratio, so the
# image keeps its aspect ratio and is padded, as for SAM.
DINOV3_PREPROCESS = PreprocessSpec(
    resize="longest_side",
    value_scale=1.0 / 255.0,
    pixel_mean=(0.485, 0.456, 0.406),
    pixel_std=(0.229, 0.224, 0.225),
)


@dataclass(frozen=True, kw_only=True)
class DinoV3Spec:
    """Architecture sizes, expected input and checkpoint names of one DINOv3 ViT variant.

    Attributes:
        name: registry name.
        embed_dim: token size E.
        depth: number of transformer blocks.
        num_heads: attention heads. E / num_heads must be a multiple of 4 because RoPE
            rotates pairs of channels for each of the two image axes.
        mlp_hidden_dim: hidden width of the MLP (transformers' ``intermediate_size``).
        gated_mlp: SwiGLU MLP (SiLU gate) when true, else a GELU MLP.
        num_register_tokens: register tokens after the class token (Meta's "storage tokens").
        patch_size: side of one square patch in pixels.
        layerscale_init: initial LayerScale value, used only for untrained models.
        rope_theta: RoPE base period.
        layer_norm_eps: epsilon of every LayerNorm.
        native_image_size: input side S the weights were pretrained at.
        preprocess: input normalisation the weights expect.
        meta_checkpoint_file: file name of Meta's original ``.pth`` release.
        hf_model_id: Hugging Face repository whose folder contains config.json and
            model.safetensors (fmadapt never downloads it; users pass the local folder).
    """

    name: str
    family: str = "dinov3"
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    gated_mlp: bool = False
    num_register_tokens: int = 4
    patch_size: int = 16
    layerscale_init: float = 1e-5
    rope_theta: float = 100.0
    layer_norm_eps: float = 1e-5
    native_image_size: int = 224
    preprocess: PreprocessSpec = DINOV3_PREPROCESS
    meta_checkpoint_file: str | None = None
    hf_model_id: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in ("embed_dim", "depth", "num_heads", "mlp_hidden_dim", "patch_size", "native_image_size"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DinoV3Spec {self.name!r}: {field_name} must be a positive int, got {value!r}")
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int):
            raise ValueError(
                f"DinoV3Spec {self.name!r}: num_register_tokens must be an int, got {self.num_register_tokens!r}"
            )
        if self.num_register_tokens < 0:
            raise ValueError(
                f"DinoV3Spec {self.name!r}: num_register_tokens must be at least 0, got {self.num_register_tokens}"
            )
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(
                f"DinoV3Spec {self.name!r}: embed_dim {self.embed_dim} must be a multiple of "
                f"4 × num_heads = {4 * self.num_heads}, because RoPE needs a head size divisible by 4"
            )
        if self.native_image_size % self.patch_size:
            raise ValueError(
                f"DinoV3Spec {self.name!r}: native_image_size {self.native_image_size} must be a "
                f"multiple of patch_size {self.patch_size}"
            )
        if not isinstance(self.preprocess, PreprocessSpec):
            raise TypeError(f"DinoV3Spec {self.name!r}: preprocess must be a PreprocessSpec")

    @property
    def head_dim(self) -> int:
        """Channels per attention head, E / num_heads."""
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: one class token and the register tokens."""
        return 1 + self.num_register_tokens


_REGISTRY: dict[str, DinoV3Spec] = {}


def register_dinov3_model(spec: DinoV3Spec) -> DinoV3Spec:
    """Add ``spec`` to the DINOv3 registry under ``spec.name``. A taken name raises ValueError."""
    if not isinstance(spec, DinoV3Spec):
        raise TypeError(f"spec must be a DinoV3Spec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"DINOv3 model name {spec.name!r} is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def list_dinov3_models() -> list[str]:
    """Return the names of all registered DINOv3 models, sorted."""
    return sorted(_REGISTRY)


def get_dinov3_spec(name: str) -> DinoV3Spec:
    """Return the registered DINOv3 spec called ``name``. Unknown names raise ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    closest = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {closest[0]!r}?" if closest else ""
    raise ValueError(f"unknown DINOv3 model {name!r}; registered models are {list_dinov3_models()}.{hint}")


# Published sizes, from Meta's hub/backbones.py and transformers' get_dinov3_config.
register_dinov3_model(DinoV3Spec(
    name="dinov3_vits16",
    embed_dim=384,
    depth=12,
    num_heads=6,
    mlp_hidden_dim=1536,  # ffn_ratio 4
    meta_checkpoint_file="dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    hf_model_id="facebook/dinov3-vits16-pretrain-lvd1689m",
    description="DINOv3 ViT-S/16 distilled on LVD-1689M (Meta AI, 21M parameters)",
))
register_dinov3_model(DinoV3Spec(
    name="dinov3_vitsplus16",
    embed_dim=384,
    depth=12,
    num_heads=6,
    mlp_hidden_dim=1536,  # ffn_ratio 6 with SwiGLU: int(2304 · 2/3) = 1536
    gated_mlp=True,
    meta_checkpoint_file="dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    hf_model_id="facebook/dinov3-vits16plus-pretrain-lvd1689m",
    description="DINOv3 ViT-S+/16 with a SwiGLU MLP, distilled on LVD-1689M (Meta AI, 29M parameters)",
))
register_dinov3_model(DinoV3Spec(
    name="dinov3_vitb16",
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_hidden_dim=3072,  # ffn_ratio 4
    meta_checkpoint_file="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    hf_model_id="facebook/dinov3-vitb16-pretrain-lvd1689m",
    description="DINOv3 ViT-B/16 distilled on LVD-1689M (Meta AI, 86M parameters)",
))
register_dinov3_model(DinoV3Spec(
    name="dinov3_vitl16",
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_hidden_dim=4096,  # ffn_ratio 4
    meta_checkpoint_file="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    hf_model_id="facebook/dinov3-vitl16-pretrain-lvd1689m",
    description="DINOv3 ViT-L/16 distilled on LVD-1689M (Meta AI, 300M parameters)",
))
register_dinov3_model(DinoV3Spec(
    name="dinov3_vit_tiny",
    embed_dim=64,
    depth=3,
    num_heads=2,
    mlp_hidden_dim=128,
    native_image_size=128,
    description="3-block DINOv3-architecture model for tests and CPU runs; no published weights",
))
register_dinov3_model(DinoV3Spec(
    name="dinov3_vitplus_tiny",
    embed_dim=64,
    depth=2,
    num_heads=2,
    mlp_hidden_dim=96,
    gated_mlp=True,
    native_image_size=128,
    description="2-block DINOv3 model with a SwiGLU MLP, for tests; no published weights",
))


def dinov3_config(spec: DinoV3Spec, *, rope_rescale: float | None = None) -> DINOv3ViTConfig:
    """Build the transformers configuration of ``spec``.

    ``rope_rescale`` is transformers' ``pos_embed_rescale``: in training mode the RoPE
    patch coordinates are multiplied by a random factor in [1/rope_rescale, rope_rescale].
    Pretraining used 2 (Meta's ``pos_embed_rope_rescale_coords``). None turns the
    augmentation off, so training-mode features are deterministic.
    """
    if not isinstance(spec, DinoV3Spec):
        raise TypeError(f"spec must be a DinoV3Spec, got {type(spec).__name__}")
    if rope_rescale is not None and not rope_rescale >= 1.0:
        raise ValueError(f"rope_rescale must be None or at least 1.0, got {rope_rescale!r}")
    return DINOv3ViTConfig(
        patch_size=spec.patch_size,
        hidden_size=spec.embed_dim,
        intermediate_size=spec.mlp_hidden_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        hidden_act="silu" if spec.gated_mlp else "gelu",
        layer_norm_eps=spec.layer_norm_eps,
        rope_theta=spec.rope_theta,
        image_size=spec.native_image_size,
        # Meta's attention has one qkv bias whose key part is masked to zero, so the
        # converted model has query and value biases only.
        query_bias=True,
        key_bias=False,
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        layerscale_value=spec.layerscale_init,
        use_gated_mlp=spec.gated_mlp,
        num_register_tokens=spec.num_register_tokens,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=rope_rescale,
    )


def _find_blocks(backbone: DINOv3ViTModel) -> tuple[str, nn.ModuleList]:
    # transformers 5.x keeps the blocks at ``model.layer``; 4.56 to 4.x kept them at ``layer``.
    for path in ("model.layer", "layer"):
        try:
            module = backbone.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path, module
    raise TypeError(
        f"DINOv3ViTModel from transformers has no block list at 'model.layer' or 'layer'; "
        f"this transformers version ({type(backbone).__module__}) is not supported"
    )


class DinoV3Encoder(ImageEncoder):
    """DINOv3 ViT image encoder returning the final-normalised patch tokens as a dense map.

    The transformers model is stored as ``backbone``. A B×3×H×W input gives
    N = 1 + R + h·w tokens (class, R registers, patches with h = H/16, w = W/16).
    ``forward`` drops the 1 + R prefix tokens and reshapes the rest to B×E×h×w.
    Inputs of any size with both sides a multiple of the patch size work, and
    non-square inputs too.

    Args:
        spec: the model variant.
        rope_rescale: random RoPE coordinate rescaling in training mode; see ``dinov3_config``.
    """

    def __init__(self, spec: DinoV3Spec, *, rope_rescale: float | None = None) -> None:
        super().__init__()
        if not isinstance(spec, DinoV3Spec):
            raise TypeError(f"spec must be a DinoV3Spec, got {type(spec).__name__}")
        self.spec = spec
        self.backbone = DINOv3ViTModel(dinov3_config(spec, rope_rescale=rope_rescale))
        block_path, _ = _find_blocks(self.backbone)
        self.embed_dim = spec.embed_dim
        self.block_embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.blocks_path = f"backbone.{block_path}"
        self.lora_targets = {
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
            "proj": "attention.o_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
        if spec.gated_mlp:
            self.lora_targets["gate"] = "mlp.gate_proj"
        # The attention module returns (output, weights), so adapters hook its output
        # projection, whose tensor output is the attention branch before LayerScale.
        self.adapter_targets = {"attention": "attention.o_proj", "mlp": "mlp"}

    @classmethod
    def from_registry(
        cls,
        name: str,
        *,
        checkpoint: str | PathLike[str] | None = None,
        strict: bool = True,
        rope_rescale: float | None = None,
    ) -> DinoV3Encoder:
        """Build the registered model ``name`` and load ``checkpoint`` if given.

        ``checkpoint`` is a local Hugging Face model folder or Meta's ``.pth`` file, read
        by ``fmadapt.models.dinov3_checkpoint.load_dinov3_checkpoint``.
        """
        encoder = cls(get_dinov3_spec(name), rope_rescale=rope_rescale)
        if checkpoint is not None:
            encoder.load_checkpoint(checkpoint, strict=strict)
        return encoder

    def load_checkpoint(self, path: str | PathLike[str], *, strict: bool = True) -> LoadReport:
        """Load a local Hugging Face folder or Meta ``.pth`` file; see ``load_dinov3_checkpoint``."""
        from fmadapt.models.dinov3_checkpoint import load_dinov3_checkpoint

        return load_dinov3_checkpoint(self, path, strict=strict)

    @property
    def blocks(self) -> nn.ModuleList:
        return _find_blocks(self.backbone)[1]

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B×3×H×W inputs to B×E×(H/16)×(W/16), the final-normalised patch tokens."""
        return self.intermediate_maps(images, [-1])[0]

    def intermediate_maps(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Return B×E×h×w maps of the requested blocks' outputs after the final LayerNorm.

        Each output goes through the model's final norm before the prefix tokens are
        dropped, as Meta's ``get_intermediate_layers(norm=True)`` does, so the map of the
        last block equals ``forward``. Blocks run only up to the deepest requested index.
        """
        grid = self.check_images(images)
        requested = self.check_layers(layers)
        tokens = self.backbone.embeddings(images)
        position_embeddings = self.backbone.rope_embeddings(images)

        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: max(requested) + 1]):
            tokens = block(tokens, position_embeddings=position_embeddings)
            if index in requested:
                outputs[index] = self.tokens_to_map(self.backbone.norm(tokens), grid)
        return [outputs[index] for index in requested]

    def tokens_to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Drop the class and register tokens of B×N×E ``tokens`` and reshape the patches to B×E×h×w."""
        height, width = grid
        expected = self.spec.num_prefix_tokens + height * width
        if tokens.ndim != 3 or tokens.shape[1] != expected:
            raise ValueError(
                f"tokens must have shape B×{expected}×E for a {height}×{width} patch grid "
                f"(1 class + {self.spec.num_register_tokens} register + {height * width} patch tokens), "
                f"got {tuple(tokens.shape)}"
            )
        patches = tokens[:, self.spec.num_prefix_tokens :]
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)
