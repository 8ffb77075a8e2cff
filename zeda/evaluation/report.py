"""What an `EvalResult` reports: the tables of its notebook and ``report.md`` view (`sections`)
and its console summary (`summary_table`). `zeda.evaluation.render` draws them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zeda.evaluation import render

if TYPE_CHECKING:
    from zeda.evaluation.result import EvalResult

__all__ = ["sections", "summary_table"]


def sections(result: EvalResult) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
    """The report's ``(title, header, rows)`` tables: the headline figures, the lm-eval tasks,
    the accuracy-versus-FLOPs curve, the zero share per layer, expert saturation and load, and the
    real experts per token (each only where measured)."""
    pct = render.pct
    title = (
        f"{result.model_name} ({result.model_type}): E={result.num_experts}, Z={result.num_zero_experts}, "
        f"top-{result.top_k}"
    )
    summary: list[list[Any]] = [
        ["zero-expert share of routed slots", "0.0%", pct(result.zero_share)],
        ["routed-expert FLOP reduction", "0.0%", pct(result.routed_flop_reduction)],
        ["total FLOP reduction", "0.0%", pct(result.total_flop_reduction)],
    ]
    if result.flops:
        summary.append(
            [
                "FLOPs / token",
                render.fmt(float(result.flops["native_flops_per_token"])),
                render.fmt(float(result.flops["flops_per_token"])),
            ]
        )
    if result.intrinsic:
        i = result.intrinsic
        summary += [
            ["held-out perplexity", i["teacher_ppl"], i["ppl"]],
            ["perplexity ratio", 1.0, i["ppl_ratio"]],
            ["top-1 agreement with original", 1.0, i["top1_agreement"]],
            ["mean KL(original ‖ model), nats", 0.0, i["mean_kl"]],
        ]
    out: list[tuple[str, Sequence[str], list[list[Any]]]] = [(title, ["", "original", "zeda"], summary)]
    rows = []
    for task, metrics in result.tasks.items():
        for name, value in metrics.items():
            rows.append(
                [
                    task,
                    name,
                    result.teacher_tasks.get(task, {}).get(name),
                    value,
                    result.recovery.get(task, {}).get(name),
                ]
            )
    if rows:
        out.append(("lm-eval tasks", ["task", "metric", "original", "zeda", "recovery"], rows))
    if result.curve:
        out.append(
            (
                "accuracy vs FLOPs (held-out text; baselines at matched measured FLOPs)",
                [
                    "setting",
                    "skipped share",
                    "routed FLOPs saved",
                    "total FLOPs saved",
                    "ppl ratio",
                    "top-1 agr.",
                    "KL",
                ],
                [
                    [
                        p.label,
                        pct(p.zero_share),
                        pct(p.routed_flop_reduction),
                        pct(p.total_flop_reduction),
                        p.ppl_ratio,
                        p.top1_agreement,
                        p.mean_kl,
                    ]
                    for p in result.curve
                ],
            )
        )
    if result.zero_share_per_layer:
        out.append(
            (
                "zero share per MoE layer",
                ["layer", *[str(i) for i in result.zero_share_per_layer]],
                [["share", *[pct(v) for v in result.zero_share_per_layer.values()]]],
            )
        )
    if result.busiest_expert_share:
        flagged = result.saturated_layers
        out.append(
            (
                f"expert saturation (busiest real expert per layer; alarm above "
                f"{render.fmt(result.saturation_factor)}x the mean load)",
                ["layer", "tokens to busiest expert", "load / mean load", "alarm"],
                [
                    [str(i), pct(v), flagged.get(i), "SATURATED" if i in flagged else ""]
                    for i, v in result.busiest_expert_share.items()
                ],
            )
        )
    if result.expert_load_ratio and result.original_expert_load_ratio:
        orig, mine = result.original_expert_load_ratio, result.expert_load_ratio
        out.append(
            (
                "busiest real expert, load / mean load (held-out text): the original beside zeda",
                ["layer", "original", "zeda", "zeda / original"],
                [[str(i), orig.get(i), v, v / orig[i] if orig.get(i) else None] for i, v in mine.items()],
            )
        )
    if result.real_experts_histogram:
        total = sum(result.real_experts_histogram) or 1
        out.append(
            (
                "real experts per token (all MoE layers)",
                ["real experts", *[str(i) for i in range(len(result.real_experts_histogram))]],
                [["share of token·layers", *[pct(h / total) for h in result.real_experts_histogram]]],
            )
        )
    return out


def summary_table(result: EvalResult) -> str:
    """A short plain-text table for the console: the headline figures and each baseline.

    One row for the converted model on the held-out text (skipped share, routed and total
    FLOPs saved, perplexity ratio, top-1 agreement, KL) and one per training-free baseline
    calibrated to that same measured share, then the expert-saturation alarm and notes if any.
    The headline figures of `EvalResult.to_dict` (``zero_share`` ...) also count the lm-eval forwards.

    Returns:
        Lines of fixed-width text (no trailing newline).
    """
    pct = render.pct
    header = ["setting", "skipped", "FLOPs saved (routed/total)", "ppl ratio", "top-1 agr.", "KL"]

    def row(label: str, share: float, routed: float, total: float, ppl: Any, agr: Any, kl: Any) -> list[str]:
        return [
            label,
            pct(share),
            f"{pct(routed)} / {pct(total)}",
            _fixed(ppl, 4),
            _fixed(agr, 3),
            render.fmt(kl, 3),
        ]

    # The converted model's held-out point when there is one: the baselines are matched to it.
    own = next((p for p in result.curve if p.method == "zeda" and p.setting == 0.0), None)
    if own is not None:
        rows = [row("zeda", own.zero_share, own.routed_flop_reduction, own.total_flop_reduction,
                    own.ppl_ratio, own.top1_agreement, own.mean_kl)]  # fmt: skip
    else:
        i = result.intrinsic or {}
        rows = [row("zeda", result.zero_share, result.routed_flop_reduction, result.total_flop_reduction,
                    i.get("ppl_ratio"), i.get("top1_agreement"), i.get("mean_kl"))]  # fmt: skip
    for p in result.curve:
        if p.method in ("original", "zeda") or p.target_share is None or own is None:
            continue
        if abs(p.target_share - round(own.zero_share, 6)) > 1e-6:  # matched to a sweep point
            continue
        rows.append(
            row(
                p.label,
                p.zero_share,
                p.routed_flop_reduction,
                p.total_flop_reduction,
                p.ppl_ratio,
                p.top1_agreement,
                p.mean_kl,
            )  # fmt: skip
        )
    lines = [f"{result.model_name}: E={result.num_experts}, Z={result.num_zero_experts}, top-{result.top_k}"]
    lines += render.text_table(header, rows).splitlines()
    if result.saturated_layers:
        worst = max(result.saturated_layers.items(), key=lambda kv: kv[1])
        lines.append(
            f"expert saturation alarm: {len(result.saturated_layers)} layer(s) above "
            f"{render.fmt(result.saturation_factor)}x the mean expert load "
            f"(worst: layer {worst[0]}, {worst[1]:.1f}x)"
        )
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _fixed(x: float | None, digits: int) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
