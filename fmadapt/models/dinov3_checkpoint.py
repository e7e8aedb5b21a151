"""Read DINOv3 ViT weights from local files in Hugging Face or Meta format.

Two layouts are supported:

- Hugging Face model folder: ``config.json`` plus ``model.safetensors`` (or shards listed
  in ``model.safetensors.index.json``), with transformers' key names such as
  ``embeddings.register_tokens`` and ``layer.0.attention.q_proj.weight``.
- Meta's original ``.pth`` from facebookresearch/dinov3, with keys such as
  ``storage_tokens``, ``blocks.0.attn.qkv.weight``, ``blocks.0.ls1.gamma`` and
  ``rope_embed.periods``.

Both are converted to the Hugging Face names ("hub names", with blocks under
``layer.N``), which are then matched with the names of the installed transformers
module. The key mapping follows Meta's module definitions (``dinov3/layers``) and
transformers' ``DINOv3ViTModel``:

================================  =========================================
Meta                              Hugging Face
================================  =========================================
cls_token, storage_tokens         embeddings.cls_token, .register_tokens
mask_token (1×E)                  embeddings.mask_token (1×1×E)
patch_embed.proj.*                embeddings.patch_embeddings.*
blocks.N.attn.qkv.weight (3E×E)   layer.N.attention.{q,k,v}_proj.weight
blocks.N.attn.qkv.bias, bias_mask layer.N.attention.{q,v}_proj.bias
blocks.N.attn.proj.*              layer.N.attention.o_proj.*
blocks.N.ls1.gamma, ls2.gamma     layer.N.layer_scale1.lambda1, layer_scale2.lambda1
blocks.N.mlp.fc1.*, fc2.*         layer.N.mlp.up_proj.*, down_proj.* (GELU MLP)
blocks.N.mlp.w1.*, w2.*, w3.*     layer.N.mlp.gate_proj.*, up_proj.*, down_proj.* (SwiGLU)
blocks.N.norm1.*, norm2.*, norm.* same names (norm.* at the top level)
rope_embed.periods                checked, not loaded (recomputed from rope_theta)
================================  =========================================
"""

from __future__ import annotations

import json
import logging
import math
import re
from os import PathLike, fspath
from pathlib import Path
from typing import Sequence

import torch

from fmadapt.errors import CheckpointError
from fmadapt.models.checkpoint import LoadReport, read_state_dict
from fmadapt.models.dinov3 import DinoV3Encoder, DinoV3Spec

__all__ = [
    "CHECKPOINT_FORMATS",
    "detect_checkpoint_format",
    "hf_to_meta_state_dict",
    "load_dinov3_checkpoint",
    "meta_to_hf_state_dict",
    "read_dinov3_state_dict",
    "rope_periods",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("huggingface", "meta")
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_MODEL_TYPE = "dinov3_vit"
_REPORT_KEY_LIMIT = 5

# Meta top-level keys and their Hugging Face names. mask_token also changes shape.
_META_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
# Meta keys that are checked or dropped on purpose rather than loaded.
_META_ROPE_PERIODS = "rope_embed.periods"
# Meta's untied norm for the class token of local crops is used only in training
# (its comment in dinov3/models/vision_transformer.py), so inference never needs it.
_META_TRAINING_ONLY_PREFIXES = ("local_cls_norm.",)

_META_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"layer\.(\d+)\.(.+)")
_HF_PREFIXES = ("embeddings.", "layer.", "model.layer.", "norm.")
# bfloat16 keeps 8 significant bits, so a stored period can differ by 2**-8 relative.
_PERIOD_TOLERANCE = 1e-2


def _block_renames(spec: DinoV3Spec) -> dict[str, str]:
    """Meta names inside ``blocks.N`` -> Hugging Face names inside ``layer.N``, except qkv."""
    renames = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "attn.proj.weight": "attention.o_proj.weight",
        "attn.proj.bias": "attention.o_proj.bias",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    if spec.gated_mlp:
        mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    else:
        mlp = {"fc1": "up_proj", "fc2": "down_proj"}
    for meta_name, hf_name in mlp.items():
        for kind in ("weight", "bias"):
            renames[f"mlp.{meta_name}.{kind}"] = f"mlp.{hf_name}.{kind}"
    return renames


def _first_keys(keys: Sequence[str]) -> str:
    listed = ", ".join(keys[:_REPORT_KEY_LIMIT])
    if len(keys) > _REPORT_KEY_LIMIT:
        listed += f", ... {len(keys) - _REPORT_KEY_LIMIT} more"
    return listed


