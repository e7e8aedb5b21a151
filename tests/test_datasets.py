"""Tests for fmadapt.data.datasets on the real data folders and on small folders built here."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fmadapt.data.datasets import load_case, read_dataset, resolve_labels
from fmadapt.data.io import read_mask
from fmadapt.errors import DataError, FmadaptWarning
from tests.conftest import require_dataset

# Ids of the SAM-Med2D structures: position in the dataset.json list plus one.
SAMMED2D_IDS = {"aorta": 1, "inferior_vena_cava": 15, "liver": 16, "spleen": 23}


def _write_json(folder: Path, description: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(description))


def _save_nifti(path: Path, array: np.ndarray, zooms=(1.0, 2.0, 3.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    nib.save(image, str(path))


def _nnunet_folder(root: Path, *, channels=2, cases=("a", "b"), labels=None) -> Path:
    _write_json(
        root,
        {
            "channel_names": {str(index): f"mod{index}" for index in range(channels)},
            "labels": labels or {"background": 0, "tumour": 1, "oedema": 2},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
        },
    )
    for number, case_id in enumerate(cases):
        for channel in range(channels):
            array = np.full((4, 5, 6), 10 * number + channel, dtype=np.int16)
            _save_nifti(root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz", array)
        label = np.zeros((4, 5, 6), dtype=np.uint8)
        label[1, 2, 3] = 2
        _save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label)
    return root


def test_totalseg_ct_lists_two_cases(data_root):
    folder = require_dataset(data_root, "Dataset001_TotalSegCT")

    info = read_dataset(folder)

    assert info.layout == "nnunet"
    assert [case.case_id for case in info.cases] == ["ts_ct_full", "ts_ct_sm"]
    assert info.labels["liver"] == 5
    assert info.labels["background"] == 0
    assert info.channel_names == ("CT",)
    assert info.file_ending == ".nii.gz"
    assert info.cases[1].images == (folder / "imagesTr" / "ts_ct_sm_0000.nii.gz",)
    assert info.cases[1].label == folder / "labelsTr" / "ts_ct_sm.nii.gz"
    assert info.test_cases == []


def test_totalseg_ct_case_loads(data_root):
    info = read_dataset(require_dataset(data_root, "Dataset001_TotalSegCT"))

    image, label = load_case(info, info.cases[1])

    assert image.shape == (122, 101, 30)
    assert image.spacing == (3.0, 3.0, 3.0)
    assert label.shape == (122, 101, 30)
    assert np.issubdtype(label.array.dtype, np.integer)
    assert np.any(label.array == 5)


def test_kvasir_lists_52_cases(data_root):
    info = read_dataset(require_dataset(data_root, "2D_KvasirSEG_polyp"))

    assert info.layout == "2d"
    assert len(info.cases) == 52
    assert info.labels == {"background": 0, "polyp": 1}
    assert info.mask_threshold == 127
    assert info.channel_names == ("R", "G", "B")


def test_kvasir_masks_binary_after_threshold(data_root):
    info = read_dataset(require_dataset(data_root, "2D_KvasirSEG_polyp"))

    for case in info.cases:
        raw = read_mask(case.label).array
        binary = read_mask(case.label, threshold=info.mask_threshold).array
        assert set(np.unique(binary).tolist()) <= {0, 1}, case.case_id
        assert np.array_equal(binary, (raw > 127).astype(np.uint8)), case.case_id

    image, label = load_case(info, info.cases[0])
    assert image.array.ndim == 3
    assert image.shape[2] == 3
    assert label.shape == image.shape[:2]
    assert set(np.unique(label.array).tolist()) == {0, 1}


def test_sammed2d_case_merges_structures(data_root):
    folder = require_dataset(data_root, "2D_SAMMed2D_CTslices")
    info = read_dataset(folder)
    case = next(case for case in info.cases if case.case_id == "amos_0006_90")

    image, label = load_case(info, case)

    for name, label_id in SAMMED2D_IDS.items():
        assert info.labels[name] == label_id
    assert image.shape == (512, 512, 3)
    assert label.shape == (512, 512)
    assert set(np.unique(label.array).tolist()) == {0, *SAMMED2D_IDS.values()}
    for name, label_id in SAMMED2D_IDS.items():
        mask_file = folder / "masks" / f"amos_0006_90_{name}_000.png"
        structure = np.asarray(Image.open(mask_file)) > 0
        assert np.all(label.array[structure] == label_id), name
    union = np.zeros((512, 512), dtype=bool)
    for name in SAMMED2D_IDS:
        union |= np.asarray(Image.open(folder / "masks" / f"amos_0006_90_{name}_000.png")) > 0
    assert np.array_equal(label.array != 0, union)


def test_sammed2d_components_share_one_id(data_root):
    folder = require_dataset(data_root, "2D_SAMMed2D_CTslices")
    info = read_dataset(folder)
    case = next(case for case in info.cases if case.case_id == "s0619_32")

    _, label = load_case(info, case)

    second_component = np.asarray(Image.open(folder / "masks" / "s0619_32_hip_left_001.png")) > 0
    assert second_component.any()
    assert np.all(label.array[second_component] == info.labels["hip_left"])


def test_folder_without_dataset_json_raises(tmp_path):
    (tmp_path / "imagesTr").mkdir()

    with pytest.raises(DataError, match=str(tmp_path / "dataset.json")):
        read_dataset(tmp_path)


def test_nnunet_channels_stacked_last(tmp_path):
    info = read_dataset(_nnunet_folder(tmp_path / "ds"))

    image, label = load_case(info, info.cases[1])

    assert info.channel_names == ("mod0", "mod1")
    assert image.shape == (4, 5, 6, 2)
    assert image.spacing == (1.0, 2.0, 3.0)
    assert np.all(image.array[..., 0] == 10)
    assert np.all(image.array[..., 1] == 11)
    assert label.shape == (4, 5, 6)
    assert label.array[1, 2, 3] == 2


def test_nnunet_test_cases_listed_separately(tmp_path):
    root = _nnunet_folder(tmp_path / "ds")
    for channel in range(2):
        _save_nifti(root / "imagesTs" / f"c_{channel:04d}.nii.gz", np.zeros((4, 5, 6), np.int16))
    info = read_dataset(root)

    image, label = load_case(info, info.test_cases[0])

    assert [case.case_id for case in info.cases] == ["a", "b"]
    assert [case.case_id for case in info.test_cases] == ["c"]
    assert info.test_cases[0].label is None
    assert image.shape == (4, 5, 6, 2)
    assert label is None


def test_nnunet_missing_channel_names_case_and_file(tmp_path):
    root = _nnunet_folder(tmp_path / "ds")
    (root / "imagesTr" / "b_0001.nii.gz").unlink()

    with pytest.raises(DataError, match=r"'b'.*b_0001\.nii\.gz"):
        read_dataset(root)


def test_nnunet_label_without_images_raises(tmp_path):
    root = _nnunet_folder(tmp_path / "ds")
    _save_nifti(root / "labelsTr" / "orphan.nii.gz", np.zeros((4, 5, 6), np.uint8))

    with pytest.raises(DataError, match="orphan.nii.gz"):
        read_dataset(root)


def test_nnunet_missing_label_raises(tmp_path):
    root = _nnunet_folder(tmp_path / "ds")
    (root / "labelsTr" / "a.nii.gz").unlink()

    with pytest.raises(DataError, match=r"'a'.*a\.nii\.gz"):
        read_dataset(root)


def test_region_based_labels_rejected(tmp_path):
    regions = {"background": 0, "whole_tumour": [1, 2, 3], "core": [2, 3]}
    root = _nnunet_folder(tmp_path / "ds", labels=regions)

    with pytest.raises(DataError, match="region-based"):
        read_dataset(root)


def test_label_value_not_in_labels_raises(tmp_path):
    root = _nnunet_folder(tmp_path / "ds", labels={"background": 0, "tumour": 1})
    info = read_dataset(root)

    with pytest.raises(DataError, match=r"\[2\]"):
        load_case(info, info.cases[0])


def test_paired_2d_layout_without_cases(tmp_path):
    root = tmp_path / "photos"
    _write_json(root, {"labels": {"background": 0, "cyst": 1, "wall": 2}})
    (root / "images").mkdir()
    (root / "masks").mkdir()
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[1:3, 2:4] = 1
    mask[4, 5] = 2
    for name in ("one", "two"):
        Image.new("L", (7, 6), color=50).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")

    info = read_dataset(root)
    image, label = load_case(info, info.cases[0])

    assert info.layout == "2d"
    assert [case.case_id for case in info.cases] == ["one", "two"]
    assert info.mask_threshold is None
    assert info.channel_names == ("gray",)
    assert image.shape == (6, 7)
    assert np.array_equal(label.array, mask)


def test_paired_2d_image_without_mask_raises(tmp_path):
    root = tmp_path / "photos"
    _write_json(root, {"labels": {"background": 0, "cyst": 1}})
    (root / "images").mkdir()
    (root / "masks").mkdir()
    Image.new("L", (7, 6)).save(root / "images" / "lonely.png")

    with pytest.raises(DataError, match="lonely"):
        read_dataset(root)


def test_binary_png_masks_need_threshold(tmp_path):
    root = tmp_path / "photos"
    _write_json(root, {"labels": {"background": 0, "cyst": 1}})
    (root / "images").mkdir()
    (root / "masks").mkdir()
    Image.new("L", (7, 6)).save(root / "images" / "x.png")
    Image.new("L", (7, 6), color=255).save(root / "masks" / "x.png")
    info = read_dataset(root)

    with pytest.raises(DataError, match="mask_threshold"):
        load_case(info, info.cases[0])

    _write_json(root, {"labels": {"background": 0, "cyst": 1}, "mask_threshold": 127})
    _, label = load_case(read_dataset(root), info.cases[0])
    assert np.all(label.array == 1)


def test_resolve_labels_by_name_and_id(data_root):
    info = read_dataset(require_dataset(data_root, "Dataset001_TotalSegCT"))

    resolved = resolve_labels(info, ["liver", 1])

    assert resolved == {"liver": 5, "spleen": 1}
    assert list(resolved) == ["liver", "spleen"]


def test_resolve_labels_suggests_close_names(data_root):
    info = read_dataset(require_dataset(data_root, "Dataset001_TotalSegCT"))

    with pytest.raises(ValueError, match="liver"):
        resolve_labels(info, ["livr"])


def test_resolve_labels_rejects_background_and_strings(data_root):
    info = read_dataset(require_dataset(data_root, "Dataset001_TotalSegCT"))

    with pytest.raises(ValueError, match="background"):
        resolve_labels(info, ["background"])
    with pytest.raises(ValueError, match="background"):
        resolve_labels(info, [0])
    with pytest.raises(TypeError, match="list"):
        resolve_labels(info, "liver")
    with pytest.raises(ValueError, match="twice"):
        resolve_labels(info, ["liver", 5])


def test_overlapping_structure_masks_warn(tmp_path):
    root = tmp_path / "structures"
    _write_json(
        root,
        {
            "labels": ["kidney", "cyst"],
            "cases": {
                "s1": {
                    "image": "images/s1.png",
                    "masks": [
                        {"mask": "masks/s1_kidney.png", "structure": "kidney"},
                        {"mask": "masks/s1_cyst.png", "structure": "cyst"},
                    ],
                }
            },
        },
    )
    (root / "images").mkdir()
    (root / "masks").mkdir()
    Image.new("RGB", (6, 5)).save(root / "images" / "s1.png")
    kidney = np.zeros((5, 6), dtype=np.uint8)
    kidney[1:4, 1:5] = 255
    cyst = np.zeros((5, 6), dtype=np.uint8)
    cyst[2, 2:4] = 255
    Image.fromarray(kidney).save(root / "masks" / "s1_kidney.png")
    Image.fromarray(cyst).save(root / "masks" / "s1_cyst.png")
    info = read_dataset(root)

    with pytest.warns(FmadaptWarning, match="2 pixels"):
        _, label = load_case(info, info.cases[0])

    assert info.labels == {"background": 0, "kidney": 1, "cyst": 2}
    assert int(np.count_nonzero(label.array == 1)) == 12 - 2
    assert label.array[2, 2] == 2
    assert label.array[2, 3] == 2
