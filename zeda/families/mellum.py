"""Mellum (mellum): softmax router, MoE where ``mlp_layer_types`` says ``sparse``, GQA with
per-head query/key norms and sliding-window layers."""

from transformers.models.mellum import modeling_mellum as m
from transformers.models.mellum.configuration_mellum import MellumConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="mellum",
        router_kind="softmax",
        config_class=MellumConfig,
        causal_lm_class=m.MellumForCausalLM,
        router_class=m.MellumTopKRouter,
        experts_class=m.MellumExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        qk_norm=lambda c: "per_head",
    )
)
