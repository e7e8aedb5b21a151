"""Model registry, SAM/MedSAM builder, checkpoint loading and the Segmenter."""

from fmadapt.models.checkpoint import LoadReport, load_checkpoint, read_state_dict, resize_position_embeddings
from fmadapt.models.registry import ModelSpec, get_model_spec, list_models, register_model
from fmadapt.models.sam import SamParts, build_sam
from fmadapt.models.segmenter import Segmenter

__all__ = [
    "LoadReport",
    "ModelSpec",
    "SamParts",
    "Segmenter",
    "build_sam",
    "get_model_spec",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register_model",
    "resize_position_embeddings",
]
