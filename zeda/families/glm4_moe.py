"""GLM-4.5 / GLM-4.6 / GLM-4.7 (glm4_moe): sigmoid router with correction bias, shared experts, GQA."""

from transformers.models.glm4_moe import modeling_glm4_moe as m
from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="glm4_moe",
        router_kind="sigmoid_bias",
        config_class=Glm4MoeConfig,
        causal_lm_class=m.Glm4MoeForCausalLM,
        router_class=m.Glm4MoeTopkRouter,
        experts_class=m.Glm4MoeExperts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention_biases=lambda c: (bool(c.attention_bias), False),
        qk_norm=lambda c: "per_head" if c.use_qk_norm else "none",
    )
)
