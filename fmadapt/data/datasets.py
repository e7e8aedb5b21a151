"""List the cases of a dataset folder and load one case's image and label map.

Two folder layouts are read, both described by a `dataset.json` at the root:

- "nnunet" (nnU-Net v2 raw layout): `imagesTr/CASE_XXXX<file_ending>` with one file per
  channel (XXXX is the 4-digit channel index from `channel_names`), `labelsTr/CASE<file_ending>`
  and optional unlabelled `imagesTs/`. `labels` maps names to ids with background 0.
- "2d": photo-format images listed under `cases` as `{id: {"image": rel, "mask": rel}}` or
  `{id: {"image": rel, "masks": [{"mask": rel, "structure": name}, ...]}}` (one binary mask
  per structure, merged into one label map), or, without `cases`, `images/NAME.ext` paired
  with `masks/NAME.*`. `labels` is a name-to-id dict, or a list of foreground names that
  get ids 1..n in list order.
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fmadapt.data.case_files import CaseFiles, list_2d_cases, list_nnunet_cases, pair_2d_cases
from fmadapt.data.io import Volume, image_format, read_image, read_mask
from fmadapt.errors import DataError, FmadaptWarning

logger = logging.getLogger(__name__)

# Lossy JPEG cannot store exact label ids, so JPEG masks are binarised at this value unless
# dataset.json sets "mask_threshold" (Kvasir-SEG masks, for example, need "> 127").
JPEG_MASK_THRESHOLD = 127
_JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class DatasetInfo:
    """A dataset folder as described by its dataset.json.

    Attributes:
        root: the dataset folder.
        layout: "nnunet" or "2d" (see the module docstring).
        name: dataset name from dataset.json, else the folder name.
        labels: label name to id, background 0 included, in dataset.json order.
        channel_names: one name per image channel, in channel order.
        file_ending: image file ending, such as ".nii.gz" or ".png".
        mask_threshold: photo-format mask pixels with value > mask_threshold are foreground,
            or None when mask values are label ids. Only used by the "2d" layout, where it
            comes from dataset.json's "mask_threshold", else is JPEG_MASK_THRESHOLD for JPEG
            masks, else None.
        cases: cases of imagesTr or of the 2d listing, sorted by case_id.
        test_cases: unlabelled cases from imagesTs (nnU-Net layout only).
    """

    root: Path
    layout: Literal["nnunet", "2d"]
    name: str
    labels: dict[str, int]
    channel_names: tuple[str, ...]
    file_ending: str
    mask_threshold: int | None
    cases: list[CaseFiles]
    test_cases: list[CaseFiles] = field(default_factory=list)


def read_dataset(root: str | Path) -> DatasetInfo:
    """Read `root/dataset.json` and list the dataset's cases.

    Raises:
        DataError: dataset.json missing or invalid, or case files missing or unmatched.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} not found")
    description = _read_json(root / "dataset.json")
    if (root / "imagesTr").is_dir():
        return _read_nnunet(root, description)
    if "cases" in description or (root / "images").is_dir():
        return _read_2d(root, description)
    raise DataError(
        f"dataset folder {str(root)!r} has neither imagesTr/ (nnU-Net layout) nor images/ or "
        "a 'cases' entry in dataset.json (2d layout)"
    )


def resolve_labels(info: DatasetInfo, requested: Sequence[str | int]) -> dict[str, int]:
    """Return the requested foreground labels as name -> id, in the requested order.

    Args:
        info: the dataset whose labels are searched.
        requested: label names or ids, such as ["liver", 1].

    Raises:
        TypeError: `requested` is a single string or contains other types.
        ValueError: unknown name or id (close names are suggested), background, or duplicates.
    """
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence):
        raise TypeError(f"requested must be a list of label names or ids, got {requested!r}")
    if len(requested) == 0:
        raise ValueError(f"requested is empty; choose from {_foreground_names(info)}")
    names_by_id = {label_id: name for name, label_id in info.labels.items()}
    resolved: dict[str, int] = {}
    for item in requested:
        name = _resolve_one_label(info, names_by_id, item)
        if name in resolved:
            raise ValueError(f"label {item!r} is requested twice in {list(requested)}")
        resolved[name] = info.labels[name]
    return resolved


def load_case(info: DatasetInfo, case: CaseFiles) -> tuple[Volume, Volume | None]:
    """Load one case's image and integer label map.

    Returns:
        (image, label). Multi-channel nnU-Net images have their channels stacked last
        (X×Y×Z×C); single-channel images keep the file's shape, so RGB photos stay H×W×3.
        The label map has the image's spatial shape, or is None for unlabelled cases.

    Raises:
        DataError: channel files that disagree in shape, a label map of another shape,
            or label values that dataset.json does not list.
    """
    image = _load_image(case)
    if case.structure_masks:
        label = _merge_structure_masks(info, case, image)
    elif case.label is not None:
        label = _load_label_file(info, case.label)
    else:
        return image, None
    _check_label(info, case, image, label)
    return image, label


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"dataset description {str(path)!r} not found; add a dataset.json")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"failed to read {str(path)!r}: {err}") from err
    if not isinstance(description, dict):
        raise DataError(
            f"{str(path)!r} must contain a JSON object, got {type(description).__name__}"
        )
    return description


