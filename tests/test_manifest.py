"""Tests for the checkpoint manifest and local file verification."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from fmadapt.errors import CheckpointError, FmadaptWarning
from fmadapt.models.manifest import (
    ManifestEntry,
    VerifyStatus,
    default_checkpoint_path,
    find_entry,
    read_manifest,
    sha256_of_file,
    verify_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Published SHA-256 test vectors (FIPS 180-2, appendix B.1 and B.3).
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
MILLION_A_SHA256 = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"

SAM_SOURCE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


def make_entry(**overrides):
    fields = {
        "model": "tiny_vit",
        "file_name": "tiny.pth",
        "size_bytes": 3,
        "sha256": ABC_SHA256,
        "source": "https://example.org/tiny",
        "licence": "Apache-2.0",
    }
    fields.update(overrides)
    return ManifestEntry(**fields)


def write_file(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def write_manifest(folder: Path, entries, *, format_version=1) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({"format_version": format_version, "checkpoints": entries}))
    return path


def entry_dict(**overrides):
    return dataclasses.asdict(make_entry(**overrides))


# The shipped manifest ----------------------------------------------------------------


def test_repository_and_package_manifests_identical():
    repository_copy = (REPO_ROOT / "checkpoints" / "manifest.json").read_bytes()
    package_copy = (REPO_ROOT / "fmadapt" / "models" / "checkpoint_manifest.json").read_bytes()
    assert repository_copy == package_copy


def test_packaged_manifest_lists_official_files():
    entries = read_manifest()
    by_model = {entry.model: entry for entry in entries}
    assert set(by_model) == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    assert by_model["sam_vit_b"].file_name == "sam_vit_b_01ec64.pth"
    assert by_model["sam_vit_l"].file_name == "sam_vit_l_0b3195.pth"
    assert by_model["sam_vit_h"].file_name == "sam_vit_h_4b8939.pth"
    assert by_model["medsam_vit_b"].file_name == "medsam_vit_b.pth"
    for model in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        assert by_model[model].source == SAM_SOURCE
    assert by_model["medsam_vit_b"].source.startswith("https://github.com/bowang-lab/MedSAM")


def test_packaged_manifest_reads_from_explicit_path():
    from_path = read_manifest(REPO_ROOT / "checkpoints" / "manifest.json")
    assert from_path == read_manifest()


def test_sam_file_suffix_is_not_sha256_prefix():
    # The six hex digits in each SAM file name start the file's MD5, not its SHA-256.
    for entry in read_manifest():
        if entry.model.startswith("sam_") and entry.sha256 is not None:
            suffix = entry.file_name.removesuffix(".pth").rsplit("_", 1)[1]
            assert not entry.sha256.startswith(suffix)


# verify_checkpoint -----------------------------------------------------------------


def test_verify_matching_file_passes(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    result = verify_checkpoint(path, make_entry())
    assert result.status is VerifyStatus.VERIFIED
    assert result.ok
    assert result.size_bytes == 3
    assert result.sha256 == ABC_SHA256
    assert result.path == path
    result.raise_if_failed()


@pytest.mark.parametrize("chunk_size", [1, 999, 4096, 1 << 20, 2_000_000])
def test_verify_streams_in_chunks(tmp_path, chunk_size):
    path = write_file(tmp_path, "million.pth", b"a" * 1_000_000)
    entry = make_entry(file_name="million.pth", size_bytes=1_000_000, sha256=MILLION_A_SHA256)
    result = verify_checkpoint(path, entry, chunk_size=chunk_size)
    assert result.status is VerifyStatus.VERIFIED


def test_sha256_of_file_matches_vector(tmp_path):
    path = write_file(tmp_path, "abc.bin", b"abc")
    assert sha256_of_file(path, chunk_size=2) == ABC_SHA256


def test_verify_wrong_size_fails(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abcd")
    result = verify_checkpoint(path, make_entry())
    assert result.status is VerifyStatus.SIZE_MISMATCH
    assert not result.ok
    assert result.size_bytes == 4
    assert result.sha256 is None
    assert "4 bytes" in result.message
    assert "3 bytes" in result.message
    assert "https://example.org/tiny" in result.message
    with pytest.raises(CheckpointError, match="is 4 bytes but the official tiny.pth is 3 bytes"):
        result.raise_if_failed()


def test_verify_wrong_hash_fails(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abd")
    result = verify_checkpoint(path, make_entry())
    assert result.status is VerifyStatus.HASH_MISMATCH
    assert not result.ok
    assert result.sha256 != ABC_SHA256
    assert ABC_SHA256 in result.message
    assert result.sha256 in result.message
    with pytest.raises(CheckpointError, match="corrupt or a different file"):
        result.raise_if_failed()


def test_verify_unknown_hash_not_verifiable(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    result = verify_checkpoint(path, make_entry(sha256=None))
    assert result.status is VerifyStatus.NOT_VERIFIABLE
    assert not result.ok
    assert result.sha256 == ABC_SHA256
    assert "not verifiable" in result.message
    with pytest.raises(CheckpointError, match="not verifiable"):
        result.raise_if_failed()
    result.raise_if_failed(allow_unverifiable=True)


def test_verify_unknown_size_checks_hash_only(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    assert verify_checkpoint(path, make_entry(size_bytes=None)).ok
    wrong = write_file(tmp_path, "tiny.pth", b"xyz")
    result = verify_checkpoint(wrong, make_entry(size_bytes=None))
    assert result.status is VerifyStatus.HASH_MISMATCH


def test_verify_unknown_size_and_hash_not_verifiable(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    result = verify_checkpoint(path, make_entry(size_bytes=None, sha256=None))
    assert result.status is VerifyStatus.NOT_VERIFIABLE


def test_verify_missing_file_names_source(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*https://example.org/tiny"):
        verify_checkpoint(tmp_path / "tiny.pth", make_entry())


def test_verify_directory_rejected(tmp_path):
    folder = tmp_path / "tiny.pth"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        verify_checkpoint(folder, make_entry())


def test_verify_other_file_name_warns(tmp_path):
    path = write_file(tmp_path, "renamed.pth", b"abc")
    with pytest.warns(FmadaptWarning, match="renamed.pth"):
        result = verify_checkpoint(path, make_entry())
    assert result.ok


def test_verify_same_file_name_does_not_warn(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FmadaptWarning)
        verify_checkpoint(path, make_entry())


def test_verify_argument_types(tmp_path):
    path = write_file(tmp_path, "tiny.pth", b"abc")
    with pytest.raises(TypeError, match="path must be"):
        verify_checkpoint(123, make_entry())
    with pytest.raises(TypeError, match="entry must be a ManifestEntry"):
        verify_checkpoint(path, {"file_name": "tiny.pth"})
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        verify_checkpoint(path, make_entry(), chunk_size=1.5)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of bytes, got 0"):
        verify_checkpoint(path, make_entry(), chunk_size=0)


def test_verify_against_packaged_entry(tmp_path):
    # A small stand-in file named like the official one must fail on size, not pass.
    entry = find_entry("sam_vit_b")
    path = write_file(tmp_path, entry.file_name, b"not the real weights")
    result = verify_checkpoint(path, entry)
    assert result.status is VerifyStatus.SIZE_MISMATCH
    assert SAM_SOURCE in result.message


# find_entry and default_checkpoint_path ----------------------------------------------


def test_find_entry_by_model_and_file():
    by_model = find_entry("sam_vit_h")
    by_file = find_entry("sam_vit_h_4b8939.pth")
    assert by_model == by_file
    assert by_model.model == "sam_vit_h"


def test_find_entry_unknown_lists_known_files():
    with pytest.raises(ValueError) as raised:
        find_entry("sam_vit_x.pth")
    message = str(raised.value)
    assert "unknown checkpoint 'sam_vit_x.pth'" in message
    for file_name in (
        "sam_vit_b_01ec64.pth",
        "sam_vit_l_0b3195.pth",
        "sam_vit_h_4b8939.pth",
        "medsam_vit_b.pth",
    ):
        assert file_name in message


def test_find_entry_suggests_close_name():
    with pytest.raises(ValueError, match="did you mean 'sam_vit_b_01ec64.pth'"):
        find_entry("sam_vit_b_01ec46.pth")


def test_find_entry_custom_entries():
    entry = make_entry()
    assert find_entry("tiny.pth", entries=[entry]) is entry
    with pytest.raises(ValueError, match="known files: \\['tiny.pth'\\]"):
        find_entry("sam_vit_b", entries=[entry])


def test_find_entry_rejects_non_string():
    with pytest.raises(TypeError, match="model_name_or_file must be a str"):
        find_entry(Path("sam_vit_b_01ec64.pth"))


def test_default_checkpoint_path(tmp_path):
    assert default_checkpoint_path("sam_vit_b") == Path("checkpoints") / "sam_vit_b_01ec64.pth"
    assert default_checkpoint_path("medsam_vit_b", tmp_path) == tmp_path / "medsam_vit_b.pth"
    with pytest.raises(ValueError, match="unknown checkpoint 'vit_b'"):
        default_checkpoint_path("vit_b")
    with pytest.raises(TypeError, match="folder must be"):
        default_checkpoint_path("sam_vit_b", folder=None)


# ManifestEntry and read_manifest validation ------------------------------------------


def test_entry_is_frozen():
    entry = make_entry()
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.sha256 = None


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"sha256": "ABC"}, ValueError, "64 lowercase hex digits"),
        ({"sha256": ABC_SHA256.upper()}, ValueError, "64 lowercase hex digits"),
        ({"sha256": 5}, TypeError, "sha256 must be a str or None"),
        ({"size_bytes": 0}, ValueError, "positive number of bytes, got 0"),
        ({"size_bytes": -3}, ValueError, "positive number of bytes, got -3"),
        ({"size_bytes": True}, TypeError, "size_bytes must be an int or None"),
        ({"size_bytes": "3"}, TypeError, "size_bytes must be an int or None"),
        ({"file_name": "sub/tiny.pth"}, ValueError, "bare file name"),
        ({"file_name": ""}, ValueError, "file_name must not be empty"),
        ({"model": None}, TypeError, "model must be a str"),
        ({"source": "http://example.org"}, ValueError, "https://"),
        ({"licence": " "}, ValueError, "licence must not be empty"),
    ],
)
def test_entry_rejects_invalid_field(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        make_entry(**overrides)


def test_read_manifest_custom_file(tmp_path):
    path = write_manifest(tmp_path, [entry_dict(), entry_dict(model="other", file_name="o.pth")])
    entries = read_manifest(path)
    assert [entry.model for entry in entries] == ["tiny_vit", "other"]
    assert entries[0] == make_entry()


def test_read_manifest_null_values(tmp_path):
    path = write_manifest(tmp_path, [entry_dict(size_bytes=None, sha256=None)])
    (entry,) = read_manifest(path)
    assert entry.size_bytes is None
    assert entry.sha256 is None


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(tmp_path / "manifest.json")


def test_read_manifest_invalid_json(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("document", "pattern"),
    [
        ([], "JSON object at the top level"),
        ({"checkpoints": []}, "format_version None"),
        ({"format_version": 2, "checkpoints": []}, "format_version 2"),
        ({"format_version": 1}, "'checkpoints' list"),
        ({"format_version": 1, "checkpoints": ["x"]}, "entry 0 must be a JSON object"),
    ],
)
def test_read_manifest_rejects_bad_layout(tmp_path, document, pattern):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=pattern):
        read_manifest(path)


def test_read_manifest_missing_key(tmp_path):
    raw = entry_dict()
    del raw["licence"]
    path = write_manifest(tmp_path, [raw])
    with pytest.raises(ValueError, match="entry 0 is missing key\\(s\\) \\['licence'\\]"):
        read_manifest(path)


def test_read_manifest_unknown_key(tmp_path):
    path = write_manifest(tmp_path, [entry_dict() | {"md5": "x"}])
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['md5'\\]"):
        read_manifest(path)


def test_read_manifest_invalid_value_names_entry(tmp_path):
    invalid = entry_dict(model="b", file_name="b.pth") | {"sha256": "bad"}
    path = write_manifest(tmp_path, [entry_dict(), invalid])
    with pytest.raises(ValueError, match="entry 1: sha256 must be 64 lowercase hex digits"):
        read_manifest(path)


def test_read_manifest_duplicate_model(tmp_path):
    path = write_manifest(tmp_path, [entry_dict(), entry_dict(file_name="other.pth")])
    with pytest.raises(ValueError, match="lists model 'tiny_vit' more than once"):
        read_manifest(path)


def test_read_manifest_duplicate_file_name(tmp_path):
    path = write_manifest(tmp_path, [entry_dict(), entry_dict(model="other")])
    with pytest.raises(ValueError, match="lists file_name 'tiny.pth' more than once"):
        read_manifest(path)


def test_read_manifest_rejects_bad_path_type():
    with pytest.raises(TypeError, match="path must be"):
        read_manifest(42)
