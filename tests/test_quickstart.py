"""`fmadapt quickstart` on nilearn's MNI152 template, on a reduced setting."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn", reason="the quickstart needs nilearn (pip install 'fmadapt[quickstart]')")

from fmadapt import cli  # noqa: E402


def test_quickstart_writes_both_evaluations(tmp_path, caplog):
    caplog.set_level("INFO")
    code = cli.main(["quickstart", "--output", str(tmp_path), "train.epochs=1", "train.steps_per_epoch=2"])
    assert code == 0
    run_dir = tmp_path / "run"
    expected = ["eval_test_automatic", "eval_test_prompted_jitter0", "eval_test_prompted_jitter3"]
    assert sorted(p.name for p in run_dir.glob("eval_*")) == expected
    for name in expected:
        summary = json.loads((run_dir / name / "summary.json").read_text())
        assert math.isfinite(summary["overall"]["dice"]["mean"])
    label = nib.load(tmp_path / "data" / "MNI152_white_matter" / "labelsTr" / "mni152_t1.nii.gz")
    prediction = nib.load(run_dir / "eval_test_automatic" / "predictions" / "mni152_t1.nii.gz")
    assert prediction.shape == label.shape
    assert np.allclose(prediction.affine, label.affine)
    assert str(run_dir) in caplog.text


def test_quickstart_existing_run_rejected(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    assert cli.main(["quickstart", "--output", str(tmp_path)]) == 2
    assert "already exists" in caplog.text


def test_quickstart_existing_run_writes_no_data(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    assert cli.main(["quickstart", "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "data").exists()


def test_quickstart_bad_override_leaves_nothing(tmp_path, caplog):
    output = tmp_path / "quick"
    assert cli.main(["quickstart", "--output", str(output), "train.epoch=2"]) == 2
    assert "train.epoch" in caplog.text
    assert not (output / "data").exists()
    assert not (output / "run").exists()