def _label_dict(description: dict[str, Any], path: Path) -> dict[str, int]:
    labels = description.get("labels")
    if isinstance(labels, list):
        if not all(isinstance(name, str) for name in labels) or len(set(labels)) != len(labels):
            raise DataError(
                f"'labels' in {str(path)!r} must be a list of distinct names, got {labels}"
            )
        if "background" in labels:
            raise DataError(
                f"'labels' in {str(path)!r} is a list, which names foreground only (ids 1..n); "
                "remove 'background' from it"
            )
        return {"background": 0, **{name: index + 1 for index, name in enumerate(labels)}}
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{str(path)!r} needs 'labels' as a name -> id object, got {labels!r}")
    regions = [name for name, value in labels.items() if isinstance(value, (list, tuple))]
    if regions:
        raise DataError(
            f"{str(path)!r} defines region-based labels {regions} (lists of ids); fmadapt "
            "does not train on overlapping regions yet, so give each label a single id"
        )
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in labels.values()):
        raise DataError(f"label ids in {str(path)!r} must be integers, got {labels}")
    if sorted(labels.values()) != sorted(set(labels.values())):
        raise DataError(f"label ids in {str(path)!r} must be distinct, got {labels}")
    if 0 not in labels.values():
        raise DataError(
            f"'labels' in {str(path)!r} must contain background with id 0, got {labels}"
        )
    return dict(labels)


def _read_nnunet(root: Path, description: dict[str, Any]) -> DatasetInfo:
    json_path = root / "dataset.json"
    channel_names = _channel_names(description, json_path)
    file_ending = description.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DataError(
            f"{str(json_path)!r} needs 'file_ending' such as '.nii.gz', got {file_ending!r}"
        )
    cases = list_nnunet_cases(root / "imagesTr", root / "labelsTr", channel_names, file_ending)
    test_cases = []
    if (root / "imagesTs").is_dir():
        test_cases = list_nnunet_cases(root / "imagesTs", None, channel_names, file_ending)
    expected = description.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        warnings.warn(
            f"{str(json_path)!r} says numTraining={expected} but imagesTr has {len(cases)} cases",
            FmadaptWarning,
            stacklevel=3,
        )
    return DatasetInfo(
        root=root,
        layout="nnunet",
        name=str(description.get("name", root.name)),
        labels=_label_dict(description, json_path),
        channel_names=channel_names,
        file_ending=file_ending,
        mask_threshold=None,
        cases=cases,
        test_cases=test_cases,
    )