def rope_periods(spec: DinoV3Spec) -> torch.Tensor:
    """Return Meta's RoPE periods theta ** (4i / head_dim) for i < head_dim / 4, in float32."""
    exponents = torch.arange(spec.head_dim // 4, dtype=torch.float32) * 4.0 / spec.head_dim
    return spec.rope_theta**exponents


def meta_to_hf_state_dict(
    state: dict[str, torch.Tensor], spec: DinoV3Spec
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Convert Meta-format weights to Hugging Face hub names for ``spec``.

    Returns:
        The converted state dict, the Meta keys consumed or dropped on purpose
        (``rope_embed.periods``, ``blocks.N.attn.qkv.bias_mask``, ``local_cls_norm.*``),
        and the Meta keys that have no counterpart (unexpected).

    Raises:
        CheckpointError: if ``rope_embed.periods`` does not match ``spec.rope_theta``, a
            qkv tensor does not have 3·E rows, or a bias mask was never initialised.
    """
    renames = _block_renames(spec)
    converted: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in state.items():
        if key in _META_TOP_LEVEL:
            if key == "mask_token" and value.ndim == 2:
                value = value.unsqueeze(1)
            converted[_META_TOP_LEVEL[key]] = value
        elif key == _META_ROPE_PERIODS:
            _check_rope_periods(value, spec)
            ignored.append(key)
        elif key.startswith(_META_TRAINING_ONLY_PREFIXES):
            ignored.append(key)
        elif match := _META_BLOCK.fullmatch(key):
            index, name = match.groups()
            prefix = f"layer.{index}."
            if name == "attn.qkv.weight":
                query, key_weight, value_weight = _split_qkv(key, value, spec)
                converted[prefix + "attention.q_proj.weight"] = query
                converted[prefix + "attention.k_proj.weight"] = key_weight
                converted[prefix + "attention.v_proj.weight"] = value_weight
            elif name == "attn.qkv.bias":
                mask = state.get(f"blocks.{index}.attn.qkv.bias_mask")
                query_bias, value_bias = _split_qkv_bias(key, value, mask, spec)
                converted[prefix + "attention.q_proj.bias"] = query_bias
                converted[prefix + "attention.v_proj.bias"] = value_bias
            elif name == "attn.qkv.bias_mask":
                ignored.append(key)
            elif name in renames:
                converted[prefix + renames[name]] = value
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    return converted, sorted(ignored), sorted(unexpected)


def _split_qkv(key: str, weight: torch.Tensor, spec: DinoV3Spec) -> tuple[torch.Tensor, ...]:
    expected = (3 * spec.embed_dim, spec.embed_dim)
    if tuple(weight.shape) != expected:
        raise CheckpointError(
            f"{key} has shape {tuple(weight.shape)}, expected {expected} for {spec.name!r} "
            f"(embed_dim {spec.embed_dim}); check that the model name matches the checkpoint"
        )
    return tuple(part.contiguous() for part in weight.chunk(3, dim=0))


def _split_qkv_bias(
    key: str, bias: torch.Tensor, mask: torch.Tensor | None, spec: DinoV3Spec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the query and value biases, with Meta's bias mask applied.

    The key bias is dropped. Adding a bias b to every key adds q·b to all attention
    scores of query q, which softmax cancels, so the attention output does not change.
    """
    size = spec.embed_dim
    if tuple(bias.shape) != (3 * size,):
        raise CheckpointError(
            f"{key} has shape {tuple(bias.shape)}, expected ({3 * size},) for {spec.name!r}; "
            "check that the model name matches the checkpoint"
        )
    if mask is not None:
        if tuple(mask.shape) != tuple(bias.shape):
            raise CheckpointError(f"{key}_mask has shape {tuple(mask.shape)}, expected {tuple(bias.shape)}")
        if torch.isnan(mask).any():
            raise CheckpointError(
                f"{key}_mask contains NaN, the value Meta's LinearKMaskedBias has before init_weights "
                "runs; the file was saved from an uninitialised model, so export it again after loading weights"
            )
        bias = bias * mask.to(bias.dtype)
    return bias[:size].contiguous(), bias[2 * size :].contiguous()


def _check_rope_periods(periods: torch.Tensor, spec: DinoV3Spec) -> None:
    expected = rope_periods(spec)
    if tuple(periods.shape) != tuple(expected.shape) or not torch.allclose(
        periods.float(), expected, rtol=_PERIOD_TOLERANCE, atol=0.0
    ):
        raise CheckpointError(
            f"{_META_ROPE_PERIODS} of the checkpoint ({periods.float().tolist()}) does not match RoPE base "
            f"{spec.rope_theta} and head size {spec.head_dim} of {spec.name!r} ({expected.tolist()}); "
            "check that the model name matches the checkpoint"
        )


def hf_to_meta_state_dict(state: dict[str, torch.Tensor], spec: DinoV3Spec) -> dict[str, torch.Tensor]:
    """Convert Hugging Face weights of ``spec`` to Meta's key names and shapes.

    Accepts hub names (``layer.N``) and the module names of transformers 5.x
    (``model.layer.N``). The qkv bias gets zeros in its key part and a ``bias_mask`` of
    ones with zeros over the key part, as Meta's initialised ``LinearKMaskedBias`` has.
    ``rope_embed.periods`` is computed from ``spec`` in float32.

    Raises:
        CheckpointError: if a key has no Meta counterpart or a q/k/v tensor is missing.
    """
    reverse = {hf: meta for meta, hf in _block_renames(spec).items()}
    top_level = {hf: meta for meta, hf in _META_TOP_LEVEL.items()}
    hub_state = _to_hub_names(state)
    converted: dict[str, torch.Tensor] = {}
    attention_parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hub_state.items():
        if key in top_level:
            converted[top_level[key]] = value.reshape(1, -1) if key == "embeddings.mask_token" else value
            continue
        match = _HF_BLOCK.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        index, name = match.groups()
        if name in reverse:
            converted[f"blocks.{index}.{reverse[name]}"] = value
        elif name.startswith("attention.") and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            attention_parts.setdefault(index, {})[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys have no Meta DINOv3 counterpart ({_first_keys(sorted(unknown))}); "
            "pass the state dict of a DINOv3ViTModel"
        )

    for index, parts in attention_parts.items():
        converted.update(_merge_qkv(index, parts, spec))
    converted[_META_ROPE_PERIODS] = rope_periods(spec)
    return converted


def _merge_qkv(index: str, parts: dict[str, torch.Tensor], spec: DinoV3Spec) -> dict[str, torch.Tensor]:
    names = [f"attention.{part}_proj.weight" for part in "qkv"] + ["attention.q_proj.bias", "attention.v_proj.bias"]
    missing = [f"layer.{index}.{name}" for name in names if name not in parts]
    if missing:
        raise CheckpointError(f"cannot build blocks.{index}.attn.qkv: missing {missing}")
    weight = torch.cat([parts[f"attention.{part}_proj.weight"] for part in "qkv"], dim=0)
    query_bias = parts["attention.q_proj.bias"]
    bias = torch.cat([query_bias, torch.zeros_like(query_bias), parts["attention.v_proj.bias"]])
    mask = torch.ones_like(bias)
    mask[spec.embed_dim : 2 * spec.embed_dim] = 0
    prefix = f"blocks.{index}.attn.qkv."
    return {prefix + "weight": weight, prefix + "bias": bias, prefix + "bias_mask": mask}


def _to_hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``model.layer.N`` (transformers 5.x module names) to the hub's ``layer.N``."""
    return {(key[len("model.") :] if key.startswith("model.layer.") else key): value for key, value in state.items()}


def detect_checkpoint_format(path: str | PathLike[str]) -> str:
    """Return ``"huggingface"`` for a folder and ``"meta"`` for a file, without reading weights.

    A single ``.safetensors`` file can be either, so ``read_dinov3_state_dict`` decides
    from its key names.
    """
    checkpoint_path = Path(fspath(path))
    if checkpoint_path.is_dir():
        return "huggingface"
    if checkpoint_path.is_file():
        return "meta"
    raise FileNotFoundError(
        f"DINOv3 checkpoint {checkpoint_path} not found; pass a local Hugging Face model folder "
        "(config.json and model.safetensors) or Meta's .pth file"
    )


def read_dinov3_state_dict(
    path: str | PathLike[str], spec: DinoV3Spec
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Read a local DINOv3 checkpoint of either format and convert it to hub names.

    Returns:
        The state dict in Hugging Face hub names, the file keys dropped on purpose, and the
        file keys that have no counterpart in the model.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the folder's config.json describes another architecture, the
            weights cannot be read, or no key has a DINOv3 name in either format.
    """
    checkpoint_path = Path(fspath(path))
    if detect_checkpoint_format(checkpoint_path) == "huggingface":
        _check_hf_config(checkpoint_path, spec)
        state = _read_hf_weights(checkpoint_path)
    else:
        state = read_state_dict(checkpoint_path)

    if _is_meta_layout(state):
        return meta_to_hf_state_dict(state, spec)
    if any(key.startswith(_HF_PREFIXES) for key in state):
        return _to_hub_names(state), [], []
    raise CheckpointError(
        f"no key of checkpoint {checkpoint_path} has a DINOv3 name in Hugging Face or Meta format "
        f"({len(state)} keys such as {_first_keys(sorted(state))}); check that the file is a DINOv3 ViT checkpoint"
    )


def _is_meta_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(key == "cls_token" or key.startswith("blocks.") for key in state)


def _check_hf_config(folder: Path, spec: DinoV3Spec) -> None:
    config_path = folder / HF_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"Hugging Face model folder {folder} has no {HF_CONFIG_FILE}; pass the folder that "
            f"save_pretrained wrote (config.json and {HF_WEIGHTS_FILE})"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"failed to read {config_path}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must contain a JSON object, got {type(config).__name__}")
    if config.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(
            f"{config_path} has model_type {config.get('model_type')!r}, expected {HF_MODEL_TYPE!r}; "
            "pass the folder of a DINOv3 ViT model"
        )

    expected = {
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.mlp_hidden_dim,
        "use_gated_mlp": spec.gated_mlp,
        "num_register_tokens": spec.num_register_tokens,
        "patch_size": spec.patch_size,
    }
    different = [
        f"{name} {config.get(name)!r} (expected {value!r})"
        for name, value in expected.items()
        if config.get(name) != value
    ]
    theta = config.get("rope_theta")
    if not isinstance(theta, (int, float)) or not math.isclose(theta, spec.rope_theta):
        different.append(f"rope_theta {theta!r} (expected {spec.rope_theta!r})")
    if different:
        raise CheckpointError(
            f"{config_path} describes a different architecture than {spec.name!r}: {', '.join(different)}; "
            "pick the registered model name that matches this folder"
        )


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / HF_WEIGHTS_FILE
    if single.is_file():
        return read_state_dict(single)
    index_path = folder / HF_INDEX_FILE
    if not index_path.is_file():
        found = sorted(child.name for child in folder.iterdir())
        raise CheckpointError(
            f"Hugging Face model folder {folder} has neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE} "
            f"(found {found}); pass the folder that save_pretrained wrote"
        )
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"failed to read the shard list in {index_path}: {error}") from error
    state: dict[str, torch.Tensor] = {}
    for shard_name in shard_names:
        state.update(read_state_dict(folder / shard_name))
    return state


def load_dinov3_checkpoint(
    encoder: DinoV3Encoder, path: str | PathLike[str], *, strict: bool = True
) -> LoadReport:
    """Load a local Hugging Face folder or Meta ``.pth`` file into ``encoder.backbone``.

    ``matched``, ``missing`` and ``mismatched`` in the report use the key names of the
    installed transformers module (such as ``model.layer.0.attention.q_proj.weight`` in
    transformers 5.x). ``unexpected`` and ``ignored`` use the file's own names.

    Args:
        encoder: the encoder to fill, built from the spec that matches the file.
        path: Hugging Face model folder, or a ``.pth``/``.safetensors`` file.
        strict: when true, a missing key or a shape mismatch raises CheckpointError.
            When false, those keys keep their current values and are reported, with a
            warning in the log.

    Raises:
        CheckpointError: if no key matches the model, or (with ``strict``) any model key is
            missing from the file or has a different shape.
    """
    if not isinstance(encoder, DinoV3Encoder):
        raise TypeError(f"encoder must be a DinoV3Encoder, got {type(encoder).__name__}")
    state, ignored, unexpected = read_dinov3_state_dict(path, encoder.spec)
    block_path = encoder.blocks_path[len("backbone.") :]
    state = {_to_module_name(key, block_path): value for key, value in state.items()}

    model_shapes = {key: tuple(value.shape) for key, value in encoder.backbone.state_dict().items()}
    matched = [key for key, shape in model_shapes.items() if key in state and tuple(state[key].shape) == shape]
    missing = [key for key in model_shapes if key not in state]
    mismatched = [key for key, shape in model_shapes.items() if key in state and tuple(state[key].shape) != shape]
    unexpected = sorted(unexpected + [key for key in state if key not in model_shapes])
    report = LoadReport(matched, missing, unexpected, [], mismatched, ignored)

    if not matched:
        raise CheckpointError(
            f"no key of DINOv3 checkpoint {path} matches {encoder.spec.name!r}: {report.summary()}; "
            "check that the model name matches the checkpoint"
        )
    if strict and (missing or mismatched):
        shape_changes = [f"{key} file {tuple(state[key].shape)} vs model {model_shapes[key]}" for key in mismatched]
        raise CheckpointError(
            f"DINOv3 checkpoint {path} does not fit {encoder.spec.name!r}: {len(missing)} keys missing "
            f"({_first_keys(missing) or 'none'}), {len(mismatched)} with a different shape "
            f"({_first_keys(shape_changes) or 'none'}), {len(unexpected)} unexpected "
            f"({_first_keys(unexpected) or 'none'}); check that the model name matches the checkpoint, "
            "or pass strict=False to load the matching keys only"
        )

    encoder.backbone.load_state_dict({key: state[key] for key in matched}, strict=False)
    if missing or unexpected or mismatched:
        logger.warning("loaded DINOv3 checkpoint %s: %s", path, report.summary())
    else:
        logger.info("loaded DINOv3 checkpoint %s: %s", path, report.summary())
    return report


def _to_module_name(hub_key: str, block_path: str) -> str:
    if hub_key.startswith("layer."):
        return f"{block_path}.{hub_key[len('layer.') :]}"
    return hub_key
