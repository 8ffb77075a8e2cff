"""Qwen3.5-MoE: softmax router (always renormalised) plus a sigmoid-gated shared expert in every
layer; Gated DeltaNet linear attention interleaved with gated full attention.

Published checkpoints are multimodal (``qwen3_5_moe``); transformers builds the text causal LM
from their ``text_config`` (``qwen3_5_moe_text``), which is what zeda injects.
"""

from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="qwen3_5_moe_text",
        aliases=("qwen3_5_moe",),
        router_kind="softmax",
        config_class=Qwen3_5MoeTextConfig,
        causal_lm_class=m.Qwen3_5MoeForCausalLM,
        router_class=m.Qwen3_5MoeTopKRouter,
        experts_class=m.Qwen3_5MoeExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        shared_expert_intermediate=lambda c: c.shared_expert_intermediate_size,
        shared_expert_gated=True,
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        attention="hybrid_linear",
        qk_norm=lambda c: "per_head",
        # The router always renormalises the chosen weights; it has no flag for it.
        norm_topk_prob=True,
    )
)
