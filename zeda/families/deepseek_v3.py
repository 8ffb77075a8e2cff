"""DeepSeek-V3: sigmoid router with correction bias, group-limited selection, shared experts, MLA."""

from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="deepseek_v3",
        router_kind="sigmoid_bias",
        config_class=DeepseekV3Config,
        causal_lm_class=m.DeepseekV3ForCausalLM,
        router_class=m.DeepseekV3TopkRouter,
        experts_class=m.DeepseekV3Experts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention="mla",
    )
)
