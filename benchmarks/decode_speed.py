"""Time box-prompt decoding on a cached embedding: fmadapt's Predictor against SamPredictor.

Same model as embedding_speed.py (SAM ViT-B, 1024×1024, seeded random weights in the
official format). The embedding of one real Kvasir-SEG image (FMADAPT_DATA) is computed
once and read back from an EmbeddingCache, so only prompt encoding, mask decoding and
upsampling to the original size are timed. Boxes are seeded random XYXY boxes inside
the image, one mask each (``multimask_output=False``).

Reported, each against a reference measured in the same run:
- 1 box: ``Predictor.predict`` (fp32 and bf16) against ``SamPredictor.predict``;
- 64 boxes: one ``Predictor.predict`` call (fp32 and bf16, default ``decoder_batch_size``)
  against 64 ``SamPredictor.predict`` calls (one per box) and against one batched
  ``SamPredictor.predict_torch`` call;
- the same 64-box call for each ``--batch-sizes`` value of ``decoder_batch_size``;
- the fraction of pixels where the fp32 masks equal SamPredictor's, and the Dice of each
  bf16 mask against SamPredictor's.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/decode_speed.py --repetitions 3 [--device cuda]

On a GPU the times include the copy of the masks to the host, as both predictors return
NumPy arrays.
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
    return masks[:, 0].cpu().numpy()


def run(
    data_root: Path, repetitions: int, prompt_count: int, folder: Path, batch_sizes: list[int], device: str
) -> dict[str, object]:
    checkpoint = folder / "sam_vit_b_random.pth"
    reference = SamPredictor(save_random_vit_b(checkpoint).to(device))
    model = Segmenter.from_registry("sam_vit_b", checkpoint=checkpoint).eval().to(device)
    cache = EmbeddingCache(folder / "embeddings")

    image, _ = load_kvasir_cases(data_root, 1)[0]
    height, width = image.shape[:2]
    reference.set_image(image)
    # The embedding is computed once in fp32 and shared, so every path decodes the same one.
    Predictor(model, cache=cache).set_image(image)
    embedding = Predictor(model, cache=cache)
    embedding.set_image(image)
    if cache.hits != 1:
        raise RuntimeError(f"expected the second set_image to read the cache, got {cache!r}")
    shared_embedding, original_size = embedding.embedding, embedding.original_size

    def predictor_for(precision: str, batch_size: int | None = None) -> Predictor:
        predictor = Predictor(model, precision=precision, decoder_batch_size=batch_size)
        predictor.set_embedding(shared_embedding, original_size)
        return predictor

    fp32, bf16 = predictor_for("fp32"), predictor_for("bf16")
    boxes = random_boxes(prompt_count, height, width)
    first_box = boxes[0]
    batch_name = f"{prompt_count}_boxes"
    timings = {
        "one_box_segment_anything_predict": median_seconds(
            lambda: reference.predict(box=first_box, multimask_output=False), repetitions
        ),
        "one_box_fmadapt_fp32": median_seconds(lambda: fp32.predict(box=first_box, multimask_output=False), repetitions),
        "one_box_fmadapt_bf16": median_seconds(lambda: bf16.predict(box=first_box, multimask_output=False), repetitions),
        f"{batch_name}_segment_anything_predict_each": median_seconds(
            lambda: reference_one_by_one(reference, boxes), repetitions
        ),
        f"{batch_name}_segment_anything_predict_torch": median_seconds(
            lambda: reference_batched(reference, boxes, (height, width)), repetitions
        ),
        f"{batch_name}_fmadapt_fp32": median_seconds(lambda: fp32.predict(box=boxes, multimask_output=False), repetitions),
        f"{batch_name}_fmadapt_bf16": median_seconds(lambda: bf16.predict(box=boxes, multimask_output=False), repetitions),
    }
    per_batch_size = {}
    for precision in ("fp32", "bf16"):
        for batch_size in batch_sizes:
            predictor = predictor_for(precision, batch_size)
            per_batch_size[f"{precision}_{batch_size}"] = median_seconds(
                lambda: predictor.predict(box=boxes, multimask_output=False), repetitions
            )

    expected = reference_one_by_one(reference, boxes)
    fp32_masks = fp32.predict(box=boxes, multimask_output=False)[0][:, 0]
    bf16_masks = bf16.predict(box=boxes, multimask_output=False)[0][:, 0]
    each = timings[f"{batch_name}_segment_anything_predict_each"]
    batched = timings[f"{batch_name}_segment_anything_predict_torch"]
    return {
        "machine": machine_description(),
        "image_shape": list(image.shape),
        "repetitions": repetitions,
        "median_seconds": timings,
        "median_seconds_by_decoder_batch_size": per_batch_size,
        "speedup": {
            "one_box_fp32_vs_predict": timings["one_box_segment_anything_predict"] / timings["one_box_fmadapt_fp32"],
            "one_box_bf16_vs_predict": timings["one_box_segment_anything_predict"] / timings["one_box_fmadapt_bf16"],
            f"{batch_name}_fp32_vs_predict_each": each / timings[f"{batch_name}_fmadapt_fp32"],
            f"{batch_name}_bf16_vs_predict_each": each / timings[f"{batch_name}_fmadapt_bf16"],
            f"{batch_name}_fp32_vs_predict_torch": batched / timings[f"{batch_name}_fmadapt_fp32"],
            f"{batch_name}_bf16_vs_predict_torch": batched / timings[f"{batch_name}_fmadapt_bf16"],
        },
        "mask_pixel_agreement_fp32": float((fp32_masks == expected).mean()),
        "mask_dice_bf16_vs_reference": [_dice(mine, theirs) for mine, theirs in zip(bf16_masks, expected)],
    }


def _dice(first: np.ndarray, second: np.ndarray) -> float:
    total = first.sum() + second.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(first, second).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs per path after one warm-up run")
    parser.add_argument("--prompts", type=int, default=64, help="number of box prompts in the batched case")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 64], help="decoder_batch_size values to time"
    )
    parser.add_argument("--device", default="cpu", help="torch device of both models, e.g. cpu or cuda")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_root = Path(os.environ.get("FMADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as folder:
        results = run(
            data_root, arguments.repetitions, arguments.prompts, Path(folder), arguments.batch_sizes, arguments.device
        )
    text = json.dumps(results, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
