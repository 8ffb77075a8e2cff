"""EXAONE MoE (exaone_moe): sigmoid router with correction bias and group-limited selection,
shared experts, MoE where ``mlp_layer_types`` says ``sparse``, per-head query/key norms."""

from transformers.models.exaone_moe import modeling_exaone_moe as m
from transformers.models.exaone_moe.configuration_exaone_moe import ExaoneMoeConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="exaone_moe",
        router_kind="sigmoid_bias",
        config_class=ExaoneMoeConfig,
        causal_lm_class=m.ExaoneMoeForCausalLM,
        router_class=m.ExaoneMoeTopkRouter,
        experts_class=m.ExaoneMoeExperts,
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.num_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention_biases=lambda c: (False, False),
        qk_norm=lambda c: "per_head",
    )
)
