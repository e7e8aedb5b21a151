"""Run `fmadapt train` and save this process's trainable parameters (for test_distributed.py).

Usage: python distributed_worker.py RECIPE OUTPUT_DIR PARAMS_DIR [key=value ...]
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from fmadapt.config import load_recipe
from fmadapt.train.loop import train


def main() -> None:
    recipe_path, output, params_dir, *overrides = sys.argv[1:]
    result = train(load_recipe(recipe_path, overrides), output)
    # end_training() has torn down the process group, so the rank comes from the launcher.
    rank = int(os.environ.get("RANK", "0"))
    tensors = {
        name: parameter.detach().contiguous().clone()
        for name, parameter in result.model.named_parameters()
        if parameter.requires_grad
    }
    Path(params_dir).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(params_dir) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
