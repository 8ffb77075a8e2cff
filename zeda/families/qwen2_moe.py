"""Qwen2-MoE / Qwen1.5-MoE: softmax router plus a sigmoid-gated shared expert."""

from transformers.models.qwen2_moe import modeling_qwen2_moe as m
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig

from zeda.families.base import MoESpec, register


def _moe_layers(c: Qwen2MoeConfig) -> list[int]:
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in (c.mlp_only_layers or []) and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
    ]


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
        moe_layer_indices=_moe_layers,
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.shared_expert_intermediate_size,
        shared_expert_gated=True,
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        attention_biases=lambda c: (bool(c.qkv_bias), False),
    )
)
