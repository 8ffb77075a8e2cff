"""Granite MoE with sliding windows (granitemoe_swa): top-k on the router logits then softmax over
the k, every layer MoE (block at ``block_sparse_moe``), attention sinks."""

from transformers.models.granitemoe_swa import modeling_granitemoe_swa as m
from transformers.models.granitemoe_swa.configuration_granitemoe_swa import GraniteMoeSWAConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="granitemoe_swa",
        router_kind="topk_softmax",
        config_class=GraniteMoeSWAConfig,
        causal_lm_class=m.GraniteMoeSWAForCausalLM,
        router_class=m.GraniteMoeSWATopKRouter,
        experts_class=m.GraniteMoeSWAExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        moe_block_attr="block_sparse_moe",
        router_attr="router",
        attention_sinks=True,
    )
)
