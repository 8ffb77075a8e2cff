"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax router, fine-grained experts, no shared expert."""

from transformers.models.qwen3_moe import modeling_qwen3_moe as m
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="qwen3_moe",
        router_kind="softmax",
        config_class=Qwen3MoeConfig,
        causal_lm_class=m.Qwen3MoeForCausalLM,
        router_class=m.Qwen3MoeTopKRouter,
        experts_class=m.Qwen3MoeExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        qk_norm=lambda c: "per_head",
    )
)
