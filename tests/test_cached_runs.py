"""The embedding cache in evaluation, the prompt protocols and decoder-only training, on real data."""

import functools
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmadapt.cli import main
from fmadapt.config import load_recipe
from fmadapt.errors import RecipeError
from fmadapt.evaluate import protocols
from fmadapt.evaluate.protocols import ProtocolSettings, run_protocol
from fmadapt.evaluate.runner import evaluate_run
from fmadapt.models import Segmenter
from fmadapt.train.loop import train

from conftest import REPO_ROOT, require_dataset

pytestmark = pytest.mark.filterwarnings("ignore:model.checkpoint is not set")

KVASIR = REPO_ROOT / "recipes" / "kvasir_polyp_5shot_lora.yaml"
TOTALSEG = REPO_ROOT / "recipes" / "totalseg_ct_fewshot_lora.yaml"
REDUCED = [
    "model.name=sam_vit_tiny",
    "model.image_size=128",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=1",
    "train.max_validation_slices=2",
]
DECODER_ONLY = [
    "adaptation.method=none",
    "adaptation.preset=decoder",
    "train.augment=false",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=2",
    "data.split.train=2",
    "data.split.validation=1",
]
EVALUATE = ["evaluate.max_cases=3", "evaluate.box_jitter=[0]"]


