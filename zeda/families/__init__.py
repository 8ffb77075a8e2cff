"""Supported MoE families: importing this package registers one `MoESpec` per family."""

from zeda.families import (  # noqa: F401  (imported for their registration side effect)
    deepseek_v3,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
)
from zeda.families.base import MoESpec, all_specs, get_spec, spec_for_model, supported_model_types

__all__ = ["MoESpec", "all_specs", "get_spec", "spec_for_model", "supported_model_types"]
