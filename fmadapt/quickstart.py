"""Quickstart on real data every install can reach: white matter on the MNI152 T1 template.

nilearn ships the ICBM 2009 (MNI152) T1 template with tissue probability maps. The
quickstart writes the 2 mm template and its white-matter map (probability > 0.5) as a
one-case dataset in nnU-Net v2 layout, fine-tunes a small SAM-architecture model from
random weights on a few axial slices, and evaluates it with box prompts and without
prompts on a held-out block of slices.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from fmadapt.config import recipe_from_dict, apply_overrides

logger = logging.getLogger(__name__)

CASE_ID = "mni152_t1"
WHITE_MATTER_THRESHOLD = 0.5


def quickstart_recipe(data_root: Path) -> dict:
    """Return the quickstart recipe as nested dicts: small model, 128 px input, 6 training slices."""
    return {
        "name": "quickstart_mni152_white_matter",
        "seed": 0,
        "data": {
            "root": str(data_root),
            "labels": ["white_matter"],
            "axis": 2,
            "min_foreground_pixels": 50,
            "intensity": {"mode": "percentile"},
            "split": {
                "mode": "slices",
                "case": CASE_ID,
                "train": 6,
                "slice_fractions": [0.45, 0.1, 0.45],
            },
        },
        "model": {"name": "sam_vit_tiny", "image_size": 128, "checkpoint": None},
        "adaptation": {"method": "lora", "preset": "full", "lora": {"rank": 4, "alpha": 8}},
        "train": {
            "epochs": 6,
            "steps_per_epoch": 15,
            "batch_size": 2,
            "learning_rate": 5e-4,
            "box_jitter": 3.0,
            "max_validation_slices": 8,
        },
        "evaluate": {"nsd_tolerance_mm": 2.0, "box_jitter": [0.0, 3.0]},
    }


def write_template_dataset(folder: Path) -> Path:
    """Write nilearn's MNI152 T1 (2 mm) and its white-matter mask as an nnU-Net v2 dataset."""
    try:
        from nilearn import datasets
    except ImportError as error:
        raise ImportError(
            "the quickstart needs nilearn, which ships the MNI152 template; install it with "
            "`pip install 'fmadapt[quickstart]'` or `pip install nilearn`"
        ) from error
    template = datasets.load_mni152_template(resolution=2)
    white_matter = datasets.load_mni152_wm_template(resolution=2)
    image = np.asarray(template.dataobj).astype(np.float32)
    mask = (np.asarray(white_matter.dataobj) > WHITE_MATTER_THRESHOLD).astype(np.uint8)

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, template.affine), folder / "imagesTr" / f"{CASE_ID}_0000.nii.gz")
    nib.save(nib.Nifti1Image(mask, template.affine), folder / "labelsTr" / f"{CASE_ID}.nii.gz")
    description = {
        "name": "MNI152_white_matter",
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "white_matter": 1},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "description": "nilearn's ICBM 2009c MNI152 T1 template (2 mm) with its white-matter probability map > 0.5",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2))
    return folder


def run_quickstart(output: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Write the dataset, train, evaluate both modes, log where the results are; return their summaries."""
    from fmadapt.evaluate.runner import evaluate_run
    from fmadapt.train.loop import train

    output = Path(output)
    data_root = output / "data" / "MNI152_white_matter"
    # The recipe and the run folder are checked before the dataset is written, so a bad
    # override or an existing run leaves nothing behind.
    recipe = recipe_from_dict(apply_overrides(quickstart_recipe(data_root), overrides or []))
    run_dir = output / "run"
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} already exists; pass --output with a new folder or delete it")
    write_template_dataset(data_root)
    train(recipe, run_dir)
    results = {}
    for mode in ("prompted", "automatic"):
        for result in evaluate_run(run_dir, mode):
            results[result.folder.name] = result.summary
    lines = [f"quickstart finished; the encoder started from random weights (no checkpoint). Results in {run_dir}:"]
    for name, summary in results.items():
        mean = summary["overall"]["dice"]["mean"]
        lines.append(f"  {name}: mean Dice {mean:.3f}  ({run_dir / name / 'per_case.csv'})")
    logger.info("\n".join(lines))
    return results
