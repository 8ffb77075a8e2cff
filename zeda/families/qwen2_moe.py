"""Qwen2-MoE / Qwen1.5-MoE: softmax router plus a sigmoid-gated shared expert."""

from transformers.models.qwen2_moe import modeling_qwen2_moe as m
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="qwen2_moe",
        router_kind="softmax",
        config_class=Qwen2MoeConfig,
        causal_lm_class=m.Qwen2MoeForCausalLM,
        router_class=m.Qwen2MoeTopKRouter,
        experts_class=m.Qwen2MoeExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.shared_expert_intermediate_size,
        shared_expert_gated=True,
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        attention_biases=lambda c: (bool(c.qkv_bias), False),
    )
)
