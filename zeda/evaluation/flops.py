"""Parameter and per-token FLOP accounting for MoE models with zero-output experts, from a config alone.

Everything here is analytic: it reads a transformers config (or a dict, a ``config.json`` path, an
HF model directory, or a built-in name such as ``"qwen3-30b-a3b"``) and the family's `MoESpec`;
no weights are loaded and nothing is built. The counts are verified in the tests against
``sum(p.numel())`` of real models built on the meta device.

Conventions
-----------
- **FLOPs = 2 × multiply-accumulates** of the weight matrices a token touches in one forward pass
  (one token, batch 1). Biases, norms, activations, softmax, RoPE, attention sinks and the
  zero-expert "no-op" are not counted (they are elementwise, O(hidden) per token). Embedding
  lookups are 0 FLOPs; the lm_head is counted (``2 · hidden · vocab``).
- **Components**: ``attention`` (q/k/v/o projections, or MLA's q_a/q_b/kv_a/kv_b/o),
  ``attention_scores`` (QKᵀ and AV against ``context_len`` cached tokens, see below),
  ``dense_mlp`` (the SwiGLU MLP of non-MoE layers), ``shared_experts`` (always-on shared experts
  plus Qwen2-MoE's ``hidden -> 1`` sigmoid gate), ``routed_experts`` (the top-k routed SwiGLU
  experts), ``router`` (the ``hidden -> E + Z`` gate), ``lm_head`` and ``embedding`` (always 0).
- **Zero share** ``s``: the fraction of the routed top-k slots that land on zero experts. A zero
  slot does no work, so routed-expert FLOPs are ``(1 - s) · k · 6 · hidden · moe_intermediate``
  per MoE layer. Every reduction is relative to the **native model at its native top-k** (no zero
  experts, ``s = 0``), never relative to "all experts".
- **Zero experts are parameter-free** but each adds one router row (``hidden`` weights, plus one
  bias entry where the router has a bias, as in gpt-oss) per MoE layer; ``num_zero_experts`` comes
  from the argument, else from an injected config's ``config.zeda["num_zero_experts"]``, else 0.
  (The sigmoid routers' ``e_score_correction_bias`` is a buffer, not a parameter.)
- **Attention scores**: with ``context_len = L`` (the number of keys the token attends to, default
  0) each layer adds ``2 · heads · (qk_head_dim + v_head_dim) · L`` FLOPs, with ``L`` capped at
  ``config.sliding_window`` on layers whose ``config.layer_types`` entry is
  ``"sliding_attention"``. For the average over a sequence of ``T`` tokens pass ``L ≈ T / 2``.
  MLA is counted as transformers runs it (keys/values expanded per head by ``kv_b_proj``).
- **Parameters**: ``total_params`` counts every parameter transformers builds (embeddings, lm_head
  unless tied, norms, biases, sinks, all experts, router incl. zero-expert rows). Multi-token
  prediction (MTP / "nextn") layers of DeepSeek-V3 and GLM-4.7-Flash are **excluded**:
  transformers does not build them (DeepSeek's 671B excludes its 14B MTP module as well).
- **Active parameters** (as model cards count them) are the parameters touched per token:
  everything except the routed experts, plus ``(1 - s) · k`` routed experts per MoE layer; they
  include the input embedding table and the lm_head (counted separately when untied).
  ``active_params_excl_embeddings`` drops the input embedding, the convention of the gpt-oss card.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    "FlopReport",
    "builtin_config_names",
    "flop_report",
    "load_config",
    "measured_report",
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


# ---------------------------------------------------------------------------------------------
# Config loading
# ---------------------------------------------------------------------------------------------


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


def _resolve(
    config_or_name: str | Path | Mapping[str, Any] | PretrainedConfig,
) -> tuple[PretrainedConfig, str]:
    """The config and a display name for a report title."""
    if isinstance(config_or_name, (str, Path)):
        data, display = _config_dict(config_or_name)
        return _config_from_dict(data), display
    config = load_config(config_or_name)
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    return config, (Path(name).name if name else str(config.model_type))


# ---------------------------------------------------------------------------------------------
# Analytic model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
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


def _attention(spec: MoESpec, config: Any) -> tuple[int, int, int, int]:
    """One layer's attention: (params, MACs per token, score MACs per key, norm params inside).

    Shapes: GQA q ``H -> n·d``, k/v ``H -> n_kv·d``, o ``n·d -> H``. MLA q ``H -> r_q -> n·(d_nope+d_rope)``
    (or ``H -> n·(d_nope+d_rope)`` when ``q_lora_rank`` is None), kv_a ``H -> r_kv + d_rope``,
    kv_b ``r_kv -> n·(d_nope + d_v)``, o ``n·d_v -> H``.
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
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
    qkv_bias, o_bias = spec.attention_biases(config)
    macs = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    params = macs + (q_out + 2 * kv_out) * qkv_bias + hidden * o_bias
    qk_norm = spec.qk_norm(config)
    if qk_norm == "per_head":
        norms = 2 * head_dim
    elif qk_norm == "full":  # OLMoE: q_norm over hidden_size, k_norm over kv heads of hidden/heads
        norms = hidden + (hidden // heads) * kv_heads
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


def _layout(config: Any, num_zero_experts: int | None) -> _Layout:
    spec = get_spec(config.model_type)
    hidden, vocab, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    moe_layers = sorted(spec.moe_layer_indices(config))
    n_moe, n_dense = len(moe_layers), n_layers - len(moe_layers)
    e, k, z = spec.num_experts(config), spec.top_k(config), _zero_experts_of(config, num_zero_experts)
    if not 0 < k <= e:
        raise ZedaError(
            f"top-k={k} with {e} experts is invalid; the config's {spec.top_k_key} must be in 1..E"
        )

    attn_params, attn_macs, score_per_key, attn_norms = _attention(spec, config)
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
        "attention": n_layers * (attn_params - attn_norms),
        "norms": n_layers * (2 * hidden + attn_norms) + hidden,
        "dense_mlp": n_dense * dense_macs,
        "shared_experts": n_moe * shared_macs,
        "routed_experts": n_moe * e * expert_params,
        "router": n_moe * router_params,
        "lm_head": 0 if tied else vocab * hidden,
    }
    macs = {
        "embedding": 0,
        "attention": n_layers * attn_macs,
        "dense_mlp": n_dense * dense_macs,
        "shared_experts": n_moe * shared_macs,
        "router": n_moe * router_rows * hidden,
        "lm_head": vocab * hidden,
    }
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    window = [
        int(sliding) if sliding and i < len(layer_types) and layer_types[i] == "sliding_attention" else None
        for i in range(n_layers)
    ]
    return _Layout(
        params=params,
        routed_params_per_expert=expert_params,
        routed_macs_per_expert=expert_macs,
        moe_layers=moe_layers,
        num_layers=n_layers,
        num_experts=e,
        num_zero_experts=z,
        top_k=k,
        macs=macs,
        score_macs_per_key=[score_per_key] * n_layers,
        window=window,
    )


