"""Solar Open (solar_open): sigmoid router with correction bias and group-limited selection, shared
experts, every layer MoE."""

from transformers.models.solar_open import modeling_solar_open as m
from transformers.models.solar_open.configuration_solar_open import SolarOpenConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="solar_open",
        router_kind="sigmoid_bias",
        config_class=SolarOpenConfig,
        causal_lm_class=m.SolarOpenForCausalLM,
        router_class=m.SolarOpenTopkRouter,
        experts_class=m.SolarOpenExperts,
        num_experts_key="n_routed_experts",
        expert_intermediate_key="moe_intermediate_size",
        shared_expert_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
        shared_expert_attrs=("shared_experts",),
        attention_biases=lambda c: (bool(c.attention_bias), False),
    )
)
