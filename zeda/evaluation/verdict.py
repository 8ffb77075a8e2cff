"""The verdict: does the converted model beat every training-free rule at its own measured share?

The bar for every run (``docs``: "Choosing settings without fooling yourself"): at the share of
routed slots the converted model really skips, calibrate each training-free rule
(`zeda.evaluation.baselines`) to that same share and compare on perplexity ratio, top-1
agreement with the original and KL(original ‖ model). `compare` makes that comparison from plain
figures, so the distillation's validation verdict, the evaluation and the evals scorers share it.

- ``best rule``: the rule with the lowest perplexity ratio;
- ``increase_ratio``: zeda's perplexity increase divided by the best rule's
  (``(ppl_ratio - 1) / (rule ppl_ratio - 1)``; below 1 is better, NaN when the rule loses nothing);
- ``beats``: zeda is at least as good as *every* rule on all three figures.

Only rules whose measured share is within `SHARE_TOLERANCE` of zeda's are compared: a rule
that cannot reach that share (keep-top-m reaches only multiples of 1/k: 0, 50% or 100% of
Mixtral's two slots) is no comparison at it; such rules are listed in ``unmatched``. When no
rule reaches it, the rules nearest to zeda's share are compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["METRICS", "SHARE_TOLERANCE", "Verdict", "compare"]

#: The three figures of the comparison and whether higher is better.
METRICS: dict[str, bool] = {"ppl_ratio": False, "top1_agreement": True, "mean_kl": False}
#: How far (absolute share of routed slots) a rule's measured share may sit from zeda's and still
#: count as matched: continuous rules calibrate to within ~0.5 points, and a model's own measured
#: share sits up to ~2 points from its target.
SHARE_TOLERANCE = 0.025


def _not_worse(zeda: dict, rule: dict, key: str) -> bool:
    higher = METRICS[key]
    return zeda[key] >= rule[key] if higher else zeda[key] <= rule[key]


@dataclass
class Verdict:
    """zeda against the training-free rules calibrated to its measured share.

    Attributes:
        split: The text it was measured on (``"validation"`` during distillation).
        zero_share: zeda's measured share of skipped routed slots (the rules' target).
        zeda: zeda's ``ppl_ratio``, ``top1_agreement``, ``mean_kl``.
        rule: The best rule (lowest perplexity ratio), e.g. ``"top_p_no_renorm p=0.61"``.
        rule_figures: Its ``zero_share``, ``ppl_ratio``, ``top1_agreement``, ``mean_kl``.
        increase_ratio: zeda's perplexity increase ÷ the best rule's (NaN if the rule's is <= 0).
        better_on_all: zeda is at least as good as the best rule on all three figures.
        beats: zeda is at least as good as every rule on all three figures.
        beaten_by: ``rule label -> figures on which it beats zeda`` for every rule that does.
        tokens: Tokens scored.
        rules: Every rule's row (label, kind, value, shares and figures), compared or not.
        unmatched: ``rule label -> its measured share`` for every rule whose share is more than
            `SHARE_TOLERANCE` from zeda's: left out of the comparison, unless no rule is within
            it (then the nearest are compared and ``rule`` is among these).
    """

    split: str
    zero_share: float
    zeda: dict[str, float]
    rule: str
    rule_figures: dict[str, float]
    increase_ratio: float
    better_on_all: bool
    beats: bool
    beaten_by: dict[str, list[str]] = field(default_factory=dict)
    tokens: int = 0
    rules: list[dict[str, Any]] = field(default_factory=list)
    unmatched: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable; NaN as None)."""
        return _finite(asdict(self))

    def named_rule(self) -> tuple[str, dict[str, float]]:
        """The rule a warning names: the best rule if it beats zeda on some figure, else the
        first rule that does (else the best rule), with its figures."""
        label = self.rule if self.rule in self.beaten_by or not self.beaten_by else next(iter(self.beaten_by))
        row = next((r for r in self.rules if r.get("rule") == label), self.rule_figures)
        return label, {k: float(row[k]) for k in ("zero_share", *METRICS)}

    def summary(self) -> str:
        """One or two lines: who wins on this split, and by how much."""
        z, r = self.zeda, self.rule_figures
        ratio = "n/a" if not math.isfinite(self.increase_ratio) else f"{self.increase_ratio:.2f}x"
        figures = (
            f"zeda {z['ppl_ratio']:.4f} / {z['top1_agreement']:.3f} / {z['mean_kl']:.4f} vs "
            f"{self.rule} {r['ppl_ratio']:.4f} / {r['top1_agreement']:.3f} / {r['mean_kl']:.4f} "
            "(ppl ratio / top-1 agreement / KL)"
        )
        if self.beats and z["ppl_ratio"] <= 1.0:
            head = (
                f"zeda beats every training-free rule on {self.split} text at {self.zero_share:.1%} skipped: "
                f"its perplexity is at or below the original's, the best rule's is {r['ppl_ratio'] - 1:+.2%}"
            )
        elif self.beats:
            head = (
                f"zeda beats every training-free rule on {self.split} text at {self.zero_share:.1%} skipped: "
                f"its perplexity increase is {ratio} the best rule's"
            )
        else:
            which = ", ".join(f"{k} ({', '.join(v)})" for k, v in self.beaten_by.items())
            head = (
                f"zeda does NOT beat every training-free rule on {self.split} text at "
                f"{self.zero_share:.1%} skipped (perplexity increase {ratio} the best rule's); "
                f"better than zeda: {which}"
            )
        if self.rule in self.unmatched:
            figures += (
                f"\n  no rule reaches {self.zero_share:.1%} skipped: compared with the nearest, "
                f"at {self.rule_figures['zero_share']:.1%}"
            )
        elif self.unmatched:
            left = ", ".join(f"{k} at {v:.1%}" for k, v in self.unmatched.items())
            figures += f"\n  not compared (cannot reach {self.zero_share:.1%} skipped): {left}"
        return f"{head}\n  {figures}"


def compare(
    zeda: dict[str, float],
    rules: list[dict[str, Any]],
    split: str,
    tokens: int = 0,
    share_tolerance: float = SHARE_TOLERANCE,
) -> Verdict:
    """The `Verdict` of ``zeda`` against ``rules`` (each calibrated to zeda's share on the same text).

    Args:
        zeda: ``zero_share``, ``ppl_ratio``, ``top1_agreement``, ``mean_kl``.
        rules: One dict per rule with ``rule`` (its label), ``zero_share`` (measured) and the
            three figures.
        split: Which text (``"validation"``, ``"test"``).
        tokens: Tokens scored.
        share_tolerance: Largest ``|rule share - zeda share|`` of a compared rule.

    Returns:
        The verdict.

    Raises:
        ValueError: if ``rules`` is empty.
    """
    if not rules:
        raise ValueError("compare needs at least one rule")
    # A share that was not measured (NaN) cannot rule a rule out: it is compared.
    gap = {id(r): _gap(r["zero_share"], zeda["zero_share"]) for r in rules}
    unmatched = {str(r["rule"]): float(r["zero_share"]) for r in rules if gap[id(r)] > share_tolerance}
    matched = [r for r in rules if gap[id(r)] <= share_tolerance]
    if not matched:
        nearest = min(gap.values())
        matched = [r for r in rules if gap[id(r)] == nearest]
    all_rules, rules = rules, matched
    best = min(rules, key=lambda r: r["ppl_ratio"])
    rule_increase = best["ppl_ratio"] - 1.0
    ratio = (zeda["ppl_ratio"] - 1.0) / rule_increase if rule_increase > 0 else math.nan
    beaten_by = {
        r["rule"]: [k for k in METRICS if not _not_worse(zeda, r, k)]
        for r in rules
        if not all(_not_worse(zeda, r, k) for k in METRICS)
    }
    return Verdict(
        split=split,
        zero_share=float(zeda["zero_share"]),
        zeda={k: float(zeda[k]) for k in METRICS},
        rule=str(best["rule"]),
        rule_figures={k: float(best[k]) for k in ("zero_share", *METRICS)},
        increase_ratio=float(ratio),
        better_on_all=all(_not_worse(zeda, best, k) for k in METRICS),
        beats=not beaten_by,
        beaten_by=beaten_by,
        tokens=int(tokens),
        rules=[dict(r) for r in all_rules],
        unmatched=unmatched,
    )


def _gap(a: Any, b: Any) -> float:
    d = abs(float(a) - float(b))
    return d if math.isfinite(d) else 0.0


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
