"""Qwen3-Next (Qwen3-Next-80B-A3B): softmax router plus a sigmoid-gated shared expert; Gated
DeltaNet linear attention interleaved with gated full attention."""

from transformers.models.qwen3_next import modeling_qwen3_next as m
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="qwen3_next",
        router_kind="softmax",
        config_class=Qwen3NextConfig,
        causal_lm_class=m.Qwen3NextForCausalLM,
        router_class=m.Qwen3NextTopKRouter,
        experts_class=m.Qwen3NextExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.shared_expert_intermediate_size,
        shared_expert_gated=True,
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        attention="hybrid_linear",
        qk_norm=lambda c: "per_head",
    )
)
