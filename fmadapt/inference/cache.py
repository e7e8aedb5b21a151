"""On-disk cache of image embeddings, so repeated evaluation and decoder-only training skip the encoder.

Each entry is one safetensors file, opened memory-mapped, named by the SHA-256 of its
``CacheKey``. The key covers everything the embedding depends on: the image content,
the model name and input size S, the base weights (``checkpoint_id``), the trained
encoder parameters, the preprocessing, the intensity mapping and the precision. Change
any of them and the key changes, so a stale embedding is never returned. The key fields
are also stored in the file's metadata and compared on every read.

Parameters of the prompt encoder and mask decoder are not part of the key because
they do not change the embedding, so decoder-only training keeps hitting the cache.

Readers: ``Predictor(cache=...)``, ``fmadapt.inference.label_maps.embed_image(cache=...)``
(evaluation with ``evaluate.cache_dir`` or ``fmadapt evaluate --cache``, and validation
during training) and decoder-only training with ``train.cache_dir``
(:mod:`fmadapt.train.embedding_cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import weakref
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fmadapt.config import expand_path
from fmadapt.data.intensity import IntensitySpec
from fmadapt.errors import RecipeError
from fmadapt.runs import base_fingerprint

__all__ = [
    "CACHE_FORMAT",
    "CacheKey",
    "ENCODER_PRECISIONS",
    "EmbeddingCache",
    "embedding_key",
    "embedding_key_from_digest",
    "image_digest",
    "open_embedding_cache",
    "trainable_encoder_parameters",
    "trained_encoder_fingerprint",
]

logger = logging.getLogger(__name__)

# Part of every key; raise it when the stored layout or the meaning of a field changes.
CACHE_FORMAT = "fmadapt-embedding-1"
# Parameter names under these prefixes change the embedding that Segmenter.encode returns.
_ENCODING_PREFIXES = ("image_encoder.", "neck.")
_TENSOR_NAME = "embedding"
# Precisions an encoder can run in, as named in keys.
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")

# Fingerprints per model, reused while no parameter has been modified in place. The
# version counters of the parameters tell when an optimizer step or load changed them.
_TRAINED_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BASE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CacheKey:
    """Everything an image embedding depends on, as strings and ints.

    Attributes:
        image_sha256: ``image_digest`` of the raw image (before the intensity mapping).
        model_name: registered model name.
        image_size: model input side S in pixels.
        checkpoint_id: identity of the base weights: a checkpoint file hash or
            ``fmadapt.runs.base_fingerprint`` of the model.
        trained_id: ``trained_encoder_fingerprint`` of the model.
        preprocess: repr of the model's ``PreprocessSpec``.
        intensity: repr of the ``IntensitySpec`` applied before preprocessing.
        precision: "fp32", "bf16" or "fp16", the precision the encoder ran in.
        cache_format: ``CACHE_FORMAT`` when the entry was written.
    """

    image_sha256: str
    model_name: str
    image_size: int
    checkpoint_id: str
    trained_id: str
    preprocess: str
    intensity: str
    precision: str
    cache_format: str = CACHE_FORMAT

    def metadata(self) -> dict[str, str]:
        """Return the fields as a str-to-str mapping, the form safetensors metadata takes."""
        return {name: str(value) for name, value in asdict(self).items()}

    def digest(self) -> str:
        """Return the SHA-256 hex digest of all fields; the entry's file name."""
        text = "\n".join(f"{name}={value}" for name, value in sorted(self.metadata().items()))
        return hashlib.sha256(text.encode()).hexdigest()


