"""Sort a segmenter's parameters into parts and count what trains."""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn

from fmadapt.adapt.adapters import BottleneckAdapter

IMAGE_ENCODER = "image_encoder"
ADAPTERS = "adapters"
NECK = "neck"
PROMPT_ENCODER = "prompt_encoder"
MASK_DECODER = "mask_decoder"
CLASS_EMBEDDINGS = "class_embeddings"
SEMANTIC_HEAD = "semantic_head"
OTHER = "other"

# Every part, in the order summaries list them. IMAGE_ENCODER counts only the encoder's base
# weights, and ADAPTERS counts LoRA and bottleneck adapter weights wherever they sit.
PARTS = (IMAGE_ENCODER, ADAPTERS, NECK, PROMPT_ENCODER, MASK_DECODER, CLASS_EMBEDDINGS, SEMANTIC_HEAD, OTHER)

# Parts that only DINOv3 segmenters have. The summary table leaves them out of models
# without them, so SAM tables keep their rows.
DINOV3_PARTS = (NECK, SEMANTIC_HEAD)

# Attributes of the segmenter whose parameters form a part of the same name.
_CHILD_PARTS = (IMAGE_ENCODER, NECK, PROMPT_ENCODER, MASK_DECODER, CLASS_EMBEDDINGS, SEMANTIC_HEAD)


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Return the names of all LoRA and bottleneck adapter parameters in ``model``.

    Adapters are found by module type (peft ``LoraLayer`` and ``BottleneckAdapter``), not by
    name. For a LoRA layer every parameter except those of its ``base_layer`` is an adapter
    parameter.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, BottleneckAdapter):
            names.update(prefix + name for name, _ in module.named_parameters())
        elif isinstance(module, LoraLayer):
            names.update(
                prefix + name for name, _ in module.named_parameters() if not name.startswith("base_layer.")
            )
    return names


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """Map each parameter name of ``model`` to its part, one of ``PARTS``."""
    adapter_names = adapter_parameter_names(model)
    parts: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if name in adapter_names:
            parts[name] = ADAPTERS
            continue
        child = name.split(".", 1)[0]
        parts[name] = child if child in _CHILD_PARTS else OTHER
    return parts


@dataclass
class ParameterSummary:
    """Parameter counts of a model, in total and by part.

    Attributes:
        total: number of parameter elements.
        trainable: number of elements with ``requires_grad=True``.
        by_part: ``(trainable, total)`` element counts for every part in ``PARTS``, in that order.
            The text table omits the ``DINOV3_PARTS`` rows whose total is zero.
    """

    total: int
    trainable: int
    by_part: dict[str, tuple[int, int]]

    def __str__(self) -> str:
        rows = [
            (part, trainable, total)
            for part, (trainable, total) in self.by_part.items()
            if total or part not in DINOV3_PARTS
        ]
        rows.append(("all", self.trainable, self.total))
        lines = [f"{'part':<18}{'trainable':>14}{'total':>14}{'percent':>10}"]
        for part, trainable, total in rows:
            percent = 100.0 * trainable / total if total else 0.0
            lines.append(f"{part:<18}{trainable:>14,}{total:>14,}{percent:>9.2f}%")
        return "\n".join(lines)


def summarize_parameters(model: nn.Module) -> ParameterSummary:
    """Count the parameter elements of ``model`` by part and by ``requires_grad``.

    Parameters shared between modules are counted once.
    """
    parts = parameter_parts(model)
    counts = {part: [0, 0] for part in PARTS}
    for name, parameter in model.named_parameters():
        count = counts[parts[name]]
        count[1] += parameter.numel()
        if parameter.requires_grad:
            count[0] += parameter.numel()
    by_part = {part: (trainable, total) for part, (trainable, total) in counts.items()}
    return ParameterSummary(
        total=sum(total for _, total in by_part.values()),
        trainable=sum(trainable for trainable, _ in by_part.values()),
        by_part=by_part,
    )
