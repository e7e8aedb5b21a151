"""Model registries, SAM/MedSAM builder, checkpoint loading and the Segmenter (SAM or DINOv3 encoder)."""

from fmadapt.models.checkpoint import LoadReport, load_checkpoint, read_state_dict, resize_position_embeddings
from fmadapt.models.registry import ModelSpec, get_model_spec, list_models, register_model
from fmadapt.models.sam import SamParts, build_sam
from fmadapt.models.segmenter import Segmenter, get_segmenter_spec, list_segmenter_models

__all__ = [
    "LoadReport",
    "ModelSpec",
    "SamParts",
    "Segmenter",
    "build_sam",
    "get_model_spec",
    "get_segmenter_spec",
    "list_models",
    "list_segmenter_models",
    "load_checkpoint",
    "read_state_dict",
    "register_model",
    "resize_position_embeddings",
]
