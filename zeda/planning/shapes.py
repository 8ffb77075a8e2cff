"""Model shapes for `zeda plan`: the config of a recipe's model and what one layer keeps for backward."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from zeda.errors import ZedaError
from zeda.evaluation.flops import builtin_config_names, flop_report, load_config
from zeda.families import get_spec

__all__ = [
    "ModelShape",
    "layer_activation_bytes",
    "merged_expert_bytes",
    "model_shape",
    "resolve_model_config",
    "scaled_config",
]


def resolve_model_config(name_or_path: str) -> tuple[PretrainedConfig, str]:
    """The config of ``model.name_or_path`` without network access.

    A built-in name, a ``config.json`` or a model directory loads directly; a hub id is matched to
    a built-in config by its last path component (``Qwen/Qwen3-30B-A3B`` -> ``qwen3-30b-a3b``,
    ``mistralai/Mixtral-8x7B-Instruct-v0.1`` -> ``mixtral-8x7b``).

    Raises:
        ZedaError: if nothing matches.
    """
    if Path(name_or_path).exists() or name_or_path in builtin_config_names():
        return load_config(name_or_path), Path(name_or_path).name or name_or_path
    tail = name_or_path.rstrip("/").split("/")[-1].lower()
    matches = [n for n in builtin_config_names() if tail == n or tail.startswith(n + "-")]
    if not matches:
        raise ZedaError(
            f"no config for {name_or_path!r}: pass --model-config (a built-in name: "
            f"{', '.join(builtin_config_names())}; a config.json; or a model directory)"
        )
    name = max(matches, key=len)
    return load_config(name), name


def scaled_config(
    config: PretrainedConfig, num_layers: int, num_experts: int | None = None
) -> PretrainedConfig:
    """A copy of ``config`` with ``num_layers`` decoder layers, all MoE, optionally fewer experts.

    Hidden size, expert width, attention and vocabulary stay as they are (the CPU validation's
    "real shapes scaled down").
    """
    config = copy.deepcopy(config)
    spec = get_spec(config.model_type)
    config.num_hidden_layers = num_layers
    for key, value in (("first_k_dense_replace", 0), ("mlp_only_layers", []), ("decoder_sparse_step", 1)):
        if hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:num_layers])
    if getattr(config, "mlp_layer_types", None):  # GLM-4.7-Flash lists dense/sparse per layer
        config.mlp_layer_types = ["sparse"] * num_layers
    if num_experts is not None:
        setattr(config, spec.num_experts_key, num_experts)
        if getattr(config, "n_group", None):
            config.n_group = min(config.n_group, num_experts)
            config.topk_group = min(config.topk_group, config.n_group)
    return config


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    vocab: int
    layers: int
    moe_layers: list[int]
    experts: int
    zero: int
    top_k: int
    expert_width: int
    gated: bool
    shared_width: int
    dense_width: int
    attn_bytes: Any  # P -> bytes saved per token by one attention block
    kv_cache_width: int  # cached elements per token per layer
    params: dict[str, int]
    router_params: int


def model_shape(config: PretrainedConfig, zero: int) -> ModelShape:
    spec = get_spec(config.model_type)
    rep = flop_report(config, num_zero_experts=zero)
    h, heads = config.hidden_size, config.num_attention_heads
    if spec.attention == "mla":
        nope, rope, vd = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q = heads * (nope + rope)
        q_rank = config.q_lora_rank or 0
        kv_rank = config.kv_lora_rank
        kv_cache = heads * (nope + rope) + heads * vd

        def attn(p: int) -> int:
            proj = p * (h + q_rank + q + kv_rank + rope + heads * (nope + vd))
            sdpa = p * (2 * q + 3 * heads * vd)
            return proj + sdpa + 4 * (h + q_rank + kv_rank)
    else:
        d = getattr(config, "head_dim", None) or h // heads
        q, kv = heads * d, config.num_key_value_heads * d
        kv_cache = 2 * kv

        def attn(p: int) -> int:
            # normed input, rotated q, k/v repeated to all heads, output, o_proj input; fp32 norms.
            return p * (h + 5 * q) + 4 * (h + q + kv)

    moe = sorted(spec.moe_layer_indices(config))
    n_dense = config.num_hidden_layers - len(moe)
    return ModelShape(
        hidden=h,
        vocab=config.vocab_size,
        layers=config.num_hidden_layers,
        moe_layers=moe,
        experts=rep.num_experts,
        zero=zero,
        top_k=rep.top_k,
        expert_width=spec.expert_intermediate(config),
        gated="gate_up_proj" in spec.lora_target_parameters,
        shared_width=spec.shared_expert_intermediate(config),
        dense_width=spec.dense_intermediate(config) if n_dense else 0,
        attn_bytes=attn,
        kv_cache_width=kv_cache,
        params=dict(rep.params_by_component),
        router_params=rep.params_by_component["router"],
    )


def layer_activation_bytes(s: ModelShape, p: int, tokens: int, moe: bool, attention_saved: bool) -> float:
    """Bytes one decoder layer saves for backward (student forward with gradients)."""
    h = s.hidden
    out = s.attn_bytes(p) * tokens if attention_saved else 0.0
    out += (4 * h + 2 * p * h) * tokens  # post-attention RMSNorm (fp32 input) and its output
    if moe:
        rows = tokens * s.top_k  # every slot a real expert: the start of training
        width = s.expert_width
        out += rows * p * (2 * h + (4 if s.gated else 2) * width)
        out += tokens * 8 * (s.experts + s.zero)  # fp32 router logits and probabilities
        if s.shared_width:
            out += tokens * p * (h + 4 * s.shared_width)
    else:
        out += tokens * p * (h + 4 * s.dense_width)
    return out


def merged_expert_bytes(s: ModelShape, p: int) -> tuple[float, float]:
    """Bytes of one MoE layer's merged expert weights: (gate_up or up, down)."""
    up = s.experts * (2 if s.gated else 1) * s.expert_width * s.hidden * p
    down = s.experts * s.expert_width * s.hidden * p
    return float(up), float(down)
