"""Class logits on one 2D image: every class from its box prompt, or with no prompt.

These functions drive evaluation and the validation pass of training. They take a
Segmenter and return C×H×W logits at the original resolution, one channel per class in
recipe order. Each class is judged on its own channel (logit > 0), as a box-prompted
model is evaluated object by object; ``logits_to_label_map`` merges the channels into
one label map for files.
"""

from __future__ import annotations

import numpy as np
import torch

from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.layout import to_hwc
from fmadapt.inference.cache import EmbeddingCache, embedding_key


# The images these functions take are already on the 0–255 scale, so their cache keys name
# the mapping that leaves values unchanged.
SCALED_INTENSITY = IntensitySpec(mode="none")


@torch.inference_mode()
def embed_image(segmenter, image: np.ndarray, cache: EmbeddingCache | None = None) -> torch.Tensor:
    """Encode one H×W or H×W×3 image on a 0–255 scale; returns the 1×E×h×w embedding on the model's device.

    With ``cache``, an embedding stored for the same image content, model weights,
    preprocessing and precision is loaded instead of running the encoder, and a newly
    computed one is stored. The precision is fp32 unless the caller runs this under
    autocast. Outside autocast the key is the one ``Predictor(intensity=
    IntensitySpec(mode="none"))`` builds, so both share entries.
    """
    device = next(segmenter.parameters()).device

    def encode() -> torch.Tensor:
        tensor = segmenter.transform.image_to_tensor(to_hwc(image))
        return segmenter.encode(tensor.unsqueeze(0).to(device))

    if cache is None:
        return encode()
    precision = autocast_precision(device)
    key = embedding_key(np.asarray(image), segmenter, intensity=SCALED_INTENSITY, precision=precision)
    return cache.get_or_compute(key, encode).to(device)


def autocast_precision(device: torch.device) -> str:
    """Return the precision an encoder runs in on ``device`` here: "fp32", or "bf16"/"fp16" under autocast."""
    if not torch.is_autocast_enabled(device.type):
        return "fp32"
    dtype = torch.get_autocast_dtype(device.type)
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    raise ValueError(f"autocast to {dtype} on {device.type} has no cache precision name; use bfloat16 or float16")


def logits_to_label_map(logits: torch.Tensor) -> np.ndarray:
    """Merge C×H×W class logits into an H×W uint8 map: the highest class where its logit > 0.

    Where the masks of two classes overlap, the class with the larger logit wins.
    """
    if logits.shape[0] == 0:
        raise ValueError("logits has no class channel (shape 0×H×W)")
    best, index = logits.max(dim=0)
    labels = torch.where(best > 0, index + 1, torch.zeros_like(index))
    return labels.to(torch.uint8).cpu().numpy()


@torch.inference_mode()
def class_logits_from_boxes(
    segmenter,
    embedding: torch.Tensor,
    boxes: dict[int, np.ndarray],
    original_size: tuple[int, int],
    num_classes: int,
) -> torch.Tensor:
    """Segment each class from its box; returns C×H×W float32 logits on the CPU.

    Args:
        embedding: 1×E×h×w image embedding.
        boxes: class index (1..C) to its XYXY box in original pixels; classes without a
            box are predicted as absent.
        original_size: (H, W) of the image.
        num_classes: C.

    All boxes go through the decoder in one call. Channels of classes without a box are
    -inf, so they are never predicted.
    """
    height, width = original_size
    logits = torch.full((num_classes, height, width), -torch.inf)
    if boxes:
        classes = sorted(boxes)
        stacked = np.stack([boxes[c] for c in classes]).astype(np.float32)
        model_boxes = torch.as_tensor(segmenter.transform.boxes_to_model(stacked, original_size))
        low_res, _ = segmenter.decode_prompts(
            embedding, boxes=model_boxes.to(embedding.device), multimask_output=False
        )
        upsampled = segmenter.transform.masks_to_original(low_res[:, 0].float().cpu(), original_size)
        for row, c in enumerate(classes):
            logits[c - 1] = upsampled[row]
    return logits


@torch.inference_mode()
def class_logits_automatic(segmenter, embedding: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Segment every class of the model without a prompt; returns C×H×W float32 logits on the CPU."""
    low_res, _ = segmenter.decode_classes(embedding)
    return segmenter.transform.masks_to_original(low_res.float().cpu(), original_size)
