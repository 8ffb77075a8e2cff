"""Analytic counts of an MoE model from its config alone: parameters and per-token MACs by component.

Reads a transformers config (or a dict, a ``config.json`` path, an HF model directory, or a
built-in name from ``zeda/configs``) and the family's `MoESpec`; nothing is built or loaded.
`zeda.evaluation.flops` turns these counts into reports; its docstring states the conventions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from zeda.errors import ZedaError
from zeda.families import get_spec
from zeda.families.base import MoESpec

logger = logging.getLogger(__name__)

__all__ = [
    "COMPONENTS",
    "PARAM_COMPONENTS",
    "Layout",
    "builtin_config_names",
    "load_config",
    "model_layout",
    "resolve",
    "score_flops",
]

COMPONENTS: tuple[str, ...] = (
    "embedding",
    "attention",
    "attention_scores",
    "dense_mlp",
    "shared_experts",
    "routed_experts",
    "router",
    "lm_head",
)
"""Components of the per-token FLOP breakdown (``flops_by_component`` keys), in display order."""

PARAM_COMPONENTS: tuple[str, ...] = (
    "embedding",
    "attention",
    "norms",
    "dense_mlp",
    "shared_experts",
    "routed_experts",
    "router",
    "lm_head",
)
"""Components of the parameter breakdown (``params_by_component`` keys), in display order."""

_METADATA_PREFIX = "_"  # keys such as "_source" in the built-in JSONs are provenance, not config


def _configs_dir() -> Any:
    """``zeda/configs`` as an importlib.resources traversable (package data, no ``__init__``)."""
    return resources.files("zeda").joinpath("configs")


def builtin_config_names() -> list[str]:
    """Sorted names of the real model configs shipped in ``zeda/configs/`` (e.g. ``"deepseek-v3"``)."""
    root = _configs_dir()
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ZedaError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); pass a transformers config.json"
        ) from e
    if not isinstance(data, dict):
        raise ZedaError(
            f"{path} holds a JSON {type(data).__name__}, not an object; pass a transformers config.json"
        )
    return data


def _config_dict(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw config dict and a display name for a built-in name, a JSON file or an HF directory."""
    key = str(name_or_path).strip()
    names = builtin_config_names()
    if key.lower() in names:
        text = _configs_dir().joinpath(f"{key.lower()}.json").read_text(encoding="utf-8")
        return json.loads(text), key.lower()
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _read_json(path / "config.json"), path.name
    if path.is_file():
        return _read_json(path), path.parent.name if path.name == "config.json" else path.stem
    raise ZedaError(
        f"unknown model config {key!r}: built-in names are {', '.join(names)}; "
        "a path to a config.json or to an HF model directory is also accepted"
    )


