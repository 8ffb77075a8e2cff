"""Supported MoE families: importing this package registers one `MoESpec` per family."""

from zeda.families import (  # noqa: F401  (imported for their registration side effect)
    deepseek_v2,
    deepseek_v3,
    dots1,
    exaone_moe,
    flex_olmo,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granitemoe_swa,
    hy_v3,
    llama4,
    mellum,
    minimax_m2,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
    solar_open,
)
from zeda.families.base import MoESpec, all_specs, get_spec, spec_for_model, supported_model_types

__all__ = ["MoESpec", "all_specs", "get_spec", "spec_for_model", "supported_model_types"]
