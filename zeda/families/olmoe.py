"""OLMoE: softmax router in every layer, no shared expert."""

from transformers.models.olmoe import modeling_olmoe as m
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="olmoe",
        router_kind="softmax",
        config_class=OlmoeConfig,
        causal_lm_class=m.OlmoeForCausalLM,
        router_class=m.OlmoeTopKRouter,
        experts_class=m.OlmoeExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="intermediate_size",
        qk_norm=lambda c: "full",
    )
)
