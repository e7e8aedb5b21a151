"""Recipe loading: strict keys, overrides, environment variables and data paths."""

import pytest
import yaml

from fmadapt.config import apply_overrides, load_recipe, recipe_from_dict, resolve_data_root
from fmadapt.errors import RecipeError

from conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def minimal(**changes):
    data = {"data": {"root": "/nonexistent", "labels": ["liver"]}}
    return apply_overrides(data, [f"{k}={v}" for k, v in changes.items()])


def test_recipes_in_repo_load(monkeypatch, tmp_path):
    from fmadapt.train.ssl.config import load_pretrain_recipe

    monkeypatch.setenv("FMADAPT_DATA", str(tmp_path))
    assert len(RECIPES) >= 3
    for path in RECIPES:
        # Self-supervised recipes (names with "_ssl") follow the pretraining schema.
        loader = load_pretrain_recipe if "_ssl" in path.stem else load_recipe
        recipe = loader(path)
        assert recipe.name == path.stem


def test_unknown_key_suggests_closest():
    with pytest.raises(RecipeError, match=r"train\.epoch'.*Did you mean 'epochs'"):
        recipe_from_dict(minimal(**{"train.epoch": 3}))


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(RecipeError, match="adaptation.method.*lora, adapters, none"):
        recipe_from_dict(minimal(**{"adaptation.method": "lorra"}))


def test_wrong_type_names_key():
    with pytest.raises(RecipeError, match="train.batch_size' must be an integer"):
        recipe_from_dict(minimal(**{"train.batch_size": "two"}))


def test_overrides_parse_yaml_values():
    recipe = recipe_from_dict(minimal(**{"train.epochs": 3, "evaluate.box_jitter": "[0, 4]", "model.image_size": 512}))
    assert recipe.train.epochs == 3
    assert recipe.evaluate.box_jitter == [0.0, 4.0]
    assert recipe.model.image_size == 512


def test_override_without_equals_raises():
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_unset_environment_variable_named(monkeypatch):
    monkeypatch.delenv("FMADAPT_DATA", raising=False)
    recipe = recipe_from_dict(minimal(**{"data.root": "$FMADAPT_DATA/Dataset001_TotalSegCT"}))
    with pytest.raises(RecipeError) as error:
        resolve_data_root(recipe)
    message = str(error.value)
    assert "FMADAPT_DATA" in message
    assert "data.root" in message


def test_missing_data_folder_named(monkeypatch, tmp_path):
    monkeypatch.setenv("FMADAPT_DATA", str(tmp_path))
    recipe = recipe_from_dict(minimal(**{"data.root": "$FMADAPT_DATA/absent"}))
    with pytest.raises(RecipeError) as error:
        resolve_data_root(recipe)
    assert str(tmp_path / "absent") in str(error.value)
    assert "data.root" in str(error.value)


def test_slice_fractions_must_sum_to_one():
    with pytest.raises(RecipeError, match="slice_fractions"):
        recipe_from_dict(minimal(**{"data.split.mode": "slices", "data.axis": 2, "data.split.slice_fractions": "[0.5, 0.5, 0.5]"}))


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)
