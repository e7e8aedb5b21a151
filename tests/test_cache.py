import logging

import numpy as np
import pytest
import torch
from tiny_checkpoints import save_tiny_checkpoint

from fmadapt.adapt.lora import LoraSettings, apply_lora
from fmadapt.data.intensity import IntensitySpec
from fmadapt.data.transforms import MEDSAM_PREPROCESS
from fmadapt.errors import FmadaptWarning
from fmadapt.inference import Predictor
from fmadapt.inference.cache import EmbeddingCache, embedding_key, image_digest
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
