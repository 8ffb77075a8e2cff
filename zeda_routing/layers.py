"""Which decoder layers hold an MoE block, per family, and the per-layer zero-logit bias.

`MOE_LAYERS` maps a family's ``model_type`` to its rule (``config -> [layer indices]``); zeda's
family specs, the vLLM plugin and the SGLang models all read it, so a family's MoE layers are
stated once. A new family adds its rule here (one line; usually an existing rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "MOE_LAYERS",
    "after_dense_prefix",
    "every_layer",
    "listed",
    "layer_zero_logit_bias",
    "moe_layer_indices",
    "per_layer_values",
    "sparse_layer_types",
    "sparse_step",
]


def every_layer(c: Any) -> list[int]:
    """Every decoder layer (Mixtral, OLMoE, gpt-oss)."""
    return list(range(c.num_hidden_layers))


def sparse_step(c: Any) -> list[int]:
    """Qwen-MoE: every ``decoder_sparse_step``-th layer, except ``mlp_only_layers``."""
    dense = getattr(c, "mlp_only_layers", None) or []
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in dense and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
    ]


def after_dense_prefix(c: Any) -> list[int]:
    """DeepSeek-V3, GLM-4.x: every layer after the first ``first_k_dense_replace`` dense ones."""
    return list(range(c.first_k_dense_replace, c.num_hidden_layers))


def sparse_layer_types(c: Any) -> list[int]:
    """GLM-4.7-Flash (glm4_moe_lite), EXAONE MoE, Hunyuan v3, Mellum: the layers whose
    ``mlp_layer_types`` entry is ``"sparse"``."""
    return [i for i, t in enumerate(c.mlp_layer_types) if t == "sparse"]


def listed(c: Any) -> list[int]:
    """Llama 4: the layers its config lists in ``moe_layers``."""
    return list(c.moe_layers)


MOE_LAYERS: dict[str, Callable[[Any], list[int]]] = {
    "deepseek_v2": after_dense_prefix,
    "deepseek_v3": after_dense_prefix,
    "dots1": after_dense_prefix,
    "exaone_moe": sparse_layer_types,
    "flex_olmo": every_layer,
    "glm4_moe": after_dense_prefix,
    "glm4_moe_lite": sparse_layer_types,
    "gpt_oss": every_layer,
    "granitemoe_swa": every_layer,
    "hy_v3": sparse_layer_types,
    "llama4_text": listed,
    "mellum": sparse_layer_types,
    "minimax_m2": every_layer,
    "mixtral": every_layer,
    "olmoe": every_layer,
    "qwen2_moe": sparse_step,
    "qwen3_5_moe_text": every_layer,
    "qwen3_moe": sparse_step,
    "qwen3_next": sparse_step,
    "solar_open": every_layer,
}
"""Family ``model_type`` -> its MoE-layer rule."""


def moe_layer_indices(config: Any) -> list[int]:
    """Decoder layers of ``config`` that hold an MoE block (``zeda_<family>`` model types too).

    Raises:
        ValueError: for a family without a rule in `MOE_LAYERS`.
    """
    family = str(config.model_type).removeprefix("zeda_")
    rule = MOE_LAYERS.get(family)
    if rule is None:
        raise ValueError(
            f"no MoE-layer rule for model type {config.model_type!r}; add the family to zeda_routing.MOE_LAYERS"
        )
    return rule(config)


def per_layer_values(value: float | Sequence[float] | None, num_layers: int) -> list[float]:
    """A zero-logit bias spread over the MoE layers: one float for all, or one per MoE layer.

    Args:
        value: A float, a list of one float per MoE layer (layer order), or None (0 everywhere).
        num_layers: The model's MoE layers.

    Returns:
        ``num_layers`` floats.

    Raises:
        ValueError: if a list does not have exactly one entry per MoE layer.
    """
    if value is None:
        return [0.0] * num_layers
    if isinstance(value, (int, float)):
        return [float(value)] * num_layers
    values = [float(v) for v in value]
    if len(values) != num_layers:
        raise ValueError(
            f"zero_logit_bias has {len(values)} entries but the model has {num_layers} MoE layers; "
            "give one float or one per MoE layer"
        )
    return values


def layer_zero_logit_bias(value: float | Sequence[float] | None, config: Any) -> dict[int, float]:
    """The zero-logit bias of every MoE layer of ``config``, by decoder-layer index.

    Args:
        value: ``config.zeda["zero_logit_bias"]`` (a float, one float per MoE layer, or None).
        config: The model's config (its family names the MoE-layer rule).

    Raises:
        ValueError: for a list of the wrong length or a family without an MoE-layer rule.
    """
    layers = moe_layer_indices(config)
    return dict(zip(layers, per_layer_values(value, len(layers)), strict=True))
