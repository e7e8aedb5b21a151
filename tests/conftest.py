"""Shared fixtures: the real data folder and small helpers."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two CPU threads keep the suite predictable on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))


def _data_root() -> Path:
    configured = os.environ.get("FMADAPT_DATA")
    if configured:
        return Path(configured).resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with the real datasets; skips (or fails under FMADAPT_REQUIRE_DATA=1) when absent."""
    root = _data_root()
    if not root.is_dir():
        message = (
            f"real data folder {root} not found; set FMADAPT_DATA to the folder that "
            "contains Dataset001_TotalSegCT and 2D_KvasirSEG_polyp"
        )
        if os.environ.get("FMADAPT_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


def require_dataset(root: Path, name: str) -> Path:
    """Return root/name, skipping (or failing under FMADAPT_REQUIRE_DATA=1) when it is missing."""
    path = root / name
    if not path.exists():
        message = f"dataset {path} not found; place it under FMADAPT_DATA"
        if os.environ.get("FMADAPT_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
