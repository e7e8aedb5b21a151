"""Self-supervised adaptation of DINOv3 encoders (``fmadapt pretrain``) by DINO and iBOT self-distillation."""

from fmadapt.train.ssl.config import PretrainRecipe, load_pretrain_recipe
from fmadapt.train.ssl.export import merged_encoder, save_encoder_checkpoint
from fmadapt.train.ssl.loop import PretrainResult, pretrain

__all__ = [
    "PretrainRecipe",
    "PretrainResult",
    "load_pretrain_recipe",
    "merged_encoder",
    "pretrain",
    "save_encoder_checkpoint",
]