class EncodeCounter:
    """Counts Segmenter.encode calls while it is installed; the real method still runs."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.images = 0
        original = Segmenter.encode

        def counted(model, images):
            self.calls += 1
            self.images += images.shape[0]
            return original(model, images)

        monkeypatch.setattr(Segmenter, "encode", counted)


def cache_files(folder):
    return sorted(path.name for path in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def kvasir_run(data_root, tmp_path_factory):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    folder = tmp_path_factory.mktemp("kvasir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        yield train(load_recipe(KVASIR, REDUCED), folder / "run").run_dir


@pytest.fixture(scope="module")
def kidney_run(data_root, tmp_path_factory):
    require_dataset(data_root, "Dataset001_TotalSegCT")
    folder = tmp_path_factory.mktemp("kidneys")
    overrides = REDUCED + ["data.labels=[kidney_right,kidney_left]", "data.split.train=4"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMADAPT_DATA", str(data_root))
        yield train(load_recipe(TOTALSEG, overrides), folder / "run").run_dir


def test_prompted_evaluation_reads_cache(kvasir_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (plain,) = evaluate_run(kvasir_run, "prompted", overrides=EVALUATE)
    expected = (plain.folder / "per_case.csv").read_text()

    counter = EncodeCounter(monkeypatch)
    (first,) = evaluate_run(kvasir_run, "prompted", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])
    assert (first.folder / "per_case.csv").read_text() == expected
    assert counter.images == 3
    assert len(cache_files(cache)) == 3

    (second,) = evaluate_run(kvasir_run, "prompted", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])
    assert (second.folder / "per_case.csv").read_text() == expected
    assert counter.images == 3
    assert len(cache_files(cache)) == 3


def test_automatic_evaluation_shares_prompted_entries(kvasir_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (plain,) = evaluate_run(kvasir_run, "automatic", overrides=EVALUATE)
    expected = (plain.folder / "per_case.csv").read_text()
    evaluate_run(kvasir_run, "prompted", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])

    counter = EncodeCounter(monkeypatch)
    (cached,) = evaluate_run(kvasir_run, "automatic", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])
    assert (cached.folder / "per_case.csv").read_text() == expected
    assert counter.calls == 0


def test_changed_trained_encoder_misses(kvasir_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    overrides = EVALUATE + [f"evaluate.cache_dir={cache}"]
    evaluate_run(kvasir_run, "prompted", overrides=overrides)
    before = cache_files(cache)

    retrained = tmp_path / "retrained"
    shutil.copytree(kvasir_run, retrained, ignore=shutil.ignore_patterns("eval_*"))
    tensors = load_file(retrained / "trained.safetensors")
    lora = [name for name in tensors if "lora_B" in name]
    assert lora, "the Kvasir recipe trains LoRA weights in the encoder"
    for name in lora:
        tensors[name] = tensors[name] + 0.01
    save_file(tensors, retrained / "trained.safetensors")

    counter = EncodeCounter(monkeypatch)
    evaluate_run(retrained, "prompted", overrides=overrides)
    assert counter.images == 3
    after = cache_files(cache)
    assert len(after) == 6
    assert set(before) < set(after)


def test_cli_cache_option(kvasir_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_ROOT", str(tmp_path))
    code = main(
        ["evaluate", str(kvasir_run), "--mode", "prompted", "--cache", "$CACHE_ROOT/from cli", "evaluate.max_cases=2"]
    )
    assert code == 0
    assert len(cache_files(tmp_path / "from cli")) == 2


def test_empty_cache_dir_is_rejected(kvasir_run):
    with pytest.raises(RecipeError, match="evaluate.cache_dir"):
        evaluate_run(kvasir_run, "prompted", overrides=EVALUATE + ["evaluate.cache_dir=''"])


def test_clicks_protocol_reads_cache(kvasir_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (plain,) = run_protocol(kvasir_run, "clicks", overrides=EVALUATE)
    expected = (plain.folder / "per_case.csv").read_text()

    counter = EncodeCounter(monkeypatch)
    (first,) = run_protocol(kvasir_run, "clicks", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])
    assert (first.folder / "per_case.csv").read_text() == expected
    assert counter.images == 3

    (second,) = run_protocol(kvasir_run, "clicks", overrides=EVALUATE + [f"evaluate.cache_dir={cache}"])
    assert (second.folder / "per_case.csv").read_text() == expected
    assert counter.images == 3
    assert len(cache_files(cache)) == 3


class VisitRecorder:
    """Records which slice each SliceEmbeddings instance is asked for; the real method still runs."""

    def __init__(self, monkeypatch):
        self.visits = []
        original = protocols.SliceEmbeddings.set_image

        def recorded(embeddings, index, image):
            self.visits.append((id(embeddings), index))
            return original(embeddings, index, image)

        monkeypatch.setattr(protocols.SliceEmbeddings, "set_image", recorded)


def test_propagation_encodes_each_slice_once(kidney_run, tmp_path, monkeypatch):
    settings = ProtocolSettings(margin=5.0)
    overrides = ["evaluate.max_cases=1"]
    with monkeypatch.context() as patch:
        recorder = VisitRecorder(patch)
        patch.setattr(protocols, "SliceEmbeddings", functools.partial(protocols.SliceEmbeddings, max_bytes=0))
        counter = EncodeCounter(patch)
        (every_visit,) = run_protocol(kidney_run, "propagate3d", overrides=overrides, settings=settings)
        assert counter.calls == len(recorder.visits)
        expected = {name: (every_visit.folder / name).read_text() for name in ("per_case.csv", "propagation.csv")}

    recorder = VisitRecorder(monkeypatch)
    counter = EncodeCounter(monkeypatch)
    (reused,) = run_protocol(kidney_run, "propagate3d", overrides=overrides, settings=settings)
    distinct = len(set(recorder.visits))
    assert len(recorder.visits) > distinct, "both kidneys should visit some of the same slices"
    assert counter.calls == distinct
    for name, text in expected.items():
        assert (reused.folder / name).read_text() == text

    cache = tmp_path / "cache"
    cached_overrides = overrides + [f"evaluate.cache_dir={cache}"]
    run_protocol(kidney_run, "propagate3d", overrides=cached_overrides, settings=settings)
    assert counter.calls == 2 * distinct
    assert len(cache_files(cache)) == distinct
    (from_cache,) = run_protocol(kidney_run, "propagate3d", overrides=cached_overrides, settings=settings)
    assert counter.calls == 2 * distinct
    for name, text in expected.items():
        assert (from_cache.folder / name).read_text() == text


def test_decoder_training_with_cache_matches(data_root, tmp_path, monkeypatch, caplog):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    overrides = REDUCED + DECODER_ONLY
    plain = train(load_recipe(KVASIR, overrides), tmp_path / "plain")

    cache = tmp_path / "cache"
    counter = EncodeCounter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fmadapt.train.embedding_cache"):
        cached = train(load_recipe(KVASIR, overrides + [f"train.cache_dir={cache}"]), tmp_path / "cached")
    assert "encoded once" in caplog.text

    expected = load_file(plain.run_dir / "trained.safetensors")
    trained = load_file(cached.run_dir / "trained.safetensors")
    assert set(trained) == set(expected)
    for name, tensor in expected.items():
        assert torch.max(torch.abs(trained[name] - tensor)).item() <= 1e-6, name

    first, second = json.loads((cached.run_dir / "history.json").read_text())
    assert first["embedding_cache_hits"] + first["embedding_cache_misses"] == 6
    assert 1 <= first["embedding_cache_misses"] <= 2
    assert second["embedding_cache_hits"] >= 6 - (2 - first["embedding_cache_misses"])
    assert second["embedding_cache_hit_rate"] == second["embedding_cache_hits"] / 6
    assert first["validation_dice_prompted"] == pytest.approx(
        json.loads((plain.run_dir / "history.json").read_text())[0]["validation_dice_prompted"], abs=1e-6
    )

    training_misses = first["embedding_cache_misses"] + second["embedding_cache_misses"]
    validation_images = 1
    assert len(cache_files(cache)) == training_misses + validation_images
    # The encoder ran only on misses: the training images once each, the validation image once.
    assert counter.images == training_misses + validation_images


def test_cache_reused_by_next_training_run(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    overrides = REDUCED + DECODER_ONLY + [f"train.cache_dir={tmp_path / 'cache'}"]
    train(load_recipe(KVASIR, overrides), tmp_path / "first")

    counter = EncodeCounter(monkeypatch)
    again = train(load_recipe(KVASIR, overrides), tmp_path / "second")
    history = json.loads((again.run_dir / "history.json").read_text())
    assert [record["embedding_cache_misses"] for record in history] == [0, 0]
    assert counter.calls == 0


def test_cache_rejected_when_encoder_trains(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    recipe = load_recipe(KVASIR, REDUCED + [f"train.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(RecipeError, match="adapters_decoder") as error:
        train(recipe, tmp_path / "run")
    assert "encoder parameters train" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cache_rejected_with_encoder_dropout(data_root, tmp_path, monkeypatch):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    overrides = REDUCED + [
        "adaptation.preset=decoder",
        "adaptation.lora.dropout=0.1",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    with pytest.raises(RecipeError, match="dropout"):
        train(load_recipe(KVASIR, overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_augmented_training_warns(data_root, tmp_path, monkeypatch, caplog):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    monkeypatch.setenv("FMADAPT_DATA", str(data_root))
    overrides = REDUCED + DECODER_ONLY + ["train.augment=true", "train.epochs=1", f"train.cache_dir={tmp_path / 'c'}"]
    with caplog.at_level(logging.WARNING, logger="fmadapt.train.embedding_cache"):
        result = train(load_recipe(KVASIR, overrides), tmp_path / "run")
    assert "train.augment=false" in caplog.text
    (record,) = json.loads((result.run_dir / "history.json").read_text())
    assert record["embedding_cache_hits"] + record["embedding_cache_misses"] == 6
    assert np.isfinite(record["loss"])


def test_two_process_training_sums_cache_counts(data_root, tmp_path):
    require_dataset(data_root, "2D_KvasirSEG_polyp")
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "fmadapt", "train", str(KVASIR), "--output", str(run_dir),
        *REDUCED, *DECODER_ONLY, "train.batch_size=1", "train.steps_per_epoch=2", f"train.cache_dir={cache}",
    ]
    environment = dict(os.environ, FMADAPT_DATA=str(data_root), OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    history = json.loads((run_dir / "history.json").read_text())
    # Two processes each draw steps_per_epoch × batch_size = 2 images per epoch.
    assert [record["embedding_cache_hits"] + record["embedding_cache_misses"] for record in history] == [4, 4]
    # Both processes may miss on the same image when they draw it at the same step, so
    # misses can exceed the files written for the two training images.
    training_files = len(cache_files(cache)) - 1  # one validation image
    assert 1 <= training_files <= 2
    assert sum(record["embedding_cache_misses"] for record in history) >= training_files
