"""Segmentation losses on decoder logits: soft Dice + binary cross-entropy, and the IoU-head loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean soft Dice loss over masks.

    Args:
        logits: M×h×w mask logits.
        targets: M×h×w binary targets (float).
        smooth: added to numerator and denominator, so an empty target with an empty
            prediction costs nothing instead of dividing by zero.
    """
    probabilities = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probabilities * targets).sum(1)
    total = probabilities.sum(1) + targets.sum(1)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice plus mean binary cross-entropy, both on M×h×w logits and targets."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    return soft_dice_loss(logits, targets) + bce


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits (> 0) with binary targets, per mask (M). Empty union gives 1."""
    predicted = (logits > 0).flatten(1).float()
    targets = targets.flatten(1)
    intersection = (predicted * targets).sum(1)
    union = predicted.sum(1) + targets.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def iou_head_loss(predicted_iou: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the IoU head's estimate (M) and the real IoU of each mask."""
    with torch.no_grad():
        actual = mask_iou(logits, targets)
    return F.mse_loss(predicted_iou, actual)
