"""Segmenter: an image encoder of any family with prompted and automatic (per-class) decoding."""

from __future__ import annotations

import difflib
import logging
import warnings
from os import PathLike
from typing import Sequence

import torch
import torch.nn as nn

from fmadapt.data.transforms import ImageTransform, PreprocessSpec, resolve_preprocess
from fmadapt.errors import FmadaptWarning
from fmadapt.models.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from fmadapt.models.dinov3 import DinoV3Encoder, DinoV3Spec, list_dinov3_models
from fmadapt.models.encoders import ImageEncoder, SamImageEncoder
from fmadapt.models.fused_attention import disable_fused_attention, enable_fused_attention
from fmadapt.models.heads import (
    DECODER_PREFIXES,
    PromptNeck,
    SemanticHead,
    build_prompt_decoder,
    default_head_layers,
    read_decoder_state,
)
from fmadapt.models.registry import ModelSpec, get_model_spec, list_models
from fmadapt.models.sam import build_sam, check_image_size

__all__ = ["DINOV3_DECODER_MODELS", "Segmenter", "get_segmenter_spec", "list_segmenter_models"]

logger = logging.getLogger(__name__)

# The SAM model whose prompt encoder and mask decoder sizes each DINOv3 model uses, so that
# model's checkpoint can initialise them. Models not listed use sam_vit_b's sizes
# (prompt_embed_dim 256), which every published SAM and MedSAM decoder has.
DINOV3_DECODER_MODELS = {"dinov3_vit_tiny": "sam_vit_tiny", "dinov3_vitplus_tiny": "sam_vit_tiny"}
_DEFAULT_DINOV3_DECODER_MODEL = "sam_vit_b"
# Maximum channel count of the semantic head's projections. Narrower encoders use their width E.
_SEMANTIC_HEAD_MAX_CHANNELS = 256


class _NotGiven:
    """Type of the ``checkpoint`` default, which distinguishes an omitted argument from an explicit None."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()


def list_segmenter_models() -> list[str]:
    """Return every registered name a Segmenter accepts (SAM family and DINOv3), sorted."""
    return sorted(list_models() + list_dinov3_models())


def get_segmenter_spec(name: str) -> ModelSpec | DinoV3Spec:
    """Return the spec registered as ``name`` in the SAM-family or the DINOv3 registry.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: if neither registry has ``name``; the message suggests the closest name.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name in list_models():
        return get_model_spec(name)
    if name in list_dinov3_models():
        from fmadapt.models.dinov3 import get_dinov3_spec

        return get_dinov3_spec(name)
    names = list_segmenter_models()
    closest = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {closest[0]!r}?" if closest else ""
    raise ValueError(f"unknown model {name!r}; registered models are {names}.{hint}")


