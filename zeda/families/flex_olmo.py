"""FlexOlmo: softmax router in every layer (OLMoE-style), no shared expert, query/key norms over
the full projections."""

from transformers.models.flex_olmo import modeling_flex_olmo as m
from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="flex_olmo",
        router_kind="softmax",
        config_class=FlexOlmoConfig,
        causal_lm_class=m.FlexOlmoForCausalLM,
        router_class=m.FlexOlmoTopKRouter,
        experts_class=m.FlexOlmoExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="intermediate_size",
        qk_norm=lambda c: "full",
    )
)
