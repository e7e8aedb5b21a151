"""Parameter-efficient adaptation: LoRA (through peft), bottleneck adapters, freezing presets,
parameter summaries and trained-parameter files."""

from fmadapt.adapt.adapters import AdapterSettings, BottleneckAdapter, apply_adapters, has_adapters
from fmadapt.adapt.freezing import FREEZING_PRESETS, apply_freezing
from fmadapt.adapt.lora import LoraSettings, apply_lora, has_lora, load_base_state_dict, remap_base_state_dict
from fmadapt.adapt.summary import PARTS, ParameterSummary, summarize_parameters
from fmadapt.adapt.trained_file import load_trained_parameters, read_trained_config, save_trained_parameters

__all__ = [
    "FREEZING_PRESETS",
    "PARTS",
    "AdapterSettings",
    "BottleneckAdapter",
    "LoraSettings",
    "ParameterSummary",
    "apply_adapters",
    "apply_freezing",
    "apply_lora",
    "has_adapters",
    "has_lora",
    "load_base_state_dict",
    "load_trained_parameters",
    "read_trained_config",
    "remap_base_state_dict",
    "save_trained_parameters",
    "summarize_parameters",
]
