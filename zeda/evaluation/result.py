"""What `zeda.evaluate` measured: `EvalResult` (with its curve of `CurvePoint` rows) and its output.

An `EvalResult` renders as tables in notebooks (``_repr_markdown_`` / ``_repr_html_``), as a
short console table (`EvalResult.summary_table`), plots inline (`EvalResult.plot`) and saves
``results.json``, ``report.md``, ``zero_share_per_layer.png`` and ``frontier.png``
(`EvalResult.save`). The tables and figures themselves are drawn by `zeda.evaluation.render`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zeda.errors import ZedaError
from zeda.evaluation import render

logger = logging.getLogger(__name__)

__all__ = ["CurvePoint", "EvalResult"]


@dataclass
class CurvePoint:
    """One setting on the accuracy-versus-FLOPs plane, measured on the held-out text.

    Attributes:
        label: Display name, e.g. ``"zeda"``, ``"zeda bias=+1"``, ``"top_p p=0.61"``.
        method: ``original``, ``zeda`` (converted model, any bias) or a baseline kind.
        setting: The knob's value (zero-logit bias, or the baseline policy value).
        zero_share: Measured share of routed slots that did no expert work.
        routed_flop_reduction: Routed-expert FLOP reduction vs. the original at native top-k.
        total_flop_reduction: Whole-model FLOP reduction (per token, context 0).
        ppl: Perplexity on the held-out text.
        ppl_ratio: ``ppl / original ppl``.
        top1_agreement: Share of positions whose argmax equals the original's.
        mean_kl: Mean KL(original ‖ this) per token, in nats.
        target_share: For baselines, the share they were calibrated to.
    """

    label: str
    method: str
    setting: float | None
    zero_share: float
    routed_flop_reduction: float
    total_flop_reduction: float
    ppl: float
    ppl_ratio: float
    top1_agreement: float
    mean_kl: float
    target_share: float | None = None


@dataclass
class EvalResult:
    """Everything `evaluate` measured. ``to_dict()`` is what ``results.json`` holds.

    Attributes:
        model_name: Display name of the model.
        model_type: Its config's model type.
        injected: Whether the model has zero experts.
        num_experts: Real routed experts E per MoE layer.
        num_zero_experts: Zero experts Z per MoE layer (0 for an original model).
        top_k: Routed slots per token.
        tasks: Converted model's lm-eval metrics, ``task -> metric -> value``.
        teacher_tasks: The original's lm-eval metrics (same tasks, same limit).
        recovery: ``task -> metric -> converted/original`` (original/converted when lower is
            better), so 1.0 means fully kept.
        higher_is_better: ``task -> metric -> bool`` as lm-eval declares it.
        intrinsic: Held-out text metrics: ``ppl``, ``teacher_ppl``, ``ppl_ratio``,
            ``top1_agreement``, ``mean_kl``, ``tokens``.
        flops: `zeda.flops.FlopReport` (as a dict) from the shares measured during evaluation.
        zero_share_per_layer: Measured zero share per MoE layer (decoder index).
        real_experts_histogram: Token·layer counts of 0..k real experts used.
        busiest_expert_share: Per MoE layer, the share of tokens that sent a slot to the
            layer's busiest real expert (the expert-saturation telemetry).
        saturated_layers: Layers whose busiest real expert carried more than
            ``saturation_factor`` × the mean expert load, with that ratio (the alarm).
        saturation_factor: The multiple of the mean load above which a layer is flagged.
        expert_load_ratio: Per MoE layer, the converted model's busiest real expert's load divided
            by the mean real-expert load, on the held-out text (1.0 = even).
        original_expert_load_ratio: The same for the original model on the same text (its
            teacher pass), so the two can be compared layer by layer.
        measured_tokens: Tokens (padding excluded) behind the FLOP figures.
        curve: The accuracy-versus-FLOPs points (original, converted, sweep, baselines).
        calibrations: Baseline calibrations (`zeda.baselines.Calibration` dicts).
        settings: The evaluation settings used.
        notes: Anything skipped and why.
        wall_seconds: Time the evaluation took.
    """

    model_name: str
    model_type: str
    injected: bool
    num_experts: int
    num_zero_experts: int
    top_k: int
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    teacher_tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    recovery: dict[str, dict[str, float | None]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    intrinsic: dict[str, float] | None = None
    flops: dict[str, Any] = field(default_factory=dict)
    zero_share_per_layer: dict[int, float] = field(default_factory=dict)
    real_experts_histogram: list[int] = field(default_factory=list)
    busiest_expert_share: dict[int, float] = field(default_factory=dict)
    saturated_layers: dict[int, float] = field(default_factory=dict)
    saturation_factor: float = math.nan
    expert_load_ratio: dict[int, float] = field(default_factory=dict)
    original_expert_load_ratio: dict[int, float] = field(default_factory=dict)
    measured_tokens: int = 0
    curve: list[CurvePoint] = field(default_factory=list)
    calibrations: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    # -- headline numbers ------------------------------------------------------------------

    @property
    def routed_flop_reduction(self) -> float:
        """Measured routed-expert FLOP reduction vs. the original at its native top-k."""
        return float(self.flops.get("routed_flop_reduction", 0.0))

    @property
    def total_flop_reduction(self) -> float:
        """Measured whole-model FLOP reduction per token."""
        return float(self.flops.get("total_flop_reduction", 0.0))

    @property
    def zero_share(self) -> float:
        """Measured share of routed slots that went to zero experts."""
        return float(self.flops.get("zero_share", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (plus the headline FLOP numbers)."""
        d = asdict(self)
        for key in (
            "zero_share_per_layer",
            "busiest_expert_share",
            "saturated_layers",
            "expert_load_ratio",
            "original_expert_load_ratio",
        ):
            d[key] = {str(k): v for k, v in getattr(self, key).items()}
        d["zero_share"] = self.zero_share
        d["routed_flop_reduction"] = self.routed_flop_reduction
        d["total_flop_reduction"] = self.total_flop_reduction
        return _finite(d)

    def card_metrics(self) -> dict[str, Any]:
        """The figures a model card lists (`zeda.export.export` ``card_metrics``)."""
        out: dict[str, Any] = {
            "zero_share": self.zero_share,
            "routed_flop_reduction": self.routed_flop_reduction,
            "total_flop_reduction": self.total_flop_reduction,
            "measured_tokens": self.measured_tokens,
        }
        if self.intrinsic:
            out.update(
                {
                    k: self.intrinsic[k]
                    for k in ("ppl_ratio", "top1_agreement", "mean_kl", "ppl", "teacher_ppl")
                }
            )
        for task, metrics in self.tasks.items():
            for name, value in metrics.items():
                out[f"{task}/{name}"] = value
                rec = self.recovery.get(task, {}).get(name)
                if rec is not None:
                    out[f"{task}/{name} recovery"] = rec
        return out

    # -- rendering -------------------------------------------------------------------------

    def _sections(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        pct = render.pct
        title = (
            f"{self.model_name} ({self.model_type}): E={self.num_experts}, Z={self.num_zero_experts}, "
            f"top-{self.top_k}"
        )
        summary: list[list[Any]] = [
            ["zero-expert share of routed slots", "0.0%", pct(self.zero_share)],
            ["routed-expert FLOP reduction", "0.0%", pct(self.routed_flop_reduction)],
            ["total FLOP reduction", "0.0%", pct(self.total_flop_reduction)],
        ]
        if self.flops:
            summary.append(
                [
                    "FLOPs / token",
                    render.fmt(float(self.flops["native_flops_per_token"])),
                    render.fmt(float(self.flops["flops_per_token"])),
                ]
            )
        if self.intrinsic:
            i = self.intrinsic
            summary += [
                ["held-out perplexity", i["teacher_ppl"], i["ppl"]],
                ["perplexity ratio", 1.0, i["ppl_ratio"]],
                ["top-1 agreement with original", 1.0, i["top1_agreement"]],
                ["mean KL(original ‖ model), nats", 0.0, i["mean_kl"]],
            ]
        sections: list[tuple[str, Sequence[str], list[list[Any]]]] = [
            (title, ["", "original", "zeda"], summary)
        ]
        rows = []
        for task, metrics in self.tasks.items():
            for name, value in metrics.items():
                rows.append(
                    [
                        task,
                        name,
                        self.teacher_tasks.get(task, {}).get(name),
                        value,
                        self.recovery.get(task, {}).get(name),
                    ]
                )
        if rows:
            sections.append(("lm-eval tasks", ["task", "metric", "original", "zeda", "recovery"], rows))
        if self.curve:
            sections.append(
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
                        for p in self.curve
                    ],
                )
            )
        if self.zero_share_per_layer:
            sections.append(
                (
                    "zero share per MoE layer",
                    ["layer", *[str(i) for i in self.zero_share_per_layer]],
                    [["share", *[pct(v) for v in self.zero_share_per_layer.values()]]],
                )
            )
        if self.busiest_expert_share:
            flagged = self.saturated_layers
            sections.append(
                (
                    f"expert saturation (busiest real expert per layer; alarm above "
                    f"{render.fmt(self.saturation_factor)}x the mean load)",
                    ["layer", "tokens to busiest expert", "load / mean load", "alarm"],
                    [
                        [str(i), pct(v), flagged.get(i), "SATURATED" if i in flagged else ""]
                        for i, v in self.busiest_expert_share.items()
                    ],
                )
            )
        if self.expert_load_ratio and self.original_expert_load_ratio:
            orig, mine = self.original_expert_load_ratio, self.expert_load_ratio
            sections.append(
                (
                    "busiest real expert, load / mean load (held-out text): the original beside zeda",
                    ["layer", "original", "zeda", "zeda / original"],
                    [[str(i), orig.get(i), v, v / orig[i] if orig.get(i) else None] for i, v in mine.items()],
                )
            )
        if self.real_experts_histogram:
            total = sum(self.real_experts_histogram) or 1
            sections.append(
                (
                    "real experts per token (all MoE layers)",
                    ["real experts", *[str(i) for i in range(len(self.real_experts_histogram))]],
                    [["share of token·layers", *[pct(h / total) for h in self.real_experts_histogram]]],
                )
            )
        return sections

    def summary_table(self) -> str:
        """A short plain-text table for the console: the headline figures and each baseline.

        One row for the converted model on the held-out text (skipped share, routed and total
        FLOPs saved, perplexity ratio, top-1 agreement, KL) and one per training-free baseline
        calibrated to that same measured share, then the expert-saturation alarm and notes if any.
        The headline figures of `to_dict` (``zero_share`` ...) also count the lm-eval forwards.

        Returns:
            Lines of fixed-width text (no trailing newline).
        """
        pct = render.pct
        header = ["setting", "skipped", "FLOPs saved (routed/total)", "ppl ratio", "top-1 agr.", "KL"]

        def row(
            label: str, share: float, routed: float, total: float, ppl: Any, agr: Any, kl: Any
        ) -> list[str]:
            return [
                label,
                pct(share),
                f"{pct(routed)} / {pct(total)}",
                _fixed(ppl, 4),
                _fixed(agr, 3),
                render.fmt(kl, 3),
            ]

        # The converted model's held-out point when there is one: the baselines are matched to it.
        own = next((p for p in self.curve if p.method == "zeda" and p.setting == 0.0), None)
        if own is not None:
            rows = [row("zeda", own.zero_share, own.routed_flop_reduction, own.total_flop_reduction,
                        own.ppl_ratio, own.top1_agreement, own.mean_kl)]  # fmt: skip
        else:
            i = self.intrinsic or {}
            rows = [row("zeda", self.zero_share, self.routed_flop_reduction, self.total_flop_reduction,
                        i.get("ppl_ratio"), i.get("top1_agreement"), i.get("mean_kl"))]  # fmt: skip
        for p in self.curve:
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
        lines = [f"{self.model_name}: E={self.num_experts}, Z={self.num_zero_experts}, top-{self.top_k}"]
        lines += render.text_table(header, rows).splitlines()
        if self.saturated_layers:
            worst = max(self.saturated_layers.items(), key=lambda kv: kv[1])
            lines.append(
                f"expert saturation alarm: {len(self.saturated_layers)} layer(s) above "
                f"{render.fmt(self.saturation_factor)}x the mean expert load "
                f"(worst: layer {worst[0]}, {worst[1]:.1f}x)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        parts = []
        for title, header, rows in self._sections():
            parts.append(f"**{title}**\n\n{render.md_table(header, rows)}")
        if self.notes:
            parts.append("Notes: " + "; ".join(self.notes))
        return "\n\n".join(parts)

    def _repr_html_(self) -> str:
        import html

        parts = [
            f"<p><b>{html.escape(title)}</b></p>{render.html_table(header, rows)}"
            for title, header, rows in self._sections()
        ]
        if self.notes:
            parts.append(f"<p>Notes: {html.escape('; '.join(self.notes))}</p>")
        return "".join(parts)

    def __str__(self) -> str:
        return self._repr_markdown_()

    def plot(self) -> list[Any]:
        """The figures (zero share per layer, accuracy-vs-FLOPs frontier); shown inline in notebooks."""
        figs = []
        if self.zero_share_per_layer:
            figs.append(
                render.zero_share_figure(
                    self.zero_share_per_layer,
                    self.real_experts_histogram,
                    f"{self.model_name}: measured routing",
                )
            )
        if self.curve:
            figs.append(
                render.frontier_figure(
                    [asdict(p) for p in self.curve], f"{self.model_name}: accuracy vs FLOPs"
                )
            )
        return figs

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``results.json``, ``report.md``, ``zero_share_per_layer.png`` and ``frontier.png``.

        Args:
            out_dir: Output directory (created).
            overwrite: Replace an existing directory.

        Returns:
            The output directory.

        Raises:
            ZedaError: if ``out_dir`` exists and ``overwrite`` is False, or the files cannot be
                written (full disk, ``ulimit -f``): the previous evaluation is then kept as it was.
        """
        from zeda.atomic import atomic_write

        if (Path(out_dir).exists() or Path(out_dir).is_symlink()) and not overwrite:
            raise ZedaError(
                f"output directory {out_dir} already exists; pass --overwrite (overwrite=True) to replace it"
            )
        figs = self.plot()
        names = (["zero_share_per_layer.png"] if self.zero_share_per_layer else []) + (
            ["frontier.png"] if self.curve else []
        )

        def write(tmp: Path) -> None:
            (tmp / "results.json").write_text(json.dumps(self.to_dict(), indent=1))
            (tmp / "report.md").write_text(
                "# zeda evaluation\n\n"
                + self._repr_markdown_()
                + "\n\n![zero share per layer](zero_share_per_layer.png)\n\n![accuracy vs FLOPs](frontier.png)\n"
            )
            for fig, name in zip(figs, names, strict=True):
                render.save_figure(fig, tmp / name)

        # Written into a temporary sibling and renamed into place once complete.
        try:
            out = atomic_write(out_dir, write, overwrite)
        finally:
            for fig in figs:
                render.close_figure(fig)
        logger.info("wrote evaluation to %s", out)
        return out


def _fixed(x: float | None, digits: int) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _finite(x: Any) -> Any:
    """Replace NaN/inf by None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
