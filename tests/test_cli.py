"""The fmadapt command line: listing, checkpoint checks, argument handling."""

import pytest

from fmadapt import cli

from conftest import REPO_ROOT


def test_models_lists_registry(capsys):
    assert cli.main(["models"]) == 0
    output = capsys.readouterr().out
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "sam_vit_tiny"):
        assert name in output


def test_checkpoints_reports_missing_and_wrong_files(tmp_path, capsys):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"not the real file")
    code = cli.main(["checkpoints", "--folder", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 1
    assert "sam_vit_b_01ec64.pth" in output
    assert "size_mismatch" in output
    assert "medsam_vit_b.pth         missing" in output


def test_unset_data_path_fails_at_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("FMADAPT_DATA", raising=False)
    recipe = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
    code = cli.main(["train", str(recipe), "--output", str(tmp_path / "run")])
    assert code == 2
    assert "FMADAPT_DATA" in caplog.text
    assert "data.root" in caplog.text
    assert not (tmp_path / "run").exists()


def test_overrides_after_options_collected():
    recipe = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(["train", str(recipe), "--output", "x", "train.epochs=2"])
    assert extra == ["train.epochs=2"]
    assert args.output == "x"


def test_evaluate_rejects_training_overrides(tmp_path, caplog):
    code = cli.main(["evaluate", str(tmp_path), "--mode", "automatic", "train.epochs=3"])
    assert code == 2
    assert "only evaluate.* keys" in caplog.text


def test_missing_checkpoint_fails_before_run_folder(data_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    recipe = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
    missing = tmp_path / "absent.pth"
    code = cli.main(["train", str(recipe), "--output", str(tmp_path / "run"), f"model.checkpoint={missing}"])
    assert code == 2
    assert "model.checkpoint" in caplog.text
    assert str(missing) in caplog.text
    assert not (tmp_path / "run").exists()


def test_invalid_log_level_is_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--log-level", "foo", "models"])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "invalid log level 'foo'" in error
    assert "DEBUG, INFO, WARNING" in error


def test_log_level_any_case_accepted(capsys):
    assert cli.main(["--log-level", "warning", "models"]) == 0
    assert "sam_vit_b" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, example",
    [
        (["train", "recipe.yaml", "train.epochs"], "train.epochs=3"),
        (["train", "recipe.yaml", "--output", "x", "train.epochs"], "train.epochs=3"),
        (["evaluate", "run", "--mode", "automatic", "evaluate.max_cases"], "evaluate.max_cases=5"),
        (["pretrain", "recipe.yaml", "--resume", "train.steps"], "train.steps=50"),
        (["quickstart", "--output", "q", "train.epochs"], "train.epochs=2"),
    ],
)
def test_override_without_equals_explained(argv, example, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "overrides are key=value" in error
    assert f"for example {example}" in error
    assert f"got {argv[-1]!r}" in error
    assert "unrecognized arguments" not in error


def test_unknown_option_still_unrecognized(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "recipe.yaml", "--epochs", "3"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --epochs" in capsys.readouterr().err


def test_checkpoints_missing_folder_fails(tmp_path, capsys, caplog):
    folder = tmp_path / "absent"
    code = cli.main(["checkpoints", "--folder", str(folder)])
    assert code != 0
    assert f"checkpoint folder {folder} not found" in caplog.text
    assert "missing" not in capsys.readouterr().out


def test_checkpoints_folder_that_is_a_file_fails(tmp_path, caplog):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"x")
    assert cli.main(["checkpoints", "--folder", str(path)]) != 0
    assert "is a file, not a folder" in caplog.text
