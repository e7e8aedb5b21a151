"""Time box-prompt decoding on a cached embedding: fmadapt's Predictor against SamPredictor.

Same model as embedding_speed.py (SAM ViT-B, 1024×1024, seeded random weights in the
official format). The embedding of one real Kvasir-SEG image (FMADAPT_DATA) is computed
once and read back from an EmbeddingCache, so only prompt encoding, mask decoding and
upsampling to the original size are timed. Boxes are seeded random XYXY boxes inside
the image, one mask each (``multimask_output=False``).

Reported, each against a reference measured in the same run:
- 1 box: ``Predictor.predict`` against ``SamPredictor.predict``;
- 64 boxes: one batched ``Predictor.predict`` call against 64 ``SamPredictor.predict``
  calls (one per box) and against one batched ``SamPredictor.predict_torch`` call;
- the fraction of pixels where the 64 fmadapt masks equal SamPredictor's.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/decode_speed.py --repetitions 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from embedding_speed import load_kvasir_cases, machine_description, median_seconds, save_random_vit_b
from segment_anything import SamPredictor

from fmadapt.inference import Predictor
from fmadapt.inference.cache import EmbeddingCache
from fmadapt.models import Segmenter

logger = logging.getLogger("benchmarks.decode_speed")


def random_boxes(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` XYXY boxes inside an H×W image, each side at least 16 pixels."""
    generator = np.random.default_rng(seed)
    x0 = generator.uniform(0, width - 16, count)
    y0 = generator.uniform(0, height - 16, count)
    x1 = x0 + generator.uniform(16, np.maximum(width - x0, 17))
    y1 = y0 + generator.uniform(16, np.maximum(height - y0, 17))
    return np.stack([x0, y0, np.minimum(x1, width), np.minimum(y1, height)], axis=1).astype(np.float32)


def reference_one_by_one(reference: SamPredictor, boxes: np.ndarray) -> np.ndarray:
    return np.stack([reference.predict(box=box, multimask_output=False)[0][0] for box in boxes])


def reference_batched(reference: SamPredictor, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    model_boxes = reference.transform.apply_boxes_torch(torch.from_numpy(boxes), original_size)
    with torch.inference_mode():
        masks, _, _ = reference.predict_torch(None, None, boxes=model_boxes, multimask_output=False)
    return masks[:, 0].numpy()


def run(data_root: Path, repetitions: int, prompt_count: int, folder: Path) -> dict[str, object]:
    checkpoint = folder / "sam_vit_b_random.pth"
    reference = SamPredictor(save_random_vit_b(checkpoint))
    model = Segmenter.from_registry("sam_vit_b", checkpoint=checkpoint).eval()
    cache = EmbeddingCache(folder / "embeddings")

    image, _ = load_kvasir_cases(data_root, 1)[0]
    height, width = image.shape[:2]
    reference.set_image(image)
    Predictor(model, cache=cache).set_image(image)
    predictor = Predictor(model, cache=cache)
    predictor.set_image(image)
    if cache.hits != 1:
        raise RuntimeError(f"expected the second set_image to read the cache, got {cache!r}")

    boxes = random_boxes(prompt_count, height, width)
    first_box = boxes[0]
    timings = {
        "one_box_segment_anything_predict": median_seconds(
            lambda: reference.predict(box=first_box, multimask_output=False), repetitions
        ),
        "one_box_fmadapt": median_seconds(lambda: predictor.predict(box=first_box, multimask_output=False), repetitions),
        f"{prompt_count}_boxes_segment_anything_predict_each": median_seconds(
            lambda: reference_one_by_one(reference, boxes), repetitions
        ),
        f"{prompt_count}_boxes_segment_anything_predict_torch": median_seconds(
            lambda: reference_batched(reference, boxes, (height, width)), repetitions
        ),
        f"{prompt_count}_boxes_fmadapt": median_seconds(
            lambda: predictor.predict(box=boxes, multimask_output=False), repetitions
        ),
    }

    masks = predictor.predict(box=boxes, multimask_output=False)[0][:, 0]
    expected = reference_one_by_one(reference, boxes)
    batch_name = f"{prompt_count}_boxes"
    return {
        "machine": machine_description(),
        "image_shape": list(image.shape),
        "repetitions": repetitions,
        "median_seconds": timings,
        "speedup": {
            "one_box_vs_predict": timings["one_box_segment_anything_predict"] / timings["one_box_fmadapt"],
            f"{batch_name}_vs_predict_each": timings[f"{batch_name}_segment_anything_predict_each"] / timings[f"{batch_name}_fmadapt"],
            f"{batch_name}_vs_predict_torch": timings[f"{batch_name}_segment_anything_predict_torch"] / timings[f"{batch_name}_fmadapt"],
        },
        "mask_pixel_agreement": float((masks == expected).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs per path after one warm-up run")
    parser.add_argument("--prompts", type=int, default=64, help="number of box prompts in the batched case")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_root = Path(os.environ.get("FMADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as folder:
        results = run(data_root, arguments.repetitions, arguments.prompts, Path(folder))
    text = json.dumps(results, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
