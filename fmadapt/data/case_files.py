"""Find the files of each case in a dataset folder, for the layouts that datasets.py reads."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmadapt.data.io import PHOTO_SUFFIXES
from fmadapt.errors import DataError


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: case identifier (the file name without channel suffix and file ending).
        images: one path per channel, in channel order.
        label: the label map file, or None for unlabelled cases and for cases whose labels
            come as per-structure masks.
        structure_masks: (structure name, path) pairs of binary masks that `load_case`
            merges into one label map; empty unless the dataset lists "masks" per case.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    structure_masks: tuple[tuple[str, Path], ...] = ()

    @property
    def has_label(self) -> bool:
        """True when the case has a label map or per-structure masks."""
        return self.label is not None or bool(self.structure_masks)


def list_nnunet_cases(
    images_dir: Path, labels_dir: Path | None, channel_names: tuple[str, ...], file_ending: str
) -> list[CaseFiles]:
    """List nnU-Net cases from `CASE_XXXX<file_ending>` channel files, sorted by case id.

    `labels_dir` None lists unlabelled cases (imagesTs). Files with another ending and
    hidden files are skipped.

    Raises:
        DataError: a file without the channel suffix, a missing channel or label file, or
            a label file without image files.
    """
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(file_ending)}$")
    channels_by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(file_ending):
            continue
        match = pattern.match(path.name)
        if match is None:
            raise DataError(
                f"image file {str(path)!r} lacks the _XXXX channel suffix before {file_ending!r}"
            )
        channel = int(match["channel"])
        if channel >= len(channel_names):
            raise DataError(
                f"image file {str(path)!r} has channel {channel}, but dataset.json lists "
                f"{len(channel_names)} channels"
            )
        channels_by_case.setdefault(match["case"], {})[channel] = path
    cases = [
        _nnunet_case(case_id, found, images_dir, labels_dir, len(channel_names), file_ending)
        for case_id, found in sorted(channels_by_case.items())
    ]
    if labels_dir is not None:
        _check_unmatched_labels(labels_dir, set(channels_by_case), file_ending)
    return cases


def _nnunet_case(
    case_id: str,
    found: dict[int, Path],
    images_dir: Path,
    labels_dir: Path | None,
    num_channels: int,
    file_ending: str,
) -> CaseFiles:
    for channel in range(num_channels):
        if channel not in found:
            missing = images_dir / f"{case_id}_{channel:04d}{file_ending}"
            raise DataError(f"case {case_id!r} is missing channel file {str(missing)!r}")
    label = None
    if labels_dir is not None:
        label = labels_dir / f"{case_id}{file_ending}"
        if not label.is_file():
            raise DataError(f"case {case_id!r} is missing its label file {str(label)!r}")
    return CaseFiles(
        case_id=case_id, images=tuple(found[c] for c in range(num_channels)), label=label
    )


def _check_unmatched_labels(labels_dir: Path, case_ids: set[str], file_ending: str) -> None:
    if not labels_dir.is_dir():
        raise DataError(f"label folder {str(labels_dir)!r} not found")
    for path in sorted(labels_dir.iterdir()):
        if path.name.endswith(file_ending) and path.name[: -len(file_ending)] not in case_ids:
            raise DataError(
                f"label file {str(path)!r} has no image files in "
                f"{str(labels_dir.parent / 'imagesTr')!r}"
            )


def list_2d_cases(
    root: Path, listed: Any, labels: dict[str, int], json_path: Path
) -> list[CaseFiles]:
    """List the cases of dataset.json's `cases` entry, with paths relative to `root`.

    Raises:
        DataError: a malformed entry, a missing file, or a structure name not in `labels`.
    """
    if not isinstance(listed, dict):
        raise DataError(f"'cases' in {str(json_path)!r} must map case ids to file entries")
    cases = []
    for case_id, entry in sorted(listed.items()):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(
                f"case {case_id!r} in {str(json_path)!r} needs an 'image' entry, got {entry!r}"
            )
        image = _listed_file(root, entry["image"], case_id)
        label = _listed_file(root, entry["mask"], case_id) if entry.get("mask") else None
        structures = tuple(
            _structure_mask(root, item, case_id, labels) for item in entry.get("masks", [])
        )
        cases.append(
            CaseFiles(case_id=case_id, images=(image,), label=label, structure_masks=structures)
        )
    return cases


def _structure_mask(
    root: Path, item: Any, case_id: str, labels: dict[str, int]
) -> tuple[str, Path]:
    if not isinstance(item, dict) or "mask" not in item or "structure" not in item:
        raise DataError(
            f"case {case_id!r}: each 'masks' entry needs 'mask' and 'structure', got {item!r}"
        )
    name = item["structure"]
    if name not in labels:
        close = difflib.get_close_matches(str(name), list(labels), n=3)
        raise DataError(
            f"case {case_id!r} uses structure {name!r}, which 'labels' does not list; "
            f"close names: {close}"
        )
    return name, _listed_file(root, item["mask"], case_id)


def _listed_file(root: Path, relative: Any, case_id: str) -> Path:
    path = root / str(relative)
    if not path.is_file():
        raise DataError(f"case {case_id!r}: file {str(path)!r} not found")
    return path


def pair_2d_cases(root: Path) -> list[CaseFiles]:
    """Pair each `images/NAME.ext` with the one `masks/NAME.*`, sorted by NAME.

    Raises:
        DataError: masks/ missing, an image with no mask or several, or a mask with no image.
    """
    images_dir, masks_dir = root / "images", root / "masks"
    if not masks_dir.is_dir():
        raise DataError(f"dataset folder {str(root)!r} has images/ but no masks/ folder")
    masks_by_stem: dict[str, list[Path]] = {}
    for path in sorted(masks_dir.iterdir()):
        if path.suffix.lower() in PHOTO_SUFFIXES:
            masks_by_stem.setdefault(path.stem, []).append(path)
    cases = []
    for image in sorted(images_dir.iterdir()):
        if image.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        masks = masks_by_stem.pop(image.stem, [])
        if len(masks) != 1:
            raise DataError(
                f"image {str(image)!r} needs exactly one mask named {image.stem}.* in "
                f"{str(masks_dir)!r}, found {[str(mask) for mask in masks]}"
            )
        cases.append(CaseFiles(case_id=image.stem, images=(image,), label=masks[0]))
    if masks_by_stem:
        extra = [str(paths[0]) for paths in masks_by_stem.values()]
        raise DataError(f"masks without images in {str(images_dir)!r}: {extra}")
    return cases
