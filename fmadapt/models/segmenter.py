"""Segmenter: a SAM-architecture model with prompted and automatic (per-class) decoding."""

from __future__ import annotations

import logging
from os import PathLike
from typing import Sequence

import torch
import torch.nn as nn

from fmadapt.data.transforms import ImageTransform, PreprocessSpec, resolve_preprocess
from fmadapt.models.registry import ModelSpec, get_model_spec
from fmadapt.models.sam import build_sam

__all__ = ["Segmenter"]

logger = logging.getLogger(__name__)


class Segmenter(nn.Module):
    """Image encoder, prompt encoder and mask decoder of one registered model.

    The attribute names ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` match
    segment-anything's ``Sam``, so official SAM and MedSAM checkpoints load by key.
    With ``class_names`` the model also has ``class_embeddings``, one learned prompt
    token of size E per class, for segmentation without user prompts.

    Every method here keeps autograd on; wrap calls in ``torch.inference_mode`` for
    prediction. Shapes: S = ``image_size``, E = ``spec.prompt_embed_dim``,
    h = w = S/16 embedding grid, S/4 the decoder's mask size.

    Args:
        spec: the model variant.
        image_size: input side S in pixels; default ``spec.native_image_size``.
        class_names: names of the classes for automatic mode, in output order.
        preprocess: only for deliberate experiments; a spec different from
            ``spec.preprocess`` raises unless ``allow_preprocess_mismatch=True``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        image_size: int | None = None,
        class_names: Sequence[str] = (),
        preprocess: PreprocessSpec | None = None,
        allow_preprocess_mismatch: bool = False,
    ) -> None:
        super().__init__()
        parts = build_sam(spec, image_size=image_size)
        self.spec = spec
        self.image_size = parts.image_encoder.img_size
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder

        chosen = resolve_preprocess(
            spec.preprocess,
            preprocess,
            allow_preprocess_mismatch=allow_preprocess_mismatch,
            model_name=repr(spec.name),
        )
        self.transform = ImageTransform(chosen, self.image_size)

        self.class_names = _check_class_names(class_names)
        if self.class_names:
            self.class_embeddings = nn.Embedding(len(self.class_names), spec.prompt_embed_dim)

    @classmethod
    def from_registry(
        cls,
        name: str,
        *,
        image_size: int | None = None,
        checkpoint: str | PathLike[str] | None = None,
        class_names: Sequence[str] = (),
        preprocess: PreprocessSpec | None = None,
        allow_preprocess_mismatch: bool = False,
    ) -> Segmenter:
        """Build the registered model ``name`` and load ``checkpoint`` (a local file) if given."""
        model = cls(
            get_model_spec(name),
            image_size=image_size,
            class_names=class_names,
            preprocess=preprocess,
            allow_preprocess_mismatch=allow_preprocess_mismatch,
        )
        if checkpoint is not None:
            from fmadapt.models.checkpoint import load_checkpoint

            load_checkpoint(model, checkpoint)
        return model

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's square mask output in pixels, S/4."""
        return self.image_size // 4

    @property
    def embedding_size(self) -> int:
        """Side of the encoder's square embedding grid, S/16 for patch size 16."""
        return self.image_size // self.spec.patch_size

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, image_size={self.image_size}, class_names={self.class_names}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B×3×S×S model inputs (from ``transform.image_to_tensor``) to B×E×h×w."""
        expected = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape B×3×{self.image_size}×{self.image_size}, got "
                f"{tuple(images.shape)}; prepare each image with model.transform.image_to_tensor"
            )
        return self.image_encoder(images)

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        *,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompts on one image in a single decoder call.

        Args:
            image_embedding: 1×E×h×w from ``encode``.
            boxes: P×4 XYXY boxes in the model frame.
            points: P×N×2 XY points in the model frame, with ``point_labels`` P×N
                (1 foreground, 0 background, -1 padding that the decoder ignores).
            mask_input: P×1×(S/4)×(S/4) logits from an earlier call (1×1×… is shared by
                all P prompts).
            multimask_output: K = 3 masks per prompt when true, else K = 1.

        Returns:
            Mask logits P×K×(S/4)×(S/4) and predicted IoU P×K.
        """
        self._check_embedding(image_embedding)
        count = _prompt_count(boxes, points, point_labels, mask_input, self.low_res_size)
        point_pair = None
        if points is not None:
            point_pair = (points.to(image_embedding.dtype), point_labels.to(torch.int64))
        if boxes is not None:
            boxes = boxes.to(image_embedding.dtype)
        if mask_input is not None:
            mask_input = mask_input.to(image_embedding.dtype).expand(count, -1, -1, -1)

        sparse, dense = self.prompt_encoder(points=point_pair, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def decode_classes(self, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one mask per class without user prompts (automatic mode).

        Each class's learned embedding is the only sparse prompt token, and the dense
        prompt is the prompt encoder's no-mask embedding.

        Args:
            image_embedding: 1×E×h×w from ``encode``.

        Returns:
            Mask logits C×(S/4)×(S/4) and predicted IoU C, in ``class_names`` order.
        """
        if not self.class_names:
            raise ValueError(
                "decode_classes needs class embeddings; build the model with "
                "class_names=('liver', ...) to use automatic mode"
            )
        self._check_embedding(image_embedding)
        num_classes = len(self.class_names)
        sparse = self.class_embeddings.weight.unsqueeze(1)
        grid = self.prompt_encoder.image_embedding_size
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = dense.expand(num_classes, -1, grid[0], grid[1])
        logits, iou = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits[:, 0], iou[:, 0]

    def _check_embedding(self, image_embedding: torch.Tensor) -> None:
        grid = self.embedding_size
        expected = (1, self.spec.prompt_embed_dim, grid, grid)
        if not isinstance(image_embedding, torch.Tensor):
            raise TypeError(f"image_embedding must be a torch.Tensor, got {type(image_embedding).__name__}")
        if tuple(image_embedding.shape) != expected:
            raise ValueError(
                f"image_embedding must have shape {'×'.join(map(str, expected))} (one image), got "
                f"{tuple(image_embedding.shape)}; decode each image of a batch separately"
            )


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = tuple(class_names)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ValueError(f"class_names must be non-empty strings, got {bad!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class_names must be unique, got duplicates {duplicates}")
    return names


def _prompt_count(
    boxes: torch.Tensor | None,
    points: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    low_res_size: int,
) -> int:
    """Check prompt shapes against each other and return P, the number of prompts."""
    counts: dict[str, int] = {}
    if boxes is not None:
        _check_tensor("boxes", boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape P×4 (XYXY, model frame), got {tuple(boxes.shape)}")
        counts["boxes"] = boxes.shape[0]
    if (points is None) != (point_labels is None):
        raise ValueError("points and point_labels must be given together (labels: 1 foreground, 0 background)")
    if points is not None:
        _check_tensor("points", points)
        _check_tensor("point_labels", point_labels)
        if points.ndim != 3 or points.shape[2] != 2:
            raise ValueError(f"points must have shape P×N×2 (XY, model frame), got {tuple(points.shape)}")
        if tuple(point_labels.shape) != tuple(points.shape[:2]):
            raise ValueError(
                f"point_labels must have shape P×N = {tuple(points.shape[:2])} to match points, "
                f"got {tuple(point_labels.shape)}"
            )
        counts["points"] = points.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"boxes and points must have the same number of prompts P, got {counts}")

    if mask_input is not None:
        _check_tensor("mask_input", mask_input)
        expected = (1, low_res_size, low_res_size)
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != expected:
            raise ValueError(
                f"mask_input must have shape P×1×{low_res_size}×{low_res_size}, got {tuple(mask_input.shape)}"
            )
        prompts = next(iter(counts.values()), mask_input.shape[0])
        if mask_input.shape[0] not in (1, prompts):
            raise ValueError(f"mask_input has {mask_input.shape[0]} masks but there are {prompts} prompts")
        return prompts

    if not counts:
        raise ValueError(
            "decode_prompts needs boxes, points or mask_input; use decode_classes for "
            "segmentation without prompts"
        )
    count = next(iter(counts.values()))
    if count < 1:
        raise ValueError(f"decode_prompts needs at least one prompt, got P = 0 ({counts})")
    return count


def _check_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
