"""The few-shot training objective as one module, so DDP wraps a single forward per step."""

from __future__ import annotations

import torch
from torch import nn

from fmadapt.train.embedding_cache import TrainingEmbeddings
from fmadapt.train.losses import dice_bce_loss, iou_head_loss


class FewShotObjective(nn.Module):
    """Compute the prompted and automatic losses of a Segmenter on one batch.

    Prompted mode: each class present in an image is prompted with its (jittered) ground
    truth box; the single-mask output is compared with that class's mask. Automatic mode:
    no prompt; the decoder predicts every recipe class from its learned class embedding. Each
    output is compared with its class mask, empty ones included, so the model learns to
    predict nothing for an absent class. Both modes add the IoU head's loss for masks whose
    class is present.

    The Segmenter's decoder takes one image embedding at a time, so the batch is looped
    after encoding all images together.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        modes: list[str],
        iou_loss_weight: float = 1.0,
        embeddings: TrainingEmbeddings | None = None,
    ) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.modes = tuple(modes)
        self.iou_loss_weight = iou_loss_weight
        self.embeddings = embeddings

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        boxes: torch.Tensor,
        present: torch.Tensor,
        image_sha256: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the losses of a batch.

        Args:
            images: B×3×S×S preprocessed model inputs.
            targets: B×C×h×w binary class masks at the decoder's output size (h = w = S/4).
            boxes: B×C×4 XYXY boxes in the model frame; rows of absent classes are ignored.
            present: B×C bool, True where the class has foreground in the image.
            image_sha256: B image digests (the dataset's ``image_sha256``). They are required
                when the objective has ``embeddings``, which then reads the embeddings of a
                frozen encoder from its cache and encodes only the images it misses.

        Returns:
            ``loss`` (the sum that is back-propagated) and its parts ``prompted``,
            ``automatic`` and ``iou`` (zero for a mode that is off).
        """
        if self.embeddings is None:
            embeddings = self.segmenter.encode(images)
        elif image_sha256 is None:
            raise ValueError(
                "FewShotObjective has an embedding cache but the batch has no image_sha256; build the "
                "PromptedSliceDataset with image_digests=True"
            )
        else:
            embeddings = self.embeddings.embed(self.segmenter, images, image_sha256)
        zero = embeddings.sum() * 0.0
        prompted, automatic, iou = zero, zero, zero
        batch = embeddings.shape[0]
        for b in range(batch):
            embedding = embeddings[b : b + 1]
            if "prompted" in self.modes and bool(present[b].any()):
                classes = present[b].nonzero().squeeze(1)
                logits, predicted_iou = self.segmenter.decode_prompts(
                    embedding, boxes=boxes[b, classes], multimask_output=False
                )
                class_targets = targets[b, classes]
                prompted = prompted + dice_bce_loss(logits[:, 0], class_targets)
                iou = iou + iou_head_loss(predicted_iou[:, 0], logits[:, 0], class_targets)
            if "automatic" in self.modes:
                logits, predicted_iou = self.segmenter.decode_classes(embedding)
                automatic = automatic + dice_bce_loss(logits, targets[b])
                if bool(present[b].any()):
                    mask = present[b]
                    iou = iou + iou_head_loss(predicted_iou[mask], logits[mask], targets[b, mask])
        prompted, automatic, iou = prompted / batch, automatic / batch, iou / batch
        loss = prompted + automatic + self.iou_loss_weight * iou
        return {"loss": loss, "prompted": prompted.detach(), "automatic": automatic.detach(), "iou": iou.detach()}
