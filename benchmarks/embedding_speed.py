"""Time one image embedding with fmadapt against segment-anything's SamPredictor.set_image.

The model is SAM ViT-B at 1024×1024 with seeded random weights, saved in the official
checkpoint format and loaded by both sides, because no real weights are available
offline. Relative-position tables are random too (segment-anything starts them at
zero), so the fused path's relative-position mask is exercised.

Reported, each against a reference measured in the same run:
- median set_image time of SamPredictor (fp32, by-hand attention), of fmadapt in the
  same configuration, and of fmadapt with fused attention and bf16 autocast where the
  device supports bf16 natively. The speed-up is reference time / fmadapt time.
- Dice between the masks of the fast path and of SamPredictor for a box around the
  ground-truth polyp of real Kvasir-SEG images (FMADAPT_DATA);
- achieved GFLOP/s of each path against a measured matrix-multiply peak of the same
  dtype. The work is counted once, by torch.utils.flop_counter on one fp32 forward with
  segment-anything's by-hand attention, and used for both paths, because the counter
  does not count every fused attention kernel.

Usage:
    FMADAPT_DATA=../shared/data python benchmarks/embedding_speed.py --repetitions 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor, sam_model_registry
from torch.utils.flop_counter import FlopCounterMode

from fmadapt.data.io import read_image, read_mask
from fmadapt.inference import Predictor
from fmadapt.models import Segmenter

logger = logging.getLogger("benchmarks.embedding_speed")

KVASIR = "2D_KvasirSEG_polyp"
# Kvasir-SEG masks are JPEG files; values above this are polyp.
KVASIR_MASK_THRESHOLD = 127


def save_random_vit_b(path: Path, seed: int = 0) -> torch.nn.Module:
    """Build segment-anything's ViT-B ``Sam`` with seeded random weights and save its state dict at ``path``."""
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():
        for name, parameter in sam.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0.0, 0.02)
    torch.save(sam.state_dict(), path)
    return sam.eval()


def load_kvasir_cases(data_root: Path, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return the first ``count`` Kvasir-SEG cases as (H×W×3 uint8 image, XYXY box of the polyp)."""
    folder = data_root / KVASIR
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found; set FMADAPT_DATA to the folder that contains {KVASIR}")
    cases = []
    for image_path in sorted((folder / "images").glob("*.jpg"))[:count]:
        image = read_image(image_path).array
        mask = read_mask(folder / "masks" / image_path.name, threshold=KVASIR_MASK_THRESHOLD).array
        rows, cols = np.nonzero(mask)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)
        cases.append((image, box))
    return cases


def median_seconds(function, repetitions: int) -> float:
    """Run ``function`` once to warm up, then ``repetitions`` times; return the median wall time."""
    function()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repetitions: int = 5) -> float:
    """Measure the GFLOP/s of a size×size matrix multiply in ``dtype`` (best of ``repetitions``)."""
    left = torch.randn(size, size).to(dtype)
    right = torch.randn(size, size).to(dtype)
    torch.mm(left, right)
    best = float("inf")
    for _ in range(repetitions):
        start = time.perf_counter()
        torch.mm(left, right)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def encoder_flops(model: Segmenter) -> int:
    """Count the FLOPs of one fp32 1×3×S×S encoder forward with torch's flop counter."""
    images = torch.zeros(1, 3, model.image_size, model.image_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.encode(images)
    return counter.get_total_flops()


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = first.sum() + second.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(first, second).sum() / total)


def machine_description() -> dict[str, object]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def run(data_root: Path, repetitions: int, cases: int, checkpoint_folder: Path) -> dict[str, object]:
    checkpoint = checkpoint_folder / "sam_vit_b_random.pth"
    reference_sam = save_random_vit_b(checkpoint)
    reference = SamPredictor(reference_sam)
    plain_model = Segmenter.from_registry("sam_vit_b", checkpoint=checkpoint).eval()
    fast_model = Segmenter.from_registry("sam_vit_b", checkpoint=checkpoint).eval()
    fast_model.enable_fused_attention()
    plain = Predictor(plain_model, precision="fp32")
    fast = Predictor(fast_model, precision="auto")
    precision = fast.precision

    samples = load_kvasir_cases(data_root, cases)
    image = samples[0][0]
    timings = {
        "segment_anything_fp32": median_seconds(lambda: reference.set_image(image), repetitions),
        "fmadapt_fp32": median_seconds(lambda: plain.set_image(image), repetitions),
        f"fmadapt_fused_{precision}": median_seconds(lambda: fast.set_image(image), repetitions),
    }
    reference_seconds = timings["segment_anything_fp32"]

    agreement = []
    for case_image, box in samples:
        reference.set_image(case_image)
        expected, _, _ = reference.predict(box=box, multimask_output=False)
        fast.set_image(case_image)
        masks, _, _ = fast.predict(box=box, multimask_output=False)
        agreement.append(dice(masks[0], expected[0]))

    flops = encoder_flops(plain_model)
    peaks = {"fp32": matmul_peak_gflops(torch.float32)}
    if precision == "bf16":
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16)
    throughput = {
        "fmadapt_fp32": flops / timings["fmadapt_fp32"] / 1e9,
        f"fmadapt_fused_{precision}": flops / timings[f"fmadapt_fused_{precision}"] / 1e9,
    }
    return {
        "machine": machine_description(),
        "image_shape": list(image.shape),
        "repetitions": repetitions,
        "fast_precision": precision,
        "median_seconds": timings,
        "speedup_vs_segment_anything": {name: reference_seconds / value for name, value in timings.items()},
        "mask_dice_fast_vs_reference": agreement,
        "encoder_gflop": flops / 1e9,
        "achieved_gflops": throughput,
        "matmul_peak_gflops": peaks,
        "fraction_of_peak": {
            "fmadapt_fp32": throughput["fmadapt_fp32"] / peaks["fp32"],
            f"fmadapt_fused_{precision}": throughput[f"fmadapt_fused_{precision}"] / peaks[precision],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs per path after one warm-up run")
    parser.add_argument("--cases", type=int, default=3, help="Kvasir-SEG images used for the mask Dice")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: print only)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_root = Path(os.environ.get("FMADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as folder:
        results = run(data_root, arguments.repetitions, arguments.cases, Path(folder))
    text = json.dumps(results, indent=2)
    logger.info("%s", text)
    if arguments.output:
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
