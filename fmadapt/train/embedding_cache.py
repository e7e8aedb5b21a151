"""Cached image embeddings for decoder-only training (recipe key ``train.cache_dir``).

When no parameter that feeds the embedding trains (a ``decoder`` or ``decoder_prompt``
preset on a SAM-family model), the embedding of a training image stays the same for the
whole run. The first time an image is drawn, the encoder runs and its embedding is stored in
an :class:`fmadapt.inference.cache.EmbeddingCache`. Every later draw, in this run or a later
run with the same images, weights, preprocessing and precision, reads it back instead.

The key contains the digest of the image after intensity scaling and after augmentation, so
augmented images (``train.augment: true``) differ on almost every draw and rarely hit. The
cache pays off with ``train.augment: false``. Training with a trainable encoder (LoRA or
adapter presets, ``full``, and every DINOv3 model, whose prompt neck always trains) is
rejected with a RecipeError, because its embeddings change with every optimizer step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fmadapt.config import Recipe
from fmadapt.errors import RecipeError
from fmadapt.inference.cache import EmbeddingCache, embedding_key_from_digest, open_embedding_cache, trainable_encoder_parameters
from fmadapt.inference.label_maps import SCALED_INTENSITY, autocast_precision

__all__ = ["TrainingEmbeddings", "open_training_cache"]

logger = logging.getLogger(__name__)

_ENCODER_MODULES = ("image_encoder", "neck")


def open_training_cache(recipe: Recipe, model: nn.Module) -> EmbeddingCache | None:
    """Open the ``train.cache_dir`` folder for ``model``, or return None when the key is unset.

    Raises:
        RecipeError: the key is set but an encoder parameter trains, or a dropout layer in
            the encoder would make each step's embedding random. The message names the
            parameters and how to fix the recipe.
    """
    if recipe.train.cache_dir is None:
        return None
    trainable = trainable_encoder_parameters(model)
    if trainable:
        examples = ", ".join(trainable[:3]) + (f" and {len(trainable) - 3} more" if len(trainable) > 3 else "")
        raise RecipeError(
            f"train.cache_dir is set, but {len(trainable)} encoder parameters train under preset "
            f"{recipe.adaptation.preset!r} ({examples}), so each optimizer step changes the embeddings. Use a "
            "decoder-only preset (adaptation.preset=decoder or decoder_prompt) on a SAM-family model, "
            "or set train.cache_dir=null"
        )
    dropout = _encoder_dropout(model)
    if dropout:
        raise RecipeError(
            f"train.cache_dir is set, but the encoder has dropout ({', '.join(dropout[:3])}), so its embedding "
            "of an image differs on every step; set adaptation.lora.dropout=0 or train.cache_dir=null"
        )
    cache = open_embedding_cache(recipe.train.cache_dir, "train.cache_dir")
    if recipe.train.augment:
        logger.warning(
            "train.cache_dir %s with train.augment=true: augmented images differ on almost every draw, so the "
            "cache will mostly miss and grow by one file per image drawn; set train.augment=false to reuse embeddings",
            cache.folder,
        )
    else:
        logger.info("embedding cache %s: training images are encoded once and read back afterwards", cache.folder)
    return cache


def _encoder_dropout(model: nn.Module) -> list[str]:
    """Return the names of dropout layers with p > 0 inside the encoder modules."""
    names = []
    for prefix in _ENCODER_MODULES:
        module = getattr(model, prefix, None)
        if module is None:
            continue
        for name, child in module.named_modules():
            if isinstance(child, nn.modules.dropout._DropoutNd) and child.p > 0:
                names.append(f"{prefix}.{name}")
    return names


class TrainingEmbeddings:
    """Embeddings of training batches, read from an EmbeddingCache or encoded and stored.

    ``FewShotObjective`` calls ``embed`` inside its forward pass, so the encoder runs under
    the same autocast as without the cache and the key names that precision.

    Args:
        cache: the run's cache, from ``open_training_cache``.

    Attributes:
        hits: images of the current epoch whose embedding came from the cache, or from an
            identical image encoded earlier in the same batch.
        misses: images of the current epoch that ran through the encoder.
    """

    def __init__(self, cache: EmbeddingCache) -> None:
        if not isinstance(cache, EmbeddingCache):
            raise TypeError(f"cache must be an EmbeddingCache, got {type(cache).__name__}")
        self.cache = cache
        self.hits = 0
        self.misses = 0

    def embed(self, segmenter: nn.Module, images: torch.Tensor, digests: list[str]) -> torch.Tensor:
        """Return the B×E×h×w embeddings of ``images`` (B×3×S×S) on their device.

        ``digests`` lists each image's ``image_digest`` (the dataset's ``image_sha256``).
        Missing embeddings are encoded together without gradients, each distinct image once.
        """
        if len(digests) != images.shape[0]:
            raise ValueError(f"got {len(digests)} image digests for a batch of {images.shape[0]} images")
        precision = autocast_precision(images.device)
        keys = [
            embedding_key_from_digest(digest, segmenter, intensity=SCALED_INTENSITY, precision=precision)
            for digest in digests
        ]
        rows = [self.cache.get(key) for key in keys]
        first_missing: dict[str, int] = {}
        for b, row in enumerate(rows):
            if row is None:
                first_missing.setdefault(digests[b], b)
        if first_missing:
            encoded = self._encode(segmenter, images, list(first_missing.values()))
            for (digest, b), embedding in zip(first_missing.items(), encoded):
                self.cache.put(keys[b], embedding)
                for other, candidate in enumerate(digests):
                    if candidate == digest:
                        rows[other] = embedding
        self.misses += len(first_missing)
        self.hits += len(digests) - len(first_missing)
        return torch.cat([row.to(images.device) for row in rows])

    @staticmethod
    def _encode(segmenter: nn.Module, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Encode ``images[indices]`` in one call; returns one 1×E×h×w embedding per index."""
        with torch.no_grad():
            embeddings = segmenter.encode(images[indices])
        return [embeddings[j : j + 1] for j in range(len(indices))]

    def take_counts(self) -> tuple[int, int]:
        """Return (hits, misses) since the last call, and start counting from zero."""
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts
