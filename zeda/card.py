"""The model card (README.md) written next to an exported checkpoint, and the figures it lists."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import nn

from zeda.zero.structure import find_moe_layers

_FLOP_KEYS = ("zero_share", "routed_flop_reduction", "total_flop_reduction", "measured_tokens")


def zeda_version() -> str:
    """The installed zeda version (``"unknown"`` when running from an uninstalled tree)."""
    try:
        return version("zeda")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _fmt_pct(x: Any) -> str:
    return f"{100 * float(x):.1f}%" if isinstance(x, (int, float)) else "-"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def card_metrics_from_results(results: dict[str, Any]) -> dict[str, Any]:
    """The figures a model card lists, from an evaluation's ``results.json`` dict.

    Args:
        results: `zeda.evaluate`'s result as saved to ``results.json``.

    Returns:
        Flat ``{name: value}``: FLOP figures, intrinsic metrics, task metrics and recoveries.
    """
    out = {k: results.get(k) for k in _FLOP_KEYS}
    intrinsic = results.get("intrinsic") or {}
    for key in ("ppl_ratio", "top1_agreement", "mean_kl", "ppl", "teacher_ppl"):
        out[key] = intrinsic.get(key)
    for task, metrics in (results.get("tasks") or {}).items():
        for name, value in metrics.items():
            out[f"{task}/{name}"] = value
            rec = (results.get("recovery") or {}).get(task, {}).get(name)
            if rec is not None:
                out[f"{task}/{name} recovery"] = rec
    return {k: v for k, v in out.items() if v is not None}


def _flop_section(model: nn.Module, metrics: dict[str, Any]) -> list[str]:
    if "routed_flop_reduction" in metrics:
        tok = metrics.get("measured_tokens")
        return [
            f"Measured with router telemetry during evaluation{f' ({tok:,} tokens)' if tok else ''}, "
            "relative to the original model at its native top-k:",
            "",
            "| figure | value |",
            "|---|---|",
            f"| zero-expert share of routed slots | {_fmt_pct(metrics.get('zero_share'))} |",
            f"| routed-expert FLOP reduction | {_fmt_pct(metrics.get('routed_flop_reduction'))} |",
            f"| total FLOP reduction (per token) | {_fmt_pct(metrics.get('total_flop_reduction'))} |",
            "",
        ]
    from zeda.evaluation.flops import flop_report

    try:
        rep = flop_report(model.config)
    except Exception as exc:  # pragma: no cover - accounting is informative only
        return [f"Not measured (FLOP accounting unavailable: {exc}).", ""]
    return [
        "Not measured at export time (run `zeda eval`). Analytic size of this checkpoint:",
        "",
        f"- total parameters: {rep.total_params:,} (original: {rep.native_total_params:,})",
        f"- FLOPs per token at zero share 0: {rep.flops_per_token:.4g}",
        "",
    ]


def model_card(model: nn.Module, card_metrics: dict[str, Any] | None, base_model: str | None = None) -> str:
    """The README.md model card: zeda metadata, FLOP figures, accuracy figures and usage.

    Args:
        model: The merged injected model.
        card_metrics: Figures to list (e.g. `EvalResult.card_metrics`); the FLOP rows fall back
            to the analytic accounting when no measurement is given.
        base_model: The original checkpoint's name or path, if known.
    """
    cfg = model.config
    z = dict(getattr(cfg, "zeda", None) or {})
    layers = find_moe_layers(model)
    e, k = layers[0].router.num_experts, layers[0].router.top_k
    metrics = dict(card_metrics or {})
    lines = ["---", "library_name: transformers", "tags:", "- zeda", "- mixture-of-experts", "- zero-experts"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += [
        "---",
        "",
        f"# {Path(str(base_model or cfg.model_type)).name} with zero-output experts (zeda)",
        "",
    ]
    lines += [
        f"This checkpoint adds **{z.get('num_zero_experts')} parameter-free zero-output experts** to each of the "
        f"{len(layers)} MoE routers of a `{z.get('base_model_type', cfg.model_type)}` model ({e} real experts, "
        f"top-{k} unchanged). A top-k slot routed to a zero expert does no expert work, so the routed-expert "
        "FLOPs per token fall by the share of slots the router sends to zero experts. The experts were distilled "
        "(LoRA, merged here) against the frozen original.",
        "",
        "## zeda metadata",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in z.items()]
    lines += [f"| real experts E | {e} |", f"| top-k | {k} |", f"| MoE layers | {len(layers)} |", ""]
    lines += ["## FLOPs", "", *_flop_section(model, metrics)]
    rest = {key: v for key, v in metrics.items() if key not in _FLOP_KEYS}
    lines += ["## Accuracy", ""]
    if rest:
        lines += ["| metric | value |", "|---|---|"] + [f"| {key} | {_fmt(v)} |" for key, v in rest.items()]
        lines += [
            "",
            "`ppl_ratio` is held-out perplexity divided by the original's, `top1_agreement` the share of "
            "positions whose greedy token matches the original, `mean_kl` the mean KL(original ‖ this) in "
            "nats; `recovery` rows are converted/original (inverted where lower is better).",
        ]
    else:
        lines += ["Not measured at export time (run `zeda eval`)."]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import zeda  # registers the zeda_<family> model classes with transformers' Auto classes",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "",
        "with zeda.router_settings(model, zero_logit_bias=1.0):  # trade accuracy for more FLOPs saved",
        "    ...",
        "```",
        "",
        "`zeda calibrate` bakes a zero-logit bias for a target skipped share into `config.json`",
        '(`config.zeda["zero_logit_bias"]`).',
        "",
        f"Exported with zeda {zeda_version()}.",
        "",
    ]
    return "\n".join(lines)
