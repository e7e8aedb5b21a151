"""Keep the embeddings of one volume's slices in memory while several passes visit them.

3D propagation runs one pass per class through the same slices, so without this every
class would encode each slice it visits again. Encoding the same image with the same
model gives the same embedding on the CPU, so reusing it does not change any prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from fmadapt.inference.predictor import Predictor

__all__ = ["DEFAULT_MAX_BYTES", "SliceEmbeddings"]

# A SAM ViT-B embedding at 1024 pixels is 4 MiB (256×64×64 float32), so 1 GiB stores 256
# such slices. Smaller models and inputs fit more.
DEFAULT_MAX_BYTES = 1 << 30


class SliceEmbeddings:
    """Set a Predictor's image by slice index, encoding each slice once while the byte budget lasts.

    Embeddings are stored in the order slices are first encoded until they fill
    ``max_bytes``. Slices encoded after that are not stored, so they are encoded again
    (or read from the predictor's on-disk cache) on every visit. Use one instance per
    volume, because the index alone identifies a slice.

    Args:
        predictor: the Predictor whose ``set_image`` encodes the slices.
        max_bytes: memory budget of the stored embeddings in bytes (>= 0).

    Attributes:
        encoded: calls that ran ``predictor.set_image``.
        reused: calls that took a stored embedding.
    """

    def __init__(self, predictor: Predictor, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not isinstance(predictor, Predictor):
            raise TypeError(f"predictor must be a Predictor, got {type(predictor).__name__}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0 (bytes of stored embeddings), got {max_bytes!r}")
        self.predictor = predictor
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.encoded = 0
        self.reused = 0
        self._stored: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}

    def set_image(self, index: int, image: np.ndarray) -> None:
        """Make slice ``index`` (pixels ``image``) the predictor's current image."""
        stored = self._stored.get(index)
        if stored is not None:
            self.predictor.set_embedding(*stored)
            self.reused += 1
            return
        self.predictor.set_image(image)
        self.encoded += 1
        embedding = self.predictor.embedding
        size = embedding.numel() * embedding.element_size()
        if self.stored_bytes + size <= self.max_bytes:
            self._stored[index] = (embedding, self.predictor.original_size)
            self.stored_bytes += size
