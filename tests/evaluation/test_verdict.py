"""`zeda.evaluation.verdict.compare`: who wins, by how much, and what a warning names."""

from __future__ import annotations

import json
import math

import pytest

from zeda.evaluation.verdict import SHARE_TOLERANCE, compare


def rule(label, ppl, agr, kl, share=0.5):
    return {"rule": label, "zero_share": share, "ppl_ratio": ppl, "top1_agreement": agr, "mean_kl": kl}


ZEDA = {"zero_share": 0.5, "ppl_ratio": 1.01, "top1_agreement": 0.95, "mean_kl": 0.02}


def test_beats_when_not_worse_than_every_rule_on_all_three():
    v = compare(ZEDA, [rule("a", 1.04, 0.90, 0.05), rule("b", 1.05, 0.95, 0.02)], "validation", tokens=10)
    assert v.beats and v.better_on_all and v.beaten_by == {}
    assert v.rule == "a" and v.increase_ratio == pytest.approx(0.01 / 0.04)
    assert "beats every training-free rule" in v.summary() and "0.25x" in v.summary()
    assert json.loads(json.dumps(v.to_dict()))["tokens"] == 10


def test_a_perplexity_below_the_originals_is_said_so_not_as_a_negative_ratio():
    below = {**ZEDA, "ppl_ratio": 0.99}
    v = compare(below, [rule("a", 1.0875, 0.77, 0.10)], "validation")
    assert v.beats and v.increase_ratio < 0
    assert "at or below the original's" in v.summary() and "+8.75%" in v.summary()
    assert "x the best rule's" not in v.summary()


def test_a_rule_better_on_one_figure_is_named():
    rules = [rule("best_ppl", 1.02, 0.90, 0.05), rule("agrees", 1.03, 0.96, 0.03)]
    v = compare(ZEDA, rules, "validation")
    assert not v.beats and v.better_on_all  # better than the best rule, not than every rule
    assert v.beaten_by == {"agrees": ["top1_agreement"]}
    assert v.named_rule()[0] == "agrees"
    assert "NOT" in v.summary() and "agrees (top1_agreement)" in v.summary()


def test_the_best_rule_is_named_when_it_wins_and_ratio_is_nan_when_it_loses_nothing():
    v = compare(ZEDA, [rule("free", 1.0, 0.97, 0.01), rule("other", 1.2, 0.8, 0.1)], "test")
    assert not v.beats and not v.better_on_all
    assert v.named_rule() == (
        "free",
        {"zero_share": 0.5, "ppl_ratio": 1.0, "top1_agreement": 0.97, "mean_kl": 0.01},
    )
    assert math.isnan(v.increase_ratio) and v.to_dict()["increase_ratio"] is None
    assert "n/a" in v.summary() and "test text" in v.summary()


def test_no_rules_is_an_error():
    with pytest.raises(ValueError):
        compare(ZEDA, [], "validation")


def test_a_rule_that_cannot_reach_zedas_share_is_not_compared():
    # Keep-top-m on a top-2 router reaches 0%, 50% or 100% only: at 25% its nearest calibration
    # is the original model (share 0), which is no comparison at 25%.
    at25 = {**ZEDA, "zero_share": 0.246, "ppl_ratio": 0.997}
    rules = [rule("keep_top_m m=2", 1.0, 1.0, 0.0, share=0.0), rule("top_p", 1.02, 0.93, 0.02, share=0.247)]
    v = compare(at25, rules, "test")
    assert v.unmatched == {"keep_top_m m=2": 0.0} and v.rule == "top_p" and v.beats
    assert len(v.rules) == 2 and "not compared" in v.summary() and "keep_top_m m=2 at 0.0%" in v.summary()
    # Within the tolerance a rule is compared, on whichever side of zeda's share it sits.
    near = [rule("keep_top_m m=1", 1.0, 1.0, 0.0, share=0.246 + SHARE_TOLERANCE - 1e-6)]
    assert not compare(at25, near, "test").beats
    # No rule within reach: the nearest ones are compared rather than none.
    far = [rule("a", 1.0, 1.0, 0.0, share=0.0), rule("b", 1.1, 0.9, 0.1, share=0.6)]
    v = compare(at25, far, "test")
    assert v.rule == "a" and v.unmatched == {"a": 0.0, "b": 0.6} and not v.beats
    assert "no rule reaches 24.6% skipped: compared with the nearest, at 0.0%" in v.summary()


def test_an_unmeasured_share_compares_every_rule():
    unknown = {**ZEDA, "zero_share": math.nan}
    v = compare(unknown, [rule("a", 1.04, 0.90, 0.05, share=0.1), rule("b", 1.05, 0.95, 0.02)], "test")
    assert v.unmatched == {} and v.rule == "a" and v.beats
