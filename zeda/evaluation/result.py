"""What `zeda.evaluate` measured: `EvalResult` (with its curve of `CurvePoint` rows) and its output.

An `EvalResult` renders as tables in notebooks (``_repr_markdown_`` / ``_repr_html_``), as a
short console table (`EvalResult.summary_table`), plots inline (`EvalResult.plot`) and saves
``results.json``, ``report.md``, ``zero_share_per_layer.png`` and ``frontier.png``
(`EvalResult.save`). What the tables hold is `zeda.evaluation.report`'s; the tables and figures
themselves are drawn by `zeda.evaluation.render`.
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
from zeda.evaluation import render, report

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
        """The figures a model card lists (`zeda.io.export` ``card_metrics``)."""
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
        return report.sections(self)

    def summary_table(self) -> str:
        """A short plain-text table for the console (`zeda.evaluation.report.summary_table`): the
        headline figures of the converted model on the held-out text and of each training-free
        baseline calibrated to that same measured share, then the expert-saturation alarm and
        notes if any.

        Returns:
            Lines of fixed-width text (no trailing newline).
        """
        return report.summary_table(self)

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


def _finite(x: Any) -> Any:
    """Replace NaN/inf by None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