def _channel_names(description: dict[str, Any], path: Path) -> tuple[str, ...]:
    channels = description.get("channel_names", description.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DataError(
            f'{str(path)!r} needs \'channel_names\' such as {{"0": "CT"}}, got {channels!r}'
        )
    try:
        indices = sorted(int(key) for key in channels)
    except ValueError as err:
        raise DataError(
            f"'channel_names' keys in {str(path)!r} must be 0, 1, ..., got {list(channels)}"
        ) from err
    if indices != list(range(len(indices))):
        raise DataError(
            f"'channel_names' keys in {str(path)!r} must be 0..{len(indices) - 1}, "
            f"got {list(channels)}"
        )
    return tuple(str(channels[str(index)]) for index in indices)


def _read_2d(root: Path, description: dict[str, Any]) -> DatasetInfo:
    json_path = root / "dataset.json"
    labels = _label_dict(description, json_path)
    if "cases" in description:
        cases = list_2d_cases(root, description["cases"], labels, json_path)
    else:
        cases = pair_2d_cases(root)
    if not cases:
        raise DataError(f"dataset folder {str(root)!r} has no cases")
    file_ending = description.get("file_ending") or cases[0].images[0].suffix.lower()
    return DatasetInfo(
        root=root,
        layout="2d",
        name=str(description.get("name", root.name)),
        labels=labels,
        channel_names=_photo_channel_names(description, cases[0].images[0], json_path),
        file_ending=str(file_ending),
        mask_threshold=_mask_threshold(description, cases, json_path),
        cases=cases,
    )


def _photo_channel_names(
    description: dict[str, Any], first_image: Path, json_path: Path
) -> tuple[str, ...]:
    if isinstance(description.get("channel_names"), dict):
        return _channel_names(description, json_path)
    volume = read_image(first_image)
    if not volume.has_channel_axis:
        return ("gray",)
    return ("R", "G", "B", "A")[: volume.shape[-1]]


def _mask_threshold(
    description: dict[str, Any], cases: list[CaseFiles], json_path: Path
) -> int | None:
    threshold = description.get("mask_threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise DataError(
                f"'mask_threshold' in {str(json_path)!r} must be an integer, got {threshold!r}"
            )
        return threshold
    mask_files = [case.label for case in cases if case.label is not None]
    mask_files += [path for case in cases for _, path in case.structure_masks]
    if mask_files and mask_files[0].suffix.lower() in _JPEG_SUFFIXES:
        logger.info("JPEG masks in %s: binarising at > %d", json_path.parent, JPEG_MASK_THRESHOLD)
        return JPEG_MASK_THRESHOLD
    return None


def _load_label_file(info: DatasetInfo, path: Path) -> Volume:
    if info.layout == "nnunet" or info.mask_threshold is None or image_format(path) == "nifti":
        return read_mask(path)
    label = read_mask(path, threshold=info.mask_threshold)
    foreground_id = _single_foreground_id(info, path)
    label.array = label.array.astype(_label_map_dtype(info)) * foreground_id
    return label


def _single_foreground_id(info: DatasetInfo, path: Path) -> int:
    foreground = [label_id for label_id in info.labels.values() if label_id != 0]
    if len(foreground) != 1:
        raise DataError(
            f"mask {str(path)!r} is binarised by mask_threshold={info.mask_threshold}, which "
            f"only works for one foreground label, but 'labels' lists {info.labels}; store "
            "label ids in the masks and remove mask_threshold"
        )
    return foreground[0]


def _load_image(case: CaseFiles) -> Volume:
    volumes = [read_image(path) for path in case.images]
    if len(volumes) == 1:
        return volumes[0]
    first = volumes[0]
    for path, volume in zip(case.images[1:], volumes[1:], strict=True):
        if volume.shape != first.shape or not np.allclose(volume.affine, first.affine, atol=1e-4):
            raise DataError(
                f"case {case.case_id!r}: channel file {str(path)!r} has shape {volume.shape} "
                f"and affine differing from {str(case.images[0])!r} with shape {first.shape}; "
                "channels must share one grid"
            )
        if volume.has_channel_axis:
            raise DataError(
                f"case {case.case_id!r}: channel file {str(path)!r} has shape {volume.shape} "
                "with its own channel axis; store one grayscale file per channel"
            )
    stacked = np.stack([volume.array for volume in volumes], axis=-1)
    return Volume(array=stacked, affine=first.affine, spacing=first.spacing, path=first.path)


def _merge_structure_masks(info: DatasetInfo, case: CaseFiles, image: Volume) -> Volume:
    merged = np.zeros(image.spatial_shape, dtype=_label_map_dtype(info))
    for name, path in case.structure_masks:
        # Structure masks are binary: nonzero (or above mask_threshold) is the structure.
        threshold = info.mask_threshold if info.mask_threshold is not None else 0
        if image_format(path) == "nifti":
            threshold = None
        mask = read_mask(path, threshold=threshold).array.astype(bool)
        if mask.shape != merged.shape:
            raise DataError(
                f"case {case.case_id!r}: mask {str(path)!r} has shape {mask.shape}, but the "
                f"image has spatial shape {merged.shape}"
            )
        overlap = np.count_nonzero(mask & (merged != 0) & (merged != info.labels[name]))
        if overlap:
            warnings.warn(
                f"case {case.case_id!r}: mask {str(path)!r} overlaps earlier structures in "
                f"{overlap} pixels; those pixels get {name!r}, the later mask in the list",
                FmadaptWarning,
                stacklevel=3,
            )
        merged[mask] = info.labels[name]
    return Volume(array=merged, affine=image.affine, spacing=image.spacing, path=None)


def _label_map_dtype(info: DatasetInfo) -> type:
    return np.uint8 if max(info.labels.values()) <= 255 else np.int32


def _check_label(info: DatasetInfo, case: CaseFiles, image: Volume, label: Volume) -> None:
    if label.spatial_shape != image.spatial_shape or label.has_channel_axis:
        raise DataError(
            f"case {case.case_id!r}: label shape {label.shape} does not match image spatial "
            f"shape {image.spatial_shape}"
        )
    unknown = sorted(set(np.unique(label.array).tolist()) - set(info.labels.values()))
    if unknown:
        raise DataError(
            f"case {case.case_id!r}: label values {unknown[:10]} are not in dataset.json "
            f"'labels' (ids {sorted(info.labels.values())[:10]}...); for 0/255 masks set "
            "'mask_threshold': 127 in dataset.json"
        )


def _foreground_names(info: DatasetInfo) -> list[str]:
    return [name for name, label_id in info.labels.items() if label_id != 0]


def _resolve_one_label(info: DatasetInfo, names_by_id: dict[int, str], item: str | int) -> str:
    if isinstance(item, str):
        if item not in info.labels:
            close = difflib.get_close_matches(item, list(info.labels), n=3)
            hint = (
                f"; did you mean {close}?"
                if close
                else f"; choose from {_foreground_names(info)[:20]}"
            )
            raise ValueError(f"label {item!r} not found in dataset {info.name!r}{hint}")
        name = item
    elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if int(item) not in names_by_id:
            raise ValueError(
                f"label id {item} not found in dataset {info.name!r}; ids are {sorted(names_by_id)}"
            )
        name = names_by_id[int(item)]
    else:
        raise TypeError(f"each requested label must be a name (str) or id (int), got {item!r}")
    if info.labels[name] == 0:
        raise ValueError(f"label {item!r} is the background (id 0); request foreground labels only")
    return name