def _config_from_dict(data: Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config of the right family class from a config dict (no network)."""
    data = {k: v for k, v in data.items() if not k.startswith(_METADATA_PREFIX)}
    model_type = data.get("model_type")
    if not model_type:
        raise ZedaError("config has no model_type; pass a transformers config.json of a supported MoE family")
    spec = get_spec(str(model_type))
    if str(model_type) in spec.aliases and isinstance(data.get("text_config"), Mapping):
        # A multimodal checkpoint (Llama 4, Qwen3.5-MoE): transformers' causal LM is its text model.
        text = {k: v for k, v in data["text_config"].items() if not k.startswith(_METADATA_PREFIX)}
        text.setdefault("tie_word_embeddings", data.get("tie_word_embeddings", False))
        return _config_from_dict({**text, "model_type": spec.model_type})
    cls: type = spec.config_class
    if str(model_type).startswith("zeda_"):
        try:  # zeda's own config class keeps the zeda_ model type (it needs the full package)
            from zeda.zero.modeling import zeda_classes

            cls = zeda_classes(spec.model_type)[0]
        except ImportError:  # pragma: no cover - partial installs
            logger.debug("zeda.zero.modeling unavailable; reading %s with %s", model_type, cls.__name__)
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    config = cls(**kwargs)
    if "zeda" in data:
        config.zeda = dict(data["zeda"])
    return config


def load_config(name_or_path: str | Path | Mapping[str, Any] | PretrainedConfig) -> PretrainedConfig:
    """Load a model config without network access.

    Args:
        name_or_path: A built-in name (see `builtin_config_names`, case-insensitive), a path to a
            ``config.json``, a path to an HF model directory holding one, a config dict, or a
            transformers config (returned as is).

    Returns:
        The family's transformers config (``zeda_<family>`` configs keep their ``zeda`` dict).

    Raises:
        ZedaError: for an unknown name or path, a config without ``model_type``, or an
            unsupported family.
    """
    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return _config_from_dict(name_or_path)
    return _config_from_dict(_config_dict(name_or_path)[0])


def resolve(
    config_or_name: str | Path | Mapping[str, Any] | PretrainedConfig,
) -> tuple[PretrainedConfig, str]:
    """The config and a display name for a report title."""
    if isinstance(config_or_name, (str, Path)):
        data, display = _config_dict(config_or_name)
        return _config_from_dict(data), display
    config = load_config(config_or_name)
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    return config, (Path(name).name if name else str(config.model_type))


@dataclass(frozen=True)
class Layout:
    """Per-token counts of one model, split by component (params: weights; macs: per token)."""

    params: dict[str, int]
    routed_params_per_expert: int  # incl. expert biases
    routed_macs_per_expert: int  # one expert, one token
    moe_layers: list[int]
    num_layers: int
    num_experts: int
    num_zero_experts: int
    top_k: int
    macs: dict[str, int]  # fixed per-token MACs of every component except routed experts and scores
    score_macs_per_key: list[int]  # per layer: MACs per attended key (QK^T + AV)
    window: list[int | None]  # per layer: sliding window or None


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _linear_attention(config: Any) -> tuple[int, int, int]:
    """One Gated DeltaNet layer (Qwen3.5-MoE): (params, MACs per token, norm params inside).

    Shapes: ``in_proj_qkv H -> 2·K + V``, ``in_proj_z H -> V``, ``in_proj_b``/``in_proj_a`` ``H -> n_v``,
    a depthwise causal conv over the ``2·K + V`` channels (``kernel`` weights each), ``out_proj V -> H``,
    ``dt_bias`` and ``A_log`` (one per value head) and a gated RMSNorm over ``head_v_dim``, with
    ``K = n_k·d_k`` and ``V = n_v·d_v``. The recurrent state update (``n_v·d_k·d_v`` per token) is
    not a weight matrix and is not counted, as attention scores are not without ``context_len``.
    """
    hidden = config.hidden_size
    n_v = config.linear_num_value_heads
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = n_v * config.linear_value_head_dim
    conv_dim = 2 * key_dim + value_dim
    macs = hidden * conv_dim + hidden * value_dim + 2 * hidden * n_v + value_dim * hidden
    macs += conv_dim * config.linear_conv_kernel_dim
    norms = config.linear_value_head_dim
    return macs + 2 * n_v + norms, macs, norms


def _attention(spec: MoESpec, config: Any, layer_type: str | None = None) -> tuple[int, int, int, int]:
    """One layer's attention: (params, MACs per token, score MACs per key, norm params inside).

    Shapes: GQA q ``H -> n·d`` (``2·n·d`` with an output gate, Qwen3.5), k/v ``H -> n_kv·d``, o
    ``n·d -> H``. MLA q ``H -> r_q -> n·(d_nope+d_rope)`` (or ``H -> n·(d_nope+d_rope)`` when
    ``q_lora_rank`` is None), kv_a ``H -> r_kv + d_rope``, kv_b ``r_kv -> n·(d_nope + d_v)``, o
    ``n·d_v -> H``. Hybrid families (``hybrid_linear``) run `_linear_attention` on their
    ``linear_attention`` layers (no score term) and gated GQA on the others.
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    if spec.attention == "hybrid_linear" and layer_type == "linear_attention":
        params, macs, norms = _linear_attention(config)
        return params, macs, 0, norms
    if spec.attention == "mla":
        bias = bool(getattr(config, "attention_bias", False))
        nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q_rank, kv_rank = config.q_lora_rank, config.kv_lora_rank
        qk_dim = nope + rope
        macs = 0
        norms = kv_rank  # kv_a_layernorm
        if q_rank is None:
            macs += hidden * heads * qk_dim
            params = 0
        else:
            macs += hidden * q_rank + q_rank * heads * qk_dim
            params = q_rank * bias  # q_a_proj bias
            norms += q_rank  # q_a_layernorm
        macs += hidden * (kv_rank + rope) + kv_rank * heads * (nope + v_dim) + heads * v_dim * hidden
        params += macs + (kv_rank + rope) * bias + hidden * bias + norms
        return params, macs, heads * (qk_dim + v_dim), norms
    head_dim, kv_heads = _head_dim(config), config.num_key_value_heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    gate_out = q_out if spec.attention == "hybrid_linear" else 0  # Qwen3.5's attention output gate
    qkv_bias, o_bias = spec.attention_biases(config)
    macs = hidden * (q_out + gate_out) + 2 * hidden * kv_out + q_out * hidden
    params = macs + (q_out + gate_out + 2 * kv_out) * qkv_bias + hidden * o_bias
    qk_norm = spec.qk_norm(config)
    if qk_norm == "per_head":
        norms = 2 * head_dim
    elif qk_norm == "full":  # OLMoE, MiniMax-M2: q_norm over the q projection, k_norm over k's
        norms = q_out + kv_out
    else:
        norms = 0
    params += norms + heads * spec.attention_sinks
    return params, macs, heads * 2 * head_dim, norms


def _zero_experts_of(config: Any, num_zero_experts: int | None) -> int:
    if num_zero_experts is not None:
        z = int(num_zero_experts)
    else:
        z = int((getattr(config, "zeda", None) or {}).get("num_zero_experts", 0))
    if z < 0:
        raise ZedaError(f"num_zero_experts={z} is negative; pass Z ≥ 0 zero experts per MoE layer")
    return z


def model_layout(config: Any, num_zero_experts: int | None) -> Layout:
    spec = get_spec(config.model_type)
    hidden, vocab, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    moe_layers = sorted(spec.moe_layer_indices(config))
    n_moe, n_dense = len(moe_layers), n_layers - len(moe_layers)
    e, k, z = spec.num_experts(config), spec.top_k(config), _zero_experts_of(config, num_zero_experts)
    if not 0 < k <= e:
        raise ZedaError(
            f"top-k={k} with {e} experts is invalid; the config's {spec.top_k_key} must be in 1..E"
        )

    layer_types = list(getattr(config, "layer_types", None) or [])
    per_layer = [
        _attention(spec, config, layer_types[i] if i < len(layer_types) else None) for i in range(n_layers)
    ]
    attn_params = sum(a[0] - a[3] for a in per_layer)
    attn_norms = sum(a[3] for a in per_layer)
    attn_macs = sum(a[1] for a in per_layer)
    dense_i = spec.dense_intermediate(config) if n_dense else 0
    shared_i = spec.shared_expert_intermediate(config)
    expert_i = spec.expert_intermediate(config)

    dense_macs = 3 * hidden * dense_i
    shared_macs = 3 * hidden * shared_i + hidden * spec.shared_expert_gated
    expert_macs = 3 * hidden * expert_i
    expert_params = expert_macs + (2 * expert_i + hidden) * spec.expert_bias
    router_rows = e + z
    router_params = router_rows * hidden + router_rows * spec.router_bias

    tied = bool(getattr(config, "tie_word_embeddings", False))
    params = {
        "embedding": vocab * hidden,
        "attention": attn_params,
        "norms": n_layers * 2 * hidden + attn_norms + hidden,
        "dense_mlp": n_dense * dense_macs,
        "shared_experts": n_moe * shared_macs,
        "routed_experts": n_moe * e * expert_params,
        "router": n_moe * router_params,
        "lm_head": 0 if tied else vocab * hidden,
    }
    macs = {
        "embedding": 0,
        "attention": attn_macs,
        "dense_mlp": n_dense * dense_macs,
        "shared_experts": n_moe * shared_macs,
        "router": n_moe * router_rows * hidden,
        "lm_head": vocab * hidden,
    }
    sliding = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)

    def window_of(i: int) -> int | None:
        kind = layer_types[i] if i < len(layer_types) else None
        if kind == "sliding_attention" and sliding:
            return int(sliding)
        if kind == "chunked_attention" and chunk:  # Llama 4: keys of the token's own chunk
            return int(chunk)
        return None

    window = [window_of(i) for i in range(n_layers)]
    return Layout(
        params=params,
        routed_params_per_expert=expert_params,
        routed_macs_per_expert=expert_macs,
        moe_layers=moe_layers,
        num_layers=n_layers,
        num_experts=e,
        num_zero_experts=z,
        top_k=k,
        macs=macs,
        score_macs_per_key=[a[2] for a in per_layer],
        window=window,
    )


def score_flops(layout: Layout, context_len: int) -> float:
    if context_len < 0:
        raise ZedaError(f"context_len={context_len} is negative; pass the number of attended keys (≥ 0)")
    total = 0
    for per_key, window in zip(layout.score_macs_per_key, layout.window, strict=True):
        total += per_key * (min(context_len, window) if window else context_len)
    return 2.0 * total
