"""Manifest of the official SAM / MedSAM checkpoint files and local file verification.

fmadapt never downloads weights. Users place the official files in a folder
(``checkpoints/`` by default), and this module checks a local file against the size
and SHA-256 recorded in the manifest. The manifest ships inside the package as
``fmadapt/models/checkpoint_manifest.json``; ``checkpoints/manifest.json`` in the
repository is an identical copy, and ``checkpoints/README.md`` names the source of
every recorded number.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from fmadapt.errors import CheckpointError, FmadaptWarning

logger = logging.getLogger(__name__)

MANIFEST_RESOURCE = "checkpoint_manifest.json"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB per read keeps memory flat for multi-GB files.

_ENTRY_KEYS = ("model", "file_name", "size_bytes", "sha256", "source", "licence")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManifestEntry:
    """One official checkpoint file that users may place in the checkpoints folder.

    Attributes:
        model: registry name of the model, for example ``"sam_vit_b"``.
        file_name: file name as published, for example ``"sam_vit_b_01ec64.pth"``.
        size_bytes: exact file size in bytes, or None when no published value was found.
        sha256: lowercase hex SHA-256 of the whole file, or None when no published
            value was found. A file checked against an entry without it is reported
            as not verifiable.
        source: https address of the page where users download the file.
        licence: SPDX identifier of the licence the weights are released under.
    """

    model: str
    file_name: str
    size_bytes: int | None
    sha256: str | None
    source: str
    licence: str

    def __post_init__(self) -> None:
        for name in ("model", "file_name", "source", "licence"):
            _check_non_empty_text(name, getattr(self, name))
        if "/" in self.file_name or "\\" in self.file_name:
            raise ValueError(
                f"file_name must be a bare file name, got {self.file_name!r}; "
                "remove the folder part"
            )
        if not self.source.startswith("https://"):
            raise ValueError(f"source must be an https:// address, got {self.source!r}")
        _check_size(self.size_bytes)
        _check_sha256(self.sha256)


class VerifyStatus(str, enum.Enum):
    """Outcome of checking a local file against a manifest entry."""

    VERIFIED = "verified"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    NOT_VERIFIABLE = "not_verifiable"


@dataclass(frozen=True)
class VerifyResult:
    """Result of :func:`verify_checkpoint`.

    Attributes:
        path: the checked file.
        entry: the manifest entry it was checked against.
        status: VERIFIED only when the SHA-256 matched (and the size, where recorded).
        size_bytes: size of the local file in bytes.
        sha256: SHA-256 of the local file, or None when hashing was skipped because
            the size already differed from the recorded one.
        message: one sentence for users that says what was checked and what to do.
    """

    path: Path
    entry: ManifestEntry
    status: VerifyStatus
    size_bytes: int
    sha256: str | None
    message: str

    @property
    def ok(self) -> bool:
        """True only for a file whose SHA-256 matched the manifest."""
        return self.status is VerifyStatus.VERIFIED

    def raise_if_failed(self, *, allow_unverifiable: bool = False) -> None:
        """Raise CheckpointError unless the file was verified.

        A file whose entry has no recorded SHA-256 also raises, unless
        ``allow_unverifiable`` is True.
        """
        if self.ok:
            return
        if self.status is VerifyStatus.NOT_VERIFIABLE and allow_unverifiable:
            return
        raise CheckpointError(self.message)


def read_manifest(path: str | os.PathLike[str] | None = None) -> list[ManifestEntry]:
    """Read and validate a checkpoint manifest.

    Args:
        path: JSON manifest file. None reads the manifest shipped inside the package.

    Returns:
        The entries in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or an entry is malformed; the message
            names the file, the entry index and the key.
    """
    if path is None:
        text = resources.files("fmadapt.models").joinpath(MANIFEST_RESOURCE).read_text("utf-8")
        label = f"packaged {MANIFEST_RESOURCE}"
    else:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str, os.PathLike or None, got {type(path).__name__}")
        manifest_path = Path(path)
        if not manifest_path.is_file():
            raise FileNotFoundError(f"checkpoint manifest {manifest_path} not found")
        text = manifest_path.read_text(encoding="utf-8")
        label = str(manifest_path)
    return _parse_manifest(text, label)


def find_entry(
    model_name_or_file: str, *, entries: Sequence[ManifestEntry] | None = None
) -> ManifestEntry:
    """Return the entry whose model name or file name equals ``model_name_or_file``.

    Args:
        model_name_or_file: a registry name such as ``"sam_vit_b"`` or a published
            file name such as ``"sam_vit_b_01ec64.pth"``.
        entries: entries to search; None searches the packaged manifest.

    Raises:
        ValueError: no entry matches; the message lists the known names and files.
    """
    if not isinstance(model_name_or_file, str):
        raise TypeError(
            f"model_name_or_file must be a str, got {type(model_name_or_file).__name__}"
        )
    if entries is None:
        entries = read_manifest()
    for entry in entries:
        if model_name_or_file in (entry.model, entry.file_name):
            return entry
    raise ValueError(_unknown_checkpoint_message(model_name_or_file, entries))


def default_checkpoint_path(
    model_name: str, folder: str | os.PathLike[str] = "checkpoints"
) -> Path:
    """Return where the official file for ``model_name`` is expected: ``folder / file_name``.

    A relative ``folder`` stays relative, so it resolves against the working
    directory when the file is opened. The path is not checked for existence.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or os.PathLike, got {type(folder).__name__}")
    return Path(folder) / find_entry(model_name).file_name


