"""The accuracy-versus-FLOPs curve: the converted model, its bias sweep, and baselines at matched share.

Every point is scored on the same held-out text (`zeda.evaluation.heldout.HeldOut`) and its
FLOPs come from the share `RouterTelemetry` measured during that very scoring. Each training-free
baseline (`zeda.evaluation.baselines`) is calibrated to the converted model's measured share
(and to each sweep point's), then scored at that setting.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zeda.errors import ZedaError
from zeda.evaluation.baselines import Calibration, apply_policy, attach_router_policy, calibrate_rule
from zeda.evaluation.heldout import HeldOut
from zeda.evaluation.result import CurvePoint, EvalResult
from zeda.zero.inject import find_moe_layers
from zeda.zero.routing import router_settings
from zeda.zero.telemetry import RouterTelemetry

logger = logging.getLogger(__name__)

__all__ = ["RuleScore", "add_curve", "baseline_label", "flop_dict", "score_rules"]

_KNOB = {"keep_top_m": "m", "top_p": "p", "threshold": "t", "adaptive_k": "s"}


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def flop_dict(
    model: nn.Module, per_layer: dict[int, float], num_zero_experts: int | None = None
) -> dict[str, Any]:
    """`zeda.evaluation.flops.measured_report` of ``model`` with ``per_layer`` shares, as a dict.

    MoE layers that telemetry did not see count as 0% saved (with a warning if only some were seen).
    """
    from zeda.evaluation.flops import measured_report

    config = _base_model(model).config
    moe = [layer.index for layer in find_moe_layers(model)]
    shares = {i: float(per_layer.get(i, 0.0)) for i in moe}
    unseen = [i for i in moe if i not in per_layer]
    if unseen and len(unseen) < len(moe):
        logger.warning("no router telemetry for MoE layers %s; counting them as 0%% saved", unseen)
    try:
        return measured_report(config, shares, num_zero_experts=num_zero_experts).to_dict()
    except ZedaError as exc:  # e.g. layer indexing this family's accounting does not share
        logger.warning("FLOP accounting failed (%s); reporting the routed share only", exc)
        share = sum(shares.values()) / len(shares) if shares else 0.0
        return {"zero_share": share, "routed_flop_reduction": share, "total_flop_reduction": math.nan}


def baseline_label(kind: str, value: float) -> str:
    """Display name of a calibrated baseline, e.g. ``top_p p=0.61`` or ``top_p_no_renorm p=0.61``."""
    rule = kind.removesuffix("_no_renorm")
    return f"{kind} {_KNOB.get(rule, 'v')}={value:.3g}"


def point(
    model: nn.Module,
    label: str,
    method: str,
    setting: float | None,
    metrics: dict,
    tel: RouterTelemetry,
    num_zero: int,
    target: float | None = None,
) -> CurvePoint:
    """A `CurvePoint` from held-out ``metrics`` and the telemetry of the same forwards."""
    flops = flop_dict(model, tel.per_layer, num_zero)
    return CurvePoint(
        label=label,
        method=method,
        setting=setting,
        zero_share=tel.zero_share,
        routed_flop_reduction=float(flops["routed_flop_reduction"]),
        total_flop_reduction=float(flops["total_flop_reduction"]),
        ppl=metrics["ppl"],
        ppl_ratio=metrics["ppl_ratio"],
        top1_agreement=metrics["top1_agreement"],
        mean_kl=metrics["mean_kl"],
        target_share=target,
    )


def add_curve(
    result: EvalResult,
    model: nn.Module,
    held: HeldOut,
    *,
    zero_bias_sweep: list[float],
    baselines: list[str],
    teacher: nn.Module | None,
    teacher_ctx: Callable[[], Any],
    injected: bool,
    baselines_at_sweep: bool,
    metrics: dict,
    tel: RouterTelemetry,
) -> None:
    """Fill ``result.curve`` and ``result.calibrations``: original, converted, sweep, baselines.

    Args:
        result: The result to fill (its ``num_zero_experts`` is read).
        model: The converted model.
        held: The held-out text, prepared.
        zero_bias_sweep: Zero-logit biases to score the converted model at.
        baselines: Baseline kinds (`zeda.evaluation.baselines.POLICY_KINDS`).
        teacher: A separate original model, or None (the converted model's teacher mode).
        teacher_ctx: Context factory that turns the teacher into the original.
        injected: Whether ``model`` has zero experts.
        baselines_at_sweep: Also calibrate the baselines to every sweep point's share.
        metrics: The converted model's held-out metrics (already scored).
        tel: The telemetry of that scoring.
    """
    result.curve.append(
        CurvePoint("original", "original", None, 0.0, 0.0, 0.0, math.exp(held.teacher_nll), 1.0, 1.0, 0.0)
    )
    num_zero = result.num_zero_experts
    result.curve.append(point(model, "zeda", "zeda", 0.0, metrics, tel, num_zero))
    targets = [tel.zero_share]
    if zero_bias_sweep and not injected:
        result.notes.append("zero-bias sweep skipped: the model has no zero experts")
    elif zero_bias_sweep:
        for b in zero_bias_sweep:
            label = f"zeda bias={b:+g}"
            ctx = lambda b=b: router_settings(model, zero_logit_bias=float(b))  # noqa: E731
            m, t = held.score(model, ctx, label)
            result.curve.append(point(model, label, "zeda", float(b), m, t, num_zero))
            if baselines_at_sweep:
                targets.append(t.zero_share)

    if not baselines:
        return
    if tel.zero_share < 1e-3 and len(targets) == 1:
        result.notes.append(
            "baselines skipped: the model skips no slots, so there is no FLOP budget to match"
        )
        return
    # The baseline model: the original routers with a slot policy (teacher mode of an injected
    # model, or a separate original attached to zeda's router class).
    bmodel = attach_router_policy(teacher) if teacher is not None else model
    for rule in score_rules(bmodel, held, baselines, targets, teacher_ctx):
        result.calibrations.append(rule.calibration.to_dict())
        result.curve.append(
            point(bmodel, rule.label, rule.kind, rule.calibration.value, rule.metrics, rule.telemetry, 0,
                  rule.target)
        )  # fmt: skip


@dataclass
class RuleScore:
    """One training-free rule calibrated to a target share and scored on held-out text.

    Attributes:
        kind: The rule (`zeda.evaluation.baselines.POLICY_KINDS`).
        target: The skipped share it was calibrated to.
        calibration: The calibration (value, share reached on the calibration blocks).
        metrics: `HeldOut.score` metrics (``ppl``, ``ppl_ratio``, ``top1_agreement``, ``mean_kl``, ``tokens``).
        telemetry: The telemetry of that scoring (``zero_share`` = the share it really skipped).
    """

    kind: str
    target: float
    calibration: Calibration
    metrics: dict
    telemetry: RouterTelemetry

    @property
    def label(self) -> str:
        """Display name, e.g. ``top_p p=0.61``."""
        return baseline_label(self.kind, self.calibration.value)

    def row(self) -> dict:
        """Plain-dict form: the rule, its setting and its measured figures."""
        return {
            "rule": self.label,
            "kind": self.kind,
            "value": self.calibration.value,
            "target_share": self.target,
            "zero_share": self.telemetry.zero_share,
            **{k: self.metrics[k] for k in ("ppl_ratio", "top1_agreement", "mean_kl")},
        }


def score_rules(
    bmodel: nn.Module,
    held: HeldOut,
    kinds: Sequence[str],
    targets: Sequence[float],
    teacher_ctx: Callable[[], Any],
    calibration_tokens: int | None = None,
    calibration_blocks: torch.Tensor | None = None,
) -> list[RuleScore]:
    """Calibrate every rule in ``kinds`` to every share in ``targets``, then score it on ``held``.

    The one place where training-free rules are calibrated and scored: the evaluation's curve,
    the distillation's validation verdict and the evals scorers call it.

    Args:
        bmodel: The model whose routers take the slot policy: an injected model (used inside
            ``teacher_ctx``, its teacher mode) or an original prepared with `attach_router_policy`.
        held: The held-out text, prepared (`HeldOut.prepare`).
        kinds: Rules (`zeda.evaluation.baselines.POLICY_KINDS`).
        targets: Skipped shares to calibrate to (shares below 0.001 are left out).
        teacher_ctx: Context factory that turns ``bmodel`` into the original.
        calibration_tokens: Tokens of ``held`` the calibration runs on (blocks spread evenly over
            the text); None: two of its batches.
        calibration_blocks: ``(N, T)`` token ids to calibrate on instead of ``held``'s own blocks
            (e.g. validation text when ``held`` is the test split, which then only scores).

    Returns:
        One `RuleScore` per (kind, target), kinds in the given order, targets ascending.
    """
    # Calibrate on blocks spread evenly over the text (two batches' worth), so the share the
    # baseline reaches on all of it lands close to the target; the share reported is measured.
    source = held.blocks if calibration_blocks is None else calibration_blocks
    n, width = source.shape
    count = 2 * held.batch_size if calibration_tokens is None else max(1, calibration_tokens // width)
    pick = torch.linspace(0, n - 1, min(n, count)).round().long().unique()
    cal_batches = list(torch.split(source[pick], held.batch_size))
    calibrated: dict[tuple[str, float], Calibration] = {}
    settings: list[tuple[str, float, Calibration]] = []
    for kind in kinds:
        rule = kind.removesuffix("_no_renorm")  # renormalising does not change the share
        for target in sorted({round(s, 6) for s in targets if s >= 1e-3}):
            if (rule, target) not in calibrated:
                with teacher_ctx():
                    calibrated[(rule, target)] = calibrate_rule(bmodel, rule, target, cal_batches)
            cal = calibrated[(rule, target)]
            settings.append(
                (
                    kind,
                    target,
                    Calibration(kind, cal.value, cal.target_share, cal.achieved_share, cal.evaluations),
                )
            )

    def ctx_for(cal: Calibration) -> Callable[[], Any]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            with teacher_ctx(), apply_policy(bmodel, cal.policy):
                yield

        return ctx

    if not settings:
        return []
    # One pass over the text for all of them: the teacher's side of each chunk is shared.
    scored = held.score_many(bmodel, [ctx_for(cal) for _, _, cal in settings], f"{len(settings)} rules")
    return [
        RuleScore(kind, target, cal, m, t)
        for (kind, target, cal), (m, t) in zip(settings, scored, strict=True)
    ]
