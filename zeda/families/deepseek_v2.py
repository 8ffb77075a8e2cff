"""DeepSeek-V2: softmax router with group-limited selection (no renormalisation, scaled), shared
experts, dense first layers, MLA."""

from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="deepseek_v2",
        router_kind="softmax_group",
        config_class=DeepseekV2Config,
        causal_lm_class=m.DeepseekV2ForCausalLM,
        router_class=m.DeepseekV2TopkRouter,
        experts_class=m.DeepseekV2Experts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention="mla",
        # DeepSeek-V2's router never renormalises the chosen weights (its config flag is unused).
        norm_topk_prob=False,
        router_attrs={"group_top": 1},  # a group ranks by its best expert
    )
)
