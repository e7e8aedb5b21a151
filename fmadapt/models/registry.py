"""Named SAM-family model variants, described as data."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from fmadapt.data.transforms import MEDSAM_PREPROCESS, SAM_PREPROCESS, PreprocessSpec

__all__ = ["ModelSpec", "get_model_spec", "list_models", "register_model"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture sizes, expected input and checkpoint file of one model variant.

    The encoder is segment-anything's ImageEncoderViT: ``encoder_depth`` blocks of
    ``encoder_embed_dim`` channels and ``encoder_num_heads`` heads. Blocks listed in
    ``encoder_global_attn_indexes`` attend globally and the rest inside windows of
    ``encoder_window_size`` tokens. Its neck outputs E = ``prompt_embed_dim`` channels,
    which the prompt encoder and mask decoder share. ``native_image_size`` is the input
    side S the published weights were trained at, and ``checkpoint_file`` the file name
    the weights are published under (looked for in the checkpoints/ folder).
    """

    name: str
    family: str = "sam"
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    encoder_window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    patch_size: int = 16
    native_image_size: int = 1024
    preprocess: PreprocessSpec
    checkpoint_file: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in (
            "encoder_embed_dim",
            "encoder_depth",
            "encoder_num_heads",
            "encoder_window_size",
            "prompt_embed_dim",
            "decoder_depth",
            "decoder_mlp_dim",
            "decoder_num_heads",
            "patch_size",
            "native_image_size",
        ):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec {self.name!r}: {field_name} must be a positive int, got {value!r}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: encoder_embed_dim {self.encoder_embed_dim} must be "
                f"divisible by encoder_num_heads {self.encoder_num_heads}"
            )
        if self.prompt_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: prompt_embed_dim {self.prompt_embed_dim} must be "
                f"divisible by decoder_num_heads {self.decoder_num_heads}"
            )
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"ModelSpec {self.name!r}: encoder_global_attn_indexes {bad} are outside "
                f"0..{self.encoder_depth - 1}"
            )
        if self.native_image_size % self.patch_size:
            raise ValueError(
                f"ModelSpec {self.name!r}: native_image_size {self.native_image_size} must be a "
                f"multiple of patch_size {self.patch_size}"
            )
        if not isinstance(self.preprocess, PreprocessSpec):
            raise TypeError(f"ModelSpec {self.name!r}: preprocess must be a PreprocessSpec")


_SAM_VIT_B = dict(
    encoder_embed_dim=768,
    encoder_depth=12,
    encoder_num_heads=12,
    encoder_global_attn_indexes=(2, 5, 8, 11),
)
_TINY = dict(
    encoder_embed_dim=96,
    encoder_depth=4,
    encoder_num_heads=3,
    encoder_global_attn_indexes=(1, 3),
    encoder_window_size=8,
    prompt_embed_dim=64,
    decoder_mlp_dim=128,
    decoder_num_heads=4,
    native_image_size=256,
)

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry under ``spec.name``; a taken name raises ValueError."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    return spec


register_model(ModelSpec(
    name="sam_vit_b",
    preprocess=SAM_PREPROCESS,
    checkpoint_file="sam_vit_b_01ec64.pth",
    description="Segment Anything ViT-B (Meta AI, 91M encoder parameters)",
    **_SAM_VIT_B,
))
register_model(ModelSpec(
    name="sam_vit_l",
    encoder_embed_dim=1024,
    encoder_depth=24,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(5, 11, 17, 23),
    preprocess=SAM_PREPROCESS,
    checkpoint_file="sam_vit_l_0b3195.pth",
    description="Segment Anything ViT-L (Meta AI, 308M encoder parameters)",
))
register_model(ModelSpec(
    name="sam_vit_h",
    encoder_embed_dim=1280,
    encoder_depth=32,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(7, 15, 23, 31),
    preprocess=SAM_PREPROCESS,
    checkpoint_file="sam_vit_h_4b8939.pth",
    description="Segment Anything ViT-H (Meta AI, 636M encoder parameters)",
))
register_model(ModelSpec(
    name="medsam_vit_b",
    family="medsam",
    preprocess=MEDSAM_PREPROCESS,
    checkpoint_file="medsam_vit_b.pth",
    description="MedSAM: SAM ViT-B fine-tuned on medical images (square resize, min-max input)",
    **_SAM_VIT_B,
))
register_model(ModelSpec(
    name="sam_vit_tiny",
    preprocess=SAM_PREPROCESS,
    description="4-block SAM-architecture model for tests and CPU runs; no published weights",
    **_TINY,
))
register_model(ModelSpec(
    name="medsam_vit_tiny",
    family="medsam",
    preprocess=MEDSAM_PREPROCESS,
    description="4-block MedSAM-preprocessing model for tests and CPU runs; no published weights",
    **_TINY,
))
register_model(ModelSpec(
    name="sam_vit_small",
    encoder_embed_dim=192,
    encoder_depth=6,
    encoder_num_heads=6,
    encoder_global_attn_indexes=(2, 5),
    prompt_embed_dim=128,
    decoder_mlp_dim=512,
    native_image_size=256,
    preprocess=SAM_PREPROCESS,
    description="6-block SAM-architecture model for CPU recipe runs; no published weights",
))


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """Return the registered spec called ``name``; unknown names raise ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    closest = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {closest[0]!r}?" if closest else ""
    raise ValueError(f"unknown model {name!r}; registered models are {list_models()}.{hint}")
