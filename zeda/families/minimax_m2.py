"""MiniMax-M2: sigmoid router whose correction bias lives on the MoE block, every layer MoE, GQA
with query/key norms over the full projections."""

from transformers.models.minimax_m2 import modeling_minimax_m2 as m
from transformers.models.minimax_m2.configuration_minimax_m2 import MiniMaxM2Config

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="minimax_m2",
        router_kind="sigmoid_bias",
        config_class=MiniMaxM2Config,
        causal_lm_class=m.MiniMaxM2ForCausalLM,
        router_class=m.MiniMaxM2TopKRouter,
        experts_class=m.MiniMaxM2Experts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        # The block passes its e_score_correction_bias to the router's forward.
        block_buffers=("e_score_correction_bias",),
        attention_biases=lambda c: (False, False),
        qk_norm=lambda c: "full",
        # The router always renormalises the k weights; no groups, no scaling factor.
        norm_topk_prob=True,
        router_attrs={"num_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0},
    )
)