class Segmenter(nn.Module):
    """Image encoder, prompt encoder and mask decoder of one registered model.

    SAM family (``ModelSpec``): ``image_encoder`` is segment-anything's ``ImageEncoderViT``
    and the attribute names ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``
    match segment-anything's ``Sam``, so official SAM and MedSAM checkpoints load by key.
    With ``class_names`` the model also has ``class_embeddings``, one learned prompt token
    of size D per class, which the mask decoder reads in automatic mode.

    DINOv3 (``DinoV3Spec``): ``image_encoder`` is a ``DinoV3Encoder`` and ``neck`` maps its
    last-block map (E channels) to D channels for the prompt encoder and mask decoder,
    whose sizes are those of the SAM model ``decoder_model``. With ``class_names``,
    ``semantic_head`` predicts all classes at once from the encoder maps of ``head_layers``.

    ``encoder`` is the ``ImageEncoder`` interface of either family, which LoRA and
    bottleneck adapters read their targets from.

    Every method here keeps autograd on; wrap calls in ``torch.inference_mode`` for
    prediction. Shapes: S = ``image_size``, D = ``prompt_embed_dim``, h = w = S/16 the
    embedding grid, S/4 the side of the masks decoded.

    Args:
        spec: the model variant.
        image_size: input side S in pixels; default ``spec.native_image_size``.
        class_names: names of the classes for automatic mode, in output order.
        preprocess: only for deliberate experiments; a spec different from
            ``spec.preprocess`` raises unless ``allow_preprocess_mismatch=True``.
        decoder_model: DINOv3 only, the registered SAM model whose decoder sizes to use;
            default from ``DINOV3_DECODER_MODELS``.
        head_layers: DINOv3 only, encoder block indices the semantic head reads; default
            ``default_head_layers(depth)``.
    """

    def __init__(
        self,
        spec: ModelSpec | DinoV3Spec,
        *,
        image_size: int | None = None,
        class_names: Sequence[str] = (),
        preprocess: PreprocessSpec | None = None,
        allow_preprocess_mismatch: bool = False,
        decoder_model: str | None = None,
        head_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.class_names = _check_class_names(class_names)
        if isinstance(spec, ModelSpec):
            _reject_dinov3_options(spec, decoder_model=decoder_model, head_layers=head_layers)
            self._build_sam_family(spec, image_size)
        elif isinstance(spec, DinoV3Spec):
            self._build_dinov3(spec, image_size, decoder_model, head_layers)
        else:
            raise TypeError(f"spec must be a ModelSpec or DinoV3Spec, got {type(spec).__name__}")

        chosen = resolve_preprocess(
            spec.preprocess,
            preprocess,
            allow_preprocess_mismatch=allow_preprocess_mismatch,
            model_name=repr(spec.name),
        )
        self.transform = ImageTransform(chosen, self.image_size)

    def _build_sam_family(self, spec: ModelSpec, image_size: int | None) -> None:
        parts = build_sam(spec, image_size=image_size)
        self.image_size = parts.image_encoder.img_size
        self.prompt_embed_dim = spec.prompt_embed_dim
        self.head_layers: tuple[int, ...] = ()
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        if self.class_names:
            self.class_embeddings = nn.Embedding(len(self.class_names), spec.prompt_embed_dim)
        # Stored outside the module tree: the view shares image_encoder's modules, so
        # registering it would list every encoder parameter twice.
        self.__dict__["_encoder_view"] = SamImageEncoder(self.image_encoder)

    def _build_dinov3(
        self,
        spec: DinoV3Spec,
        image_size: int | None,
        decoder_model: str | None,
        head_layers: Sequence[int] | None,
    ) -> None:
        self.image_size = check_image_size(spec, spec.native_image_size if image_size is None else image_size)
        self.decoder_model = decoder_model or DINOV3_DECODER_MODELS.get(spec.name, _DEFAULT_DINOV3_DECODER_MODEL)
        sizes = get_model_spec(self.decoder_model)
        self.prompt_embed_dim = sizes.prompt_embed_dim
        self.image_encoder = DinoV3Encoder(spec)
        self.neck = PromptNeck(spec.embed_dim, sizes.prompt_embed_dim)
        self.prompt_encoder, self.mask_decoder = build_prompt_decoder(sizes, self.image_size)
        self.head_layers = ()
        if self.class_names:
            self.head_layers = _check_head_layers(self.image_encoder, head_layers)
            self.semantic_head = SemanticHead(
                self.image_encoder.block_embed_dim,
                len(self.head_layers),
                len(self.class_names),
                channels=min(_SEMANTIC_HEAD_MAX_CHANNELS, self.image_encoder.block_embed_dim),
            )
        elif head_layers is not None:
            raise ValueError("head_layers needs class_names, because the semantic head exists only in automatic mode")
        self.__dict__["_encoder_view"] = self.image_encoder

    @classmethod
    def from_registry(
        cls,
        name: str,
        *,
        image_size: int | None = None,
        checkpoint: str | PathLike[str] | None | _NotGiven = _NOT_GIVEN,
        decoder_checkpoint: str | PathLike[str] | None = None,
        class_names: Sequence[str] = (),
        preprocess: PreprocessSpec | None = None,
        allow_preprocess_mismatch: bool = False,
        decoder_model: str | None = None,
        head_layers: Sequence[int] | None = None,
    ) -> Segmenter:
        """Build the registered model ``name`` and load its local checkpoint files.

        ``checkpoint`` is a SAM or MedSAM file for the SAM family (every part loads by key),
        or a Hugging Face folder or Meta ``.pth`` file for a DINOv3 encoder. When it is
        omitted for a model with published weights, the model starts from random weights
        and a FmadaptWarning says so. ``checkpoint=None`` asks for random weights without
        the warning. ``decoder_checkpoint`` is a SAM-format file whose ``prompt_encoder.*``
        and ``mask_decoder.*`` weights are loaded afterwards (see ``load_decoder_checkpoint``).
        """
        spec = get_segmenter_spec(name)
        if checkpoint is _NOT_GIVEN:
            checkpoint = None
            _warn_random_weights(spec)
        model = cls(
            spec,
            image_size=image_size,
            class_names=class_names,
            preprocess=preprocess,
            allow_preprocess_mismatch=allow_preprocess_mismatch,
            decoder_model=decoder_model,
            head_layers=head_layers,
        )
        if checkpoint is not None:
            if model.is_dinov3:
                model.image_encoder.load_checkpoint(checkpoint)
            else:
                from fmadapt.models.checkpoint import load_checkpoint

                load_checkpoint(model, checkpoint)
        if decoder_checkpoint is not None:
            model.load_decoder_checkpoint(decoder_checkpoint)
        return model

    @property
    def encoder(self) -> ImageEncoder:
        """The image encoder behind the ``ImageEncoder`` interface (blocks, LoRA and adapter targets)."""
        return self.__dict__["_encoder_view"]

    @property
    def is_dinov3(self) -> bool:
        """Whether the encoder is a DINOv3 ViT (neck and semantic head) rather than SAM's ViT."""
        return isinstance(self.spec, DinoV3Spec)

    @property
    def low_res_size(self) -> int:
        """Side of the decoded square masks in pixels, S/4."""
        return self.image_size // 4

    @property
    def embedding_size(self) -> int:
        """Side of the encoder's square embedding grid, S/16 for patch size 16."""
        return self.image_size // self.spec.patch_size

    @property
    def embedding_channels(self) -> int:
        """Channels of the image embedding that ``encode`` returns.

        D for the SAM family and for DINOv3 without classes. A DINOv3 model with a
        semantic head appends its L encoder maps of E channels each: D + L·E.
        """
        return self.prompt_embed_dim + len(self.head_layers) * self.encoder.block_embed_dim

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, image_size={self.image_size}, class_names={self.class_names}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B×3×S×S model inputs (from ``transform.image_to_tensor``) to the image embedding.

        The embedding is B×``embedding_channels``×h×w. Its first D channels are what the
        mask decoder reads. For a DINOv3 model with a semantic head, the encoder maps of
        ``head_layers`` follow in that order, so slicing the batch keeps every image's maps
        together with its embedding.
        """
        expected = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape B×3×{self.image_size}×{self.image_size}, got "
                f"{tuple(images.shape)}; prepare each image with model.transform.image_to_tensor"
            )
        if not self.is_dinov3:
            return self.image_encoder(images)

        last = len(self.image_encoder.blocks) - 1
        maps = self.image_encoder.intermediate_maps(images, (*self.head_layers, last))
        return torch.cat([self.neck(maps[-1]), *maps[:-1]], dim=1)

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        *,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        decoder_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompts on one image in a single decoder call.

        Args:
            image_embedding: 1×``embedding_channels``×h×w from ``encode``.
            boxes: P×4 XYXY boxes in the model frame.
            points: P×N×2 XY points in the model frame, with ``point_labels`` P×N
                (1 foreground, 0 background, -1 padding that the decoder ignores).
            mask_input: P×1×(S/4)×(S/4) logits from an earlier call (1×1×… is shared by
                all P prompts).
            multimask_output: K = 3 masks per prompt when true, else K = 1.
            decoder_dtype: run the mask decoder with its weights and inputs cast to this
                dtype (for inference, e.g. torch.bfloat16), and return float32 outputs.
                The module's own weights are not changed. None runs it as it is.

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
        inputs = {
            "image_embeddings": image_embedding[:, : self.prompt_embed_dim],
            "image_pe": self.prompt_encoder.get_dense_pe(),
            "sparse_prompt_embeddings": sparse,
            "dense_prompt_embeddings": dense,
        }
        if decoder_dtype is None:
            return self.mask_decoder(**inputs, multimask_output=multimask_output)

        # The decoder's cost is mostly elementwise work on P copies of the image tokens, so
        # a narrower dtype halves the memory traffic. Casting a copy of the weights per call
        # (a few million values) keeps the module itself in float32 for training.
        weights = {
            name: value.to(decoder_dtype) if value.is_floating_point() else value
            for name, value in [*self.mask_decoder.named_parameters(), *self.mask_decoder.named_buffers()]
        }
        cast_inputs = {name: value.to(decoder_dtype) for name, value in inputs.items()}
        cast_inputs["multimask_output"] = multimask_output
        logits, iou = torch.func.functional_call(self.mask_decoder, weights, (), cast_inputs)
        return logits.float(), iou.float()

    def decode_classes(self, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one mask per class without user prompts (automatic mode).

        SAM family: each class's learned embedding is the only sparse prompt token, and
        the dense prompt is the prompt encoder's no-mask embedding. DINOv3: the semantic
        head reads the encoder maps stored in the embedding.

        Args:
            image_embedding: 1×``embedding_channels``×h×w from ``encode``.

        Returns:
            Mask logits C×(S/4)×(S/4) and predicted IoU C, in ``class_names`` order.
        """
        if not self.class_names:
            raise ValueError(
                "decode_classes needs class embeddings; build the model with "
                "class_names=('liver', ...) to use automatic mode"
            )
        self._check_embedding(image_embedding)
        if self.is_dinov3:
            maps = image_embedding[:, self.prompt_embed_dim :].split(self.encoder.block_embed_dim, dim=1)
            logits, scores = self.semantic_head(maps)
            return logits[0], scores[0]

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

    def load_decoder_checkpoint(self, path: str | PathLike[str]) -> list[str]:
        """Load only the ``prompt_encoder.*`` and ``mask_decoder.*`` weights of a SAM-format file.

        The file's image encoder is skipped, so a DINOv3 model can start its decoder from
        SAM or MedSAM. Returns the loaded keys, sorted. Raises CheckpointError as
        ``read_decoder_state`` describes.
        """
        model_state = {key: value for key, value in self.state_dict().items() if key.startswith(DECODER_PREFIXES)}
        decoder_state = read_decoder_state(path, model_state)
        self.load_state_dict(decoder_state, strict=False)
        logger.info("loaded %d prompt encoder and mask decoder tensors from %s", len(decoder_state), path)
        return sorted(decoder_state)

    def enable_fused_attention(self) -> int:
        """Compute the encoder's attention with torch's ``scaled_dot_product_attention``, in place.

        SAM family: each segment-anything ``Attention`` gets a forward that passes the
        relative-position term as an attention mask (``fmadapt.models.fused_attention``).
        DINOv3: the transformers backbone uses its "sdpa" attention. Parameters, hooks and
        state-dict keys do not change. Returns the number of attention modules switched.
        """
        return enable_fused_attention(self.image_encoder)

    def disable_fused_attention(self) -> int:
        """Go back to the encoder's by-hand attention; returns the number of modules restored."""
        return disable_fused_attention(self.image_encoder)

    def enable_gradient_checkpointing(self) -> int:
        """Recompute each encoder block's activations in the backward pass, in place.

        Applies only in training mode with autograd on, and saves activation memory for
        about one extra encoder forward per step (``fmadapt.models.checkpointing``).
        Returns the number of blocks checkpointed.
        """
        return enable_gradient_checkpointing(self.image_encoder)

    def disable_gradient_checkpointing(self) -> int:
        """Run the encoder blocks without checkpointing again; returns the number of blocks."""
        return disable_gradient_checkpointing(self.image_encoder)

    def _check_embedding(self, image_embedding: torch.Tensor) -> None:
        grid = self.embedding_size
        expected = (1, self.embedding_channels, grid, grid)
        if not isinstance(image_embedding, torch.Tensor):
            raise TypeError(f"image_embedding must be a torch.Tensor, got {type(image_embedding).__name__}")
        if tuple(image_embedding.shape) != expected:
            raise ValueError(
                f"image_embedding must have shape {'×'.join(map(str, expected))} (one image), got "
                f"{tuple(image_embedding.shape)}; decode each image of a batch separately"
            )


def _reject_dinov3_options(spec: ModelSpec, **options: object) -> None:
    set_options = sorted(name for name, value in options.items() if value is not None)
    if set_options:
        raise ValueError(
            f"{set_options} apply only to DINOv3 models, but {spec.name!r} is a {spec.family} model; leave them unset"
        )


def _check_head_layers(encoder: DinoV3Encoder, head_layers: Sequence[int] | None) -> tuple[int, ...]:
    if head_layers is None:
        return default_head_layers(len(encoder.blocks))
    layers = encoder.check_layers(head_layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"head_layers repeats a block index: {list(head_layers)} resolves to {list(layers)}")
    return layers


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


def _warn_random_weights(spec: ModelSpec | DinoV3Spec) -> None:
    """Warn that a model with published weights was built without a checkpoint."""
    if isinstance(spec, DinoV3Spec):
        copies = [f"the Hugging Face folder {spec.hf_model_id}"] if spec.hf_model_id else []
        copies += [spec.meta_checkpoint_file] if spec.meta_checkpoint_file else []
        instruction = f"set checkpoint to a local copy of {' or '.join(copies)}"
    else:
        copies = [spec.checkpoint_file] if spec.checkpoint_file else []
        instruction = f"pass checkpoint='checkpoints/{spec.checkpoint_file}'"
    if not copies:
        return
    warnings.warn(
        f"Segmenter.from_registry({spec.name!r}) got no checkpoint, so the model starts from random weights. "
        f"To load the published weights, {instruction}. To build random weights without this warning, pass "
        "checkpoint=None",
        FmadaptWarning,
        stacklevel=3,
    )


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
