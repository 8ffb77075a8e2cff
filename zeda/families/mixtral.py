"""Mixtral: softmax router (always renormalised over the top-k), every layer MoE."""

from transformers.models.mixtral import modeling_mixtral as m
from transformers.models.mixtral.configuration_mixtral import MixtralConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="mixtral",
        router_kind="softmax",
        config_class=MixtralConfig,
        causal_lm_class=m.MixtralForCausalLM,
        router_class=m.MixtralTopKRouter,
        experts_class=m.MixtralExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        attention_biases=lambda c: (False, False),
        # Mixtral always renormalises the chosen weights; its router has no flag for it.
        norm_topk_prob=True,
    )
)
