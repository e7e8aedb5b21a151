"""Volumes, datasets, slices and prompts: the data stage of fmadapt."""

from fmadapt.data.datasets import CaseFiles, DatasetInfo, load_case, read_dataset, resolve_labels
from fmadapt.data.io import Volume, read_image, read_mask, write_segmentation
from fmadapt.data.prompts import (
    box_from_mask,
    boxes_from_label_map,
    jitter_box,
    points_from_mask,
)
from fmadapt.data.slices import (
    SliceRef,
    SliceSplit,
    extract_slice,
    foreground_slices,
    remap_labels,
    split_slices,
)

__all__ = [
    "CaseFiles",
    "DatasetInfo",
    "SliceRef",
    "SliceSplit",
    "Volume",
    "box_from_mask",
    "boxes_from_label_map",
    "extract_slice",
    "foreground_slices",
    "jitter_box",
    "load_case",
    "points_from_mask",
    "read_dataset",
    "read_image",
    "read_mask",
    "remap_labels",
    "resolve_labels",
    "split_slices",
    "write_segmentation",
]
