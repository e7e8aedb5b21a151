"""Predictor: encode an image once, then segment it with many prompts."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from fmadapt.data.intensity import IntensitySpec, normalize_intensity
from fmadapt.data.layout import to_hwc
from fmadapt.errors import FmadaptWarning
from fmadapt.inference.cache import EmbeddingCache, embedding_key
from fmadapt.models.segmenter import Segmenter

__all__ = [
    "CPU_DECODER_BATCH_SIZE",
    "PRECISIONS",
    "Predictor",
    "bf16_is_native",
    "resolve_precision",
    "select_best_mask",
]

# Prompts per decoder call on a CPU. benchmarks/decode_speed.py times 1, 4, 8, 16 and 64
# prompts per call and records the results in benchmarks/README.md.
CPU_DECODER_BATCH_SIZE = 4

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")


def bf16_is_native(device: torch.device) -> bool:
    """Return whether ``device`` runs bfloat16 matrix multiplies natively.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: whether oneDNN has bf16 kernels for
    this processor (AVX512-BF16 or AMX). Other devices return False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn a ``PRECISIONS`` entry into "fp32" or "bf16" for ``device``.

    "auto" gives "bf16" where ``bf16_is_native(device)`` and "fp32" elsewhere. "bf16" on a
    device without native support still runs, with a FmadaptWarning, because emulated
    bfloat16 is usually slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    native = bf16_is_native(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(
            f"precision='bf16' on {device}, which has no native bfloat16 support, so the encoder may run "
            "slower than in fp32; use precision='auto' to pick bf16 only where it is native",
            FmadaptWarning,
            stacklevel=3,
        )
    return precision


def select_best_mask(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick, for each prompt, the mask with the highest predicted IoU.

    ``masks`` is K×H×W with ``scores`` K, or P×K×H×W with ``scores`` P×K. Returns the
    chosen mask (H×W or P×H×W) and its score (scalar array or P). With
    ``multimask_output=True`` the decoder proposes K = 3 masks for ambiguous prompts
    (such as one click) and its IoU head scores each one.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores)
    if scores.ndim not in (1, 2) or masks.shape[: scores.ndim] != scores.shape or masks.ndim != scores.ndim + 2:
        raise ValueError(
            f"masks must be K×H×W with scores K, or P×K×H×W with scores P×K; got masks "
            f"{masks.shape} and scores {scores.shape}"
        )
    best = np.argmax(scores, axis=-1)
    if scores.ndim == 1:
        return masks[best], scores[best]
    rows = np.arange(scores.shape[0])
    return masks[rows, best], scores[rows, best]


class Predictor:
    """Segment one image at a time with box, point and mask prompts.

    ``set_image`` runs the encoder once and caches the embedding, so each ``predict``
    call only runs the prompt encoder and mask decoder. Prompts are in pixels of the
    original image: boxes XYXY, points XY. All P prompts of one call go through the
    decoder together, and their P×K low-res logits are resized to H×W in one call.

    Args:
        model: the Segmenter; its ``transform`` prepares images and maps prompts.
        intensity: how raw values map to 0–255 before the model transform; default
            ``IntensitySpec()`` ("auto": uint8 unchanged, other dtypes by percentiles).
        precision: "fp32", "bf16" (encoder under bfloat16 autocast, mask decoder with
            bfloat16 weights) or "auto" (bf16 where ``bf16_is_native``). The embedding,
            logits and scores are returned as float32. Fused attention is a separate
            switch, ``model.enable_fused_attention()``.
        cache: an EmbeddingCache; ``set_image`` then reads the embedding from it when
            the image, weights, preprocessing, intensity and precision match a stored one.
        decoder_batch_size: prompts per mask-decoder call; None picks all prompts on a
            GPU and ``CPU_DECODER_BATCH_SIZE`` on a CPU. The decoder updates a copy of the
            h·w image tokens per prompt (4096 × 256 values for SAM at 1024 px), so a large
            batch only adds memory traffic on a CPU, where each prompt's matrix products
            already have 4096 rows. Results agree across settings up to float rounding.
    """

    def __init__(
        self,
        model: Segmenter,
        *,
        intensity: IntensitySpec | None = None,
        precision: str = "fp32",
        cache: EmbeddingCache | None = None,
        decoder_batch_size: int | None = None,
    ) -> None:
        if not isinstance(model, Segmenter):
            raise TypeError(f"model must be a Segmenter, got {type(model).__name__}")
        if intensity is not None and not isinstance(intensity, IntensitySpec):
            raise TypeError(f"intensity must be an IntensitySpec or None, got {type(intensity).__name__}")
        if cache is not None and not isinstance(cache, EmbeddingCache):
            raise TypeError(f"cache must be an EmbeddingCache or None, got {type(cache).__name__}")
        self.model = model
        self.intensity = intensity if intensity is not None else IntensitySpec()
        self.precision = resolve_precision(precision, self.device)
        self.cache = cache
        if decoder_batch_size is not None and (
            isinstance(decoder_batch_size, bool) or not isinstance(decoder_batch_size, int) or decoder_batch_size < 1
        ):
            raise ValueError(f"decoder_batch_size must be a positive int or None, got {decoder_batch_size!r}")
        if decoder_batch_size is None and self.device.type == "cpu":
            decoder_batch_size = CPU_DECODER_BATCH_SIZE
        self.decoder_batch_size = decoder_batch_size
        self._embedding: torch.Tensor | None = None
        self._original_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        """Whether ``set_image`` has cached an embedding."""
        return self._embedding is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """(H, W) of the current image in pixels, or None before ``set_image``."""
        return self._original_size

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` (H×W, H×W×1, 1×H×W, H×W×3 or H×W×4) and keep its embedding.

        With a ``cache``, a stored embedding for the same key is loaded instead of
        running the encoder, and a newly computed one is stored.
        """
        hwc = to_hwc(image)
        if self.cache is None:
            embedding = self._encode(hwc)
        else:
            key = embedding_key(np.asarray(image), self.model, intensity=self.intensity, precision=self.precision)
            embedding = self.cache.get_or_compute(key, lambda: self._encode(hwc))
        self._embedding = embedding.to(self.device)
        self._original_size = (int(hwc.shape[0]), int(hwc.shape[1]))

    @property
    def embedding(self) -> torch.Tensor | None:
        """1×E×h×w embedding of the current image, or None before ``set_image``."""
        return self._embedding

    def set_embedding(self, embedding: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Make ``embedding`` the current image's, as if ``set_image`` had computed it.

        For callers that keep the ``embedding`` of an earlier ``set_image`` with this model
        and settings, so an image that comes back is not encoded again.

        Args:
            embedding: 1×E×h×w tensor, the ``embedding`` property after ``set_image``.
            original_size: (H, W) of that image in pixels, the ``original_size`` property.
        """
        if not isinstance(embedding, torch.Tensor) or embedding.ndim != 4 or embedding.shape[0] != 1:
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"embedding must be a 1×E×h×w tensor from Predictor.embedding, got {shape}")
        if len(original_size) != 2 or any(int(side) < 1 for side in original_size):
            raise ValueError(f"original_size must be (H, W) in pixels, both >= 1, got {original_size!r}")
        self._embedding = embedding.to(self.device)
        self._original_size = (int(original_size[0]), int(original_size[1]))

    def _encode(self, hwc: np.ndarray) -> torch.Tensor:
        scaled = normalize_intensity(hwc, self.intensity)
        model_input = self.model.transform.image_to_tensor(scaled).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    embedding = self.model.encode(model_input)
                return embedding.float()
            return self.model.encode(model_input)

    def reset_image(self) -> None:
        """Drop the cached embedding and image size."""
        self._embedding = None
        self._original_size = None

    def predict(
        self,
        *,
        box: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment the current image from prompts in original-image pixels.

        Args:
            box: (4,) one XYXY box, or (P, 4) for P boxes decoded in one call.
            points: (N, 2) XY points for one prompt or (P, N, 2), with
                ``point_labels`` (N,) or (P, N): 1 foreground, 0 background.
            mask_input: low-res logits (S/4)×(S/4), 1×(S/4)×(S/4) or P×(S/4)×(S/4),
                usually a previous call's third output.
            multimask_output: K = 3 candidate masks per prompt when true, else K = 1.
                Pick among the three with ``select_best_mask`` (highest predicted IoU).
            return_logits: return float logits instead of boolean masks.

        Returns:
            masks K×H×W (bool, logits > 0, unless ``return_logits``), scores K
            (predicted IoU) and low-res logits K×(S/4)×(S/4). With P prompts (a 2-D box
            array or 3-D points) each output gains a leading P axis.
        """
        if self._embedding is None or self._original_size is None:
            raise RuntimeError("predict needs an image; call set_image(image) first")
        if box is None and points is None and point_labels is None and mask_input is None:
            raise ValueError(
                "predict needs a prompt: pass box (XYXY pixels), points with point_labels, or mask_input "
                "(low-res logits); for segmentation without prompts use class_logits_automatic"
            )
        batched = _is_batched(box, points)
        boxes_model, points_model, labels = self._prompts_to_model(box, points, point_labels)
        count = _count(boxes_model, points_model)
        masks_low = self._mask_input_tensor(mask_input, count)

        with torch.inference_mode():
            low_res, scores = self._decode(boxes_model, points_model, labels, masks_low, count, multimask_output)
            full = self.model.transform.masks_to_original(low_res, self._original_size)

        masks = full if return_logits else full > 0
        outputs = tuple(value.detach().cpu().numpy() for value in (masks, scores, low_res))
        if not batched:
            outputs = tuple(value[0] for value in outputs)
        return outputs

    def _decode(
        self,
        boxes: torch.Tensor | None,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        masks_low: torch.Tensor | None,
        count: int,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder on ``count`` prompts in chunks of ``decoder_batch_size``; returns P×K logits and scores."""
        step = self.decoder_batch_size or max(count, 1)
        if count <= step:
            starts = [0]
        else:
            starts = list(range(0, count, step))
        decoder_dtype = torch.bfloat16 if self.precision == "bf16" else None
        logits, scores = [], []
        for start in starts:
            chunk = slice(start, start + step)
            chunk_masks = masks_low
            if masks_low is not None and masks_low.shape[0] > 1:
                chunk_masks = masks_low[chunk]
            chunk_logits, chunk_scores = self.model.decode_prompts(
                self._embedding,
                boxes=None if boxes is None else boxes[chunk],
                points=None if points is None else points[chunk],
                point_labels=None if labels is None else labels[chunk],
                mask_input=chunk_masks,
                multimask_output=multimask_output,
                decoder_dtype=decoder_dtype,
            )
            logits.append(chunk_logits)
            scores.append(chunk_scores)
        if len(logits) == 1:
            return logits[0], scores[0]
        return torch.cat(logits), torch.cat(scores)

    def _prompts_to_model(
        self,
        box: np.ndarray | None,
        points: np.ndarray | None,
        point_labels: np.ndarray | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        transform, size, device = self.model.transform, self._original_size, self.device
        boxes_model = None
        if box is not None:
            boxes = np.asarray(box, dtype=np.float32)
            if boxes.shape == (4,):
                boxes = boxes[None]
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"box must have shape (4,) or (P, 4) XYXY, got {boxes.shape}")
            _check_boxes(boxes, batched=np.ndim(box) == 2)
            boxes_model = torch.from_numpy(transform.boxes_to_model(boxes, size)).to(device)

        if points is None and point_labels is None:
            return boxes_model, None, None
        if points is None or point_labels is None:
            raise ValueError("points and point_labels must be given together (labels: 1 foreground, 0 background)")
        coords = np.asarray(points, dtype=np.float32)
        labels = np.asarray(point_labels)
        if coords.ndim == 2:
            coords, labels = coords[None], labels[None]
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(f"points must have shape (N, 2) or (P, N, 2) XY, got {np.shape(points)}")
        if not np.isfinite(coords).all():
            raise ValueError(f"points must be finite XY pixel coordinates, got NaN or infinity in {coords.tolist()}")
        if labels.shape != coords.shape[:2]:
            raise ValueError(
                f"point_labels must have shape {coords.shape[:2]} to match points {np.shape(points)}, "
                f"got {np.shape(point_labels)}"
            )
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {np.unique(labels)}")
        points_model = torch.from_numpy(transform.points_to_model(coords, size)).to(device)
        labels_tensor = torch.from_numpy(labels.astype(np.int64)).to(device)
        return boxes_model, points_model, labels_tensor

    def _mask_input_tensor(self, mask_input: np.ndarray | None, count: int) -> torch.Tensor | None:
        if mask_input is None:
            return None
        side = self.model.low_res_size
        masks = np.asarray(mask_input, dtype=np.float32)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or masks.shape[1:] != (side, side) or masks.shape[0] not in (1, max(count, 1)):
            raise ValueError(
                f"mask_input must have shape {side}×{side}, 1×{side}×{side} or P×{side}×{side} "
                f"with P = {count} prompts, got {np.shape(mask_input)}"
            )
        return torch.from_numpy(masks[:, None]).to(self.device)


def _check_boxes(boxes: np.ndarray, batched: bool) -> None:
    """Reject P×4 boxes with NaN or infinite values or with corners out of XYXY order.

    A box that extends past the image border is allowed, because the prompt encoder
    encodes any finite coordinate.
    """
    invalid = ~np.isfinite(boxes).all(axis=1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    bad = np.flatnonzero(invalid | inverted)
    if bad.size == 0:
        return
    index = int(bad[0])
    name = f"box {index} of {len(boxes)}" if batched else "box"
    problem = "contains NaN or infinity" if invalid[index] else "has x1 < x0 or y1 < y0"
    raise ValueError(
        f"{name} {boxes[index].tolist()} {problem}; boxes must be finite pixel coordinates in XYXY order "
        "[x0, y0, x1, y1] with x0 <= x1 and y0 <= y1"
    )


def _is_batched(box: np.ndarray | None, points: np.ndarray | None) -> bool:
    if box is not None and np.ndim(box) == 2:
        return True
    return points is not None and np.ndim(points) == 3


def _count(boxes: torch.Tensor | None, points: torch.Tensor | None) -> int:
    if boxes is not None:
        return boxes.shape[0]
    if points is not None:
        return points.shape[0]
    return 0