def _score_flops(layout: _Layout, context_len: int) -> float:
    if context_len < 0:
        raise ZedaError(f"context_len={context_len} is negative; pass the number of attended keys (≥ 0)")
    total = 0
    for per_key, window in zip(layout.score_macs_per_key, layout.window, strict=True):
        total += per_key * (min(context_len, window) if window else context_len)
    return 2.0 * total


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


@dataclass
class FlopReport:
    """Parameters and per-token forward FLOPs of one MoE model at one zero share.

    All FLOP values are per token of one forward pass (FLOPs = 2 × MACs, see the module
    docstring); all ``native_*`` values are for the original model (no zero experts, zero share 0,
    its native top-k) at the same ``context_len``.

    Attributes:
        name: Display name (built-in name, directory name or model type).
        model_type: The config's model type (``zeda_<family>`` for injected configs).
        num_layers: Decoder layers.
        num_moe_layers: Decoder layers with an MoE block.
        num_experts: Routed (real) experts E per MoE layer.
        num_zero_experts: Zero experts Z per MoE layer counted in the router.
        top_k: Slots per token per MoE layer (unchanged by zeda).
        zero_share: Token-weighted mean fraction of top-k slots routed to zero experts, in [0, 1].
        context_len: Attended keys per token for the attention-score term (0: not counted).
        total_params: Every built parameter (zero-expert router rows included, MTP excluded).
        active_params: Parameters touched per token (expected value at ``zero_share``), with the
            input embedding and the lm_head.
        active_params_excl_embeddings: ``active_params`` without the input embedding table.
        flops_per_token: Forward FLOPs per token.
        routed_expert_flops_per_token: The routed-experts part of ``flops_per_token``.
        flops_by_component: ``flops_per_token`` split by `COMPONENTS`.
        params_by_component: ``total_params`` split by `PARAM_COMPONENTS`.
        active_params_by_component: ``active_params`` split by `PARAM_COMPONENTS`.
        native_total_params: ``total_params`` of the original model.
        native_active_params: ``active_params`` of the original model.
        native_flops_per_token: ``flops_per_token`` of the original model.
        native_routed_expert_flops_per_token: Routed-expert FLOPs of the original model.
        native_flops_by_component: ``flops_by_component`` of the original model.
        routed_flop_reduction: ``1 - routed / native routed`` (equals ``zero_share``).
        total_flop_reduction: ``1 - flops / native flops`` (smaller: attention, router, lm_head and
            dense/shared parts do not shrink, and zero-expert router rows add a little).
        per_layer_zero_share: Measured share per MoE layer (`measured_report`), else None.
    """

    name: str
    model_type: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    num_zero_experts: int
    top_k: int
    zero_share: float
    context_len: int
    total_params: int
    active_params: int
    active_params_excl_embeddings: int
    flops_per_token: float
    routed_expert_flops_per_token: float
    flops_by_component: dict[str, float]
    params_by_component: dict[str, int]
    active_params_by_component: dict[str, int]
    native_total_params: int
    native_active_params: int
    native_flops_per_token: float
    native_routed_expert_flops_per_token: float
    native_flops_by_component: dict[str, float]
    routed_flop_reduction: float
    total_flop_reduction: float
    per_layer_zero_share: list[float] | None = field(default=None)

    @property
    def relative_flops(self) -> float:
        """``flops_per_token / native_flops_per_token`` (1.0 for the native model)."""
        return self.flops_per_token / self.native_flops_per_token

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (plus ``relative_flops``)."""
        out = asdict(self)
        out["relative_flops"] = self.relative_flops
        return out

    def _rows(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str, str]]]:
        summary = [
            ("Total params", _human(self.native_total_params), _human(self.total_params)),
            ("Active params", _human(self.native_active_params), _human(self.active_params)),
            (
                "FLOPs / token",
                _human(self.native_flops_per_token, "FLOP"),
                _human(self.flops_per_token, "FLOP"),
            ),
            (
                "Routed-expert FLOPs / token",
                _human(self.native_routed_expert_flops_per_token, "FLOP"),
                _human(self.routed_expert_flops_per_token, "FLOP"),
            ),
            ("Routed-expert FLOP reduction", "0%", f"{100 * self.routed_flop_reduction:.1f}%"),
            ("Total FLOP reduction", "0%", f"{100 * self.total_flop_reduction:.1f}%"),
        ]
        components = []
        for c in COMPONENTS:
            native, now = self.native_flops_by_component[c], self.flops_by_component[c]
            if native == 0 and now == 0:
                continue
            share = f"{100 * now / self.flops_per_token:.1f}%" if self.flops_per_token else "-"
            components.append((c, _human(native, "FLOP"), _human(now, "FLOP"), share))
        return summary, components

    def _title(self) -> str:
        return (
            f"{self.name} ({self.model_type}): E={self.num_experts}, Z={self.num_zero_experts}, "
            f"top-{self.top_k}, zero share {self.zero_share:.3f}, context {self.context_len}"
        )

    def _repr_markdown_(self) -> str:
        summary, components = self._rows()
        lines = [f"**{self._title()}**", "", "| | native | zeda |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in summary]
        lines += ["", "| component | native FLOPs | zeda FLOPs | share |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in components]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        summary, components = self._rows()

        def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
            )
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

        return (
            f"<p><b>{html.escape(self._title())}</b></p>"
            + table(["", "native", "zeda"], summary)
            + table(["component", "native FLOPs", "zeda FLOPs", "share"], components)
        )

    def __str__(self) -> str:
        return self._repr_markdown_()


def _check_share(s: float, what: str) -> float:
    s = float(s)
    if not (0.0 <= s <= 1.0) or math.isnan(s):
        raise ZedaError(
            f"{what}={s} is outside [0, 1]; it is the fraction of top-k slots routed to zero experts"
        )
    return s


def _build(
    config: PretrainedConfig,
    name: str,
    shares: dict[int, float],
    num_zero_experts: int | None,
    context_len: int,
    per_layer: list[float] | None,
) -> FlopReport:
    layout = _layout(config, num_zero_experts)
    native = _layout(config, 0) if layout.num_zero_experts else layout
    k, n_moe = layout.top_k, len(layout.moe_layers)
    scores = _score_flops(layout, int(context_len))

    # Routed experts: every MoE layer costs the same per slot, so weight each layer's share by its
    # routed cost (k experts) -- the token-weighted mean over MoE layers.
    kept_slots = sum(k * (1.0 - shares[i]) for i in layout.moe_layers)
    mean_share = 1.0 - kept_slots / (k * n_moe) if n_moe else 0.0

    def flops(lay: _Layout, slots: float) -> dict[str, float]:
        out = {c: 2.0 * lay.macs.get(c, 0) for c in COMPONENTS}
        out["attention_scores"] = scores
        out["routed_experts"] = 2.0 * lay.routed_macs_per_expert * slots
        return out

    def active(lay: _Layout, slots: float) -> dict[str, int]:
        out = dict(lay.params)
        out["routed_experts"] = round(lay.routed_params_per_expert * slots)
        return out

    now_flops, native_flops = flops(layout, kept_slots), flops(native, k * n_moe)
    now_active, native_active = active(layout, kept_slots), active(native, k * n_moe)
    total_now, total_native = sum(now_flops.values()), sum(native_flops.values())
    routed_native = native_flops["routed_experts"]
    return FlopReport(
        name=name,
        model_type=str(config.model_type),
        num_layers=layout.num_layers,
        num_moe_layers=n_moe,
        num_experts=layout.num_experts,
        num_zero_experts=layout.num_zero_experts,
        top_k=k,
        zero_share=mean_share,
        context_len=int(context_len),
        total_params=sum(layout.params.values()),
        active_params=sum(now_active.values()),
        active_params_excl_embeddings=sum(now_active.values()) - now_active["embedding"],
        flops_per_token=total_now,
        routed_expert_flops_per_token=now_flops["routed_experts"],
        flops_by_component=now_flops,
        params_by_component=dict(layout.params),
        active_params_by_component=now_active,
        native_total_params=sum(native.params.values()),
        native_active_params=sum(native_active.values()),
        native_flops_per_token=total_native,
        native_routed_expert_flops_per_token=routed_native,
        native_flops_by_component=native_flops,
        routed_flop_reduction=1.0 - now_flops["routed_experts"] / routed_native if routed_native else 0.0,
        total_flop_reduction=1.0 - total_now / total_native,
        per_layer_zero_share=per_layer,
    )


def flop_report(
    config_or_name: str | Path | Mapping[str, Any] | PretrainedConfig,
    zero_share: float = 0.0,
    num_zero_experts: int | None = None,
    context_len: int = 0,
) -> FlopReport:
    """Parameters and per-token FLOPs of a model at a uniform zero share.

    Args:
        config_or_name: A transformers config, a config dict, a built-in name (see
            `builtin_config_names`), a ``config.json`` path or an HF model directory.
        zero_share: Fraction s ∈ [0, 1] of routed top-k slots that go to zero experts (every MoE
            layer alike); routed-expert FLOPs scale by ``1 - s``.
        num_zero_experts: Zero experts Z per MoE layer (router rows); default: the injected
            config's ``zeda.num_zero_experts``, else 0.
        context_len: Keys attended per token for the attention-score term (0: not counted).

    Returns:
        The `FlopReport`, with native (original-model) values and the reductions.

    Raises:
        ZedaError: for an unknown name, an unsupported family or an out-of-range argument.
    """
    config, name = _resolve(config_or_name)
    s = _check_share(zero_share, "zero_share")
    spec = get_spec(config.model_type)
    shares = dict.fromkeys(spec.moe_layer_indices(config), s)
    report = _build(config, name, shares, num_zero_experts, context_len, None)
    report.zero_share = s  # exact, not recomputed through the mean
    return report


def measured_report(
    config_or_name: str | Path | Mapping[str, Any] | PretrainedConfig,
    zero_share_per_layer: Sequence[float] | Mapping[int, float],
    num_zero_experts: int | None = None,
    context_len: int = 0,
) -> FlopReport:
    """A `FlopReport` from zero shares measured per MoE layer (router telemetry).

    Every token passes every MoE layer and each layer's routed cost per slot is the same, so the
    model-level share is the mean of the per-layer shares weighted by each layer's routed-expert
    FLOPs (all equal here); the routed FLOPs are the exact sum over layers.

    Args:
        config_or_name: As in `flop_report`.
        zero_share_per_layer: Either one share per MoE layer, in decoder order (length =
            number of MoE layers), or a mapping ``decoder layer index -> share`` covering exactly
            the MoE layers. Each share is the fraction of that layer's top-k slots (over all
            measured tokens) that went to zero experts.
        num_zero_experts: As in `flop_report`.
        context_len: As in `flop_report`.

    Returns:
        The `FlopReport`; ``zero_share`` is the weighted mean and ``per_layer_zero_share`` lists
        the per-MoE-layer shares.

    Raises:
        ZedaError: if the shares do not match the model's MoE layers or lie outside [0, 1].
    """
    config, name = _resolve(config_or_name)
    moe = sorted(get_spec(config.model_type).moe_layer_indices(config))
    if isinstance(zero_share_per_layer, Mapping):
        keys = sorted(int(i) for i in zero_share_per_layer)
        if keys != moe:
            raise ZedaError(
                f"zero shares given for layers {keys} but the MoE layers are {moe}; pass one share per MoE layer"
            )
        shares = {
            int(i): _check_share(v, f"zero share of layer {i}") for i, v in zero_share_per_layer.items()
        }
    else:
        values = list(zero_share_per_layer)
        if len(values) != len(moe):
            raise ZedaError(
                f"got {len(values)} per-layer zero shares but the model has {len(moe)} MoE layers "
                f"(decoder layers {moe[0]}..{moe[-1]}); pass one share per MoE layer in order"
            )
        shares = {i: _check_share(v, f"zero share of layer {i}") for i, v in zip(moe, values, strict=True)}
    return _build(config, name, shares, num_zero_experts, context_len, [shares[i] for i in moe])
