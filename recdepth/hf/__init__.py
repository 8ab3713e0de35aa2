"""Export to and import from the huginn-0125 Hugging Face format."""

from recdepth.hf.export import (
    config_from_hf,
    export,
    generation_config,
    hf_config,
    hf_state_dict_keys,
    hf_state_dict_shapes,
    load,
)

__all__ = [
    "config_from_hf",
    "export",
    "generation_config",
    "hf_config",
    "hf_state_dict_keys",
    "hf_state_dict_shapes",
    "load",
]
