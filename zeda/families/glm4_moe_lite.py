"""GLM-4.7-Flash (glm4_moe_lite): sigmoid router with correction bias, shared experts, MLA."""

from transformers.models.glm4_moe_lite import modeling_glm4_moe_lite as m
from transformers.models.glm4_moe_lite.configuration_glm4_moe_lite import Glm4MoeLiteConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="glm4_moe_lite",
        router_kind="sigmoid_bias",
        config_class=Glm4MoeLiteConfig,
        causal_lm_class=m.Glm4MoeLiteForCausalLM,
        router_class=m.Glm4MoeLiteTopkRouter,
        experts_class=m.Glm4MoeLiteExperts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention="mla",
    )
)
