"""Time a decoder-only epoch over NIfTI slices with and without fmadapt's EmbeddingCache.

One epoch runs ``Predictor.set_image`` and one box-prompted ``Predictor.predict`` on every
axial slice of ``Dataset001_TotalSegCT/imagesTr/ts_ct_full_0000.nii.gz`` that contains
liver (label 5), with the box around the liver of that slice. The model is SAM ViT-B
(``sam_vit_b``) with seeded random weights at a reduced input size, because no weights
are available offline. Intensity: CT soft-tissue window.

Measured, in the same run:
- ``no_cache``: every epoch runs the encoder on every slice (the reference). It runs
  once before and once after the cached epochs, and the faster of the two is the
  reference, so load from other processes shows up as the gap between them;
- ``cache_cold``: the first epoch with an empty cache folder, which encodes and stores;
- ``cache_warm``: the next epoch, which loads every embedding from the cache.

Each epoch's masks are compared with those of ``no_cache`` (fraction of equal pixels).

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/cache_epoch.py --image-size 256 --slices 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.io import read_image, read_mask
from fmadapt.data.prompts import box_from_mask
from fmadapt.inference import Predictor
from fmadapt.inference.cache import EmbeddingCache
from fmadapt.models import Segmenter

logger = logging.getLogger("benchmarks.cache_epoch")

DATASET = "Dataset001_TotalSegCT"
CASE = "ts_ct_full"
LIVER = 5
MODEL_NAME = "sam_vit_b"


def load_liver_slices(data_root: Path, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return up to ``count`` axial slices with liver as (X×Y CT slice in HU, XYXY box of the liver)."""
    folder = data_root / DATASET
    image_path = folder / "imagesTr" / f"{CASE}_0000.nii.gz"
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path} not found; set FMADAPT_DATA to the folder that contains {DATASET}")
    image = read_image(image_path).array
    liver = read_mask(folder / "labelsTr" / f"{CASE}.nii.gz").array == LIVER
    slices = []
    for index in np.flatnonzero(liver.any(axis=(0, 1)))[:count]:
        slices.append((np.ascontiguousarray(image[:, :, index]), box_from_mask(liver[:, :, index])))
    return slices


def run_epoch(predictor: Predictor, slices: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    """Encode (or load) and decode every slice once, and return the wall time in seconds and the masks."""
    masks = []
    start = time.perf_counter()
    for image, box in slices:
        predictor.set_image(image)
        mask, _, _ = predictor.predict(box=box, multimask_output=False)
        masks.append(mask[0])
    return time.perf_counter() - start, masks


def equal_pixel_fraction(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """Return the fraction of pixels on which two lists of masks agree."""
    equal = sum(int((a == b).sum()) for a, b in zip(first, second))
    total = sum(a.size for a in first)
    return equal / total


def run(data_root: Path, image_size: int, count: int, cache_folder: Path) -> dict[str, object]:
    slices = load_liver_slices(data_root, count)
    torch.manual_seed(0)
    model = Segmenter.from_registry(MODEL_NAME, image_size=image_size).eval()
    intensity = IntensitySpec(mode="ct_window", window="soft_tissue")

    plain = Predictor(model, intensity=intensity)
    run_epoch(plain, slices[:1])
    no_cache_seconds, reference_masks = run_epoch(plain, slices)

    cache = EmbeddingCache(cache_folder)
    cached = Predictor(model, intensity=intensity, cache=cache)
    cold_seconds, cold_masks = run_epoch(cached, slices)
    warm_seconds, warm_masks = run_epoch(cached, slices)
    no_cache_again_seconds, _ = run_epoch(plain, slices)
    reference_seconds = min(no_cache_seconds, no_cache_again_seconds)
    cache_bytes = sum(path.stat().st_size for path in cache_folder.glob("*.safetensors"))
    return {
        "model": MODEL_NAME,
        "image_size": image_size,
        "slices": len(slices),
        "slice_shape": list(slices[0][0].shape),
        "seconds": {
            "no_cache_before": no_cache_seconds,
            "cache_cold": cold_seconds,
            "cache_warm": warm_seconds,
            "no_cache_after": no_cache_again_seconds,
        },
        "speedup_of_warm_cache": reference_seconds / warm_seconds,
        "cold_cache_time_ratio": cold_seconds / reference_seconds,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "cache_mib": cache_bytes / 2**20,
        "equal_pixels_cold": equal_pixel_fraction(reference_masks, cold_masks),
        "equal_pixels_warm": equal_pixel_fraction(reference_masks, warm_masks),
    }


def machine_description() -> dict[str, object]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256, help="model input size S in pixels (S×S)")
    parser.add_argument("--slices", type=int, default=16, help="axial liver slices per epoch")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_root = Path(os.environ.get("FMADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as folder:
        results = run(data_root, arguments.image_size, arguments.slices, Path(folder))
    results["command"] = " ".join(sys.argv)
    results["machine"] = machine_description()
    text = json.dumps(results, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
