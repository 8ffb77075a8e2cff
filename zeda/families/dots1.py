"""dots.llm1 (dots1): sigmoid router with correction bias and group-limited selection, shared
experts, dense first layers, GQA with per-head query/key norms."""

from transformers.models.dots1 import modeling_dots1 as m
from transformers.models.dots1.configuration_dots1 import Dots1Config

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="dots1",
        router_kind="sigmoid_bias",
        config_class=Dots1Config,
        causal_lm_class=m.Dots1ForCausalLM,
        router_class=m.Dots1TopkRouter,
        experts_class=m.Dots1Experts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size,
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        qk_norm=lambda c: "per_head",
    )
)
