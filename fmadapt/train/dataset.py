"""Torch dataset of prepared training slices with ground-truth box prompts."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fmadapt.data.layout import to_hwc
from fmadapt.data.prompts import box_from_mask, jitter_box
from fmadapt.data.transforms import ImageTransform
from fmadapt.inference.cache import image_digest
from fmadapt.train.augment import AugmentSettings, augment_sample
from fmadapt.train.samples import SliceSample


class PromptedSliceDataset(Dataset):
    """Training slices as model inputs, class targets and jittered box prompts.

    Without augmentation, images and low-resolution targets are prepared once, because
    few-shot sets are small. With ``augment`` settings every access draws a new flip,
    quarter turn and crop, and prepares the result. Box jitter is drawn anew on every
    access too, so each epoch trains on other boxes.

    Each item is a dict:
        ``images``: 3×S×S float32 model input.
        ``targets``: C×h×w float32 binary class masks at the decoder's output size.
        ``boxes``: C×4 float32 XYXY boxes in the model frame (zeros where absent).
        ``present``: C bool, True where the class has foreground.
        ``image_sha256``: only with ``image_digests=True``, the
            :func:`fmadapt.inference.cache.image_digest` of the (augmented) image before
            the model transform, the key of its cached embedding.
    """

    def __init__(
        self,
        samples: list[SliceSample],
        transform: ImageTransform,
        num_classes: int,
        *,
        box_jitter: float,
        seed: int,
        augment: AugmentSettings | None = None,
        image_digests: bool = False,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.num_classes = num_classes
        self.box_jitter = box_jitter
        self.augment = augment
        self.image_digests = image_digests
        self.rng = np.random.default_rng(seed)
        self.low_res = transform.image_size // 4
        self.prepared = None if augment else [self._prepare(s.image, s.label) for s in samples]

    def _prepare(self, image: np.ndarray, label: np.ndarray) -> tuple:
        tensor = self.transform.image_to_tensor(to_hwc(image))
        digest = image_digest(image) if self.image_digests else None
        return tensor, self._targets(label, self.low_res), self._boxes(label), label.shape[:2], digest

    def _targets(self, label: np.ndarray, low_res: int) -> torch.Tensor:
        classes = np.arange(1, self.num_classes + 1)[:, None, None]
        masks = torch.from_numpy((label[None] == classes).astype(np.float32))
        return (self.transform.masks_to_low_res(masks, low_res) >= 0.5).float()

    def _boxes(self, label: np.ndarray) -> list[np.ndarray | None]:
        return [box_from_mask(label == c) for c in range(1, self.num_classes + 1)]

    def reseed(self, seed: int, process_index: int, epoch: int) -> None:
        """Restart the jitter and augmentation draws for one epoch of one process."""
        self.rng = np.random.default_rng([seed, process_index, epoch])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.prepared is not None:
            image, targets, class_boxes, original_size, digest = self.prepared[index]
        else:
            sample = self.samples[index]
            augmented = augment_sample(sample.image, sample.label, self.augment, self.rng)
            image, targets, class_boxes, original_size, digest = self._prepare(*augmented)
        boxes = np.zeros((self.num_classes, 4), dtype=np.float32)
        present = np.zeros(self.num_classes, dtype=bool)
        for c, box in enumerate(class_boxes):
            if box is None:
                continue
            if self.box_jitter > 0:
                box = jitter_box(box, original_size, max_shift=self.box_jitter, rng=self.rng)
            boxes[c] = box
            present[c] = True
        model_boxes = self.transform.boxes_to_model(boxes, original_size)
        item = {
            "images": image,
            "targets": targets,
            "boxes": torch.as_tensor(model_boxes, dtype=torch.float32),
            "present": torch.from_numpy(present),
        }
        if digest is not None:
            item["image_sha256"] = digest
        return item
