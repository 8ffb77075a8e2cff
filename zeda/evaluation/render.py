"""Rendering of evaluation results: Markdown / HTML tables and matplotlib figures.

Kept apart from `zeda.evaluation.result` so that the numbers and their presentation stay separate. The
figures use whatever matplotlib backend is active (inline in a notebook); `save_figures` switches
to the non-interactive ``Agg`` backend when no display backend has been chosen.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "fmt",
    "frontier_figure",
    "html_table",
    "md_table",
    "pct",
    "save_figure",
    "text_table",
    "zero_share_figure",
]

_METHOD_STYLE: dict[str, tuple[str, str]] = {
    "original": ("black", "*"),
    "zeda": ("tab:red", "o"),
    "keep_top_m": ("tab:blue", "s"),
    "top_p": ("tab:green", "^"),
    "threshold": ("tab:purple", "D"),
    "top_p_no_renorm": ("tab:olive", "v"),
    "threshold_no_renorm": ("tab:pink", "d"),
    "keep_top_m_no_renorm": ("tab:cyan", "p"),
    "adaptive_k": ("tab:brown", "h"),
}


def fmt(x: Any, digits: int = 4) -> str:
    """Format a number compactly for tables (``-`` for None/NaN)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.{digits}g}"
    return str(x)


def pct(x: float | None) -> str:
    """``0.4213`` → ``"42.1%"``."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with `fmt` unless already strings)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table with the same content as `md_table`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(c if isinstance(c, str) else fmt(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pyplot() -> Any:
    """``matplotlib.pyplot``, on the ``Agg`` backend unless running inside a notebook kernel."""
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def zero_share_figure(per_layer: dict[int, float], histogram: Sequence[int], title: str = "") -> Any:
    """Bar chart of the measured zero share per MoE layer, and the real-experts-per-token histogram.

    Args:
        per_layer: Decoder layer index → share of routed slots that went to zero experts.
        histogram: Tokens×layers counts of 0..k real experts used.
        title: Figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    layers = sorted(per_layer)
    ax1.bar([str(i) for i in layers], [per_layer[i] for i in layers], color="tab:red")
    ax1.set_xlabel("MoE layer")
    ax1.set_ylabel("zero-expert share of routed slots")
    ax1.set_ylim(0, 1)
    total = sum(histogram) or 1
    ax2.bar([str(i) for i in range(len(histogram))], [h / total for h in histogram], color="tab:gray")
    ax2.set_xlabel("real experts used per token")
    ax2.set_ylabel("fraction of token·layers")
    fig.suptitle(title or "measured routing")
    fig.tight_layout()
    return fig


def frontier_figure(points: Sequence[dict], title: str = "") -> Any:
    """Accuracy-versus-FLOPs frontier: perplexity ratio and top-1 agreement against FLOP reduction.

    Args:
        points: Dicts with ``method``, ``routed_flop_reduction``, ``ppl_ratio``, ``top1_agreement``
            (one per evaluated setting: original, converted model, bias sweep, baselines).
        title: Figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    methods: dict[str, list[dict]] = {}
    for p in points:
        methods.setdefault(p["method"], []).append(p)
    origin = methods.get("original", [])[:1]
    for method, pts in methods.items():
        # Every method reaches the original at 0% saved: start each curve there.
        pts = sorted((origin if method != "original" else []) + pts, key=lambda p: p["routed_flop_reduction"])
        color, marker = _METHOD_STYLE.get(method, ("tab:orange", "x"))
        label = {"zeda": "zeda (distilled, bias sweep)"}.get(method, method)
        xs = [100 * p["routed_flop_reduction"] for p in pts]
        for ax, key in ((ax1, "ppl_ratio"), (ax2, "top1_agreement")):
            ax.plot(
                xs,
                [p[key] for p in pts],
                marker=marker,
                color=color,
                label=label,
                ms=7 if method == "original" else 5,
            )
    ax1.set_ylabel("perplexity / original perplexity (lower is better)")
    ax2.set_ylabel("top-1 agreement with original (higher is better)")
    for ax in (ax1, ax2):
        ax.set_xlabel("routed-expert FLOP reduction (%)")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title or "accuracy vs FLOPs")
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG and close it."""
    plt = _pyplot()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def close_figure(fig: Any) -> None:
    """Close ``fig`` (a no-op if it is closed already)."""
    _pyplot().close(fig)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width plain-text table for the console (cells formatted with `fmt`)."""
    cells = [list(header)] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
