"""Hunyuan v3 (hy_v3): sigmoid router whose correction bias lives on the MoE block, weights
normalised and scaled by ``router_scaling_factor``, shared experts, per-head query/key norms."""

from transformers.models.hy_v3 import modeling_hy_v3 as m
from transformers.models.hy_v3.configuration_hy_v3 import HYV3Config

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="hy_v3",
        router_kind="sigmoid_bias",
        config_class=HYV3Config,
        causal_lm_class=m.HYV3ForCausalLM,
        router_class=m.HYV3TopKRouter,
        experts_class=m.HYV3Experts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.num_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        block_buffers=("e_score_correction_bias",),
        qk_norm=lambda c: "per_head",
        norm_topk_prob=True,
        # No groups; the router names its scaling factor router_scaling_factor.
        router_attrs={
            "num_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": property(lambda self: self.router_scaling_factor),
        },
    )
)
