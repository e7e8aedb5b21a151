import logging
import pickle

import pytest
import torch
from tiny_checkpoints import build_reference_sam, sam_state_dict, save_tiny_checkpoint

from fmadapt.errors import CheckpointError
from fmadapt.models import Segmenter, load_checkpoint, read_state_dict, resize_position_embeddings
from fmadapt.models.manifest import find_entry


def _assert_weights_equal(model, reference):
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def test_official_format_loads(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth")
    model = Segmenter.from_registry("sam_vit_tiny")
    report = load_checkpoint(model, path)
    assert report.missing == []
    assert report.unexpected == []
    assert report.resized == []
    assert report.ignored == ["pixel_mean", "pixel_std"]
    _assert_weights_equal(model, build_reference_sam())


@pytest.mark.parametrize("wrap", ["model", "state_dict"])
def test_wrapped_checkpoint_loads(tmp_path, wrap):
    path = save_tiny_checkpoint(tmp_path / "trained.pt", wrap=wrap)
    model = Segmenter.from_registry("sam_vit_tiny")
    report = load_checkpoint(model, path)
    assert report.missing == []
    assert report.unexpected == []
    _assert_weights_equal(model, build_reference_sam())


def test_read_unwraps_and_strips_ddp(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ddp.pth", wrap="model", ddp_prefix=True)
    state = read_state_dict(path)
    assert "optimizer" not in state
    assert "epoch" not in state
    assert "image_encoder.pos_embed" in state
    assert not any(key.startswith("module.") for key in state)


def test_safetensors_loads(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.safetensors", seed=4)
    model = Segmenter.from_registry("sam_vit_tiny")
    report = load_checkpoint(model, path)
    assert report.missing == []
    _assert_weights_equal(model, build_reference_sam(seed=4))


def test_unrelated_keys_raise(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)}, path)
    model = Segmenter.from_registry("sam_vit_tiny")
    with pytest.raises(CheckpointError, match="no key"):
        load_checkpoint(model, path)


def test_missing_required_keys_raise(tmp_path):
    state = sam_state_dict(build_reference_sam())
    del state["image_encoder.neck.0.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(Segmenter.from_registry("sam_vit_tiny"), path)
    assert "1 keys missing" in str(caught.value)
    assert "image_encoder.neck.0.weight" in str(caught.value)


def test_wrong_model_size_raises(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(Segmenter.from_registry("sam_vit_small"), path)
    assert "different shape" in str(caught.value)
    assert "image_encoder.pos_embed file (1, 16, 16, 96) vs model (1, 16, 16, 192)" in str(caught.value)


def test_decoder_keys_optional_by_default(tmp_path, caplog):
    state = sam_state_dict(build_reference_sam())
    state = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    path = tmp_path / "encoder_only.pth"
    torch.save(state, path)
    model = Segmenter.from_registry("sam_vit_tiny")
    with caplog.at_level(logging.WARNING, logger="fmadapt.models.checkpoint"):
        report = load_checkpoint(model, path)
    assert report.missing
    assert all(key.startswith(("prompt_encoder.", "mask_decoder.")) for key in report.missing)
    assert "missing" in caplog.text
    with pytest.raises(CheckpointError, match="mask_decoder"):
        load_checkpoint(model, path, required=("image_encoder", "mask_decoder"))


def test_class_embeddings_reported_missing(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "sam_tiny.pth")
    model = Segmenter.from_registry("sam_vit_tiny", class_names=("liver", "spleen"))
    report = load_checkpoint(model, path)
    assert report.missing == ["class_embeddings.weight"]


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError) as caught:
        read_state_dict(path)
    assert str(path) in str(caught.value)
    assert "checkpoints/" in str(caught.value)


def test_non_tensor_content_raises(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        read_state_dict(path)
    mixed = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "b": 3}, mixed)
    with pytest.raises(CheckpointError, match="1 entries"):
        read_state_dict(mixed)


def test_pickled_objects_rejected(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_unknown_suffix_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="suffix"):
        read_state_dict(path)


def test_1024_checkpoint_into_256_model(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny_1024.pth", image_size=1024, seed=2)
    source = read_state_dict(path)
    model = Segmenter.from_registry("sam_vit_tiny", image_size=256)
    report = load_checkpoint(model, path)

    # Global blocks 1 and 3 see 64 tokens per side at 1024 and 16 at 256; windowed blocks 0 and 2 do not change.
    expected = {"image_encoder.pos_embed"}
    for block in (1, 3):
        expected |= {f"image_encoder.blocks.{block}.attn.rel_pos_h", f"image_encoder.blocks.{block}.attn.rel_pos_w"}
    assert set(report.resized) == expected
    assert report.missing == []
    state = model.state_dict()
    assert state["image_encoder.pos_embed"].shape == (1, 16, 16, 96)
    assert source["image_encoder.pos_embed"].shape == (1, 64, 64, 96)
    assert state["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 32)
    torch.testing.assert_close(state["image_encoder.blocks.0.attn.rel_pos_h"], source["image_encoder.blocks.0.attn.rel_pos_h"])

    embedding = model.encode(torch.zeros(1, 3, 256, 256))
    assert embedding.shape == (1, 64, 16, 16)
    assert torch.isfinite(embedding).all()


def test_pos_embed_resize_keeps_constant_field():
    # A constant table must stay constant under bicubic resizing.
    model = Segmenter.from_registry("sam_vit_tiny", image_size=64)
    state = {"image_encoder.pos_embed": torch.full((1, 16, 16, 96), 0.25)}
    resized = resize_position_embeddings(state, model)
    assert resized == ["image_encoder.pos_embed"]
    torch.testing.assert_close(state["image_encoder.pos_embed"], torch.full((1, 4, 4, 96), 0.25))


def _truncated_copy(source, target, size):
    target.write_bytes(source.read_bytes()[:size])
    return target


def test_truncated_official_file_names_sizes(tmp_path):
    complete = save_tiny_checkpoint(tmp_path / "complete.pth")
    path = _truncated_copy(complete, tmp_path / "sam_vit_b_01ec64.pth", 1000)
    official = find_entry("sam_vit_b_01ec64.pth")
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "(1000 bytes)" in message
    assert f"is {official.size_bytes} bytes" in message
    assert "Download it again" in message
    assert official.source in message
    assert "weights_only=False" not in message
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_garbage_official_file_hides_torch_advice(tmp_path):
    # Bytes that are not a zip archive reach the pickle reader, whose torch error text
    # recommends weights_only=False.
    path = tmp_path / "medsam_vit_b.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "(1024 bytes)" in message
    assert f"is {find_entry('medsam_vit_b').size_bytes} bytes" in message
    assert "False" not in message
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
    assert "False" in str(caught.value.__cause__)


def test_truncated_unlisted_file_says_download_again(tmp_path):
    complete = save_tiny_checkpoint(tmp_path / "complete.pth")
    size = complete.stat().st_size // 2
    path = _truncated_copy(complete, tmp_path / "my_weights.pth", size)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert f"({size} bytes)" in message
    assert "download or copy it again" in message
    assert "weights_only=False" not in message
    assert caught.value.__cause__ is not None


def test_empty_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(0 bytes\)"):
        read_state_dict(path)