def verify_checkpoint(
    path: str | os.PathLike[str],
    entry: ManifestEntry,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> VerifyResult:
    """Check a local file's size and SHA-256 against a manifest entry.

    The size is compared first, and a size mismatch returns without hashing the
    file. Otherwise the file is hashed in chunks of ``chunk_size`` bytes. An entry
    without a recorded SHA-256 gives NOT_VERIFIABLE, never VERIFIED.

    Args:
        path: the local checkpoint file.
        entry: the manifest entry to check against, usually from :func:`find_entry`.
        chunk_size: bytes read per step while hashing.

    Raises:
        CheckpointError: the file is missing, is not a regular file or cannot be read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(entry, ManifestEntry):
        raise TypeError(f"entry must be a ManifestEntry, got {type(entry).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of bytes, got {chunk_size}")

    file_path = Path(path)
    _check_regular_file(file_path, entry)
    if file_path.name != entry.file_name:
        warnings.warn(
            f"checking {file_path} against the entry for {entry.file_name}; "
            "make sure this is the intended model",
            FmadaptWarning,
            stacklevel=2,
        )

    size = file_path.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        message = (
            f"{file_path} is {size} bytes but the official {entry.file_name} is "
            f"{entry.size_bytes} bytes; the file is incomplete or a different file, "
            f"download it again from {entry.source}"
        )
        return _finish(file_path, entry, VerifyStatus.SIZE_MISMATCH, size, None, message)

    logger.info("hashing %s (%d bytes) to check it against %s", file_path, size, entry.model)
    try:
        digest = sha256_of_file(file_path, chunk_size=chunk_size)
    except OSError as error:
        raise CheckpointError(f"checkpoint file {file_path} could not be read: {error}") from error
    if entry.sha256 is None:
        message = (
            f"{file_path} is not verifiable: the manifest has no published SHA-256 for "
            f"{entry.file_name} (its SHA-256 is {digest}); compare it with the value "
            f"from {entry.source} before trusting the file"
        )
        return _finish(file_path, entry, VerifyStatus.NOT_VERIFIABLE, size, digest, message)
    if digest != entry.sha256:
        message = (
            f"{file_path} has SHA-256 {digest} but the official {entry.file_name} has "
            f"{entry.sha256}; the file is corrupt or a different file, download it "
            f"again from {entry.source}"
        )
        return _finish(file_path, entry, VerifyStatus.HASH_MISMATCH, size, digest, message)
    message = f"{file_path} matches the official {entry.file_name} (size and SHA-256)"
    return _finish(file_path, entry, VerifyStatus.VERIFIED, size, digest, message)


def sha256_of_file(path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """Return the lowercase hex SHA-256 of a file, read ``chunk_size`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_manifest(text: str, label: str) -> list[ManifestEntry]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint manifest {label} is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"checkpoint manifest {label} must contain a JSON object at the top level")
    version = document.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint manifest {label} has format_version {version!r}; "
            f"this fmadapt reads format_version {MANIFEST_FORMAT_VERSION}"
        )
    raw_entries = document.get("checkpoints")
    if not isinstance(raw_entries, list):
        raise ValueError(f"checkpoint manifest {label} must have a 'checkpoints' list")

    entries = [_parse_entry(raw, index, label) for index, raw in enumerate(raw_entries)]
    _check_unique(entries, "model", label)
    _check_unique(entries, "file_name", label)
    return entries


def _parse_entry(raw: Any, index: int, label: str) -> ManifestEntry:
    where = f"checkpoint manifest {label}, entry {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    missing = [key for key in _ENTRY_KEYS if key not in raw]
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}; every entry needs {list(_ENTRY_KEYS)}")
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed keys are {list(_ENTRY_KEYS)}")
    try:
        return ManifestEntry(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def _check_unique(entries: list[ManifestEntry], field: str, label: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        value = getattr(entry, field)
        if value in seen:
            raise ValueError(f"checkpoint manifest {label} lists {field} {value!r} more than once")
        seen.add(value)


def _check_non_empty_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")


def _check_size(size_bytes: Any) -> None:
    if size_bytes is None:
        return
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise TypeError(f"size_bytes must be an int or None, got {type(size_bytes).__name__}")
    if size_bytes <= 0:
        raise ValueError(f"size_bytes must be a positive number of bytes, got {size_bytes}")


def _check_sha256(sha256: Any) -> None:
    if sha256 is None:
        return
    if not isinstance(sha256, str):
        raise TypeError(f"sha256 must be a str or None, got {type(sha256).__name__}")
    if not _SHA256_PATTERN.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")


def _check_regular_file(file_path: Path, entry: ManifestEntry) -> None:
    if not file_path.exists():
        raise CheckpointError(
            f"checkpoint file {file_path} not found; download {entry.file_name} "
            f"from {entry.source} and place it there"
        )
    if not file_path.is_file():
        raise CheckpointError(f"checkpoint path {file_path} is not a regular file")


def _finish(
    path: Path,
    entry: ManifestEntry,
    status: VerifyStatus,
    size: int,
    digest: str | None,
    message: str,
) -> VerifyResult:
    if status is VerifyStatus.VERIFIED:
        logger.info(message)
    else:
        logger.warning(message)
    return VerifyResult(path, entry, status, size, digest, message)


def _unknown_checkpoint_message(name: str, entries: Sequence[ManifestEntry]) -> str:
    models = [entry.model for entry in entries]
    files = [entry.file_name for entry in entries]
    message = f"unknown checkpoint {name!r}; known models: {models}; known files: {files}"
    close = difflib.get_close_matches(name, models + files, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message
