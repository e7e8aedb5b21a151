"""DINO and iBOT self-distillation losses with teacher centering and sharpening.

The teacher's logits t are centered and sharpened into targets
``p = softmax((t - c) / tau_t)``, with c a running mean of teacher logits (momentum m:
``c <- m c + (1 - m) mean(t)``) and tau_t a low temperature. The student's logits s give
``log q = log_softmax(s / tau_s)``, and each loss is the cross-entropy ``-sum_k p_k log q_k``.
Centering keeps one prototype from dominating, and sharpening keeps the targets from
becoming uniform, which are the two ways the teacher's output can collapse.

- DINO (class token): every teacher global crop g is the target of every student crop
  v != g (global and local), averaged over those pairs and over the batch.
- iBOT (patch tokens): on each global crop, the student's masked patches predict the
  teacher's patches at the same positions (the teacher gets the crop unmasked). Each
  image's masked patches are averaged, and then the images are averaged.
- KoLeo (class token, student only): ``-mean_i log(min_j ||x_i - x_j||)`` over the
  L2-normalised class tokens of one crop across the batch. It is the Kozachenko-Leonenko
  estimate of their differential entropy up to constants, so minimising it spreads the
  features over the sphere (Sablayrolles et al., "Spreading vectors for similarity search",
  ICLR 2019; DINOv2 adds it with weight 0.1). Unlike centering and sharpening it acts on the
  encoder output itself, which is what collapses first when the encoder starts near the
  identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DinoLoss", "IbotPatchLoss", "koleo_loss", "teacher_targets"]


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Center and sharpen teacher logits (..., K) into probabilities ``softmax((t - c) / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


class _CenteredLoss(nn.Module):
    """Base of both losses: the running center (a buffer saved with the state dict) and the student temperature."""

    def __init__(self, prototypes: int, *, student_temperature: float, center_momentum: float) -> None:
        super().__init__()
        if not student_temperature > 0:
            raise ValueError(f"student_temperature must be > 0, got {student_temperature}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Teacher probabilities (..., K) centered with the current center."""
        return teacher_targets(teacher_logits.detach(), self.center, temperature)

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor) -> None:
        """Move the center towards ``batch_center`` (K values, the mean teacher logit of the batch).

        Under several processes, pass the mean over all processes so the centers stay equal.
        """
        batch_center = batch_center.reshape(1, -1).to(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))


class DinoLoss(_CenteredLoss):
    """Cross-entropy between teacher class-token targets and student predictions across crops.

    Args:
        prototypes: K, the class head's output size.
        student_temperature: tau_s.
        center_momentum: m of the running center.
    """

    def forward(self, student_logits: torch.Tensor, teacher_probabilities: torch.Tensor) -> torch.Tensor:
        """Return the mean cross-entropy over pairs (teacher crop g, student crop v != g) and images.

        Args:
            student_logits: V×B×K, global crops first, in the same order as the teacher's.
            teacher_probabilities: G×B×K targets from ``targets``, G <= V.
        """
        views, global_views = student_logits.shape[0], teacher_probabilities.shape[0]
        if student_logits.ndim != 3 or teacher_probabilities.shape[1:] != student_logits.shape[1:]:
            raise ValueError(
                f"student_logits must be V×B×K and teacher_probabilities G×B×K with the same B and K, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probabilities.shape)}"
            )
        if global_views > views or views < 2:
            raise ValueError(
                f"need at least 2 student crops and no more teacher crops than student crops, "
                f"got V={views}, G={global_views}"
            )
        log_student = F.log_softmax(student_logits / self.student_temperature, dim=-1)
        total = student_logits.new_zeros(())
        pairs = 0
        for teacher_view in range(global_views):
            for student_view in range(views):
                if student_view == teacher_view:
                    continue
                cross_entropy = -(teacher_probabilities[teacher_view] * log_student[student_view]).sum(dim=-1)
                total = total + cross_entropy.mean()
                pairs += 1
        return total / pairs


class IbotPatchLoss(_CenteredLoss):
    """Cross-entropy between teacher patch targets and student predictions at masked patches.

    Args:
        prototypes: K', the patch head's output size.
        student_temperature: tau_s.
        center_momentum: m of the running center.
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Return the masked-patch cross-entropy, averaged per image and then over images with masks.

        Args:
            student_logits: ...×N×K' patch logits of the masked crops.
            teacher_probabilities: ...×N×K' targets of the same crops, unmasked.
            masks: ...×N bool, True at masked patches. When no patch is masked the loss
                is a zero that stays connected to ``student_logits``.
        """
        if student_logits.shape != teacher_probabilities.shape or masks.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"student_logits and teacher_probabilities must both be ...×N×K and masks ...×N, got "
                f"{tuple(student_logits.shape)}, {tuple(teacher_probabilities.shape)} and {tuple(masks.shape)}"
            )
        log_student = F.log_softmax(student_logits / self.student_temperature, dim=-1)
        cross_entropy = -(teacher_probabilities * log_student).sum(dim=-1)
        weights = masks.to(cross_entropy.dtype)
        masked_per_image = weights.sum(dim=-1)
        has_mask = masked_per_image > 0
        if not has_mask.any():
            return (student_logits * 0.0).sum()
        per_image = (cross_entropy * weights).sum(dim=-1)[has_mask] / masked_per_image[has_mask]
        return per_image.mean()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Return the KoLeo regulariser of ...×B×E features, averaged over the leading axes.

    Each group of B vectors (one crop of every image) is L2-normalised, and each vector's
    distance to its nearest neighbour in the group enters as ``-log(distance + eps)``.
    Identical vectors therefore cost ``-log(eps)`` (about 18.4), and spread ones cost less.

    Raises:
        ValueError: if a group has fewer than 2 vectors, so no neighbour exists.
    """
    if features.ndim < 2 or features.shape[-2] < 2:
        raise ValueError(
            f"koleo_loss needs at least 2 vectors per group (...×B×E with B >= 2), got shape {tuple(features.shape)}"
        )
    groups = F.normalize(features.reshape(-1, *features.shape[-2:]), dim=-1, eps=eps)
    count = groups.shape[1]
    with torch.no_grad():
        # The neighbour is chosen without gradient, as a hard assignment; the distance to it
        # is then differentiable.
        similarity = groups @ groups.transpose(1, 2)
        similarity.diagonal(dim1=1, dim2=2).fill_(-2.0)
        neighbour = similarity.argmax(dim=-1)
    nearest = torch.gather(groups, 1, neighbour.unsqueeze(-1).expand(-1, count, groups.shape[-1]))
    distances = (groups - nearest).norm(dim=-1)
    return -torch.log(distances + eps).mean()