def image_digest(image: np.ndarray) -> str:
    """Return the SHA-256 of an image's dtype, shape and C-order bytes.

    Two arrays with equal values but a different dtype or shape get different digests,
    because they are prepared differently.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    digest = hashlib.sha256()
    digest.update(f"{image.dtype.str}|{image.shape}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def trained_encoder_fingerprint(model: torch.nn.Module) -> str:
    """Return the SHA-256 of the exact values of the trainable parameters that feed the embedding.

    Covers parameters with ``requires_grad`` under ``image_encoder.`` and ``neck.``
    (LoRA and adapter weights included, because they are registered there). Frozen
    parameters are covered by ``checkpoint_id`` instead. The result is reused until a
    parameter is modified in place (which bumps its version counter) or changes dtype.
    """
    parameters = [
        (name, parameter)
        for name, parameter in sorted(model.named_parameters())
        if parameter.requires_grad and name.startswith(_ENCODING_PREFIXES)
    ]
    versions = tuple((name, id(parameter), parameter._version, parameter.dtype) for name, parameter in parameters)
    cached = _TRAINED_IDS.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]

    digest = hashlib.sha256()
    for name, parameter in parameters:
        values = parameter.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}|".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    result = digest.hexdigest()
    _TRAINED_IDS[model] = (versions, result)
    return result


def trainable_encoder_parameters(model: torch.nn.Module) -> list[str]:
    """Return the names of the parameters with ``requires_grad`` that change the embedding.

    An empty list means the encoder is frozen, so its embedding of an image stays the same
    while the prompt encoder and mask decoder train.
    """
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and name.startswith(_ENCODING_PREFIXES)
    ]


def _base_id(model: torch.nn.Module) -> str:
    """Return ``base_fingerprint(model)``, reused while no frozen parameter changed or was (un)frozen."""
    # Trainable parameters are left out of the fingerprint, so their version counters are left
    # out too. Otherwise every optimizer step of decoder-only training would recompute it.
    versions = tuple(
        (name, id(parameter), None if parameter.requires_grad else parameter._version, parameter.dtype)
        for name, parameter in sorted(model.named_parameters())
    )
    cached = _BASE_IDS.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    result = base_fingerprint(model)
    _BASE_IDS[model] = (versions, result)
    return result


def embedding_key(
    image: np.ndarray,
    model: torch.nn.Module,
    *,
    intensity: IntensitySpec,
    precision: str,
    checkpoint_id: str | None = None,
) -> CacheKey:
    """Build the cache key of ``model``'s embedding of ``image``.

    Args:
        image: the raw image as given to ``Predictor.set_image``.
        model: a Segmenter.
        intensity: the mapping to 0–255 applied before the model transform.
        precision: the precision the encoder runs in: "fp32", "bf16" or "fp16".
        checkpoint_id: identity of the base weights, such as the SHA-256 of the
            checkpoint file; default ``fmadapt.runs.base_fingerprint(model)``.
    """
    return embedding_key_from_digest(
        image_digest(image), model, intensity=intensity, precision=precision, checkpoint_id=checkpoint_id
    )


def embedding_key_from_digest(
    image_sha256: str,
    model: torch.nn.Module,
    *,
    intensity: IntensitySpec,
    precision: str,
    checkpoint_id: str | None = None,
) -> CacheKey:
    """Build the cache key of ``model``'s embedding of the image whose ``image_digest`` is ``image_sha256``.

    For callers that hash each image once and look it up many times, such as training on
    a fixed set of slices. The other arguments are those of ``embedding_key``.
    """
    if not isinstance(image_sha256, str) or len(image_sha256) != 64:
        raise ValueError(f"image_sha256 must be the 64-character hex digest from image_digest, got {image_sha256!r}")
    if not isinstance(intensity, IntensitySpec):
        raise TypeError(f"intensity must be an IntensitySpec, got {type(intensity).__name__}")
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"precision must be one of {list(ENCODER_PRECISIONS)}, got {precision!r}")
    if checkpoint_id is not None and (not isinstance(checkpoint_id, str) or not checkpoint_id):
        raise ValueError(f"checkpoint_id must be a non-empty str or None, got {checkpoint_id!r}")
    return CacheKey(
        image_sha256=image_sha256,
        model_name=model.spec.name,
        image_size=int(model.image_size),
        checkpoint_id=checkpoint_id or _base_id(model),
        trained_id=trained_encoder_fingerprint(model),
        preprocess=repr(model.transform.spec),
        intensity=repr(intensity),
        precision=precision,
    )


class EmbeddingCache:
    """Folder of cached embeddings, one memory-mapped safetensors file per ``CacheKey``.

    Writes are atomic (temporary file in the same folder, then ``os.replace``), so
    several processes may share a folder. A file that cannot be read, or that was
    written for another key, is recomputed and replaced. ``hits`` and ``misses`` count
    lookups since construction.

    Args:
        folder: where the ``<digest>.safetensors`` files go; created if missing.
    """

    def __init__(self, folder: str | PathLike[str]) -> None:
        if not isinstance(folder, (str, PathLike)):
            raise TypeError(f"folder must be a str or path, got {type(folder).__name__}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"cache folder {self.folder} exists and is not a folder; choose another path")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r}, hits={self.hits}, misses={self.misses})"

    def path_for(self, key: CacheKey) -> Path:
        """Return the file that stores ``key``'s embedding (it may not exist yet)."""
        return self.folder / f"{key.digest()}.safetensors"

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """Return the stored embedding for ``key`` on the CPU, or None when there is none."""
        _check_key(key)
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as stored:
                if stored.metadata() != key.metadata():
                    logger.warning("cache file %s was written for another key; recomputing it", path)
                    return None
                return stored.get_tensor(_TENSOR_NAME)
        except (SafetensorError, OSError, KeyError) as error:
            logger.warning("cache file %s cannot be read (%s); recomputing it", path, error)
            return None

    def put(self, key: CacheKey, embedding: torch.Tensor) -> Path:
        """Store ``embedding`` (any shape, moved to the CPU) under ``key``; returns the file."""
        _check_key(key)
        if not isinstance(embedding, torch.Tensor):
            raise TypeError(f"embedding must be a torch.Tensor, got {type(embedding).__name__}")
        path = self.path_for(key)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(handle)
        try:
            tensor = embedding.detach().to("cpu").contiguous().clone()
            save_file({_TENSOR_NAME: tensor}, temporary, metadata=key.metadata())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(self, key: CacheKey, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Return the stored embedding for ``key``, or run ``compute()``, store and return its result.

        A stored embedding comes back on the CPU; a computed one is returned as
        ``compute`` made it (same device).
        """
        if not callable(compute):
            raise TypeError(f"compute must be a callable returning a tensor, got {type(compute).__name__}")
        stored = self.get(key)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        embedding = compute()
        self.put(key, embedding)
        return embedding

    def clear(self) -> int:
        """Delete every cached embedding file in the folder; returns how many were deleted."""
        removed = 0
        for path in self.folder.glob("*.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed


def open_embedding_cache(folder: str | None, recipe_key: str) -> EmbeddingCache | None:
    """Open the cache folder that a recipe key names, after expanding ``$VARIABLES``.

    Returns None when ``folder`` is None, which turns caching off.

    Raises:
        RecipeError: ``folder`` is empty or names an unset environment variable; the
            message names ``recipe_key``.
    """
    if folder is None:
        return None
    if not isinstance(folder, str) or not folder.strip():
        raise RecipeError(f"recipe key '{recipe_key}' is {folder!r}; set it to a folder path, or null to turn caching off")
    return EmbeddingCache(expand_path(folder, recipe_key))


def _check_key(key: object) -> None:
    if not isinstance(key, CacheKey):
        raise TypeError(f"key must be a CacheKey (see embedding_key), got {type(key).__name__}")
