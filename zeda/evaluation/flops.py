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
- **Active parameters** are the parameters a token touches: everything except the routed
  experts, plus ``(1 - s) · k`` routed experts per MoE layer. Model cards disagree on whether the
  input embedding table (a lookup, not a matmul) and the unembedding (``lm_head``) count, so
  ``active_params`` follows the convention of each family's own card (`ACTIVE_PARAM_CONVENTIONS`):

  ==========================================  ==================  ==========================
  family (built-in config, published active)  input embedding     lm_head (unembedding)
  ==========================================  ==================  ==========================
  qwen3_moe (Qwen3-30B-A3B, 3.3B)             counted             counted
  qwen2_moe (Qwen1.5-MoE-A2.7B, 2.7B)         counted             counted
  mixtral (Mixtral-8x7B, 12.9B)               counted             counted
  olmoe (OLMoE-1B-7B, 1.3B)                   counted             counted
  deepseek_v3 (DeepSeek-V3, 37B)              counted             counted
  deepseek_v2 (DeepSeek-V2, 21B)              counted             counted
  llama4_text (Llama 4 Scout/Maverick, 17B)   counted             counted
  qwen3_5_moe_text (Qwen3.5-397B-A17B, 17B)   counted             counted
  gpt_oss (gpt-oss-20b, 3.61B)                excluded            counted
  glm4_moe, glm4_moe_lite (GLM-4.7-Flash)     excluded            excluded
  minimax_m2 (MiniMax-M2, 10B)                excluded            excluded
  ==========================================  ==================  ==========================

  The gpt-oss card leaves the embedding out because a lookup is not a matmul and keeps the
  unembedding. Z.ai's GLM figures are non-embedding counts (GLM-4.5-Air: 12.2B without either
  table against the published 12B; 13.4B with both); GLM-4.7-Flash publishes only the "A3B"
  label, which its 3.26B non-embedding count rounds to. MiniMax-M2's "10B active" is a rounded
  figure: its non-embedding count is 9.80B (10.42B with the lm_head, 11.03B with both tables).
  Multimodal cards (Llama 4, Qwen3.5) count their vision encoder in the total; zeda counts the text
  model transformers' causal LM builds (Scout: 107.8B of the card's 109B). ``active_params_all`` counts both
  tables for every family; ``active_params_excl_embeddings`` drops the input embedding only.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from zeda.errors import ZedaError
from zeda.evaluation.counts import (
    COMPONENTS,
    PARAM_COMPONENTS,
    Layout,
    builtin_config_names,
    load_config,
    model_layout,
    resolve,
    score_flops,
)
from zeda.families import get_spec

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVE_PARAM_CONVENTIONS",
    "COMPONENTS",
    "PARAM_COMPONENTS",
    "FlopReport",
    "builtin_config_names",
    "flop_report",
    "load_config",
    "measured_report",
]


ACTIVE_PARAM_CONVENTIONS: dict[str, frozenset[str]] = {
    "gpt_oss": frozenset({"embedding"}),
    "glm4_moe": frozenset({"embedding", "lm_head"}),
    "glm4_moe_lite": frozenset({"embedding", "lm_head"}),
    "minimax_m2": frozenset({"embedding", "lm_head"}),
}
"""Per family (model type): the parameter components its model card leaves out of the active
count. Families not listed count every component, the input embedding and lm_head included."""


def _convention(model_type: str) -> tuple[frozenset[str], str]:
    excluded = ACTIVE_PARAM_CONVENTIONS.get(get_spec(model_type).model_type, frozenset())
    if not excluded:
        return excluded, "embedding and lm_head counted"
    return excluded, " and ".join(sorted(excluded)) + " excluded (as the family's model card counts)"


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
        active_params: Parameters touched per token (expected value at ``zero_share``), counted
            as the family's model card does (`ACTIVE_PARAM_CONVENTIONS`).
        active_params_convention: Which tables ``active_params`` leaves out, in words.
        active_params_all: Parameters touched per token with the input embedding and lm_head.
        active_params_excl_embeddings: ``active_params_all`` without the input embedding table.
        flops_per_token: Forward FLOPs per token.
        routed_expert_flops_per_token: The routed-experts part of ``flops_per_token``.
        flops_by_component: ``flops_per_token`` split by `COMPONENTS`.
        params_by_component: ``total_params`` split by `PARAM_COMPONENTS`.
        active_params_by_component: ``active_params_all`` split by `PARAM_COMPONENTS`.
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
    active_params_convention: str
    active_params_all: int
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
            (
                "Active params",
                _human(self.native_active_params),
                _human(self.active_params),
            ),  # card convention
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
    layout = model_layout(config, num_zero_experts)
    native = model_layout(config, 0) if layout.num_zero_experts else layout
    k, n_moe = layout.top_k, len(layout.moe_layers)
    scores = score_flops(layout, int(context_len))

    # Routed experts: every MoE layer costs the same per slot, so weight each layer's share by its
    # routed cost (k experts) -- the token-weighted mean over MoE layers.
    kept_slots = sum(k * (1.0 - shares[i]) for i in layout.moe_layers)
    mean_share = 1.0 - kept_slots / (k * n_moe) if n_moe else 0.0

    def flops(lay: Layout, slots: float) -> dict[str, float]:
        out = {c: 2.0 * lay.macs.get(c, 0) for c in COMPONENTS}
        out["attention_scores"] = scores
        out["routed_experts"] = 2.0 * lay.routed_macs_per_expert * slots
        return out

    def active(lay: Layout, slots: float) -> dict[str, int]:
        out = dict(lay.params)
        out["routed_experts"] = round(lay.routed_params_per_expert * slots)
        return out

    excluded, convention = _convention(str(config.model_type))
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
        active_params=sum(v for c, v in now_active.items() if c not in excluded),
        active_params_convention=convention,
        active_params_all=sum(now_active.values()),
        active_params_excl_embeddings=sum(now_active.values()) - now_active["embedding"],
        flops_per_token=total_now,
        routed_expert_flops_per_token=now_flops["routed_experts"],
        flops_by_component=now_flops,
        params_by_component=dict(layout.params),
        active_params_by_component=now_active,
        native_total_params=sum(native.params.values()),
        native_active_params=sum(v for c, v in native_active.items() if c not in excluded),
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
    config, name = resolve(config_or_name)
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
    config, name = resolve(config_or_name)
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
