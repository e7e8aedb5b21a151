import logging

import numpy as np
import pytest
import torch
from tiny_checkpoints import save_tiny_checkpoint

from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.transforms import MEDSAM_PREPROCESS
from fmadapt.errors import FmadaptWarning
from fmadapt.errors import RecipeError
from fmadapt.inference import Predictor
from fmadapt.inference import cache as cache_module
from fmadapt.inference.cache import (
    EmbeddingCache,
    embedding_key,
    embedding_key_from_digest,
    image_digest,
    open_embedding_cache,
)
from fmadapt.inference.label_maps import embed_image
from fmadapt.inference.slice_embeddings import SliceEmbeddings
from fmadapt.models import Segmenter

SIZE = 128
FP32 = dict(intensity=IntensitySpec(), precision="fp32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "sam_tiny.pth")


@pytest.fixture
def model(checkpoint):
    return Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE).eval()


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)


class CountingEncoder:
    """compute() for get_or_compute that records how often it ran."""

    def __init__(self, value):
        self.value = value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_predictor_miss_then_hit(model, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    image = _image()
    box = np.array([10, 10, 60, 50])

    first = Predictor(model, cache=cache)
    first.set_image(image)
    assert (cache.hits, cache.misses) == (0, 1)
    assert len(list(cache.folder.glob("*.safetensors"))) == 1

    second = Predictor(model, cache=cache)
    second.set_image(image)
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(second._embedding, first._embedding, atol=0, rtol=0)

    plain = Predictor(model)
    plain.set_image(image)
    expected = plain.predict(box=box)
    cached = second.predict(box=box)
    for got, want in zip(cached, expected):
        np.testing.assert_array_equal(got, want)


def test_hit_skips_compute(model, tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = embedding_key(_image(), model, **FP32)
    compute = CountingEncoder(torch.arange(6.0).reshape(1, 6))

    cache.get_or_compute(key, compute)
    stored = cache.get_or_compute(key, compute)

    assert compute.calls == 1
    torch.testing.assert_close(stored, torch.arange(6.0).reshape(1, 6))


def test_key_changes_with_image(model):
    image = _image()
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    base = embedding_key(image, model, **FP32)

    assert embedding_key(image.copy(), model, **FP32) == base
    assert embedding_key(changed, model, **FP32).digest() != base.digest()
    assert image_digest(image.astype(np.int16)) != image_digest(image)
    assert image_digest(image.reshape(80, 60, 3)) != image_digest(image)


def test_key_changes_with_model_name(checkpoint, model):
    other = Segmenter.from_registry(
        "medsam_vit_tiny", checkpoint=checkpoint, image_size=SIZE
    ).eval()
    image = _image()
    assert embedding_key(image, other, **FP32).digest() != embedding_key(image, model, **FP32).digest()


def test_key_changes_with_checkpoint(tmp_path, model):
    other_checkpoint = save_tiny_checkpoint(tmp_path / "other.pth", seed=7)
    other = Segmenter.from_registry("sam_vit_tiny", checkpoint=other_checkpoint, image_size=SIZE)
    for parameter in (*model.parameters(), *other.parameters()):
        parameter.requires_grad_(False)
    image = _image()

    first = embedding_key(image, model, **FP32)
    second = embedding_key(image, other, **FP32)
    assert first.checkpoint_id != second.checkpoint_id
    assert embedding_key(image, model, **FP32, checkpoint_id="sha256:abc").checkpoint_id == "sha256:abc"


def test_key_changes_with_trained_encoder(model):
    apply_lora(model, LoraSettings(rank=2, target_modules=("qkv",)))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    image = _image()
    before = embedding_key(image, model, **FP32)

    lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b.add_(0.01)
    after = embedding_key(image, model, **FP32)

    assert after.trained_id != before.trained_id
    assert after.checkpoint_id == before.checkpoint_id


def test_decoder_training_keeps_key(model):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("mask_decoder."))
    image = _image()
    before = embedding_key(image, model, **FP32)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    embedding = torch.randn(1, model.embedding_channels, SIZE // 16, SIZE // 16)
    logits, _ = model.decode_prompts(embedding, boxes=torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    logits.mean().backward()
    optimizer.step()

    assert embedding_key(image, model, **FP32) == before


def test_key_changes_with_preprocessing(checkpoint, model):
    with pytest.warns(FmadaptWarning, match="allow_preprocess_mismatch=True"):
        other = Segmenter.from_registry(
            "sam_vit_tiny",
            checkpoint=checkpoint,
            image_size=SIZE,
            preprocess=MEDSAM_PREPROCESS,
            allow_preprocess_mismatch=True,
        )
    image = _image()
    base = embedding_key(image, model, **FP32)

    assert embedding_key(image, other, **FP32).preprocess != base.preprocess
    window = embedding_key(image, model, intensity=IntensitySpec(mode="ct_window", window="liver"), precision="fp32")
    assert window.digest() != base.digest()
    assert embedding_key(image, model, intensity=IntensitySpec(), precision="bf16").digest() != base.digest()


def test_key_changes_with_image_size(checkpoint, model):
    larger = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=2 * SIZE)
    image = _image()
    assert embedding_key(image, larger, **FP32).digest() != embedding_key(image, model, **FP32).digest()


def test_unreadable_file_is_recomputed(model, tmp_path, caplog):
    cache = EmbeddingCache(tmp_path)
    key = embedding_key(_image(), model, **FP32)
    cache.path_for(key).write_bytes(b"not a safetensors file")
    compute = CountingEncoder(torch.ones(2, 3))

    with caplog.at_level(logging.WARNING, logger="fmadapt.inference.cache"):
        result = cache.get_or_compute(key, compute)

    assert compute.calls == 1
    assert "cannot be read" in caplog.text
    torch.testing.assert_close(cache.get(key), result)


def test_file_of_other_key_is_ignored(model, tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = embedding_key(_image(0), model, **FP32)
    other = embedding_key(_image(1), model, **FP32)
    cache.put(other, torch.zeros(3))
    cache.path_for(other).rename(cache.path_for(key))

    assert cache.get(key) is None


def test_put_leaves_no_temporary_files(model, tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = embedding_key(_image(), model, **FP32)
    path = cache.put(key, torch.ones(1, 4, 2, 2))

    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert cache.clear() == 1
    assert list(tmp_path.iterdir()) == []


def test_input_errors(model, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        EmbeddingCache(file)
    with pytest.raises(TypeError, match="key must be a CacheKey"):
        EmbeddingCache(tmp_path / "c").get("digest")
    with pytest.raises(TypeError, match="intensity must be an IntensitySpec"):
        embedding_key(_image(), model, intensity="auto", precision="fp32")
    with pytest.raises(TypeError, match="cache must be an EmbeddingCache"):
        Predictor(model, cache=str(tmp_path))


def test_key_input_errors(model):
    with pytest.raises(ValueError, match="precision must be one of"):
        embedding_key(_image(), model, intensity=IntensitySpec(), precision="fp64")
    with pytest.raises(ValueError, match="64-character hex digest"):
        embedding_key_from_digest("abc", model, **FP32)
    with pytest.raises(RecipeError, match="'evaluate.cache_dir'"):
        open_embedding_cache("  ", "evaluate.cache_dir")
    assert open_embedding_cache(None, "evaluate.cache_dir") is None


def test_digest_key_equals_image_key(model):
    image = _image()
    assert embedding_key_from_digest(image_digest(image), model, **FP32) == embedding_key(image, model, **FP32)


def scaled_image(seed=0):
    """An H×W×3 float32 image on the 0–255 scale, as evaluation passes to embed_image."""
    return _image(seed).astype(np.float32)


class EncodeCounter:
    """Counts Segmenter.encode calls while it is installed; the real method still runs."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = Segmenter.encode

        def counted(segmenter, images):
            self.calls += 1
            return original(segmenter, images)

        monkeypatch.setattr(Segmenter, "encode", counted)


def test_embed_image_miss_then_hit(model, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    image = scaled_image()
    plain = embed_image(model, image)
    counter = EncodeCounter(monkeypatch)

    first = embed_image(model, image, cache)
    second = embed_image(model, image, cache)

    assert counter.calls == 1
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(first, plain, atol=0, rtol=0)
    torch.testing.assert_close(second, plain, atol=0, rtol=0)


def test_embed_image_shares_predictor_entries(model, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    image = scaled_image()
    predictor = Predictor(model, intensity=IntensitySpec(mode="none"), cache=cache)
    predictor.set_image(image)
    counter = EncodeCounter(monkeypatch)

    embedding = embed_image(model, image, cache)

    assert counter.calls == 0
    torch.testing.assert_close(embedding, predictor.embedding, atol=0, rtol=0)


def test_embed_image_under_autocast_has_own_entry(model, tmp_path):
    cache = EmbeddingCache(tmp_path)
    image = scaled_image()
    embed_image(model, image, cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embed_image(model, image, cache)

    assert (cache.hits, cache.misses) == (0, 2)


def test_embed_image_misses_changed_settings(checkpoint, model, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache")
    image = scaled_image()
    embed_image(model, image, cache)

    other_checkpoint = save_tiny_checkpoint(tmp_path / "other.pth", seed=7)
    other_weights = Segmenter.from_registry("sam_vit_tiny", checkpoint=other_checkpoint, image_size=SIZE).eval()
    with pytest.warns(FmadaptWarning, match="allow_preprocess_mismatch=True"):
        other_preprocessing = Segmenter.from_registry(
            "sam_vit_tiny",
            checkpoint=checkpoint,
            image_size=SIZE,
            preprocess=MEDSAM_PREPROCESS,
            allow_preprocess_mismatch=True,
        ).eval()
    lora = Segmenter.from_registry("sam_vit_tiny", checkpoint=checkpoint, image_size=SIZE).eval()
    apply_lora(lora, LoraSettings(rank=2, target_modules=("qkv",)))
    for name, parameter in lora.named_parameters():
        parameter.requires_grad_("lora_" in name)

    counter = EncodeCounter(monkeypatch)
    for changed in (other_weights, other_preprocessing, lora):
        embed_image(changed, image, cache)
    assert counter.calls == 3
    embed_image(lora, image, cache)
    assert counter.calls == 3

    lora_b = next(p for name, p in lora.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b.add_(0.01)
    trained = embed_image(lora, image, cache)
    assert counter.calls == 4
    assert len(list(cache.folder.glob("*.safetensors"))) == 5
    torch.testing.assert_close(trained, embed_image(lora, image), atol=0, rtol=0)


def test_decoder_steps_keep_base_fingerprint(model, monkeypatch):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("mask_decoder."))
    image = _image()
    embedding_key(image, model, **FP32)
    calls = []
    original = cache_module.base_fingerprint
    monkeypatch.setattr(cache_module, "base_fingerprint", lambda m: calls.append(m) or original(m))

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    embedding = torch.randn(1, model.embedding_channels, SIZE // 16, SIZE // 16)
    logits, _ = model.decode_prompts(embedding, boxes=torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    logits.mean().backward()
    optimizer.step()
    embedding_key(image, model, **FP32)
    assert calls == []

    decoder_weight = next(p for name, p in model.named_parameters() if name.startswith("mask_decoder."))
    decoder_weight.requires_grad_(False)
    embedding_key(image, model, **FP32)
    assert len(calls) == 1


def test_slice_embeddings_reuse_within_budget(model):
    predictor = Predictor(model, intensity=IntensitySpec(mode="none"))
    slices = [scaled_image(seed) for seed in range(3)]
    box = np.array([10, 10, 60, 50])
    embeddings = SliceEmbeddings(predictor)

    for index in (0, 1, 2, 1, 0):
        embeddings.set_image(index, slices[index])
    assert (embeddings.encoded, embeddings.reused) == (3, 2)
    reused = predictor.predict(box=box)
    fresh = Predictor(model, intensity=IntensitySpec(mode="none"))
    fresh.set_image(slices[0])
    for got, want in zip(reused, fresh.predict(box=box)):
        np.testing.assert_array_equal(got, want)

    one_slice = predictor.embedding.numel() * predictor.embedding.element_size()
    small = SliceEmbeddings(predictor, max_bytes=one_slice)
    for index in (0, 1, 0, 1):
        small.set_image(index, slices[index])
    assert (small.encoded, small.reused) == (3, 1)
    assert small.stored_bytes == one_slice


def test_slice_embeddings_input_errors(model):
    predictor = Predictor(model)
    with pytest.raises(TypeError, match="predictor must be a Predictor"):
        SliceEmbeddings(model)
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        SliceEmbeddings(predictor, max_bytes=-1)
    with pytest.raises(ValueError, match="1×E×h×w tensor"):
        predictor.set_embedding(torch.zeros(2, 4, 8, 8), (60, 80))
    with pytest.raises(ValueError, match="original_size must be"):
        predictor.set_embedding(torch.zeros(1, 4, 8, 8), (0, 80))
