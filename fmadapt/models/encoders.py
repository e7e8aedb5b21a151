"""One image-encoder interface for every model family, and its SAM implementation.

An ``ImageEncoder`` maps B×3×H×W model inputs to a dense B×E×h×w feature map, with
h = H // ``patch_size`` and w = W // ``patch_size``. It also declares where
parameter-efficient layers go. ``blocks`` is the list of transformer blocks and
``blocks_path`` is where that list sits inside the encoder. ``lora_targets`` maps short
names to Linear layers inside one block, and ``adapter_targets`` names the modules that
bottleneck adapters hook. Code that adds LoRA or adapters reads these declarations
instead of guessing module names.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT

from fmadapt.models.registry import ModelSpec
from fmadapt.models.sam import build_sam

__all__ = ["ADAPTER_TARGET_NAMES", "LORA_TARGET_NAMES", "ImageEncoder", "SamImageEncoder"]

# Keys of ``ImageEncoder.adapter_targets``. The "attention" module must output the
# attention branch as a tensor of tokens (..., E) before the residual addition, and the
# "mlp" module takes the normalised tokens as its first input and outputs a tensor.
ADAPTER_TARGET_NAMES = ("attention", "mlp")

# Linear layers inside one segment-anything ``Block``, by LoRA target name.
_SAM_LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.lin1", "lin2": "mlp.lin2"}
_SAM_ADAPTER_TARGETS = {"attention": "attn", "mlp": "mlp"}

# LoRA target names by encoder architecture ("sam" covers SAM and MedSAM), for checking
# settings before a model exists. Every encoder's ``lora_targets`` keys come from its
# architecture's entry. The "gate" layer exists only in DINOv3 variants with a SwiGLU MLP,
# so the encoder itself rejects names it does not declare.
LORA_TARGET_NAMES: dict[str, tuple[str, ...]] = {
    "sam": tuple(_SAM_LORA_TARGETS),
    "dinov3": ("q", "k", "v", "proj", "up", "down", "gate"),
}


class ImageEncoder(nn.Module, ABC):
    """Contract shared by every image encoder (SAM ViT, DINOv3 ViT).

    Subclasses set these attributes in ``__init__``:

    - ``embed_dim``: E, the channel count of the dense map that ``forward`` returns.
    - ``block_embed_dim``: channel count of the maps from ``intermediate_maps``, which is
      the token size inside the blocks. It differs from ``embed_dim`` when a neck follows
      the blocks (SAM: 768 inside ViT-B blocks, 256 after the neck).
    - ``patch_size``: side of one square patch in pixels.
    - ``blocks_path``: dotted path of ``blocks`` inside this module, for
      ``get_submodule`` and peft's ``target_modules``.
    - ``lora_targets``: short name -> path of an ``nn.Linear`` inside one block.
    - ``adapter_targets``: ``"attention"`` and ``"mlp"`` -> path of the module inside one
      block whose output a bottleneck adapter modifies (see ``ADAPTER_TARGET_NAMES``).

    ``forward`` and ``intermediate_maps`` keep autograd on, so they can be fine-tuned.
    """

    embed_dim: int
    block_embed_dim: int
    patch_size: int
    blocks_path: str
    lora_targets: dict[str, str]
    adapter_targets: dict[str, str]

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """Transformer blocks in the order the tokens pass through them."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B×3×H×W model inputs to a B×E×h×w dense map, E = ``embed_dim``."""

    @abstractmethod
    def intermediate_maps(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Return the B×``block_embed_dim``×h×w output of each block index in ``layers``, in that order."""

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Return the patch grid (h, w) = (H // patch_size, W // patch_size) of an H×W input.

        Raises:
            ValueError: if H or W is not a positive multiple of ``patch_size``.
        """
        size = self.patch_size
        if height < size or width < size or height % size or width % size:
            padded_height = max(size, -(-height // size) * size)
            padded_width = max(size, -(-width // size) * size)
            raise ValueError(
                f"image size {height}×{width} (H×W) is not a multiple of the patch size {size}; "
                f"resize or pad the image so that both sides are multiples of {size}, for example "
                f"to {padded_height}×{padded_width}"
            )
        return height // size, width // size

    def check_images(self, images: object) -> tuple[int, int]:
        """Validate a B×3×H×W floating-point batch and return its patch grid (h, w)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape B×3×H×W, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape B×3×H×W, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a floating-point tensor (normalised model input), got dtype {images.dtype}"
            )
        return self.patch_grid(int(images.shape[2]), int(images.shape[3]))

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Validate block indices for ``intermediate_maps``. Negative indices count from the end."""
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a sequence of block indices, got {type(layers).__name__} {layers!r}")
        depth = len(self.blocks)
        resolved = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layers must contain int block indices, got {layer!r} in {list(layers)}")
            if not -depth <= layer < depth:
                raise ValueError(
                    f"layer index {layer} is out of range for an encoder with {depth} blocks; "
                    f"use 0 to {depth - 1}, or -{depth} to -1 to count from the end"
                )
            resolved.append(layer % depth)
        if not resolved:
            raise ValueError("layers is empty; pass at least one block index, such as [-1] for the last block")
        return tuple(resolved)

    def target_module_names(self, targets: Sequence[str], blocks: Sequence[int] | None = None) -> list[str]:
        """Return the qualified names of the LoRA ``targets`` in the selected blocks.

        Names are relative to this encoder, such as ``blocks.0.attn.qkv`` under
        ``blocks_path``, in block order and then in the order of ``targets``. ``blocks``
        selects block indices, and None selects every block.

        Raises:
            ValueError: for a target that is not in ``lora_targets`` (the message suggests
                the closest name) or a block index out of range.
        """
        if isinstance(targets, str):
            targets = (targets,)
        unknown = [name for name in targets if name not in self.lora_targets]
        if unknown or not targets:
            closest = difflib.get_close_matches(unknown[0], self.lora_targets, n=1) if unknown else []
            hint = f" Did you mean {closest[0]!r}?" if closest else ""
            raise ValueError(
                f"unknown LoRA targets {unknown or list(targets)} for {type(self).__name__}; "
                f"choose from {sorted(self.lora_targets)}.{hint}"
            )
        indices = range(len(self.blocks)) if blocks is None else self.check_layers(blocks)
        return [f"{self.blocks_path}.{index}.{self.lora_targets[name]}" for index in indices for name in targets]


class SamImageEncoder(ImageEncoder):
    """segment-anything's ``ImageEncoderViT`` behind the ``ImageEncoder`` contract.

    ``forward`` returns the neck output, B×``embed_dim``×h×w (256 channels in every
    published SAM). The blocks add an absolute position embedding of one fixed grid, so
    inputs must be exactly ``image_size``×``image_size``. The wrapped module is stored as
    ``image_encoder``, so the keys of an official SAM checkpoint that start with
    ``image_encoder.`` match this module's keys.

    Args:
        image_encoder: the segment-anything encoder to wrap (not copied).
    """

    def __init__(self, image_encoder: ImageEncoderViT) -> None:
        super().__init__()
        if not isinstance(image_encoder, ImageEncoderViT):
            raise TypeError(
                f"image_encoder must be a segment_anything ImageEncoderViT, got {type(image_encoder).__name__}"
            )
        self.image_encoder = image_encoder
        projection = image_encoder.patch_embed.proj
        self.image_size = int(image_encoder.img_size)
        self.patch_size = int(projection.kernel_size[0])
        self.block_embed_dim = int(projection.out_channels)
        self.embed_dim = int(image_encoder.neck[0].out_channels)
        self.blocks_path = "image_encoder.blocks"
        self.lora_targets = dict(_SAM_LORA_TARGETS)
        self.adapter_targets = dict(_SAM_ADAPTER_TARGETS)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, image_size: int | None = None) -> SamImageEncoder:
        """Build an untrained encoder of the registered SAM-family ``spec`` at input side ``image_size``."""
        return cls(build_sam(spec, image_size=image_size).image_encoder)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.image_encoder.blocks

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode B×3×S×S inputs (S = ``image_size``) to the B×E×(S/16)×(S/16) neck output."""
        self._check_square_input(images)
        return self.image_encoder(images)

    def intermediate_maps(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Return block outputs B×``block_embed_dim``×h×w, taken before the neck.

        Blocks run only up to the deepest requested index.
        """
        self._check_square_input(images)
        requested = self.check_layers(layers)
        tokens = self.image_encoder.patch_embed(images)
        if self.image_encoder.pos_embed is not None:
            tokens = tokens + self.image_encoder.pos_embed

        # segment-anything blocks keep tokens as B×h×w×C between blocks.
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: max(requested) + 1]):
            tokens = block(tokens)
            if index in requested:
                outputs[index] = tokens.permute(0, 3, 1, 2)
        return [outputs[index] for index in requested]

    def _check_square_input(self, images: torch.Tensor) -> None:
        self.check_images(images)
        height, width = int(images.shape[2]), int(images.shape[3])
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}×{self.image_size} for this SAM encoder, got "
                f"{height}×{width}; resize the longest side to {self.image_size} and pad, or build the "
                f"encoder with image_size={height} when the input is square"
            )
